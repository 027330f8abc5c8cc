"""Shared fixtures' builders for the image tests: tiny pipeline dirs, LoKr adapters (peft's and lokr's), references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import lokr
from service.images.load import LoadedPipeline, load_pipeline
from service.images.tiny import UNET_TARGETS, inject_peft_lokr, save_peft_unet_lokr, save_tiny_pipeline

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def pipeline_dir(root: Path, kind: str) -> Path:
    out = root / f"tiny-{kind}"
    if not (out / "model_index.json").is_file():
        save_tiny_pipeline(out, kind, seed=0)
    return out


def load(path: Path) -> LoadedPipeline:
    return load_pipeline(str(path), "cpu", "float32")


def peft_unet_adapter(path: Path, out: Path, seed: int) -> Path:
    return save_peft_unet_lokr(path, out, seed)


def peft_reference_pipe(path: Path, seed: int) -> Any:
    """The plain diffusers pipeline with the same peft LoKr injected into its UNet (same seed, same factors)."""
    pipe = load(path).pipe
    inject_peft_lokr(pipe.unet, seed)
    return pipe


def own_adapter(path: Path, out: Path, seed: int, scale_down: float = 0.3) -> Path:
    """lokr's own LoKr on the text encoder(s) and the UNet, saved as a PEFT dir (container names)."""
    loaded = load(path)
    torch.manual_seed(seed)
    config = lokr.LoKrConfig(r=4, alpha=4, target_modules=UNET_TARGETS + TE_TARGETS, init_weights=False)
    lokr.inject(loaded.container, config, "own")
    with torch.no_grad():  # keep the random deltas moderate (the image must stay far from saturation)
        for name, p in loaded.container.named_parameters():
            if "lokr_w1" in name:
                p.mul_(scale_down)
    lokr.save_adapter(loaded.container, "own", out)
    return out


def merged_reference_pipe(path: Path, adapter: Path) -> Any:
    """The plain diffusers pipeline with `adapter` merged into its weights."""
    loaded = load(path)
    lokr.load_adapter(loaded.container, adapter, "ref")
    lokr.merge_adapter(loaded.container, "ref")
    return loaded.pipe


def reference_image(pipe: Any, prompt: str, seed: int, size: int = 32, steps: int = 3, **kwargs: Any) -> np.ndarray:
    image = pipe(
        prompt, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images[0]  # fmt: skip
    return np.asarray(image).astype(np.int16)


def reference_latents(pipe: Any, prompt: str, seed: int, size: int = 32, steps: int = 3, **kwargs: Any) -> torch.Tensor:
    return pipe(
        prompt, height=size, width=size, num_inference_steps=steps, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images  # fmt: skip


def assert_pixels_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    assert diff <= 1, f"pixels differ by up to {diff}/255"


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with some texture: far from the tiny VAE's saturation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], axis=-1)
    rgb = rgb + rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def img2img_reference(
    pipe: Any, kind: str, image: Image.Image, prompt: str, seed: int, mask: Image.Image | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """diffusers' own img2img pipeline on `pipe`'s components (its inpainting one with `mask`): (latents, pixels)
    for `seed`."""
    import diffusers

    names = {"sd": "StableDiffusion", "sdxl": "StableDiffusionXL", "flux": "Flux"}
    cls = getattr(diffusers, names[kind] + ("InpaintPipeline" if mask is not None else "Img2ImgPipeline"))
    if kind == "flux" or mask is not None:  # their own default size otherwise, not the image's
        kwargs = {"height": image.height, "width": image.width, **kwargs}
    if mask is not None:
        kwargs["mask_image"] = mask
    img2img = cls.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    out: list[Any] = [None]  # no latents with padding_mask_crop: the answer is pasted into the picture
    for output_type in ("pil",) if "padding_mask_crop" in kwargs else ("latent", "pil"):
        result = img2img(prompt, image=image, generator=torch.Generator("cpu").manual_seed(seed),
                         output_type=output_type, **kwargs).images  # fmt: skip
        out.append(result if output_type == "latent" else np.asarray(result[0]).astype(np.int16))
    return out[-2], out[-1]


def latents_and_pixels(pipe: Any, prompt: str, seed: int, **kwargs: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A diffusers pipeline's final latents (`output_type="latent"`) and its image's pixels `(H, W, 3)` int16 for
    `prompt` and `seed` (a CPU generator), `kwargs` passed on."""
    latents, images = (
        pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type=kind, **kwargs).images
        for kind in ("latent", "pil")
    )
    return latents, np.asarray(images[0]).astype(np.int16)
