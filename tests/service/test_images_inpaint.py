"""Inpainting in the engine: masked rows equal diffusers' inpainting pipelines (SD, SDXL, Flux; strength below 1 and
at 1, a sampler of order 2, a stochastic one that draws from the generator at every step, a LoKr adapter), beside
text-to-image and plain img2img rows in the same forwards; and the masks each API sends."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import lokr
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.front import ImageFront
from service.images.init_image import pixels_for
from service.images.inpaint import Repaint, a1111_mask, latent_mask, mask_pixels, openai_mask, repaint_plan
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
from .test_images_img2img import init_spec
from .test_images_parity import TOL, Run, spec


def square_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    """White (repainted) inside `box` = (left, top, right, bottom), black elsewhere; an "L" picture."""
    mask = np.zeros((size, size), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def masked_spec(loaded: LoadedPipeline, image: Image.Image, mask: Image.Image, strength: float, **kwargs: Any) -> Any:
    base = init_spec(loaded, image, strength, **kwargs)
    return replace(base, mask=mask_pixels(mask, (base.width, base.height), loaded.vae_scale_factor))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inpaint")
    return {kind: pipeline_dir(root, kind) for kind in ("sd", "sdxl")}


def reference(pipe: Any, kind: str, image: Image.Image, mask: Image.Image, s: Any) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"strength": s.strength, "num_inference_steps": s.steps,
                              "negative_prompt": s.negative_prompt, "guidance_scale": s.guidance_scale}  # fmt: skip
    return img2img_reference(pipe, kind, image, s.prompt, s.seed, mask=mask, **kwargs)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_masked_rows_equal_diffusers_inpainting_beside_other_rows(
    kind: str, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strength 0.6 and 1 (pure noise, not the picture noised), Heun (order 2) and Euler a (draws from the
    generator at every step: the masked picture's own encoding draw must come before them, as in diffusers)."""
    loaded = load(dirs[kind])
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32), square_mask(32, (8, 4, 24, 20))
    heun = resolve("Heun", None, loaded.pipe.scheduler, False)
    ancestral = resolve("Euler a", None, loaded.pipe.scheduler, False)
    items = [
        (spec("a red cat", 3), None),  # text to image and plain img2img in the same forwards
        (init_spec(loaded, image, 0.6, prompt="a red cat", seed=4, steps_=5), None),
        (masked_spec(loaded, image, mask, 0.6, prompt="the dog", seed=5, steps_=5), None),
        (masked_spec(loaded, image, mask, 1.0, prompt="the dog", seed=6, steps_=3, neg="blue"), None),
        (replace(masked_spec(loaded, image, mask, 0.5, prompt="a cat", seed=7, steps_=4), sampler=heun), None),
        (replace(masked_spec(loaded, image, mask, 0.8, prompt="a cat", seed=8, steps_=4), sampler=ancestral), None),
    ]
    jobs = run(items, joins=[0, 1, 0, 2, 1, 0])
    for job, (s, _) in list(zip(jobs, items))[2:]:
        ref = load(dirs[kind]).pipe
        if s.sampler is not None:
            ref.scheduler = s.sampler.make(loaded.pipe.scheduler)
        want_latents, want_pixels = reference(ref, kind, image, mask, s)
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)
        assert_pixels_close(run.pixels(job), want_pixels)
    other = run([(replace(items[2][0], prompt="a blue bird"), None)])[0]  # same picture and seed, other prompt
    keep = latent_mask(items[2][0].mask, tuple(run.latents[other.id].shape[-2:]), torch.device("cpu"), torch.float32)
    a, b = run.latents[jobs[2].id], run.latents[other.id]
    torch.testing.assert_close(a * (1 - keep), b * (1 - keep), rtol=0, atol=1e-5)  # the picture's latents in both
    assert (a - b).abs().mul(keep).max() > 0.1  # the masked area is what each prompt drew


