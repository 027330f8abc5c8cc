"""Load a diffusers pipeline dir (safetensors only) and the adapter container over its components."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backend import ModelLoadError, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from .family import Family

__all__ = ["ADAPTER_COMPONENTS", "FAMILIES", "LoadedPipeline", "is_pipeline_dir", "load_pipeline"]

# diffusers pipeline class -> our family name; anything else is refused with this list.
FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
    # inpainting checkpoints (a 9-channel UNet: latents, mask, masked picture; Flux Fill: the packed masked
    # picture's latents and mask after the packed latents), or plain ones saved by these classes
    "StableDiffusionInpaintPipeline": "sd", "StableDiffusionXLInpaintPipeline": "sdxl", "FluxFillPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3InpaintPipeline": "sd3",  # a 16-channel transformer
    "FluxKontextPipeline": "flux-kontext",  # Flux's transformer, edits from a reference picture
    "ChromaPipeline": "chroma",  # Flux's transformer with an approximator, T5 only, real CFG
    # SD / SDXL with one ControlNet: every image takes a control image
    "StableDiffusionControlNetPipeline": "sd", "StableDiffusionXLControlNetPipeline": "sdxl",
}  # fmt: skip
# Components adapters may target (the container's keys, as in kohya's lora_unet_ / lora_te1_ / lora_te2_).
ADAPTER_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class LoadedPipeline:
    """A pipeline ready to serve: `container` holds the components adapters attach to (ModuleDict)."""

    pipe: Any  # diffusers StableDiffusionPipeline | StableDiffusionXLPipeline | FluxPipeline
    container: nn.ModuleDict
    family: str  # "sd" | "sdxl" | "sd3" | "flux" | "flux-kontext" | "chroma"
    device: torch.device
    dtype: torch.dtype

    @cached_property
    def ops(self) -> Family:
        """The family's encode / start / denoiser-batch / decode parts (`family.Family`), made once."""
        from .family import family_ops

        return family_ops(self.family)

    @property
    def controlnet(self) -> Any:
        """The pipeline's ControlNet (`StableDiffusionControlNetPipeline`), or None."""
        return getattr(self.pipe, "controlnet", None)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def masked_channels(self) -> int:
        """Input channels an inpainting checkpoint's denoiser takes beyond the latents: the mask and the masked
        picture's latents (5 on SD / SDXL inpainting models; Flux Fill: 4C + 4f^2 of its packed tokens, 320);
        0 for other denoisers."""
        latent, inputs = _input_channels(self.pipe, self.family)
        return inputs - latent

    @property
    def default_size(self) -> tuple[int, int]:
        """`(width, height)` the pipeline draws when none is given (SD: the UNet's sample size x VAE factor)."""
        return self.ops.default_size(self.pipe)

    @property
    def default_steps(self) -> int:
        return int(_call_default(self.pipe, "num_inference_steps", 50))

    @property
    def default_guidance(self) -> float:
        return float(_call_default(self.pipe, "guidance_scale", 7.5))

    @property
    def uses_cfg_model(self) -> bool:
        """Classifier-free guidance rows are possible (SD without a guidance-distilled timestep_cond; not Flux)."""
        return self.ops.uses_cfg(self.pipe)


