"""SD3-style pipelines (`StableDiffusion3Pipeline`: MMDiT, CLIP-L / CLIP-G / T5, flow matching) against diffusers:
same seed => same latents and pixels, rows with and without CFG and with a peft LoKr adapter sharing forwards;
img2img and inpainting rows as diffusers' SD3 img2img and inpainting pipelines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lokr
from lokr.errors import UnsupportedAdapterError
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.tiny import inject_peft_lokr, save_peft_lokr

from ..lokr.lyco import EVERY_LAYER, MULT, kohya_file, register_presets
from .images_world import assert_pixels_close, latents_and_pixels, load, picture, pipeline_dir
from .sd3_world import sai_twin, sai_twin_to_diffusers
from .test_images_img2img import init_spec
from .test_images_inpaint import masked_spec, square_mask
from .test_images_parity import TOL, Run, spec

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.2", "ff_context.net.2"]  # fmt: skip


def _reference(pipe: Any, s: Any) -> tuple[torch.Tensor, np.ndarray]:
    kwargs = {"height": s.height, "width": s.width, "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale,
              "negative_prompt": s.negative_prompt}  # fmt: skip
    return latents_and_pixels(pipe, s.prompt, s.seed, **kwargs)


@pytest.mark.slow
def test_sd3_rows_equal_the_sd3_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CFG row, a row without CFG (guidance 1) joining a step later, and a peft LoKr row with a negative prompt,
    in shared forwards: each equals `StableDiffusion3Pipeline` at its seed (the LoKr row: with peft's LoKr on the
    transformer)."""
    from diffusers import SD3Transformer2DModel

    path = pipeline_dir(tmp_path, "sd3")
    loaded = load(path)
    assert loaded.family == "sd3" and loaded.masked_channels == 0
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", use_safetensors=True)
    lokr.load_adapter(loaded.container, save_peft_lokr(transformer, "transformer", SD3_TARGETS, tmp_path / "p", 5), "p")
    run = Run(loaded, monkeypatch)
    items = [
        (spec("a red cat", 3, steps_=4, guidance=7.0), None),
        (spec("the dog", 4, steps_=3, guidance=1.0), None),
        (spec("a cat on the mat", 5, steps_=4, guidance=5.0, neg="blurry"), "p"),
    ]
    jobs = run(items, joins=[0, 1, 0])
    for job, (s, sel) in zip(jobs, items):
        pipe = load(path).pipe
        if sel:
            inject_peft_lokr(pipe.transformer, 5, targets=SD3_TARGETS)
        latents, pixels = _reference(pipe, s)
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), pixels)
    plain, _ = _reference(load(path).pipe, items[2][0])
    assert not torch.allclose(run.latents[jobs[2].id], plain, atol=1e-2)  # the adapter changed the image


@pytest.mark.slow
def test_sd3_img2img_rows_equal_the_sd3_img2img_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Img2img rows (strength 0.6 and 1) beside a text-to-image row: each equals
    `StableDiffusion3Img2ImgPipeline` (or the text-to-image pipeline) at its seed."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    path = pipeline_dir(tmp_path, "sd3")
    loaded = load(path)
    run = Run(loaded, monkeypatch)
    image = picture(32, 32, seed=3)
    items = [
        (init_spec(loaded, image, 0.6, prompt="a red cat", seed=3, steps_=5, guidance=7.0), None),
        (spec("the dog", 4, steps_=3, guidance=7.0), None),
        (init_spec(loaded, image, 1.0, prompt="a cat", seed=5, steps_=3, guidance=4.0), None),
    ]
    jobs = run(items, joins=[0, 1, 1])
    for job, (s, _) in zip(jobs, items):
        pipe = load(path).pipe
        if s.init is None:
            latents, pixels = _reference(pipe, s)
        else:
            img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
            kwargs = {"image": image, "strength": s.strength, "num_inference_steps": s.steps,
                      "guidance_scale": s.guidance_scale, "height": 32, "width": 32}  # fmt: skip
            latents, out = (
                img2img(s.prompt, generator=torch.Generator("cpu").manual_seed(s.seed), output_type=kind, **kwargs)
                .images for kind in ("latent", "pil")
            )  # fmt: skip
            pixels = np.asarray(out[0]).astype(np.int16)
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), pixels)


