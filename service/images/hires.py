"""A1111's hires fix: the second pass a txt2img request asks for (`enable_hr`), and the first pass's images (pictures
or latents) upscaled to its size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from ..errors import BadRequestError
from .backend import round_to_unit
from .schemas import Txt2ImgRequest

__all__ = ["Hires", "hires_pass", "upscaled_to"]


@dataclass(frozen=True)
class Hires:
    """The hires fix's second pass: each image upscaled to `size`, its picture with PIL's `resample` or (`latent`:
    `(mode, antialias)` of `F.interpolate`) its latents, then img2img at `strength` over `steps` (diffusers'
    img2img: `int(steps x strength)` of them run), same seed and adapters."""

    size: tuple[int, int]
    resample: int | None
    latent: tuple[str, bool] | None
    steps: int
    strength: float
    upscaler: str


_PIXEL_UPSCALERS = {"lanczos": 1, "nearest": 0}  # PIL.Image.Resampling.LANCZOS, NEAREST
_LATENT_UPSCALERS = {  # A1111's latent upscale modes
    "latent": ("bilinear", False), "latent (antialiased)": ("bilinear", True), "latent (bicubic)": ("bicubic", False),
    "latent (bicubic antialiased)": ("bicubic", True), "latent (nearest)": ("nearest", False),
    "latent (nearest-exact)": ("nearest-exact", False),
}  # fmt: skip


def hires_pass(body: Txt2ImgRequest, size: tuple[int, int], unit: int) -> Hires:
    """The second pass `body` asks for (no `hr_upscaler`: A1111's default, `Latent`); a 400 for model upscalers."""
    upscaler = (body.hr_upscaler or "Latent").strip()
    name = upscaler.lower()
    if name not in _PIXEL_UPSCALERS and name not in _LATENT_UPSCALERS:
        raise BadRequestError(
            f"hr_upscaler {upscaler!r} is not served; the latent upscalers ({', '.join(_LATENT_UPSCALERS)}) and "
            "the pixel upscalers 'Lanczos' and 'Nearest' are (not upscaling models such as ESRGAN)",
            code="invalid_request",
        )
    width, height = size
    x, y = body.hr_resize_x, body.hr_resize_y
    if not x and not y:
        x, y = int(width * body.hr_scale), int(height * body.hr_scale)
    elif not y:
        y = x * height // width
    elif not x:
        x = y * width // height
    target = round_to_unit(x, y, unit)
    steps = body.hr_second_pass_steps or body.steps
    resample, latent = _PIXEL_UPSCALERS.get(name), _LATENT_UPSCALERS.get(name)
    return Hires(target, resample, latent, steps, body.denoising_strength, upscaler)


def upscaled_to(hires: Hires, images: Sequence[Any], factor: int) -> list[Any]:
    """The first pass's images (PIL pictures, or `(1, C, h, w)` latents for a latent upscaler) at the hires size
    (`factor`: the VAE's, pixels per latent)."""
    if hires.latent is None:
        return [image.resize(hires.size, hires.resample) for image in images]
    mode, antialias = hires.latent
    size = (hires.size[1] // factor, hires.size[0] // factor)
    return [F.interpolate(latents, size=size, mode=mode, antialias=antialias) for latents in images]
