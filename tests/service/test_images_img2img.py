"""Img2img in the engine: rows that start from an image equal diffusers' img2img pipelines (SD and SDXL, samplers
of order 1 and 2, adapters), also batched with text-to-image rows that join at other steps; and the starting
image's decoding and checks."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import lokr
from service.errors import BadRequestError
from service.images.backend import A1111_NAMES, check_spec
from service.images.family import family_ops
from service.images.init_image import decode_b64, model_pixels, open_image, pixels_for
from service.images.load import LoadedPipeline
from service.images.samplers import resolve
from service.images.tiny_flux import save_peft_flux_lokr

from .flux_world import peft_flux_reference
from .images_world import (
    assert_pixels_close,
    img2img_reference,
    load,
    peft_reference_pipe,
    peft_unet_adapter,
    picture,
    pipeline_dir,
)
from .test_images_parity import TOL, Run, spec


def init_spec(loaded: LoadedPipeline, image: Image.Image, strength: float, **kwargs: Any) -> Any:
    base = spec(**kwargs)
    pixels = pixels_for(loaded.pipe.image_processor, image, (base.width, base.height))
    return replace(base, init=pixels, strength=strength)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("img2img")
    return {kind: pipeline_dir(root, kind) for kind in ("sd", "sdxl")}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_img2img_rows_equal_diffusers_img2img_beside_txt2img_rows(
    kind: str, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load(dirs[kind])
    run = Run(loaded, monkeypatch)
    image = picture(32, 32)
    heun = resolve("Heun", None, loaded.pipe.scheduler, False)  # order 2: two forwards per step
    items = [
        (spec("a red cat", 3), None),  # text to image, in the same batches
        (init_spec(loaded, image, 0.6, prompt="a red cat", seed=4, steps_=5), None),
        (replace(init_spec(loaded, image, 0.5, prompt="the dog", seed=5, steps_=4, neg="blue"), sampler=heun), None),
    ]
    jobs = run(items, joins=[0, 1, 2])
    ref = load(dirs[kind]).pipe
    for job, (s, _) in list(zip(jobs, items))[1:]:
        kwargs: dict[str, Any] = {"strength": s.strength, "num_inference_steps": s.steps,
                                  "negative_prompt": s.negative_prompt, "guidance_scale": s.guidance_scale}  # fmt: skip
        if s.sampler is not None:
            ref.scheduler = s.sampler.make(loaded.pipe.scheduler)
        want_latents, want_pixels = img2img_reference(ref, kind, image, s.prompt, s.seed, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)
        assert_pixels_close(run.pixels(job), want_pixels)


@pytest.mark.slow
def test_flux_img2img_rows_equal_flux_img2img_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux rounds the skipped steps as SD3 does and mixes noise in at the first sigma run (`scale_noise`); a peft
    LoKr row and a text-to-image row share the transformer forwards."""
    flux_dir = pipeline_dir(tmp_path, "flux")
    loaded = load(flux_dir)
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(flux_dir, tmp_path / "peft", 5), "pe")
    run = Run(loaded, monkeypatch)
    image = picture(32, 32, seed=5)
    s = init_spec(loaded, image, 0.6, prompt="a red cat", seed=3, steps_=4, guidance=3.5)
    items = [(spec("the dog", 2, guidance=3.5), None), (s, None), (replace(s, seed=4), "pe")]
    jobs = run(items, joins=[0, 1, 0])
    for job, pipe in ((jobs[1], load(flux_dir).pipe), (jobs[2], peft_flux_reference(flux_dir, 5))):
        seed = job.spec.seed if job.spec else -1
        want_latents, want_pixels = img2img_reference(
            pipe, "flux", image, s.prompt, seed, strength=0.6, num_inference_steps=4, guidance_scale=3.5
        )
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)
        assert_pixels_close(run.pixels(job), want_pixels)
    assert np.abs(run.pixels(jobs[2]) - run.pixels(jobs[1])).max() > 8  # different seeds; the adapter ran


