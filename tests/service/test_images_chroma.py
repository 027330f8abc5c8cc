"""Chroma pipelines (`ChromaPipeline`: Flux's transformer with an approximator, T5 only, real CFG) against diffusers:
same seed => same latents and pixels, rows with and without CFG, a negative prompt and a peft LoKr adapter sharing
forwards; img2img as `ChromaImg2ImgPipeline`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lokr
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.tiny import inject_peft_lokr, save_peft_lokr
from service.images.tiny_flux import FLUX_TARGETS

from .images_world import assert_pixels_close, latents_and_pixels, load, picture, pipeline_dir
from .test_images_img2img import init_spec
from .test_images_parity import TOL, Run, spec


def chroma_reference(pipe: Any, s: Any, image: Any | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """`ChromaPipeline` (`ChromaImg2ImgPipeline` from `image`) for `s`: (packed latents, pixels)."""
    kwargs: dict[str, Any] = {"height": s.height, "width": s.width, "num_inference_steps": s.steps,
                              "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt}  # fmt: skip
    if image is not None:
        from diffusers import ChromaImg2ImgPipeline

        pipe = ChromaImg2ImgPipeline.from_pipe(pipe)
        kwargs.update(image=image, strength=s.strength)
    return latents_and_pixels(pipe, s.prompt, s.seed, **kwargs)


@pytest.mark.slow
def test_chroma_rows_equal_the_chroma_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CFG row, a row without CFG (guidance 1) joining a step later, a peft LoKr row with a negative prompt and an
    img2img row, in shared forwards: each equals `ChromaPipeline` (or its img2img pipeline) at its seed."""
    from diffusers import ChromaTransformer2DModel

    path = pipeline_dir(tmp_path, "chroma")
    loaded = load(path)
    assert loaded.family == "chroma" and loaded.uses_cfg_model
    transformer = ChromaTransformer2DModel.from_pretrained(path, subfolder="transformer", use_safetensors=True)
    lokr.load_adapter(
        loaded.container, save_peft_lokr(transformer, "transformer", FLUX_TARGETS, tmp_path / "p", 5), "p"
    )
    run = Run(loaded, monkeypatch)
    start = picture(32, 32, seed=3)
    items = [
        (spec("a red cat", 3, steps_=4, guidance=5.0), None),
        (spec("the dog", 4, steps_=3, guidance=1.0), None),
        (spec("a cat on the mat", 5, steps_=4, guidance=4.0, neg="blurry"), "p"),
        (init_spec(loaded, start, 0.6, prompt="a red cat", seed=6, steps_=5, guidance=5.0), None),
    ]
    jobs = run(items, joins=[0, 1, 0, 1])
    for job, (s, sel) in zip(jobs, items):
        pipe = load(path).pipe
        if sel:
            inject_peft_lokr(pipe.transformer, 5, targets=FLUX_TARGETS)
        latents, pixels = chroma_reference(pipe, s, start if s.init is not None else None)
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), pixels)
    plain, _ = chroma_reference(load(path).pipe, items[2][0])
    assert not torch.allclose(run.latents[jobs[2].id], plain, atol=1e-2)  # the adapter changed the image


def test_chroma_refuses_what_it_does_not_serve(tmp_path: Path) -> None:
    from service.images.inpaint import mask_pixels

    loaded = load(pipeline_dir(tmp_path, "chroma"))
    check_spec(loaded, spec("a cat", 1, neg="blurry", guidance=4.0))  # negative prompts are Chroma's own CFG
    with pytest.raises(BadRequestError, match="true_cfg_scale applies to Flux"):
        check_spec(loaded, replace(spec("x", 1), true_cfg_scale=4.0))
    start = init_spec(loaded, picture(32, 32), 0.5, prompt="x", seed=0)
    with pytest.raises(BadRequestError, match="inpainting is not served on Chroma"):
        check_spec(loaded, replace(start, mask=mask_pixels(picture(32, 32).convert("L"), (32, 32), 2)))
    with pytest.raises(BadRequestError, match="latent upscaling"):
        check_spec(loaded, replace(spec("x", 1), latent_output=True))


@pytest.mark.slow
def test_one_file_for_t5_and_transformer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lora_te3_` (sd-scripts' name for T5: Chroma's only `text_encoder`) and `lycoris_` keys in one file load as
    one adapter across both components; the image (with CFG) equals diffusers with LyCORIS's two networks applied."""
    from .flux_world import MULT, lycoris_networks_file, register_linear_preset

    register_linear_preset(monkeypatch)
    path = pipeline_dir(tmp_path, "chroma")
    reference = load(path).pipe
    file = lycoris_networks_file(tmp_path / "all.safetensors", [("lora_te3", reference.text_encoder),
                                                                ("lycoris", reference.transformer)])  # fmt: skip
    loaded = load(path)
    info = lokr.load_adapter(loaded.container, file, "all")
    assert {m.split(".")[0] for m in info.modules} == {"text_encoder", "transformer"}
    run = Run(loaded, monkeypatch)
    s = spec("a red cat", 21, guidance=4.0, neg="blurry")
    base, styled = run([(s, None), (s, [("all", MULT)])])
    assert np.abs(run.pixels(styled) - run.pixels(base)).max() > 8
    latents, pixels = chroma_reference(reference, s)
    torch.testing.assert_close(run.latents[styled.id], latents, **TOL)
    assert_pixels_close(run.pixels(styled), pixels)


@pytest.mark.slow
def test_a_chroma_dir_is_served_over_both_routes(tmp_path: Path) -> None:
    """`lokr-serve serve --model <ChromaPipeline dir>`: the OpenAI route's image (a negative prompt, CFG) and
    A1111's equal the pipeline's."""
    import base64
    import io

    import httpx
    from PIL import Image

    from .conftest import World, start_server, stop_server

    model = pipeline_dir(tmp_path, "chroma")
    (tmp_path / "adapters").mkdir()
    server = start_server(World(tmp_path, model, tmp_path / "adapters", {}), "--device", "cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            openai = http.post("/v1/images/generations", json={
                "prompt": "a red cat", "size": "32x32", "num_inference_steps": 3, "seed": 7, "guidance_scale": 4.0,
                "negative_prompt": "blurry"})  # fmt: skip
            a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "steps": 3, "cfg_scale": 4.0,
                                                         "seed": 7, "width": 32, "height": 32})  # fmt: skip
    finally:
        stop_server(server)
    assert openai.status_code == 200 and a1111.status_code == 200, (openai.text, a1111.text)
    pipe = load(model).pipe
    for answer, negative in ((openai.json()["data"][0]["b64_json"], "blurry"), (a1111.json()["images"][0], "")):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer))).convert("RGB")).astype(np.int16)
        _, want = chroma_reference(pipe, spec("a red cat", 7, steps_=3, guidance=4.0, neg=negative))
        assert_pixels_close(got, want)
