"""A ControlNet pipeline (`StableDiffusionControlNetPipeline` dirs): rows with their own control images, scales and
adapters share each forward and equal diffusers' ControlNet pipeline (with peft's LoKr for an adapter's row); over
HTTP the control image is a base64 extension of OpenAI's generations; what the pipeline cannot honour is a 400."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import lokr
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.controlnet import ControlUnit, control_unit
from service.images.load import LoadedPipeline
from service.images.rows import ImageSpec

from .conftest import Server, World, start_server, stop_server
from .images_world import (
    assert_pixels_close,
    load,
    peft_reference_pipe,
    peft_unet_adapter,
    picture,
    pipeline_dir,
    reference_image,
    reference_latents,
)
from .test_images_parity import TOL, Run

PEFT_SEED = 5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images-controlnet")


@pytest.fixture(scope="module")
def cn_dir(root: Path) -> Path:
    return pipeline_dir(root, "sd-controlnet")


@pytest.fixture(scope="module")
def ink(root: Path, cn_dir: Path) -> Path:
    return peft_unet_adapter(cn_dir, root / "adapters" / "ink", seed=PEFT_SEED)


def _control(loaded: LoadedPipeline, image: Image.Image, size: int = 32) -> torch.Tensor:
    return loaded.pipe.control_image_processor.preprocess(image, height=size, width=size).to(torch.float32)


def test_rows_with_their_own_control_images_scales_and_adapters_equal_diffusers(
    cn_dir: Path, ink: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three images in one batch: two control images, scales 1 and 0.5, one with peft's LoKr on the UNet, one
    joining a step later with its ControlNet from 40% of its steps; each equals `StableDiffusionControlNetPipeline`
    with that image, scale and start."""
    loaded = load(cn_dir)
    lokr.load_adapter(loaded.container, ink, "ink")
    run = Run(loaded, monkeypatch)
    first, second = picture(32, 32, seed=1), picture(32, 32, seed=2).transpose(Image.Transpose.ROTATE_90)
    items = [
        (ImageSpec("a red cat", None, 32, 32, 3, 7.5, 7, control=_control(loaded, first)), None),
        (ImageSpec("the dog", "red", 32, 32, 4, 6.0, 8, control=_control(loaded, second), control_scale=0.5), "ink"),
        (
            ImageSpec("a cat on the mat", None, 32, 32, 3, 7.5, 9, control=_control(loaded, second), control_start=0.4),
            None,
        ),  # no control on its first step
    ]
    jobs = run(items, joins=[0, 0, 1])
    _assert_as_diffusers(run, jobs, items, [first, second, second], cn_dir)
    weaker = ImageSpec("the dog", "red", 32, 32, 4, 6.0, 8, control=_control(loaded, second), control_scale=0.0)
    (unscaled,) = run([(weaker, "ink")])
    assert np.abs(run.pixels(unscaled) - run.pixels(jobs[1])).max() > 0  # the control image changes the image


