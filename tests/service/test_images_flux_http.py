"""A Flux pipeline dir served end to end (real uvicorn, httpx): images equal plain diffusers' with the LyCORIS
network applied, with and without true CFG; a negative prompt without `true_cfg_scale` and a file with a key for
a module the transformer lacks are 400s."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import ADMIN_TOKEN, World, start_server, stop_server
from .flux_world import MULT, lycoris_flux_file, register_linear_preset, with_extra_key
from .images_world import assert_pixels_close, img2img_reference, load, picture, pipeline_dir, reference_image
from .test_images import b64_png, png

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MISSING = "lycoris_single_transformer_blocks_9_proj_mlp"  # the tiny transformer has two single-stream blocks


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Any]:
    """The pipeline dir, a LyCORIS file `ly` (and a bad copy under the adapter root), and the reference pipeline
    with LyCORIS's network applied at multiplier MULT."""
    root = tmp_path_factory.mktemp("flux-world")
    model = pipeline_dir(root, "flux")
    (root / "adapters").mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_linear_preset(monkeypatch)
        reference = load(model).pipe
        lycoris_flux_file(root / "adapters" / "ly.safetensors", reference.transformer)  # applied in place
    with_extra_key(root / "adapters" / "ly.safetensors", root / "adapters" / "bad.safetensors", MISSING)
    return World(root, model, root / "adapters", {"ly": root / "adapters" / "ly.safetensors"}), reference


def test_flux_dir_served_over_http(flux_world: tuple[World, Any]) -> None:
    world, reference = flux_world
    server = start_server(world, "--adapter", f"ly={world.adapters['ly']}", "--device", "cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            body = {"model": "tiny", "prompt": "a red cat", "size": "32x32", "num_inference_steps": 3, "seed": 4,
                    "adapters": [{"name": "ly", "scale": MULT}], "guidance_scale": 5.0}  # fmt: skip
            response = http.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
            (served,) = [png(d["b64_json"]) for d in response.json()["data"]]
            assert_pixels_close(served, reference_image(reference, "a red cat", 4, guidance_scale=5.0))
            refused = http.post("/v1/images/generations", json={**body, "negative_prompt": "blurry"})
            assert refused.status_code == 400 and "true_cfg_scale" in refused.json()["error"]["message"]
            cfg = {**body, "negative_prompt": "blurry", "true_cfg_scale": 3.0}
            response = http.post("/v1/images/generations", json=cfg)
            assert response.status_code == 200, response.text
            (served,) = [png(d["b64_json"]) for d in response.json()["data"]]
            want = reference_image(
                reference, "a red cat", 4, guidance_scale=5.0, negative_prompt="blurry", true_cfg_scale=3.0
            )
            assert_pixels_close(served, want)
            tagged = {"prompt": f"a red <lora:ly:{MULT}> cat", "negative_prompt": "blurry", "true_cfg_scale": 3.0,
                      "cfg_scale": 5.0, "steps": 3, "seed": 4, "width": 32, "height": 32}  # fmt: skip
            response = http.post("/sdapi/v1/txt2img", json=tagged)  # AUTOMATIC1111's API, the same extension
            assert response.status_code == 200, response.text
            assert_pixels_close(png(response.json()["images"][0]), want)
            start = picture(32, 32, seed=6)
            img2img = {**tagged, "init_images": [b64_png(start)], "denoising_strength": 0.7, "negative_prompt": "",
                       "true_cfg_scale": None}  # fmt: skip
            response = http.post("/sdapi/v1/img2img", json=img2img)  # a starting image, on Flux too
            assert response.status_code == 200, response.text
            _, want = img2img_reference(reference, "flux", start, "a red cat", 4, strength=0.7, num_inference_steps=3,
                                        guidance_scale=5.0)  # fmt: skip
            assert_pixels_close(png(response.json()["images"][0]), want)
            bad = http.post("/v1/adapters", json={"name": "bad", "source": "bad.safetensors"}, headers=AUTH)
            assert bad.status_code == 400 and MISSING in bad.json()["error"]["message"], bad.text
            models = {m["id"] for m in http.get("/v1/models").json()["data"]}
            assert models == {"tiny", "ly"}  # nothing loaded from the bad file, nothing lost
    finally:
        stop_server(server)