@pytest.mark.slow
def test_an_adapter_on_a_masked_row_equals_peft_inpainting(
    dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load(dirs["sd"])
    lokr.load_adapter(loaded.container, peft_unet_adapter(dirs["sd"], tmp_path / "peft", seed=5), "p")
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32, seed=1), square_mask(32, (0, 0, 16, 32))
    s = masked_spec(loaded, image, mask, 0.9, prompt="the dog", seed=9, steps_=4)
    base, adapted = run([(s, None), (s, "p")])  # one batch, with and without the adapter
    assert np.abs(run.pixels(adapted) - run.pixels(base)).max() > 8
    want_latents, want_pixels = reference(peft_reference_pipe(dirs["sd"], seed=5), "sd", image, mask, s)
    torch.testing.assert_close(run.latents[adapted.id], want_latents, **TOL)
    assert_pixels_close(run.pixels(adapted), want_pixels)


@pytest.mark.slow
def test_flux_masked_rows_equal_flux_inpaint_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux re-noises the kept area with `scale_noise`, on packed latents; a peft LoKr row beside a plain one."""
    flux_dir = pipeline_dir(tmp_path, "flux")
    loaded = load(flux_dir)
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(flux_dir, tmp_path / "peft", 5), "pe")
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32, seed=5), square_mask(32, (0, 8, 32, 24))
    s = replace(masked_spec(loaded, image, mask, 0.7, prompt="a red cat", seed=3, steps_=4), guidance_scale=3.5)
    items = [(spec("the dog", 2, guidance=3.5), None), (s, None), (replace(s, seed=4), "pe")]
    jobs = run(items, joins=[0, 1, 0])
    for job, pipe in ((jobs[1], load(flux_dir).pipe), (jobs[2], peft_flux_reference(flux_dir, 5))):
        assert job.spec is not None
        want_latents, want_pixels = img2img_reference(
            pipe, "flux", image, s.prompt, job.spec.seed, mask=mask, strength=0.7, num_inference_steps=4,
            guidance_scale=3.5,
        )  # fmt: skip
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)
        assert_pixels_close(run.pixels(job), want_pixels)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_an_inpainting_model_takes_the_mask_and_masked_picture_as_its_pipeline_does(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 9-channel UNet (an inpainting checkpoint, `StableDiffusion(XL)InpaintPipeline` dir): each row feeds it the
    mask and its masked picture's latents after its own latents, in one batch with the others (strength below 1
    and 1, Euler a, on SD a peft LoKr row); the pipeline's own images. Text to image and unmasked img2img are
    400s."""
    path = pipeline_dir(tmp_path, f"{kind}-inpaint")
    loaded = load(path)
    assert loaded.masked_channels == 5
    if kind == "sd":
        lokr.load_adapter(loaded.container, peft_unet_adapter(path, tmp_path / "peft", seed=5), "p")
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32, seed=2), square_mask(32, (4, 4, 28, 20))
    ancestral = resolve("Euler a", None, loaded.pipe.scheduler, False)
    first = masked_spec(loaded, image, mask, 0.7, prompt="a red cat", seed=3, steps_=4)
    items = [
        (first, None),
        (masked_spec(loaded, image, mask, 1.0, prompt="the dog", seed=4, steps_=3, neg="blue"), None),
        (replace(masked_spec(loaded, image, mask, 0.8, prompt="a cat", seed=5, steps_=4), sampler=ancestral), None),
        (replace(first, seed=6), "p" if kind == "sd" else None),
    ]
    jobs = run(items, joins=[0, 1, 0, 1])
    for job, (s, sel) in zip(jobs, items):
        ref = peft_reference_pipe(path, seed=5) if sel == "p" else load(path).pipe
        if s.sampler is not None:
            ref.scheduler = s.sampler.make(loaded.pipe.scheduler)
        want_latents, want_pixels = reference(ref, kind, image, mask, s)
        torch.testing.assert_close(run.latents[job.id], want_latents, **TOL)
        assert_pixels_close(run.pixels(job), want_pixels)
    for unmasked in (spec("x", 1), init_spec(loaded, image, 0.5, prompt="x", seed=0)):
        with pytest.raises(BadRequestError, match="is an inpainting model"):
            check_spec(loaded, unmasked)


