"""`lokr-serve ray` on a diffusers pipeline: the ingress serves the image routes (OpenAI's, streamed too, and
A1111's), routed by the request's first adapter, and the images are the single-process server's (diffusers with
peft's LoKr)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import World
from .images_world import assert_pixels_close, peft_reference_pipe, peft_unet_adapter, picture, pipeline_dir
from .images_world import reference_image as diffusers_image
from .test_ray import ADMIN, RayApp, ray_running

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
INK_SEED = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("ray-images")
    model = pipeline_dir(root, "sd")
    ink = peft_unet_adapter(model, root / "adapters" / "ink", seed=INK_SEED)
    return World(root, model, root / "adapters", {"ink": ink})


@pytest.fixture(scope="module")
def ray_app(world: World) -> Iterator[RayApp]:
    with ray_running(world, "--adapter", f"ink={world.adapters['ink']}", "--device", "cpu") as app:
        yield app


@pytest.fixture(scope="module")
def rc(ray_app: RayApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_app.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def ink_image(world: World) -> np.ndarray:
    """What diffusers draws with peft's LoKr `ink` injected: "the dog", seed 4, 32x32, 3 steps, CFG 6."""
    return diffusers_image(peft_reference_pipe(world.model_dir, INK_SEED), "the dog", 4, guidance_scale=6.0)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def test_openai_images_through_the_ingress_equal_diffusers(rc: httpx.Client, ink_image: np.ndarray) -> None:
    body = {"model": "ink", "prompt": "the dog", "size": "32x32", "num_inference_steps": 3, "seed": 4,
            "guidance_scale": 6.0}  # fmt: skip
    response = rc.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert_pixels_close(_pixels(response.json()["data"][0]["b64_json"]), ink_image)
    streamed = rc.post("/v1/images/generations", json={**body, "stream": True, "partial_images": 1})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert_pixels_close(_pixels(events[-1]["b64_json"]), ink_image)


def test_a1111_through_the_ingress_routes_by_its_lora_tag(rc: httpx.Client, ink_image: np.ndarray) -> None:
    body = {"prompt": "the <lora:ink:1> dog", "steps": 3, "cfg_scale": 6.0, "seed": 4, "width": 32, "height": 32}
    response = rc.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert_pixels_close(_pixels(response.json()["images"][0]), ink_image)
    unknown = rc.post("/sdapi/v1/txt2img", json={**body, "prompt": "a <lora:nobody:1> dog"})
    assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
    assert [lora["name"] for lora in rc.get("/sdapi/v1/loras").json()] == ["ink"]
    assert rc.get("/sdapi/v1/samplers").status_code == 200  # the model's own listings come from a replica
    assert {card["kind"] for card in rc.get("/v1/models").json()["data"]} == {"image"}
    wrong = rc.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"  # as `serve` answers


def test_image_edits_through_the_ingress(rc: httpx.Client) -> None:
    buf = io.BytesIO()
    picture(32, 32, seed=3).save(buf, format="PNG")
    form = {"prompt": "a red cat", "adapters": json.dumps([{"name": "ink", "scale": 0.7}]), "seed": "4",
            "num_inference_steps": "4", "strength": "0.75"}  # fmt: skip
    response = rc.post("/v1/images/edits", data=form, files={"image": ("start.png", buf.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    assert _pixels(response.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
    listed = rc.get("/v1/adapters/ink", headers=ADMIN).json()
    assert listed["replicas"], listed  # some replica holds it: the edit was routed to one that loaded it
