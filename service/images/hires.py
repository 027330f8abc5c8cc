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

__all__ = ["LATENT_UPSCALERS", "PIXEL_UPSCALERS", "Hires", "hires_pass", "upscaled_to"]


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


PIXEL_UPSCALERS = {"Lanczos": 1, "Nearest": 0}  # PIL.Image.Resampling.LANCZOS, NEAREST
LATENT_UPSCALERS = {  # A1111's latent upscale modes: F.interpolate's (mode, antialias)
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True), "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True), "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}  # fmt: skip
_PIXEL_UPSCALERS = {name.lower(): resample for name, resample in PIXEL_UPSCALERS.items()}  # names any case
_LATENT_UPSCALERS = {name.lower(): mode for name, mode in LATENT_UPSCALERS.items()}


def hires_pass(body: Txt2ImgRequest, size: tuple[int, int], unit: int) -> Hires:
    """The second pass `body` asks for (no `hr_upscaler`: A1111's default, `Latent`); a 400 for model upscalers."""
    upscaler = (body.hr_upscaler or "Latent").strip()
    name = upscaler.lower()
    if name not in _PIXEL_UPSCALERS and name not in _LATENT_UPSCALERS:
        raise BadRequestError(
            f"hr_upscaler {upscaler!r} is not served; the latent upscalers ({', '.join(LATENT_UPSCALERS)}) and "
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