@pytest.mark.slow
def test_a_flux_fill_model_takes_the_masked_picture_and_mask_as_its_pipeline_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `FluxFillPipeline` dir (the transformer takes the packed masked picture and mask after the latents):
    rows at strength 1 and below, guidance 30 and 10, a peft LoKr row, joining at other steps; each equals the
    pipeline's own image. Text to image, unmasked img2img and true CFG are 400s."""
    path = pipeline_dir(tmp_path, "flux-fill")
    loaded = load(path)
    assert loaded.masked_channels == 32  # 16 packed latent channels + 4 x 2 x 2 of mask
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(path, tmp_path / "peft", 5), "pe")
    run = Run(loaded, monkeypatch)
    image, mask = picture(32, 32, seed=5), square_mask(32, (0, 8, 32, 24))
    first = replace(masked_spec(loaded, image, mask, 1.0, prompt="a red cat", seed=3, steps_=4), guidance_scale=30.0)
    second = replace(masked_spec(loaded, image, mask, 0.6, prompt="the dog", seed=4, steps_=4), guidance_scale=10.0)
    items = [(first, None), (second, None), (replace(first, seed=6), "pe")]
    jobs = run(items, joins=[0, 1, 0])
    for job, (s, sel) in zip(jobs, items):
        pipe = peft_flux_reference(path, 5) if sel else load(path).pipe
        kwargs = {"image": image, "mask_image": mask, "height": 32, "width": 32, "strength": s.strength,
                  "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale}  # fmt: skip
        latents, pixels = (
            pipe(s.prompt, generator=torch.Generator("cpu").manual_seed(s.seed), output_type=kind, **kwargs).images
            for kind in ("latent", "pil")
        )
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), np.asarray(pixels[0]).astype(np.int16))
    for unmasked in (spec("x", 1), init_spec(loaded, image, 0.5, prompt="x", seed=0)):
        with pytest.raises(BadRequestError, match="is an inpainting model"):
            check_spec(loaded, unmasked)
    with pytest.raises(BadRequestError, match="no true classifier-free guidance"):
        check_spec(loaded, replace(first, negative_prompt="blue", true_cfg_scale=4.0))


def test_unets_of_other_input_layouts_are_refused_at_load() -> None:
    from service.backend import ModelLoadError
    from service.images.load import _check_inputs

    def pipe(inputs: int) -> Any:
        config = SimpleNamespace(in_channels=inputs)
        return SimpleNamespace(unet=SimpleNamespace(config=config), vae=SimpleNamespace(config=SimpleNamespace(
            latent_channels=4)))  # fmt: skip

    for served in (4, 9):
        _check_inputs(pipe(served), Path("m"), "sd")
    with pytest.raises(ModelLoadError, match="takes 7 input channels; lokr-serve serves UNets of 4"):
        _check_inputs(pipe(7), Path("m"), "sd")

    def flux(inputs: int) -> Any:  # VAE factor 8, 16 latent channels: 64 packed
        vae = SimpleNamespace(config=SimpleNamespace(latent_channels=16))
        return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(in_channels=inputs)), vae=vae,
                               vae_scale_factor=8)  # fmt: skip

    for served in (64, 384):  # FLUX.1-dev, FLUX.1-Fill-dev
        _check_inputs(flux(served), Path("m"), "flux")
    with pytest.raises(ModelLoadError, match="transformer takes 128 input channels; .* 64 .* or 384"):
        _check_inputs(flux(128), Path("m"), "flux")  # a control model (the control image's latents)


