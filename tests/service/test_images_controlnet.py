"""A ControlNet pipeline (`StableDiffusionControlNetPipeline` dirs): rows with their own control images, scales and
adapters share each forward and equal diffusers' ControlNet pipeline (with peft's LoKr for an adapter's row); over
HTTP the control image is a base64 extension of OpenAI's generations; what the pipeline cannot honour is a 400."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import lokr
from service.errors import BadRequestError
from service.images.backend import check_spec
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
    joining a step later; each equals `StableDiffusionControlNetPipeline` with that image and scale."""
    loaded = load(cn_dir)
    lokr.load_adapter(loaded.container, ink, "ink")
    run = Run(loaded, monkeypatch)
    first, second = picture(32, 32, seed=1), picture(32, 32, seed=2).transpose(Image.Transpose.ROTATE_90)
    items = [
        (ImageSpec("a red cat", None, 32, 32, 3, 7.5, 7, control=_control(loaded, first)), None),
        (ImageSpec("the dog", "red", 32, 32, 4, 6.0, 8, control=_control(loaded, second), control_scale=0.5), "ink"),
        (ImageSpec("a cat on the mat", None, 32, 32, 3, 7.5, 9, control=_control(loaded, second)), None),
    ]
    jobs = run(items, joins=[0, 0, 1])
    plain, with_ink = load(cn_dir).pipe, peft_reference_pipe(cn_dir, PEFT_SEED)
    for job, (spec, adapter), picture_ in zip(jobs, items, (first, second, second), strict=True):
        ref = with_ink if adapter else plain
        kwargs = {"image": picture_, "controlnet_conditioning_scale": spec.control_scale,
                  "negative_prompt": spec.negative_prompt, "guidance_scale": spec.guidance_scale}  # fmt: skip
        want = reference_latents(ref, spec.prompt, spec.seed, 32, spec.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(ref, spec.prompt, spec.seed, 32, spec.steps, **kwargs))
    weaker = ImageSpec("the dog", "red", 32, 32, 4, 6.0, 8, control=_control(loaded, second), control_scale=0.0)
    (unscaled,) = run([(weaker, "ink")])
    assert np.abs(run.pixels(unscaled) - run.pixels(jobs[1])).max() > 0  # the control image changes the image


def test_control_images_only_where_a_controlnet_takes_them(cn_dir: Path, root: Path) -> None:
    loaded, plain = load(cn_dir), load(pipeline_dir(root, "sd"))
    spec = ImageSpec("a cat", None, 32, 32, 3, 7.5, 1)
    with pytest.raises(BadRequestError, match="every image needs a control image"):
        check_spec(loaded, spec)
    control = _control(loaded, picture(32, 32))
    with pytest.raises(BadRequestError, match="img2img and inpainting are not served on a ControlNet"):
        check_spec(loaded, replace(spec, control=control, init=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
    with pytest.raises(BadRequestError, match="needs a ControlNet pipeline"):
        check_spec(plain, replace(spec, control=control))
    check_spec(loaded, replace(spec, control=control))


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
        a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 32, "height": 32})
        assert a1111.status_code == 400 and "alwayson_scripts" in a1111.json()["error"]["message"]
        edit = http.post("/v1/images/edits", data={"prompt": "a cat", "control_image": body["control_image"]},
                         files={"image": ("p.png", base64.b64decode(body["control_image"]), "image/png")})  # fmt: skip
        assert edit.status_code == 400 and "not on edits" in edit.json()["error"]["message"]
        not_an_image = http.post("/v1/images/generations", json={**body, "control_image": "aGVsbG8="})
        assert not_an_image.status_code == 400 and "control_image" in not_an_image.json()["error"]["message"]