@pytest.mark.slow
def test_an_adapter_on_an_img2img_row_equals_peft_img2img(
    dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load(dirs["sd"])
    lokr.load_adapter(loaded.container, peft_unet_adapter(dirs["sd"], tmp_path / "peft", seed=5), "p")
    run = Run(loaded, monkeypatch)
    image = picture(32, 32, seed=1)
    s = init_spec(loaded, image, 0.8, prompt="the dog", seed=9, steps_=4)
    base, adapted = run([(s, None), (s, "p")])  # one batch, with and without the adapter
    assert np.abs(run.pixels(adapted) - run.pixels(base)).max() > 8
    want_latents, want_pixels = img2img_reference(
        peft_reference_pipe(dirs["sd"], seed=5),
        "sd",
        image,
        s.prompt,
        s.seed,
        strength=0.8,
        num_inference_steps=4,
        guidance_scale=s.guidance_scale,
    )
    torch.testing.assert_close(run.latents[adapted.id], want_latents, **TOL)
    assert_pixels_close(run.pixels(adapted), want_pixels)


def test_strength_must_leave_a_step_rounded_as_each_family_does(dirs: dict[str, Path]) -> None:
    loaded = load(dirs["sd"])
    image = picture(32, 32)
    check_spec(loaded, init_spec(loaded, image, 0.25, prompt="x", seed=0, steps_=4))  # one step
    with pytest.raises(BadRequestError, match="denoising_strength 0.2 with steps 4 runs 0 of the 4"):
        check_spec(loaded, init_spec(loaded, image, 0.2, prompt="x", seed=0, steps_=4), names=A1111_NAMES)
    with pytest.raises(BadRequestError, match="must be in \\[0, 1\\]"):
        check_spec(loaded, init_spec(loaded, image, 1.5, prompt="x", seed=0, steps_=4))
    assert (family_ops("sd").first_step(4, 0.6), family_ops("flux").first_step(4, 0.6)) == (2, 1)  # as diffusers


def test_starting_images_decode_from_base64_or_are_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (40, 24), (10, 20, 30, 128)).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    for sent in (text, f"data:image/png;base64,{text}"):
        image = open_image(decode_b64(sent, "init_images[0]"), "init_images[0]", 10_000)
        assert image.mode == "RGB" and image.size == (40, 24)
    for mode, value in (("I;16", 40000), ("CMYK", (0, 50, 90, 10)), ("P", 3), ("LA", (9, 200))):
        other = io.BytesIO()
        Image.new(mode, (8, 8), value).save(other, format="TIFF" if mode == "CMYK" else "PNG")
        assert open_image(other.getvalue(), "image", 10_000).mode == "RGB"  # any mode PIL reads: RGB, not a 500
    with pytest.raises(BadRequestError, match=r"init_images\[0\] is not base64"):
        decode_b64("not base64!", "init_images[0]")
    with pytest.raises(BadRequestError, match="image is not a readable image file"):
        open_image(b"GIF89a garbage", "image", 10_000)
    with pytest.raises(BadRequestError, match="a 40x24 image is over this server's 900-pixel limit"):
        open_image(buf.getvalue(), "image", 900)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux"])
def test_a_starting_picture_waits_as_uint8_and_reaches_the_vae_as_the_pipelines_preprocess_it(
    kind: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Stretched (or cropped / filled, or a region of it) to the asked size, kept as uint8 (a quarter of float32),
    and the pixels the VAE gets are, bit for bit, the pipeline's own `image_processor.preprocess` of the picture at
    that size."""
    path = dirs[kind] if kind in dirs else pipeline_dir(tmp_path, kind)
    processor = load(path).pipe.image_processor
    image = picture(40, 70)
    for resize in ("default", "crop", "fill"):
        kept = pixels_for(processor, image, (48, 32), resize=resize)
        assert kept.shape == (1, 3, 32, 48) and kept.dtype == torch.uint8
        want = processor.preprocess(image, height=32, width=48, resize_mode=resize)
        assert torch.equal(model_pixels(kept), want)
    region = (4, 10, 36, 50)
    want = processor.preprocess(image, height=32, width=48, resize_mode="fill", crops_coords=region)
    assert torch.equal(model_pixels(pixels_for(processor, image, (48, 32), crop=region)), want)


def test_starting_images_are_encoded_once_each_in_one_forward_per_size(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three images of one request share one starting image (one encoding); another request's image of the same
    size joins the same encoder forward; an image of another size gets its own. Each equals its lone run."""
    loaded = load(dirs["sd"])
    batches: list[int] = []
    real = loaded.pipe.vae.encode

    def counting(pixels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batches.append(pixels.shape[0])
        return real(pixels, *args, **kwargs)

    monkeypatch.setattr(loaded.pipe.vae, "encode", counting)
    shared = init_spec(loaded, picture(32, 32), 0.5, prompt="a red cat", seed=1, steps_=2)
    items = [(replace(shared, seed=1 + k), None) for k in range(3)]
    items.append((init_spec(loaded, picture(32, 32, seed=3), 0.5, prompt="the dog", seed=7, steps_=2), None))
    items.append((init_spec(loaded, picture(48, 48), 0.5, prompt="the dog", seed=8, size=48, steps_=2), None))
    run = Run(loaded, monkeypatch)
    jobs = run(items)
    assert sorted(batches) == [1, 2]
    alone = [run([item])[0] for item in (items[1], items[4])]
    for job, lone in zip((jobs[1], jobs[4]), alone):
        torch.testing.assert_close(run.latents[job.id], run.latents[lone.id], **TOL)
