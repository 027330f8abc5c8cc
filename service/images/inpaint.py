"""Inpainting: a mask over img2img's starting picture says what is repainted (white) and what is kept (black).

As diffusers' inpainting pipelines do with a plain (4-channel, Flux 64-channel) denoiser: the mask is binarised at
the output size and shrunk to the latents' (nearest), and after every step the kept area is set back to the picture's
own latents, noised to the timestep that comes next (none after the last); an inpainting checkpoint's UNet takes the
mask and the masked picture as inputs instead (`sd.StableDiffusion`). How each API states its mask (OpenAI: the
transparent pixels; AUTOMATIC1111: the white ones) becomes one white-is-repainted greyscale picture here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BadRequestError

__all__ = ["Inpaint", "Repaint", "a1111_mask", "latent_mask", "mask_pixels", "openai_mask", "overlay", "repaint_plan"]

Crop = tuple[int, int, int, int]  # (left, top, right, bottom) in the picture's pixels


@dataclass
class Inpaint:
    """What a masked row keeps between steps, each shaped like (or broadcasting to) its latents: `mask` (1 where
    the picture is repainted), the picture's latents `image` and the noise its start was drawn with."""

    mask: Tensor
    image: Tensor
    noise: Tensor

    def blend(self, latents: Tensor, kept: Tensor) -> Tensor:
        """`latents` where the mask repaints, `kept` (the picture's latents at this point of the schedule) elsewhere."""
        return (1 - self.mask) * kept + self.mask * latents


@dataclass(frozen=True)
class Repaint:
    """What a request repaints: `mask`, a white-is-repainted greyscale PIL image (blurred as asked), and with
    "only masked" inpainting the region of the picture (`crop`) inpainted at the output size and pasted back."""

    mask: Any
    crop: Crop | None = None


def repaint_plan(mask: Any, blur: int, padding: int | None, size: tuple[int, int], pictures: list[Any]) -> Repaint:
    """`mask` blurred by `blur` (diffusers' `mask_processor.blur`), and with `padding` (not None) its crop region as
    the inpainting pipelines' `padding_mask_crop` finds it: around the mask's repainted pixels, `padding` more
    on each side, widened to the aspect ratio of `size` = `(width, height)`. A 400 for "only masked" with a mask of
    another size than the pictures, or one that repaints nothing."""
    from diffusers.image_processor import VaeImageProcessor

    if blur > 0:
        mask = VaeImageProcessor.blur(mask, blur)
    if padding is None:
        return Repaint(mask)
    if any(picture.size != mask.size for picture in pictures):
        raise BadRequestError(
            f"inpainting only the masked area needs the mask ({mask.width}x{mask.height}) and every picture to be "
            "the same size",
            code="invalid_image",
        )
    left, top, right, bottom = VaeImageProcessor.get_crop_region(mask, size[0], size[1], pad=padding)
    if right <= left or bottom <= top:
        raise BadRequestError("the mask repaints nothing: mark the area to inpaint white", code="invalid_image")
    return Repaint(mask, (left, top, right, bottom))


def mask_pixels(
    mask: Any, size: tuple[int, int], vae_scale_factor: int, crop: Crop | None = None, resize: str = "default"
) -> Tensor:
    """A white-is-repainted mask (a PIL image) as diffusers' inpainting pipelines preprocess it (their
    `mask_processor`): cropped to `crop` and resized to fill `size` = `(width, height)` when given, else resized
    to it as the picture is (`resize`: `init_image.pixels_for`'s modes), greyscale, binarised at one half;
    `(1, 1, H, W)` bool."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    width, height = size
    resize_mode = resize if crop is None else "fill"
    binary: Tensor = processor.preprocess(mask, height, width, resize_mode=resize_mode, crops_coords=crop) >= 0.5
    return binary


def overlay(processor: Any, repaint: Repaint, picture: Any, image: Any) -> Any:
    """ "Only masked" inpainting's answer: the inpainted `image` resized into its crop of `picture`, where the mask
    repaints (the inpainting pipelines' `apply_overlay`, with `processor` their image processor)."""
    return processor.apply_overlay(repaint.mask, picture, image, repaint.crop)


def latent_mask(mask: Tensor, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A `mask_pixels` mask at the latents' `size` = `(h, w)`: float, nearest-neighbour, `(1, 1, h, w)`."""
    return F.interpolate(mask.float(), size=size).to(device, dtype)


def openai_mask(mask: Any, image_size: tuple[int, int], field: str = "mask") -> Any:
    """OpenAI's edit mask (a picture with an alpha channel whose fully transparent pixels are edited, the size of
    the image) as a white-is-repainted greyscale PIL image; a 400 for a mask without alpha or of another size."""
    if mask.size != image_size:
        raise BadRequestError(
            f"{field} is {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}: the mask must "
            "have the image's size",
            code="invalid_image",
        )
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise BadRequestError(
            f"{field} has no alpha channel: send a PNG whose fully transparent pixels mark what to edit",
            code="invalid_image",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def a1111_mask(mask: Any, invert: bool) -> Any:
    """AUTOMATIC1111's inpainting mask as a white-is-repainted greyscale PIL image: a picture with transparent
    pixels is its alpha channel (opaque: repainted, above 128 counted as opaque), any other its grey levels (white:
    repainted), as A1111 reads it; `invert` (`inpainting_mask_invert`) swaps them."""
    from PIL import ImageOps

    rgba = mask.convert("RGBA") if "A" in mask.getbands() or "transparency" in mask.info else None
    if rgba is not None and rgba.getchannel("A").getextrema() != (255, 255):
        grey = rgba.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    else:
        grey = mask.convert("L")
    return ImageOps.invert(grey) if invert else grey