def _call_default(pipe: Any, name: str, fallback: object) -> Any:
    """The pipeline's own `__call__` default for `name` (e.g. 50 steps, guidance 7.5 for SD, 5.0 for SDXL)."""
    import inspect

    param = inspect.signature(pipe.__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def is_pipeline_dir(source: str | None) -> bool:
    return bool(source) and (Path(str(source)) / "model_index.json").is_file()


def load_pipeline(source: str, device: str = "auto", dtype: str = "auto") -> LoadedPipeline:
    """Load an SD 1.x/2.x-, SDXL- or Flux-style pipeline dir onto the device/dtype; eval mode, no grads."""
    path = Path(source)
    cls_name = _pipeline_class(path)
    _check_safetensors(path)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # its loading bars would break the server's log lines
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:  # the named class only: never a custom pipeline's code from the dir
        pipe = getattr(diffusers, cls_name).from_pretrained(path, torch_dtype=dt, use_safetensors=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the diffusers pipeline in {path}: {exc}") from exc
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # what the pipeline does before decoding (fp16 VAEs overflow)
    _name_text_model(pipe)
    _check_inputs(pipe, path, FAMILIES[cls_name])
    parts = {n: getattr(pipe, n) for n in ADAPTER_COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)}
    controlnet = _one_controlnet(pipe, path)
    for module in [*parts.values(), pipe.vae, *([controlnet] if controlnet is not None else [])]:
        module.eval()
        module.requires_grad_(False)
    return LoadedPipeline(pipe, nn.ModuleDict(parts), FAMILIES[cls_name], dev, dt)


def _one_controlnet(pipe: Any, path: Path) -> Any:
    """The pipeline's ControlNet, None without one; several (a `MultiControlNetModel`) are refused."""
    from diffusers import ControlNetModel

    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None and not isinstance(controlnet, ControlNetModel):
        raise ModelLoadError(f"{path}: a pipeline with {type(controlnet).__name__}; lokr-serve serves one ControlNet")
    if controlnet is not None and getattr(controlnet, "config", {}).get("global_pool_conditions", False):
        raise ModelLoadError(f"{path}: a ControlNet with global_pool_conditions (shuffle-style, always in guess "
                             "mode) is not served")  # fmt: skip
    return controlnet


def _name_text_model(pipe: Any) -> None:
    """diffusers' SD `clip_skip` reads `text_encoder.text_model.final_layer_norm`; transformers 5's CLIPTextModel
    holds `final_layer_norm` itself, with no `text_model`. Name the model itself so (a plain attribute, not a
    submodule: module names, adapter keys and weights stay as they are)."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        named = isinstance(encoder, nn.Module) and "text_model" in encoder._modules
        if isinstance(encoder, nn.Module) and not named and hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", encoder)


def _input_channels(pipe: Any, family: str) -> tuple[int, int]:
    """`(latent, input)` channels of the denoiser: the latents' (Flux: packed 2x2, 4C) and what it takes."""
    latent = int(pipe.vae.config.latent_channels)
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return latent, int(unet.config.in_channels)
    packed = family in ("flux", "flux-kontext", "chroma")  # 2x2 latent patches per token
    return (4 if packed else 1) * latent, int(pipe.transformer.config.in_channels)


def _check_inputs(pipe: Any, path: Path, family: str) -> None:
    """A denoiser takes the VAE's latents, or (an inpainting checkpoint: SD, SDXL, Flux) those plus a mask and the
    masked picture's latents; other input layouts (depth, control, upscaler models) are refused."""
    latent, inputs = _input_channels(pipe, family)
    unet = getattr(pipe, "unet", None) is not None
    fill = latent + 1 if unet else latent + 4 * int(pipe.vae_scale_factor) ** 2  # the mask's channels
    fills = family in ("sd", "sdxl", "flux")  # families with inpainting checkpoints (SD3 inpaints with its own)
    if inputs not in ((latent, latent + fill) if fills else (latent,)):
        name = "UNet" if unet else "transformer"
        inpainting = f" or {latent + fill} (an inpainting model: latents, masked picture, mask)" if fills else ""
        raise ModelLoadError(
            f"{path}: the {name} takes {inputs} input channels; lokr-serve serves {name}s of {latent} (the latents)"
            f"{inpainting}"
        )


def _pipeline_class(path: Path) -> str:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/model_index.json is not readable JSON: {exc}") from exc
    name = str(index.get("_class_name", ""))
    if name not in FAMILIES:
        raise ModelLoadError(
            f"{path} holds a {name or 'unnamed'} pipeline; lokr-serve serves {sorted(FAMILIES)} "
            "(Stable Diffusion 1.x/2.x and SDXL with or without a ControlNet, SD3, Flux, Flux Kontext and Chroma style)"
        )
    return name


def _check_safetensors(path: Path) -> None:
    """Refuse component dirs whose weights are pickles only (they would be unpickled)."""
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f.name for f in sub.iterdir() if f.is_file()]
        pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if pickled and not any(f.endswith(".safetensors") for f in files):
            raise ModelLoadError(
                f"{sub} has pickle weights only ({pickled[:2]}); lokr-serve loads safetensors only: "
                "convert them (e.g. `pipe.save_pretrained(dir, safe_serialization=True)`)"
            )
