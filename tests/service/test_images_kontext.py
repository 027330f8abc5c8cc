"""Flux Kontext pipelines (`FluxKontextPipeline`: Flux's transformer editing from a reference picture) against
diffusers: same seed => same latents and pixels, reference rows beside text-to-image rows, with a peft LoKr adapter
and true CFG; both image routes over HTTP, the picture taken at Kontext's own resolutions."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lokr
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.init_image import pixels_for
from service.images.load import LoadedPipeline
from service.images.tiny_flux import save_peft_flux_lokr

from .flux_world import peft_flux_reference
from .images_world import assert_pixels_close, latents_and_pixels, load, picture, pipeline_dir
from .test_images_parity import TOL, Run, spec


def referenced(loaded: LoadedPipeline, image: Any, **kwargs: Any) -> Any:
    """A spec (as `spec`) that edits from `image`, taken at its own size."""
    return replace(spec(**kwargs), reference=pixels_for(loaded.pipe.image_processor, image, image.size))


def kontext_reference(pipe: Any, s: Any, image: Any | None, auto_resize: bool = False) -> tuple[Any, np.ndarray]:
    """`FluxKontextPipeline` for `s` (its size exactly: `max_area` = its area) from `image` (None: text to image):
    (packed latents, pixels)."""
    kwargs: dict[str, Any] = {
        "image": image, "height": s.height, "width": s.width, "max_area": s.height * s.width,
        "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale, "_auto_resize": auto_resize,
        "negative_prompt": s.negative_prompt, "true_cfg_scale": s.true_cfg_scale,
    }  # fmt: skip
    return latents_and_pixels(pipe, s.prompt, s.seed, **kwargs)


@pytest.mark.slow
def test_kontext_rows_equal_the_kontext_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference rows (two reference sizes, one with a peft LoKr adapter, one with true CFG) beside a text-to-image
    row, joining at different steps: each equals `FluxKontextPipeline` at its seed; the reference changes the
    image."""
    path = pipeline_dir(tmp_path, "flux-kontext")
    loaded = load(path)
    assert loaded.family == "flux-kontext" and loaded.ops.edits_from_reference
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(path, tmp_path / "peft", 5), "pe")
    run = Run(loaded, monkeypatch)
    tall, square = picture(32, 48, seed=1), picture(32, 32, seed=2)
    items = [
        (spec("a red cat", 2, steps_=3, guidance=3.5), None),
        (referenced(loaded, tall, prompt="a red cat", seed=2, steps_=3, guidance=3.5), None),
        (referenced(loaded, tall, prompt="the dog", seed=4, steps_=4, guidance=2.5), "pe"),
        (
            replace(
                referenced(loaded, tall, prompt="a cat", seed=5, steps_=3, guidance=3.5, neg="blurry"),
                true_cfg_scale=4.0,
            ),
            None,
        ),  # fmt: skip
        (referenced(loaded, square, prompt="a cat", seed=6, steps_=2, guidance=3.5), None),
    ]
    jobs = run(items, joins=[0, 0, 1, 0, 1])
    for job, (s, sel) in zip(jobs, items):
        pipe = peft_flux_reference(path, 5) if sel else load(path).pipe
        image = None if s.reference is None else (square if s.reference.shape[-1] == 32 == s.reference.shape[-2]
                                                  else tall)  # fmt: skip
        latents, pixels = kontext_reference(pipe, s, image)
        torch.testing.assert_close(run.latents[job.id], latents, **TOL)
        assert_pixels_close(run.pixels(job), pixels)
    assert not torch.allclose(run.latents[jobs[0].id], run.latents[jobs[1].id], atol=1e-2)  # the reference counts


