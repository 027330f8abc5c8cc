"""Diffusion pipelines behind the engine: SD / SDXL pipelines with per-row LoKr adapters in every step.

Modules: `load` (pipeline dir -> pipeline + adapter container), `rows` (jobs and per-row scheduler state),
`steps` (batched text encoding, denoiser step, VAE decode), `backend` (the engine's `Backend`), `front`
(requests -> jobs), `schemas`, `routes` (OpenAI images), `a1111` (AUTOMATIC1111 txt2img), `tiny` (test
pipelines). Nothing here imports diffusers at import time.
"""