def test_masks_are_preprocessed_as_diffusers_does() -> None:
    """Blurred first when asked (`mask_processor.blur`), resized (Lanczos) and binarised at one half; "only
    masked": cropped around the mask as `padding_mask_crop` crops, then resized to fill the size."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((40, 24)) * 255).astype(np.uint8), "L")
    for blur in (0, 3):
        plan = repaint_plan(noise, blur, None, (32, 48), [])
        got = mask_pixels(plan.mask, (32, 48), 8)
        want = processor.preprocess(processor.blur(noise, blur) if blur else noise, height=48, width=32)
        assert got.shape == (1, 1, 48, 32) and got.dtype == torch.bool and plan.crop is None
        assert torch.equal(got.float(), want)
    box = square_mask(40, (8, 10, 20, 16))
    plan = repaint_plan(box, 0, 4, (32, 16), [picture(40, 40)])
    assert plan.crop == VaeImageProcessor.get_crop_region(box, 32, 16, pad=4)
    want = processor.preprocess(box, height=16, width=32, crops_coords=plan.crop, resize_mode="fill")
    assert torch.equal(mask_pixels(plan.mask, (32, 16), 8, plan.crop).float(), want)


def test_starting_pixels_and_masks_take_the_output_size_as_asked(dirs: dict[str, Path]) -> None:
    """`ImageFront.starting_from`: the picture and the mask resized by the same mode (stretched, cropped, filled)
    or, "only masked", the crop region of both resized to fill; the modes give different starting pixels."""
    loaded = load(dirs["sd"])
    front = ImageFront(None, SimpleNamespace(loaded=loaded), None, None, "tiny", 4, 4)  # type: ignore[arg-type]
    image, mask = picture(48, 32), square_mask(48, (10, 4, 30, 20)).crop((0, 0, 48, 32))
    processor, base = loaded.pipe.image_processor, spec("x", 1)
    seen = []
    for resize in ("default", "crop", "fill"):
        (got,) = front.starting_from([base], [image], Repaint(mask), resize)
        assert torch.equal(got.init, pixels_for(processor, image, (32, 32), resize=resize))
        assert torch.equal(got.mask, mask_pixels(mask, (32, 32), 8, resize=resize))
        seen.append(got.init)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    plan = repaint_plan(mask, 0, 2, (32, 32), [image])
    (got,) = front.starting_from([base], [image], plan, "crop")  # the crop region wins over the resize mode
    assert torch.equal(got.init, pixels_for(processor, image, (32, 32), crop=plan.crop))
    assert torch.equal(got.mask, mask_pixels(mask, (32, 32), 8, crop=plan.crop))


def test_only_masked_inpainting_needs_a_mask_of_the_pictures_size_that_repaints_something() -> None:
    with pytest.raises(BadRequestError, match="the same size"):
        repaint_plan(square_mask(32, (0, 0, 8, 8)), 0, 8, (32, 32), [picture(32, 32), picture(40, 32)])
    with pytest.raises(BadRequestError, match="repaints nothing"):
        repaint_plan(square_mask(32, (0, 0, 0, 0)), 0, 8, (32, 32), [picture(32, 32)])


def test_a_mask_needs_a_starting_image_of_its_size(dirs: dict[str, Path]) -> None:
    loaded = load(dirs["sd"])
    image, mask = picture(32, 32), square_mask(32, (0, 0, 8, 8))
    good = masked_spec(loaded, image, mask, 0.5, prompt="x", seed=0)
    check_spec(loaded, good)
    for bad in (replace(good, init=None), replace(good, mask=mask_pixels(mask, (48, 32), 8))):
        with pytest.raises(BadRequestError, match="mask needs a starting image"):
            check_spec(loaded, bad)


def rgba(alpha: np.ndarray) -> Image.Image:
    rgb = np.full(alpha.shape + (3,), 200, dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")


def test_openai_masks_edit_their_transparent_pixels() -> None:
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[2:4, 2:6], alpha[6, 6] = 0, 1  # fully transparent: edited; nearly (1): kept
    grey = np.asarray(openai_mask(rgba(alpha), (8, 8)))
    assert grey[2:4, 2:6].min() == 255 and grey.sum() == 255 * 8
    with pytest.raises(BadRequestError, match="no alpha channel"):
        openai_mask(Image.new("RGB", (8, 8)), (8, 8))
    with pytest.raises(BadRequestError, match="must have the image's size"):
        openai_mask(rgba(alpha), (16, 8))


def test_a1111_masks_are_white_or_opaque_where_repainted() -> None:
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[:4] = 255
    assert np.array_equal(np.asarray(a1111_mask(Image.fromarray(grey, "L"), False)), grey)
    assert np.array_equal(np.asarray(a1111_mask(Image.fromarray(grey, "L").convert("RGB"), True)), 255 - grey)
    alpha = np.zeros((8, 8), dtype=np.uint8)
    alpha[:, :3] = 200  # over 128: repainted
    assert np.array_equal(np.asarray(a1111_mask(rgba(alpha), False)) > 0, alpha > 128)
    opaque = rgba(np.full((8, 8), 255, dtype=np.uint8))  # no transparency: its grey levels (all 200) count
    assert np.asarray(a1111_mask(opaque, False)).min() == 200