def test_sdxl_controlnet_rows_equal_diffusers(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDXL ControlNet pipeline (its ControlNet takes SDXL's pooled text and time ids too): a plain row and a
    peft LoKr row at control scale 0.5 from 30% of its steps, in one batch, each equal to
    `StableDiffusionXLControlNetPipeline`'s."""
    xl_dir = pipeline_dir(root, "sdxl-controlnet")
    adapter = peft_unet_adapter(xl_dir, root / "adapters" / "xl-ink", seed=PEFT_SEED)
    loaded = load(xl_dir)
    lokr.load_adapter(loaded.container, adapter, "ink")
    run = Run(loaded, monkeypatch)
    control = picture(32, 32, seed=3)
    items = [
        (ImageSpec("a red cat", None, 32, 32, 3, 5.0, 7, control=_control(loaded, control)), None),
        (ImageSpec("the dog", "red", 32, 32, 3, 6.0, 8, control=_control(loaded, control), control_scale=0.5,
                   control_start=0.3), "ink"),
    ]  # fmt: skip
    _assert_as_diffusers(run, run(items), items, [control, control], xl_dir)


def _assert_as_diffusers(
    run: Run, jobs: list[Any], items: list[tuple[ImageSpec, str | None]], pictures: list[Image.Image], model: Path
) -> None:
    """Each job's latents and pixels equal the dir's ControlNet pipeline's with its control picture, scale and start
    (with peft's LoKr `ink` injected for a row that names it)."""
    plain, with_ink = load(model).pipe, peft_reference_pipe(model, PEFT_SEED)
    for job, (spec, adapter), picture_ in zip(jobs, items, pictures, strict=True):
        ref = with_ink if adapter else plain
        kwargs = {"image": picture_, "controlnet_conditioning_scale": spec.control_scale,
                  "control_guidance_start": spec.control_start, "negative_prompt": spec.negative_prompt,
                  "guidance_scale": spec.guidance_scale}  # fmt: skip
        want = reference_latents(ref, spec.prompt, spec.seed, 32, spec.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(ref, spec.prompt, spec.seed, 32, spec.steps, **kwargs))


def test_img2img_rows_with_control_images_equal_diffusers_controlnet_img2img(
    cn_dir: Path, ink: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Img2img on a ControlNet pipeline (strength 0.6: 2 of 4 steps run from the picture): a text-to-image row and
    an img2img LoKr row with its ControlNet from half its run, in one batch, equal diffusers' ControlNet text-to-image
    and `StableDiffusionControlNetImg2ImgPipeline` (whose ControlNet share counts the steps the image runs)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from service.images.init_image import pixels_for

    loaded = load(cn_dir)
    lokr.load_adapter(loaded.container, ink, "ink")
    run = Run(loaded, monkeypatch)
    start, control = picture(32, 32, seed=5), picture(32, 32, seed=6).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    init = pixels_for(loaded.pipe.image_processor, start, (32, 32))
    edit = ImageSpec("the dog", None, 32, 32, 4, 6.0, 8, init=init, strength=0.6, control=_control(loaded, control),
                     control_scale=0.8, control_start=0.5)  # fmt: skip
    text = ImageSpec("a red cat", None, 32, 32, 3, 7.5, 7, control=_control(loaded, control))
    edited, drawn = run([(edit, "ink"), (text, None)])
    _assert_as_diffusers(run, [drawn], [(text, None)], [control], cn_dir)
    ref = StableDiffusionControlNetImg2ImgPipeline(**peft_reference_pipe(cn_dir, PEFT_SEED).components)
    kwargs = {"image": start, "control_image": control, "strength": 0.6, "guidance_scale": 6.0,
              "controlnet_conditioning_scale": 0.8, "control_guidance_start": 0.5}  # fmt: skip
    torch.testing.assert_close(run.latents[edited.id], reference_latents(ref, "the dog", 8, 32, 4, **kwargs), **TOL)
    assert_pixels_close(run.pixels(edited), reference_image(ref, "the dog", 8, 32, 4, **kwargs))


def test_texts_of_other_lengths_run_the_controlnet_apart(cn_dir: Path) -> None:
    """A1111 prompts of other chunk counts are zero-padded and masked for the UNet; a ControlNet takes no mask, so it
    runs once per text length on unpadded text: each row's residuals are those of a forward of that row alone."""
    from service.images.sd import _by_text_length

    controlnet = load(cn_dir).pipe.controlnet
    torch.manual_seed(0)
    lengths = [32, 16, 32]
    states = torch.randn(3, 32, 32)
    states[1, 16:] = 0.0  # the padding
    inputs = {
        "sample": torch.randn(3, 4, 16, 16),
        "timestep": torch.tensor([900, 500, 100]),
        "encoder_hidden_states": states,
        "controlnet_cond": torch.rand(3, 3, 32, 32),
        "added_cond_kwargs": None,
    }
    down, mid = _by_text_length(controlnet, inputs, lengths)
    for i, n in enumerate(lengths):
        alone = {k: None if v is None else v[i : i + 1] for k, v in inputs.items()}
        alone["encoder_hidden_states"] = states[i : i + 1, :n]
        want_down, want_mid = controlnet(**alone, return_dict=False)
        for got, want in zip([*down, mid], [*want_down, want_mid], strict=True):
            torch.testing.assert_close(got[i : i + 1], want, **TOL)  # batch sizes change float sums


def test_control_images_only_where_a_controlnet_takes_them(cn_dir: Path, root: Path) -> None:
    loaded, plain = load(cn_dir), load(pipeline_dir(root, "sd"))
    spec = ImageSpec("a cat", None, 32, 32, 3, 7.5, 1)
    with pytest.raises(BadRequestError, match="every image needs a control image"):
        check_spec(loaded, spec)
    control = _control(loaded, picture(32, 32))
    picture_ = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(BadRequestError, match="inpainting is not served on a ControlNet"):
        check_spec(
            loaded, replace(spec, control=control, init=picture_, mask=torch.ones(1, 1, 32, 32, dtype=torch.bool))
        )
    check_spec(loaded, replace(spec, control=control, init=picture_, strength=0.5))  # img2img is served
    with pytest.raises(BadRequestError, match="needs a ControlNet pipeline"):
        check_spec(plain, replace(spec, control=control))
    check_spec(loaded, replace(spec, control=control))


@pytest.mark.parametrize(
    ("scripts", "unit"),
    [(None, None), ({}, None), ({"controlnet": {"args": []}}, None),
     ({"controlnet": {"args": [{"enabled": False, "image": "x"}]}}, None),
     ({"ControlNet": {"args": [{"image": "x"}]}}, ControlUnit("x")),  # A1111's default resize: crop and resize
     ({"controlnet": {"args": [{"input_image": "x", "module": "none", "resize_mode": "Just Resize", "weight": 0.5,
                                "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": "Balanced"}]}},
      ControlUnit("x", "default", 0.5, 0.1, 0.9)),
     ({"controlnet": {"args": [{"image": {"image": "x", "mask": None}, "resize_mode": 2}, {"enabled": False}]}},
      ControlUnit("x", "fill")),
     ({"ADetailer": {"args": []}, "controlnet": {"args": [{"image": "x", "resize_mode": 0}]}},
      ControlUnit("x", "default"))],
)  # fmt: skip
def test_a1111_controlnet_units_are_read_as_the_extension_sends_them(scripts: dict, unit: ControlUnit | None) -> None:
    assert control_unit(scripts) == unit


@pytest.mark.parametrize(
    ("scripts", "says"),
    [({"ADetailer": {"args": [{"ad_model": "face"}]}}, "other than ControlNet are not served"),
     ({"controlnet": {"args": [{"image": "x"}, {"image": "y"}]}}, "2 enabled units"),
     ({"controlnet": {"args": [{"image": "x", "module": "canny"}]}}, "preprocessors are not served"),
     ({"controlnet": {"args": [{"image": "x", "control_mode": "ControlNet is more important"}]}}, "control_mode"),
     ({"controlnet": {"args": [{"module": "none"}]}}, "has no image"),
     ({"controlnet": {"args": [{"image": "x", "resize_mode": "Envelope"}]}}, "resize_mode 'Envelope'"),
     ({"controlnet": {"args": [{"image": "x", "weight": "strong"}]}}, "weight must be a number"),
     ({"controlnet": {"args": "x"}}, "a list of ControlNet units")],
)  # fmt: skip
def test_a1111_controlnet_units_not_served_are_400s(scripts: dict, says: str) -> None:
    with pytest.raises(BadRequestError, match=says):
        control_unit(scripts)


# ------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def server(root: Path, cn_dir: Path, ink: Path) -> Iterator[Server]:
    srv = start_server(World(root, cn_dir, root / "adapters", {"ink": ink}), "--adapter", f"ink={ink}")
    try:
        yield srv
    finally:
        stop_server(srv)


def _b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.e2e
def test_control_images_over_http(server: Server, cn_dir: Path) -> None:
    """The control image (resized to the output size as diffusers does) and its scale reach the ControlNet: the
    served image is diffusers'; leaving it out, editing, or A1111's route (no control image there) are 400s."""
    control = picture(48, 40, seed=4)
    body = {"model": "ink", "prompt": "the dog", "size": "32x32", "num_inference_steps": 3, "seed": 4,
            "guidance_scale": 6.0, "control_image": _b64_png(control),
            "controlnet_conditioning_scale": 0.7}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=300) as http:
        response = http.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
        want = reference_image(peft_reference_pipe(cn_dir, PEFT_SEED), "the dog", 4, guidance_scale=6.0, image=control,
                               controlnet_conditioning_scale=0.7)  # fmt: skip
        assert_pixels_close(served.astype(np.int16), want)
        missing = http.post("/v1/images/generations", json={k: v for k, v in body.items() if k != "control_image"})
        assert missing.status_code == 400 and "needs a control image" in missing.json()["error"]["message"]
        no_unit = http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 32, "height": 32})
        assert no_unit.status_code == 400 and "alwayson_scripts" in no_unit.json()["error"]["message"]
        form = {"prompt": "a cat", "control_image": body["control_image"], "num_inference_steps": "3", "size": "32x32"}
        edit = http.post("/v1/images/edits", data=form,
                         files={"image": ("p.png", base64.b64decode(body["control_image"]), "image/png")})  # fmt: skip
        assert edit.status_code == 200, edit.text  # img2img with the control image
        not_an_image = http.post("/v1/images/generations", json={**body, "control_image": "aGVsbG8="})
        assert not_an_image.status_code == 400 and "control_image" in not_an_image.json()["error"]["message"]


