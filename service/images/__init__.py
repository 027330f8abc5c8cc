"""Diffusion pipelines behind the engine: SD / SDXL / Flux pipelines with per-row LoKr adapters in every step.

Modules: `load` (pipeline dir -> pipeline + adapter container), `rows` (jobs and per-row scheduler state),
`family` (what differs per pipeline family; SD / SDXL) and `flux` (Flux), `steps` (batched text encoding,
denoiser step, VAE encode / decode), `backend` (the engine's `Backend`), `front` (requests -> jobs), `init_image`
(img2img's starting pictures), `inpaint` (masks), `hires` (A1111's hires fix), `samplers`, `schemas`, `routes`
(OpenAI images: generations, edits), `a1111` (AUTOMATIC1111 txt2img / img2img), `tiny` / `tiny_flux` (test
pipelines). Nothing here imports diffusers at import time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["routers"]


def routers(images: bool) -> list[Any]:
    """The routers an app of this kind serves: the image APIs, or 400s for them on a causal-LM server."""
    from . import a1111, routes

    if images:
        return [routes.lm_refusals, routes.router, a1111.router]
    return [routes.refusals_of(routes.router, a1111.router)]
