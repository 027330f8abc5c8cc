"""Img2img's starting image: decoded from base64 text or uploaded bytes (PIL; nothing is ever unpickled), sized
and turned into the pixels the VAE encodes, as diffusers' img2img pipelines preprocess them."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from torch import Tensor

from ..errors import BadRequestError

__all__ = ["decode_b64", "open_image", "pixels_for"]

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_b64(text: str, field: str) -> bytes:
    """The bytes of base64 `text` (a `data:image/...;base64,` prefix allowed, as A1111 clients send); a 400 naming
    `field` when it is not base64."""
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{field} is not base64-encoded image data: {exc}", code="invalid_image") from exc


def open_image(data: bytes, field: str, max_pixels: int) -> Any:
    """An RGB PIL image from PNG / JPEG / WebP / ... file bytes; a 400 for data that is not an image or whose
    pixel count is over `max_pixels` (checked from the header, before the pixels are decoded)."""
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
        return image.convert("RGB")  # decodes it (the first frame of an animation)
    except BadRequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequestError(f"{field} is not a readable image file: {exc}", code="invalid_image") from exc


def pixels_for(processor: Any, image: Any, size: tuple[int, int]) -> Tensor:
    """`image` as the img2img pipelines preprocess it (`processor`: the pipeline's `VaeImageProcessor`), resized to
    `size` = `(width, height)` ("just resize": stretched, Lanczos; none when it has that size already). Returns
    `(1, 3, H, W)` float32 in [-1, 1]."""
    width, height = size
    pixels: Tensor = processor.preprocess(image, height=height, width=width)
    return pixels.float()