@pytest.mark.slow
def test_kohya_sai_layout_file_splits_fused_layers_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sd-scripts' SD3 keys (SAI's MMDiT layout: `lora_unet_joint_blocks_0_x_block_attn_qkv`, SD3.5's `attn2`, the
    last block's context stream, the patch embedding Conv2d, ...) written by LyCORIS's kohya network on an SAI-named
    twin of the transformer: every layer maps, fused q / k / v rows and swapped modulation halves split onto
    diffusers' layers; the image equals diffusers with the twin's merged weights converted into it. Factors whose
    rows do not split at the layer boundaries are refused, naming the keys."""
    register_presets(monkeypatch)
    path = pipeline_dir(tmp_path, "sd3")
    reference = load(path).pipe
    twin = sai_twin(reference.transformer)
    sai = tmp_path / "sai.safetensors"
    kohya_file(sai, None, twin, 4, 2.0, factor=7, preset=EVERY_LAYER)  # w2's 8 rows divide every q / k / v bound
    sai_twin_to_diffusers(twin, reference.transformer)
    loaded = load(path)
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    layers = [n for n, m in loaded.pipe.transformer.named_modules() if isinstance(m, kinds)]
    info = lokr.load_adapter(loaded.container, sai, "sai")
    assert sorted(info.modules) == sorted(f"transformer.{n}" for n in layers)
    run = Run(loaded, monkeypatch)
    s = spec("a red cat", 13, steps_=3, guidance=5.0)
    base, styled = run([(s, None), (s, [("sai", MULT)])])
    assert np.abs(run.pixels(styled) - run.pixels(base)).max() > 8
    latents, pixels = _reference(reference, s)
    torch.testing.assert_close(run.latents[styled.id], latents, **TOL)
    assert_pixels_close(run.pixels(styled), pixels)
    kohya_file(tmp_path / "f4.safetensors", None, sai_twin(load(path).pipe.transformer), 4, 2.0, factor=4,
               preset=EVERY_LAYER)  # fmt: skip
    refused = r"lora_unet_joint_blocks_0_(x_block_attn2?|context_block_attn)_qkv"
    with pytest.raises(UnsupportedAdapterError, match=refused):
        lokr.load_adapter(loaded.container, tmp_path / "f4.safetensors", "f4")
    assert lokr.list_adapters(loaded.container) == ["sai"]


def _inpaint_reference(pipe: Any, image: Any, mask: Any, s: Any) -> tuple[torch.Tensor, np.ndarray]:
    """`StableDiffusion3InpaintPipeline`'s latents for `s`, and their pixels decoded as SD3's text-to-image pipeline
    decodes (with the VAE's shift factor, which the inpainting pipeline's own decode leaves out)."""
    from diffusers import StableDiffusion3InpaintPipeline

    inpaint = StableDiffusion3InpaintPipeline.from_pipe(pipe)
    latents = inpaint(
        s.prompt, image=image, mask_image=mask, strength=s.strength, num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
        generator=torch.Generator("cpu").manual_seed(s.seed), output_type="latent",
    ).images  # fmt: skip
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    out = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    return latents, np.asarray(out).astype(np.int16)


@pytest.mark.slow
def test_sd3_masked_rows_equal_the_sd3_inpaint_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked rows (strength 0.7 and 1, one with a peft LoKr adapter) beside a text-to-image row: each equals
    `StableDiffusion3InpaintPipeline` at its seed; outside the mask the answer keeps the picture's latents."""
    from diffusers import SD3Transformer2DModel

    path = pipeline_dir(tmp_path, "sd3")
    loaded = load(path)
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", use_safetensors=True)
    lokr.load_adapter(loaded.container, save_peft_lokr(transformer, "transformer", SD3_TARGETS, tmp_path / "p", 5), "p")
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32, seed=2), square_mask(32, (8, 0, 24, 16))
    items = [
        (spec("the dog", 4, steps_=3, guidance=7.0), None),
        (masked_spec(loaded, image, mask, 0.7, prompt="a red cat", seed=3, steps_=5, guidance=6.0), None),
        (masked_spec(loaded, image, mask, 1.0, prompt="a cat", seed=5, steps_=3, guidance=4.0, neg="blue"), None),
        (masked_spec(loaded, image, mask, 0.8, prompt="a cat", seed=6, steps_=4, guidance=5.0), "p"),
    ]
    jobs = run(items, joins=[0, 1, 0, 1])
    for job, (s, sel) in list(zip(jobs, items))[1:]:
        pipe = load(path).pipe
        if sel:
            inject_peft_lokr(pipe.transformer, 5, targets=SD3_TARGETS)
        latents, pixels = _inpaint_reference(pipe, image, mask, s)
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), pixels)
    latents = run.latents[jobs[1].id]
    keep = 1 - torch.nn.functional.interpolate(items[1][0].mask.float(), size=tuple(latents.shape[-2:]))
    picture_latents = run.latents[run([(replace(items[1][0], prompt="a blue bird"), None)])[0].id]
    torch.testing.assert_close(latents * keep, picture_latents * keep, rtol=0, atol=1e-5)