def test_kontext_takes_pictures_at_its_resolutions_and_refuses_masks(tmp_path: Path) -> None:
    """The reference size is the Kontext resolution nearest the picture's aspect ratio (as the pipeline's
    auto-resize); img2img and inpainting from a starting picture are 400s."""
    loaded = load(pipeline_dir(tmp_path, "flux-kontext"))
    ops = loaded.ops
    assert ops.reference_size((512, 512)) == (1024, 1024)
    assert ops.reference_size((1500, 1000)) == (1248, 832)
    assert ops.reference_size((40, 24)) == (1328, 800)
    assert ops.reference_size((100, 1000)) == (672, 1568)
    check_spec(loaded, referenced(loaded, picture(32, 32), prompt="x", seed=0))
    with pytest.raises(BadRequestError, match="inpainting is not served"):
        check_spec(loaded, spec("x", 0), masked=True)
    start = replace(spec("x", 0), init=pixels_for(loaded.pipe.image_processor, picture(32, 32), (32, 32)))
    with pytest.raises(BadRequestError, match="edits from its picture as a reference"):
        check_spec(loaded, start)


def test_the_front_takes_a_picture_as_the_reference(tmp_path: Path) -> None:
    """On a Kontext pipeline, `ImageFront` makes each request's picture the image's reference at Kontext's resolution
    (not a starting picture), defaults the output size to it, and runs every step whatever strength is asked."""
    from types import SimpleNamespace

    from service.images.front import ImageFront

    loaded = load(pipeline_dir(tmp_path, "flux-kontext"))
    front = ImageFront(None, SimpleNamespace(loaded=loaded), None, None, "tiny", 4, 4)  # type: ignore[arg-type]
    start = picture(40, 24)
    assert front.output_size(start, None, None) == (1328, 800) and front.output_size(start, 32, None) == (32, 800)
    assert front.strength(0.5) == 1.0
    (edit,) = front.starting_from([spec("x", 1)], [start])
    assert edit.init is None and edit.reference is not None and tuple(edit.reference.shape) == (1, 3, 800, 1328)


@pytest.mark.slow
def test_a_kontext_dir_edits_over_both_routes(tmp_path: Path) -> None:
    """`/v1/images/edits` and A1111's img2img on a Kontext dir: the picture is the reference at Kontext's resolution
    (auto-resized, as the pipeline does), strength does not apply (A1111's `info` says 1); both equal
    `FluxKontextPipeline`; a mask and the hires fix are 400s."""
    import httpx
    from PIL import Image

    from .conftest import World, start_server, stop_server
    from .test_images import b64_png

    model = pipeline_dir(tmp_path, "flux-kontext")
    (tmp_path / "adapters").mkdir()
    start = picture(40, 24, seed=3)
    server = start_server(World(tmp_path, model, tmp_path / "adapters", {}), "--device", "cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            form = {"prompt": "a red cat", "size": "32x32", "num_inference_steps": "2", "seed": "7",
                    "guidance_scale": "3.5"}  # fmt: skip
            files = {"image": ("start.png", base64.b64decode(b64_png(start)), "image/png")}
            edited = http.post("/v1/images/edits", data=form, files=files)
            body = {"prompt": "a red cat", "init_images": [b64_png(start)], "width": 32, "height": 32, "steps": 2,
                    "seed": 7, "cfg_scale": 3.5, "denoising_strength": 0.5}  # fmt: skip
            a1111 = http.post("/sdapi/v1/img2img", json=body)
            masked = http.post("/sdapi/v1/img2img", json={**body, "mask": b64_png(picture(40, 24).convert("L"))})
            hires = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                                         "hr_upscaler": "Lanczos"})  # fmt: skip
    finally:
        stop_server(server)
    assert edited.status_code == 200 and a1111.status_code == 200, (edited.text, a1111.text)
    want_spec = replace(spec("a red cat", 7, steps_=2, guidance=3.5))
    _, want = kontext_reference(load(model).pipe, want_spec, start, auto_resize=True)
    for answer in (edited.json()["data"][0]["b64_json"], a1111.json()["images"][0]):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer))).convert("RGB")).astype(np.int16)
        assert_pixels_close(got, want)
    assert '"denoising_strength": 1.0' in a1111.json()["info"]
    assert masked.status_code == 400 and "inpainting is not served" in masked.json()["error"]["message"]
    assert hires.status_code == 400 and "enable_hr" in hires.json()["error"]["message"]