@pytest.mark.e2e
def test_a1111_controlnet_unit_over_http(server: Server, cn_dir: Path) -> None:
    """A1111's ControlNet unit (module none, "Crop and Resize", weight 0.8, guidance end 0.67) with a `<lora>` tag:
    diffusers' ControlNet pipeline with that control image cropped and resized, scale and end; `info` says so; the
    hires fix's second pass (img2img) takes the control image at its own size."""
    control = picture(96, 32, seed=6)  # crop and stretch give other control images
    unit = {"enabled": True, "image": _b64_png(control), "module": "none", "model": "control_tiny [0000]",
            "weight": 0.8, "resize_mode": "Crop and Resize", "guidance_start": 0.0, "guidance_end": 0.67,
            "control_mode": "Balanced", "pixel_perfect": False}  # fmt: skip
    body = {"prompt": "the <lora:ink:1> dog", "steps": 3, "cfg_scale": 6.0, "seed": 4, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=300) as http:
        response = http.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        hires = http.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_upscaler": "Lanczos"})
        long = {**body, "prompt": "the <lora:ink:1> dog " + "on a red mat " * 6}  # two chunks against one negative
        assert http.post("/sdapi/v1/txt2img", json=long).status_code == 200
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    pipe = peft_reference_pipe(cn_dir, PEFT_SEED)
    cropped = pipe.control_image_processor.preprocess(control, height=32, width=32, resize_mode="crop")
    want = reference_image(pipe, "the dog", 4, guidance_scale=6.0, negative_prompt="", image=cropped,
                           controlnet_conditioning_scale=0.8, control_guidance_end=0.67)  # fmt: skip
    assert_pixels_close(served.astype(np.int16), want)
    info = json.loads(response.json()["info"])
    assert info["controlnet"] == {"weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.67}
    assert hires.status_code == 200, hires.text
    assert Image.open(io.BytesIO(base64.b64decode(hires.json()["images"][0]))).size == (64, 64)