def test_sd3_serves_text_to_image_img2img_and_inpainting_and_refuses_the_rest(tmp_path: Path) -> None:
    from service.images.inpaint import mask_pixels

    loaded = load(pipeline_dir(tmp_path, "sd3"))
    assert loaded.default_size == (32, 32) and loaded.default_guidance == 7.0
    check_spec(loaded, spec("a cat", 1))
    start = init_spec(loaded, picture(32, 32), 0.5, prompt="x", seed=0)
    check_spec(loaded, start)
    check_spec(loaded, replace(start, mask=mask_pixels(picture(32, 32).convert("L"), (32, 32), 8)))
    with pytest.raises(BadRequestError, match="latent upscaling .* is served on Stable Diffusion"):
        check_spec(loaded, replace(spec("x", 1), latent_output=True))
    with pytest.raises(BadRequestError, match="true_cfg_scale applies to Flux"):
        check_spec(loaded, replace(spec("x", 1), true_cfg_scale=4.0))


@pytest.mark.slow
def test_an_sd3_pipeline_dir_is_served_over_both_routes(tmp_path: Path) -> None:
    """`lokr-serve serve --model <StableDiffusion3Pipeline dir>`: the OpenAI route's and A1111's images equal the
    pipeline's, and an A1111 inpainting answer equals `StableDiffusion3InpaintPipeline`'s; `/v1/models` says it is
    an image model; the hires fix's latent upscalers are a 400 in the route's words."""
    import base64
    import io

    import httpx
    from PIL import Image

    from .conftest import World, start_server, stop_server

    model = pipeline_dir(tmp_path, "sd3")
    mask = square_mask(32, (0, 8, 20, 32))
    (tmp_path / "adapters").mkdir()
    server = start_server(World(tmp_path, model, tmp_path / "adapters", {}), "--device", "cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            body = {"model": "tiny", "prompt": "a red cat", "size": "32x32", "num_inference_steps": 3, "seed": 7}
            openai = http.post("/v1/images/generations", json=body)
            a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "steps": 3, "cfg_scale": 7.0,
                                                         "seed": 7, "width": 32, "height": 32})  # fmt: skip
            kinds = {m["id"]: m.get("kind") for m in http.get("/v1/models").json()["data"]}
            picture_b64 = base64.b64encode(_png(picture(32, 32))).decode()
            inpainted = http.post("/sdapi/v1/img2img", json={
                "prompt": "a red cat", "init_images": [picture_b64], "mask": base64.b64encode(_png(mask)).decode(),
                "mask_blur": 0, "denoising_strength": 0.8, "steps": 3, "cfg_scale": 6.0, "seed": 2})  # fmt: skip
            refused = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                                           "hr_upscaler": "Latent"})  # fmt: skip
    finally:
        stop_server(server)
    assert openai.status_code == 200 and a1111.status_code == 200, (openai.text, a1111.text)
    assert kinds["tiny"] == "image"
    pipe = load(model).pipe
    for answer, negative in ((openai.json()["data"][0]["b64_json"], None), (a1111.json()["images"][0], "")):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer))).convert("RGB")).astype(np.int16)
        _, want = _reference(pipe, replace(spec("a red cat", 7, steps_=3, guidance=7.0), negative_prompt=negative))
        assert_pixels_close(got, want)
    assert inpainted.status_code == 200, inpainted.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(inpainted.json()["images"][0]))).convert("RGB"))
    masked = replace(init_spec(load(model), picture(32, 32), 0.8, prompt="a red cat", seed=2, steps_=3, guidance=6.0),
                     negative_prompt="")  # fmt: skip
    _, want = _inpaint_reference(pipe, picture(32, 32), mask, masked)
    assert_pixels_close(got.astype(np.int16), want)
    assert refused.status_code == 400 and "latent upscaling (the hires" in refused.json()["error"]["message"]


def _png(image: Any) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
