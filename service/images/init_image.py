"""Img2img's starting image: decoded from base64 text or uploaded bytes (PIL; nothing is ever unpickled), sized
and turned into the pixels the VAE encodes, as diffusers' img2img pipelines preprocess them."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import torch
from torch import Tensor

from ..errors import BadRequestError

__all__ = ["decode_b64", "model_pixels", "open_image", "pixels_for"]

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_b64(text: str, field: str) -> bytes:
    """The bytes of base64 `text` (a `data:image/...;base64,` prefix allowed, as A1111 clients send); a 400 naming
    `field` when it is not base64."""
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{field} is not base64-encoded image data: {exc}", code="invalid_image") from exc


def open_image(data: bytes, field: str, max_pixels: int, mode: str | None = "RGB") -> Any:
    """A PIL image from PNG / JPEG / WebP / ... file bytes, in `mode` (None: its own, an inpainting mask's alpha
    kept); a 400 for data that is not an image or whose pixel count is over `max_pixels` (checked from the header,
    before the pixels are decoded)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; PIL's own bomb check is far above ours
        width, height = image.size
        if width * height > max_pixels:
            raise BadRequestError(
                f"{field}: a {width}x{height} image is over this server's {max_pixels}-pixel limit "
                "(--max-image-pixels)",
                code="invalid_image",
            )
        image.load()  # decodes it (the first frame of an animation)
        return image if mode is None else image.convert(mode)
    except BadRequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequestError(f"{field} is not a readable image file: {exc}", code="invalid_image") from exc


def pixels_for(
    processor: Any,
    image: Any,
    size: tuple[int, int],
    crop: tuple[int, int, int, int] | None = None,
    resize: str = "default",
) -> Tensor:
    """`image` resized as the img2img pipelines' preprocessing resizes it (`processor`: the pipeline's
    `VaeImageProcessor`) to `size` = `(width, height)`: `resize` "default" stretches it (Lanczos; none when it has
    that size already), "crop" scales it to cover the size and crops the centre, "fill" scales it to fit and fills
    the sides from its edges (`VaeImageProcessor.resize`'s modes, A1111's resize modes 1 and 2); with `crop`, that
    region of it resized to fill the size, as the inpainting pipelines' `padding_mask_crop` does. Kept as
    `(1, 3, H, W)` uint8: a quarter of the float pixels' memory while it waits in the queue (`model_pixels` makes
    those, exactly)."""
    import numpy as np

    width, height = size
    if crop is not None:
        image = image.crop(crop)
    resized = processor.resize(image, height=height, width=width, resize_mode=resize if crop is None else "fill")
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)


def model_pixels(pixels: Tensor) -> Tensor:
    """uint8 `pixels` as `VaeImageProcessor.preprocess` gives the VAE: float32 in [0, 1], then in [-1, 1]
    (`(1, 3, H, W)`; the same bits as its own path from the picture, tested)."""
    return pixels.float() / 255.0 * 2.0 - 1.0
