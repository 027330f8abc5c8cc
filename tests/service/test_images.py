"""The image server end to end: a real uvicorn serving a tiny SD pipeline dir, talked to with httpx and openai."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from service.backend import ModelLoadError
from service.images.load import load_pipeline
from service.images.lora_tags import LoraTag, parse_lora_tags
from service.settings import Settings

from .conftest import ADMIN_TOKEN, Server, World, start_server, stop_server
from .images_world import (
    assert_pixels_close,
    img2img_reference,
    load,
    peft_reference_pipe,
    peft_unet_adapter,
    picture,
    pipeline_dir,
    reference_image,
)

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PEFT_SEED = 5


@pytest.fixture(scope="module")
def image_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("image-world")
    model = pipeline_dir(root, "sd")
    adapters = {"ink": peft_unet_adapter(model, root / "adapters" / "ink", seed=PEFT_SEED)}
    return World(root, model, root / "adapters", adapters)


@pytest.fixture(scope="module")
def image_server(image_world: World) -> Iterator[Server]:
    srv = start_server(image_world, "--adapter", f"ink={image_world.adapters['ink']}", "--device", "cpu")
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def http(image_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_server.url, timeout=300) as c:
        yield c


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def generate(http: httpx.Client, **body: Any) -> list[np.ndarray]:
    body = {"model": "tiny", "size": "32x32", "num_inference_steps": 3, **body}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return [png(d["b64_json"]) for d in response.json()["data"]]


def test_openai_client_gets_diffusers_images(image_server: Server, image_world: World) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{image_server.url}/v1", api_key="unused", timeout=300)
    result = client.images.generate(
        model="tiny", prompt="a red cat", n=2, size="32x32", response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"seed": 21, "num_inference_steps": 3, "negative_prompt": "dog"},
    )  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    ref = load(image_world.model_dir).pipe
    for k, image in enumerate(result.data):
        assert image.b64_json is not None
        want = reference_image(ref, "a red cat", 21 + k, negative_prompt="dog")  # seed S + k
        assert_pixels_close(png(image.b64_json), want)


def test_served_peft_adapter_equals_peft_reference(http: httpx.Client, image_world: World) -> None:
    (served,) = generate(http, model="ink", prompt="the dog", seed=4, guidance_scale=6.0)
    want = reference_image(peft_reference_pipe(image_world.model_dir, PEFT_SEED), "the dog", 4, guidance_scale=6.0)
    assert_pixels_close(served, want)


def test_a1111_text_encoder_and_unet_multipliers_over_http(http: httpx.Client, image_world: World) -> None:
    """`<lora:NAME:TE:UNET>` reaches the engine (an adapter on the text encoder and the UNet, hot-loaded): a TE of 0
    differs from TE equal to UNET, `<lora:both:0.6:0.6>` is `<lora:both:0.6>`; `info` reports both multipliers. The
    OpenAI route's `text_encoder_scale` is the same multiplier: the same images."""
    from .images_world import own_adapter

    own_adapter(image_world.model_dir, image_world.root / "adapters" / "both", seed=4)
    assert http.post("/v1/adapters", json={"name": "both", "source": "both"}, headers=AUTH).status_code == 201

    def txt2img(prompt: str) -> dict[str, Any]:
        body = {"prompt": prompt, "steps": 3, "cfg_scale": 7.5, "seed": 5, "width": 32, "height": 32}
        response = http.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    try:
        same, explicit, unet_only = (txt2img(p) for p in ("a <lora:both:0.6> cat", "a <lora:both:0.6:0.6> cat",
                                                          "a <lora:both:0:0.6> cat"))  # fmt: skip
        openai = [generate(http, prompt="a cat", guidance_scale=7.5, seed=5,
                           adapters=[{"name": "both", "scale": 0.6, "text_encoder_scale": te}])[0]
                  for te in (0.0, 0.6, None)]  # fmt: skip
    finally:
        http.delete("/v1/adapters/both", headers=AUTH)
    assert_pixels_close(png(explicit["images"][0]), png(same["images"][0]))
    assert np.abs(png(unet_only["images"][0]) - png(same["images"][0])).max() > 0
    assert json.loads(unet_only["info"])["loras"] == [{"name": "both", "weight": 0.6, "te": 0.0, "unet": 0.6}]
    for served, a1111 in zip(openai, (unet_only, explicit, same), strict=True):
        assert_pixels_close(served, png(a1111["images"][0]))


def test_guidance_rescale_reaches_both_routes(http: httpx.Client) -> None:
    """`guidance_rescale` (an extension on both routes): the same image from each, A1111's `info` reports it, and it
    changes the image (its parity with diffusers: test_images_parity)."""
    rescaled = generate(http, prompt="a red cat", seed=3, guidance_scale=9.0, guidance_rescale=0.7)[0]
    body = {"prompt": "a red cat", "steps": 3, "cfg_scale": 9.0, "seed": 3, "width": 32, "height": 32,
            "guidance_rescale": 0.7}  # fmt: skip
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["guidance_rescale"] == 0.7
    assert_pixels_close(png(response.json()["images"][0]), rescaled)
    plain = generate(http, prompt="a red cat", seed=3, guidance_scale=9.0)[0]
    assert np.abs(plain - rescaled).max() > 0


def test_a1111_txt2img_lora_tags_and_listings(http: httpx.Client) -> None:
    body = {"prompt": "a red <lora:ink:0.6> cat", "steps": 3, "cfg_scale": 7.5, "seed": 3, "width": 32,
            "height": 32, "batch_size": 2}  # fmt: skip
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [3, 4] and info["prompt"] == "a red cat"
    assert answer["parameters"]["prompt"] == body["prompt"]
    same = generate(http, prompt="a red cat", n=2, seed=3, guidance_scale=7.5, adapters=[{"name": "ink", "scale": 0.6}])
    for got, want in zip(answer["images"], same, strict=True):
        assert_pixels_close(png(got), want)
    base = generate(http, prompt="a red cat", seed=3, guidance_scale=7.5)[0]
    assert np.abs(same[0] - base).max() > 8  # the tag's adapter was applied
    loras = http.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in loras] == ["ink"] and loras[0]["path"] == "ink"  # no server directories
    models = http.get("/v1/models").json()["data"]
    assert {(m["id"], m["kind"]) for m in models} == {("tiny", "image"), ("ink", "image")}


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/images/generations", {"prompt": "a", "size": "33x32"}, 400, "invalid_size"),
        ("/v1/images/generations", {"prompt": "a", "size": "4096x4096"}, 400, "invalid_size"),
        ("/v1/images/generations", {"prompt": "a", "size": "big"}, 400, "invalid_size"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": 0}, 400, "invalid_steps"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": 1001}, 400, "invalid_steps"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": "2"}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": True}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": 2.0}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "n": "2"}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "seed": "1"}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "output_format": "gif"}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "guidance_rescale": 1.5}, 400, "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "guidance_rescale": 0.7, "guidance_scale": 1.0}, 400,
         "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "guidance_rescale": 0.7, "cfg_scale": 1}, 400, "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "steps": "20"}, 400, "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 400,
         "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True, "hr_upscaler": "Lanczos", "hr_prompt": "b"}, 400,
         "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True, "hr_upscaler": "Lanczos", "hr_resize_x": 9000}, 400,
         "invalid_size"),
        ("/v1/images/generations", {"prompt": "a", "num_inference_steps": 500}, 400, "invalid_steps"),
        ("/v1/images/generations", {"prompt": "a", "adapters": [{"name": "ink", "scale": 1e9}]}, 400,
         "invalid_request"),
        ("/v1/images/generations", {"prompt": "a", "adapters": [{"name": "nope"}]}, 404, "adapter_not_found"),
        ("/v1/images/generations", {"prompt": "a", "model": "nope"}, 404, "model_not_found"),
        ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 400, "invalid_response_format"),
        ("/v1/images/generations", {"prompt": "a", "n": 99}, 400, "invalid_n"),
        ("/v1/images/generations", {"prompt": "a \ud800 cat"}, 400, "invalid_request"),  # a lone surrogate
        ("/sdapi/v1/txt2img", {"prompt": "a", "negative_prompt": "\udfff"}, 400, "invalid_request"),
        ("/sdapi/v1/txt2img", {"prompt": "<lora:nope:1> a"}, 404, "adapter_not_found"),
        ("/sdapi/v1/txt2img", {"prompt": "<lora:ink:x> a"}, 400, "invalid_lora_tag"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "width": 30, "height": 32}, 400, "invalid_size"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "DPM fast"}, 400, "invalid_sampler"),
        ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "Euler a", "scheduler": "karras"}, 400,
         "invalid_scheduler"),
        ("/v1/images/generations", {"prompt": "a", "sampler": "nope"}, 400, "invalid_sampler"),
        ("/v1/images/generations", {"prompt": "a", "scheduler": "DDIMScheduler"}, 400, "invalid_scheduler"),
        ("/v1/completions", {"model": "tiny", "prompt": "a"}, 400, "wrong_model_kind"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}, 400,
         "wrong_model_kind"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_in_one_shape(http: httpx.Client, path: str, body: dict, status: int, code: str) -> None:
    content = json.dumps(body)  # ASCII, lone surrogates as escapes (httpx's json= cannot encode them)
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_samplers_by_a1111_and_diffusers_names_give_diffusers_images(http: httpx.Client, image_world: World) -> None:
    """Old-style "DPM++ 2M Karras", A1111 1.9's sampler + scheduler, and the OpenAI route's extension fields give
    the same image: diffusers' with `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`."""
    body = {"prompt": "a red cat", "steps": 3, "cfg_scale": 7.5, "seed": 9, "width": 32, "height": 32}
    old = http.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M Karras"}).json()
    new = http.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}).json()
    info = json.loads(old["info"])
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    (openai_route,) = generate(
        http, prompt="a red cat", seed=9, guidance_scale=7.5, sampler="DPMSolverMultistepScheduler", scheduler="karras"
    )
    pipe = load(image_world.model_dir).pipe
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    want = reference_image(pipe, "a red cat", 9, guidance_scale=7.5)
    for got in (png(old["images"][0]), png(new["images"][0]), openai_route):
        assert_pixels_close(got, want)
    default = http.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(default["info"])["sampler_name"] == "PNDMScheduler"  # none named: the pipeline's own
    assert np.abs(png(default["images"][0]) - want).max() > 8
    samplers = {s["name"]: s for s in http.get("/sdapi/v1/samplers").json()}
    assert samplers["Euler a"]["options"]["diffusers"] == "EulerAncestralDiscreteScheduler"
    assert "karras" in {s["name"] for s in http.get("/sdapi/v1/schedulers").json()}


def test_a1111_clients_connect_read_the_checkpoint_and_choose_it(http: httpx.Client) -> None:
    """What A1111 clients do before generating: list checkpoints, read the options, set the one they want."""
    assert [m["title"] for m in http.get("/sdapi/v1/sd-models").json()] == ["tiny"]
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    other = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl-base"})
    assert other.status_code == 400 and "serves one checkpoint, 'tiny'" in other.json()["error"]["message"]
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    unknown = http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert unknown.status_code == 400 and "CLIP_stop_at_last_layers" in unknown.json()["error"]["message"]


def test_a1111_listings_name_what_the_hires_fix_takes_and_nothing_this_server_lacks(http: httpx.Client) -> None:
    """The upscalers listed are the ones `hr_upscaler` takes (each runs); VAEs, styles, embeddings, hypernetworks
    and face restorers are empty lists; a LoRA-folder refresh is a no-op that succeeds."""
    pixel = [u["name"] for u in http.get("/sdapi/v1/upscalers").json()]
    latent = [m["name"] for m in http.get("/sdapi/v1/latent-upscale-modes").json()]
    assert pixel == ["Lanczos", "Nearest"] and latent[0] == "Latent" and len(latent) == 6
    body = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "enable_hr": True, "hr_scale": 1.5}
    for name in pixel + latent:
        answer = http.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": name})
        assert answer.status_code == 200, (name, answer.text)
    for path in ["sd-vae", "prompt-styles", "hypernetworks", "face-restorers"]:
        assert http.get(f"/sdapi/v1/{path}").json() == []
    assert http.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert http.post("/sdapi/v1/refresh-loras").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/images/generations", {"n": 17}, "n must be in [1, 16] on this server (LOKR_MAX_N), got 17"),
        ("/v1/images/generations", {"n": 129}, "n must be in [1, 16] on this server (LOKR_MAX_N), got 129"),
        ("/v1/images/generations", {"num_inference_steps": 1001}, "num_inference_steps must be in [1, 200], got 1001"),
        ("/sdapi/v1/txt2img", {"steps": 1000}, "steps must be in [1, 200], got 1000"),
        ("/sdapi/v1/txt2img", {"batch_size": 9, "n_iter": 2}, "batch_size x n_iter must be in [1, 16]"),
    ],
)  # fmt: skip
def test_limits_are_one_message_in_the_routes_own_words(http: httpx.Client, path: str, body: dict, says: str) -> None:
    response = http.post(path, json={"prompt": "a", **body})
    assert response.status_code == 400 and says in response.json()["error"]["message"]


def test_output_formats_and_the_seed_of_each_image(http: httpx.Client) -> None:
    """OpenAI's `output_format` (png, jpeg, webp; `output_compression` for the lossy ones) and each image's `seed`,
    which reproduces it, also when the request named none."""
    body = {"model": "tiny", "prompt": "a red cat", "size": "32x32", "num_inference_steps": 2, "n": 2}
    for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        answer = http.post("/v1/images/generations", json={**body, "output_format": fmt, "output_compression": 10})
        assert answer.status_code == 200 and answer.json()["output_format"] == fmt
        for item in answer.json()["data"]:
            assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).format == pil
    data = http.post("/v1/images/generations", json=body).json()["data"]  # no seed: a random one per request
    seed = data[0]["seed"]
    assert data[1]["seed"] == seed + 1
    again = http.post("/v1/images/generations", json={**body, "seed": seed}).json()["data"]
    assert [d["b64_json"] for d in again] == [d["b64_json"] for d in data]


def test_an_image_count_the_queue_cannot_hold_is_a_400_not_a_503() -> None:
    """`n` images over `--max-queue` could only ever be refused as "queue full": a 400 naming the flag instead."""
    from service.errors import BadRequestError
    from service.images.front import A1111_NAMES, ImageFront
    from service.images.rows import ImageSpec

    images = ImageFront(None, None, None, None, "tiny", max_n=16, max_queue=2)  # type: ignore[arg-type]
    spec = ImageSpec("a", None, 32, 32, 2, 7.5, 0)
    with pytest.raises(BadRequestError, match=r"batch_size x n_iter must be in \[1, 2\] on this server \(--max-queue"):
        images.specs(spec, 3, A1111_NAMES)


def test_a_huge_size_is_refused_for_its_size_not_its_form(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "a", "size": "100000x100000"})
    assert response.status_code == 400
    assert "pixel limit" in response.json()["error"]["message"]


@pytest.mark.slow
def test_disconnect_cancels_the_images(image_server: Server, http: httpx.Client) -> None:
    body = {"model": "ink", "prompt": "a cat", "size": "256x256", "num_inference_steps": 200, "seed": 1}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=image_server.url, timeout=3) as impatient:
        impatient.post("/v1/images/generations", json=body)  # minutes of work; the client leaves after 3 s
    deadline = time.monotonic() + 120  # far less than 200 steps at 256x256 take
    while http.get("/v1/adapters/ink", headers=AUTH).json()["in_use"] != 0:
        assert time.monotonic() < deadline, "the cancelled images still hold their adapter"
        time.sleep(0.2)
    assert len(generate(http, prompt="a cat", seed=2)) == 1  # and the server serves the next request
    assert "never retrieved" not in image_server.log.read_text()  # the cancelled images' outcomes were all read


def test_the_image_server_keeps_a_folded_copy_per_batch_image_by_default(image_server: Server) -> None:
    """`--fold-cache auto` on the tiny pipeline (memory to spare): one copy per image of a full batch (16)."""
    log = image_server.log.read_text()
    assert "fold cache: 16 folded weight copies per adapted layer (auto:" in log
    assert "it/s]" not in log  # no loading progress bars among the log's lines


def test_causal_lm_server_refuses_image_routes(client: httpx.Client) -> None:
    routes = [("POST", "/v1/images/generations"), ("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/loras"),
              ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/schedulers"), ("GET", "/sdapi/v1/sd-models"),
              ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"), ("GET", "/sdapi/v1/progress"),
              ("POST", "/sdapi/v1/img2img"), ("POST", "/v1/images/edits")]  # fmt: skip
    for method, path in routes:
        response = client.request(method, path, json={"prompt": "a"} if method == "POST" else None)
        assert response.status_code == 400 and response.json()["error"]["code"] == "wrong_model_kind"
    assert {m["kind"] for m in client.get("/v1/models").json()["data"]} == {"causal-lm"}


def test_loading_a_pipeline_turns_off_diffusers_progress_bars(image_world: World) -> None:
    """Loading bars would break the server's log lines (the logging setup leaves diffusers to the loader)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_progress_bar()
    load(image_world.model_dir)
    assert not diffusers_logging.is_progress_bar_enabled()


def test_load_refuses_pickle_weights_and_other_pipelines(image_world: World, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "pickled"
    shutil.copytree(image_world.model_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_pipeline(str(copy), "cpu", "float32")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    refusal = r"KandinskyV22Pipeline pipeline; lokr-serve serves .*StableDiffusion3Pipeline"
    with pytest.raises(ModelLoadError, match=refusal):
        load_pipeline(str(copy), "cpu", "float32")


def test_lora_tags() -> None:
    """As A1111's Lora extension reads them: TE then UNET positional (UNET defaults to TE), `te=` / `unet=` override,
    a 4th positional or `dyn=` (DyLoRA's) is an integer; anything else a 400 naming the tag."""
    assert parse_lora_tags("a <lora:ink:0.8> cat <lyco:b> x") == ("a cat x", [LoraTag("ink", 0.8, 0.8), LoraTag("b")])
    assert parse_lora_tags("plain") == ("plain", [])
    cases = {
        "<lora:ink:1:0.5>": LoraTag("ink", 1.0, 0.5), "<lora:ink:unet=0.3>": LoraTag("ink", 1.0, 0.3),
        "<lora:ink:0.5:te=0.2>": LoraTag("ink", 0.2, 0.2), "<LORA:ink:te=0.4:0.9>": LoraTag("ink", 0.4, 0.4),
        "<lora:ink:0.7:0.1:16>": LoraTag("ink", 0.7, 0.1), "<lora:ink:dyn=8:0.6>": LoraTag("ink", 0.6, 0.6),
    }  # fmt: skip
    for tag, want in cases.items():
        assert parse_lora_tags(f"x {tag}") == ("x", [want]), tag
    from service.errors import BadRequestError

    bad_tags = ("<lora:ink:lbw=1,0,1>", "<lora:ink:x>", "<lora::1>", "<lora:ink:1:0.5:abc>", "<lora:ink:1:1e9>",
                "<lora:ink:>")  # fmt: skip
    for bad in bad_tags:
        with pytest.raises(BadRequestError, match=r"not served|name the adapter|must be"):
            parse_lora_tags(bad)


def test_max_image_pixels_bounds_what_a_request_may_ask(image_world: World) -> None:
    """`--max-image-pixels`: an operator on CPU caps the size one request may tie the engine up with."""
    from service.errors import BadRequestError
    from service.images.backend import ImageBackend
    from service.images.rows import ImageJob, ImageSpec
    from service.metrics import Metrics

    backend = ImageBackend(load_pipeline(str(image_world.model_dir), "cpu", "float32"), Metrics(), max_pixels=64 * 64)

    def job(side: int) -> ImageJob:
        return ImageJob([], None, None, lambda event: None, spec=ImageSpec("a", None, side, side, 3, 7.5, 1))

    backend.check(job(64))
    with pytest.raises(BadRequestError, match=r"over this server's 4096-pixel limit \(64x64; --max-image-pixels\)"):
        backend.check(job(72))


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def box_mask(size: int = 32) -> Image.Image:
    """White (repainted) in a box, black elsewhere."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[6:22, 4:20] = 255
    return Image.fromarray(mask, "L")


MASK_B64 = b64_png(box_mask())


def test_a1111_img2img_equals_diffusers_img2img(http: httpx.Client, image_world: World) -> None:
    """One starting image serves the batch (seeds S, S + 1), as diffusers' img2img pipeline draws them; without
    width and height the output takes the image's size rounded down to the size unit (8 here: 44x70 -> 40x64)."""
    start = picture(32, 32, seed=2)
    body = {"prompt": "a red cat", "init_images": [b64_png(start)], "denoising_strength": 0.6, "steps": 5,
            "cfg_scale": 7.5, "seed": 3, "batch_size": 2, "width": 32, "height": 32}  # fmt: skip
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.6 and info["all_seeds"] == [3, 4]
    assert "init_images" not in answer["parameters"]
    pipe = load(image_world.model_dir).pipe
    for k, got in enumerate(answer["images"]):
        _, want = img2img_reference(pipe, "sd", start, "a red cat", 3 + k, strength=0.6, num_inference_steps=5,
                                    guidance_scale=7.5)  # fmt: skip
        assert_pixels_close(png(got), want)
    own = {"prompt": "a", "init_images": [f"data:image/png;base64,{b64_png(picture(44, 70))}"], "steps": 2}
    response = http.post("/sdapi/v1/img2img", json=own)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size == (40, 64)


def test_a1111_resize_modes_crop_or_fill_the_picture_as_diffusers_resize_modes(
    http: httpx.Client, image_world: World
) -> None:
    """resize_mode 1 (crop and resize) and 2 (resize and fill) of a 48x32 picture to 32x32: diffusers' img2img
    given the picture as `image_processor.resize(..., resize_mode="crop" / "fill")` makes it. (The tiny pipeline's
    random VAE all but ignores the picture in its pixels: that each mode reaches the picture is checked on the
    starting pixels, in test_images_inpaint.)"""
    start = picture(48, 32, seed=9)
    pipe = load(image_world.model_dir).pipe
    for mode, name in ((1, "crop"), (2, "fill")):
        body = {"prompt": "a red cat", "init_images": [b64_png(start)], "resize_mode": mode, "denoising_strength": 0.5,
                "steps": 4, "seed": 2, "width": 32, "height": 32}  # fmt: skip
        response = http.post("/sdapi/v1/img2img", json=body)
        assert response.status_code == 200, response.text
        sized = pipe.image_processor.resize(start, height=32, width=32, resize_mode=name)
        _, want = img2img_reference(pipe, "sd", sized, "a red cat", 2, strength=0.5, num_inference_steps=4,
                                    guidance_scale=7.0)  # fmt: skip
        assert_pixels_close(png(response.json()["images"][0]), want)


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        ({"mask": "%%%"}, "invalid_image", "mask is not base64"),
        ({"mask": base64.b64encode(b"not an image").decode()}, "invalid_image", "mask is not a readable image"),
        ({"mask": MASK_B64, "inpainting_fill": 0}, "invalid_request", "inpainting_fill 0 (fill)"),
        ({"mask": MASK_B64, "inpaint_full_res": 1, "init_images": [b64_png(picture(40, 32))]}, "invalid_image",
         "needs the mask (32x32) and every picture to be the same size"),
        ({"mask": MASK_B64, "mask_round": False}, "invalid_request", "mask_round false"),
        ({"mask": MASK_B64, "mask_blur_x": 2}, "invalid_request", "mask_blur_x / mask_blur_y"),
        ({"resize_mode": 3}, "invalid_request", "resize_mode 3 is not served"),
        ({"init_images": ["A", "B", "C"], "batch_size": 2}, "invalid_request", "3 init_images for batch_size 2"),
        ({"init_images": ["%%%"]}, "invalid_image", "init_images[0] is not base64"),
        ({"init_images": [base64.b64encode(b"not an image").decode()]}, "invalid_image", "not a readable image"),
        ({"denoising_strength": 0.1, "steps": 4}, "invalid_strength", "denoising_strength 0.1 with steps 4 runs"),
        ({"denoising_strength": 1.5}, "invalid_request", "denoising_strength"),
        ({"width": 30}, "invalid_size", "size 30x32"),
    ],
)  # fmt: skip
def test_img2img_refusals_name_the_field(http: httpx.Client, extra: dict, code: str, says: str) -> None:
    body = {"prompt": "a", "init_images": [b64_png(picture(32, 32))], "steps": 4, **extra}
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_openai_image_edits_are_img2img(image_server: Server, image_world: World) -> None:
    """The `openai` client's `images.edit` (multipart form): every image starts from the uploaded one, as diffusers'
    img2img pipeline at the same `strength` and seed S + k; the form's numbers arrive as text."""
    from openai import OpenAI

    start = picture(32, 32, seed=4)
    client = OpenAI(base_url=f"{image_server.url}/v1", api_key="unused", timeout=300)
    result = client.images.edit(
        model="tiny", image=("start.png", base64.b64decode(b64_png(start)), "image/png"), prompt="the dog", n=2,
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 4, "strength": 0.75, "guidance_scale": 6.0},
    )  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    pipe = load(image_world.model_dir).pipe
    for k, image in enumerate(result.data):
        assert image.b64_json is not None
        _, want = img2img_reference(pipe, "sd", start, "the dog", 7 + k, strength=0.75, num_inference_steps=4,
                                    guidance_scale=6.0)  # fmt: skip
        assert_pixels_close(png(image.b64_json), want)


@pytest.mark.parametrize(
    ("files", "data", "code", "says"),
    [
        ({"mask": b"x"}, {}, "invalid_image", "mask is not a readable image"),
        ({"mask": ("m.png", base64.b64decode(b64_png(Image.new("RGB", (32, 32)))), "image/png")}, {},
         "invalid_image", "mask has no alpha channel"),
        ({"mask": ("m.png", base64.b64decode(b64_png(Image.new("RGBA", (16, 32)))), "image/png")}, {},
         "invalid_image", "the mask must have the image's size"),
        ({}, {"mask": "x"}, "invalid_image", "mask must be a file"),
        ({"other": b"x"}, {}, "invalid_image", "send one image file as the multipart/form-data field `image`"),
        ({}, {"n": "two"}, "invalid_request", "n:"),
        ({}, {"adapters": "[{"}, "invalid_request", "adapters must be JSON text"),
        ({}, {"adapters": '[{"name": "nope"}]'}, "adapter_not_found", "nope"),
        ({}, {"strength": "0.1", "num_inference_steps": "4"}, "invalid_strength", "strength 0.1 with"),
        ({}, {"size": "30x32"}, "invalid_size", "size 30x32"),
    ],
)  # fmt: skip
def test_image_edit_refusals(http: httpx.Client, files: dict, data: dict, code: str, says: str) -> None:
    parts = {"image": ("a.png", base64.b64decode(b64_png(picture(32, 32))), "image/png"), **files}
    if "other" in files:
        del parts["image"]
    response = http.post("/v1/images/edits", files=parts, data={"prompt": "a", **data})
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_a1111_inpainting_equals_diffusers_inpainting(http: httpx.Client, image_world: World) -> None:
    """A `mask` (white: repainted), blurred by `mask_blur` (A1111's default 4) as diffusers' `mask_processor.blur`
    does, then inverted or not: the images equal diffusers' inpainting pipeline given that mask."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import ImageOps

    start, mask = picture(32, 32, seed=6), box_mask()
    pipe = load(image_world.model_dir).pipe
    body = {"prompt": "a red cat", "init_images": [b64_png(start)], "mask": MASK_B64, "denoising_strength": 0.8,
            "steps": 4, "cfg_scale": 7.5, "seed": 11, "batch_size": 2}  # fmt: skip
    for extra, want_mask in (
        ({}, VaeImageProcessor.blur(mask, 4)),
        ({"inpainting_mask_invert": 1, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False},
         ImageOps.invert(mask)),
    ):  # fmt: skip
        response = http.post("/sdapi/v1/img2img", json={**body, **extra})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert "mask" not in answer["parameters"] and json.loads(answer["info"])["inpainting_fill"] == 1
        for k, got in enumerate(answer["images"]):
            _, want = img2img_reference(pipe, "sd", start, "a red cat", 11 + k, mask=want_mask, strength=0.8,
                                        num_inference_steps=4, guidance_scale=7.5)  # fmt: skip
            assert_pixels_close(png(got), want)


def test_a1111_only_masked_inpainting_equals_diffusers_padding_mask_crop(
    http: httpx.Client, image_world: World
) -> None:
    """`inpaint_full_res` ("only masked"): the region around the mask (`inpaint_full_res_padding` more) inpainted
    at width x height and pasted back into the picture, which keeps its own size: diffusers' inpainting pipeline
    with `padding_mask_crop`."""
    start = picture(48, 40, seed=3)
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[10:22, 14:30] = 255
    body = {"prompt": "a red cat", "init_images": [b64_png(start)], "mask": b64_png(Image.fromarray(mask, "L")),
            "mask_blur": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 4, "denoising_strength": 0.9,
            "steps": 4, "cfg_scale": 7.5, "seed": 5, "width": 32, "height": 32}  # fmt: skip
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    (got,) = response.json()["images"]
    pipe = load(image_world.model_dir).pipe
    _, want = img2img_reference(pipe, "sd", start, "a red cat", 5, mask=Image.fromarray(mask, "L"), height=32,
                                width=32, padding_mask_crop=4, strength=0.9, num_inference_steps=4,
                                guidance_scale=7.5)  # fmt: skip
    assert png(got).shape == (40, 48, 3)
    assert_pixels_close(png(got), want)
    assert np.array_equal(png(got)[30:], np.asarray(start)[30:])  # outside the mask: the picture itself


@pytest.mark.parametrize("kind", ["sd-inpaint", pytest.param("flux-fill", marks=pytest.mark.slow)])
def test_an_inpainting_checkpoint_is_served_for_masked_requests_only(kind: str, tmp_path: Path) -> None:
    """A `StableDiffusionInpaintPipeline` dir (9-channel UNet) or a `FluxFillPipeline` dir from the command line: a
    masked img2img equals the pipeline's own image; text to image is a 400 that says what the model needs."""
    model = pipeline_dir(tmp_path, kind)
    (tmp_path / "adapters").mkdir()
    server = start_server(World(tmp_path, model, tmp_path / "adapters", {}), "--device", "cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            refused = http.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2})
            assert refused.status_code == 400 and "is an inpainting model" in refused.json()["error"]["message"]
            start = picture(32, 32, seed=4)
            body = {"prompt": "a red cat", "init_images": [b64_png(start)], "mask": MASK_B64, "mask_blur": 0,
                    "denoising_strength": 0.8, "steps": 3, "cfg_scale": 7.5, "seed": 2}  # fmt: skip
            response = http.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 200, response.text
    finally:
        stop_server(server)
    pipe = load(model).pipe
    kwargs = {"strength": 0.8, "num_inference_steps": 3, "guidance_scale": 7.5}
    if kind == "sd-inpaint":
        _, want = img2img_reference(pipe, "sd", start, "a red cat", 2, mask=box_mask(), **kwargs)
    else:
        image = pipe("a red cat", image=start, mask_image=box_mask(), height=32, width=32,
                     generator=torch.Generator("cpu").manual_seed(2), **kwargs).images[0]  # fmt: skip
        want = np.asarray(image).astype(np.int16)
    assert_pixels_close(png(response.json()["images"][0]), want)


def test_openai_image_edits_with_a_mask_inpaint_its_transparent_pixels(
    image_server: Server, image_world: World
) -> None:
    """The `openai` client's `images.edit` with `mask` (an RGBA PNG of the image's size, transparent where edited)
    equals diffusers' inpainting pipeline with the white-where-transparent mask."""
    from openai import OpenAI

    start = picture(32, 32, seed=8)
    alpha = 255 - np.asarray(box_mask())  # transparent inside the box
    rgba = Image.fromarray(np.dstack([np.asarray(start), alpha]).astype(np.uint8), "RGBA")
    client = OpenAI(base_url=f"{image_server.url}/v1", api_key="unused", timeout=300)
    result = client.images.edit(
        model="tiny", image=("start.png", base64.b64decode(b64_png(start)), "image/png"), prompt="the dog",
        mask=("mask.png", base64.b64decode(b64_png(rgba)), "image/png"), response_format="b64_json",
        extra_body={"seed": 2, "num_inference_steps": 4, "strength": 0.9},
    )  # fmt: skip
    assert result.data is not None and result.data[0].b64_json is not None
    pipe = load(image_world.model_dir).pipe
    _, want = img2img_reference(pipe, "sd", start, "the dog", 2, mask=box_mask(), strength=0.9,
                                num_inference_steps=4)  # fmt: skip
    assert_pixels_close(png(result.data[0].b64_json), want)


def test_an_image_server_takes_img2img_bodies_over_the_json_default(http: httpx.Client) -> None:
    """A 1200x1200 photo-like PNG is several MiB as base64: over the 4 MiB a causal-LM server takes, under the
    image server's default (64 MiB); the picture is stretched to the asked size."""
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    text = b64_png(Image.fromarray(noise, "RGB"))
    assert len(text) > 4 << 20
    body = {"prompt": "a", "init_images": [text], "steps": 2, "width": 32, "height": 32, "seed": 1}
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text[:500]
    assert Settings(model="x").body_limit(images=False) == 4 << 20
    assert Settings(model="x", max_body_bytes="1MiB").body_limit(images=True) == 1 << 20


def test_clip_skip_per_request_on_both_routes(http: httpx.Client, image_world: World) -> None:
    """A1111's CLIP skip 2 (`override_settings.CLIP_stop_at_last_layers`, as its clients send it) and the OpenAI
    route's `clip_skip` 1 are diffusers' `clip_skip=1`; a CLIP skip of 1 is the default."""
    body = {"prompt": "a red cat", "steps": 3, "cfg_scale": 7.5, "seed": 5, "width": 32, "height": 32}
    overrides = {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny"}
    skip = http.post("/sdapi/v1/txt2img", json={**body, "override_settings": overrides})
    assert skip.status_code == 200, skip.text
    assert json.loads(skip.json()["info"])["clip_skip"] == 2
    (openai_route,) = generate(http, prompt="a red cat", seed=5, guidance_scale=7.5, clip_skip=1)
    pipe = load(image_world.model_dir).pipe
    want = reference_image(pipe, "a red cat", 5, guidance_scale=7.5, negative_prompt="", clip_skip=1)
    assert_pixels_close(png(skip.json()["images"][0]), want)
    assert_pixels_close(openai_route, reference_image(pipe, "a red cat", 5, guidance_scale=7.5, clip_skip=1))
    plain = http.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 1}})
    assert_pixels_close(png(plain.json()["images"][0]), reference_image(pipe, "a red cat", 5, negative_prompt=""))


def test_a1111_prompts_read_emphasis_and_break_while_the_openai_route_reads_text(
    http: httpx.Client, image_world: World
) -> None:
    """A1111's route reads `(word:1.4)`, `[word]` and BREAK as A1111 does (the image diffusers draws from the
    embeddings A1111's algorithm makes); the OpenAI route gives the same text to diffusers as it is."""
    from .test_images_prompts import CHUNKS, NEGATIVE, NEGATIVE_CHUNKS, PROMPT, _oracle

    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "cfg_scale": 7.5, "seed": 9, "width": 32,
            "height": 32}  # fmt: skip
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    pipe = load(image_world.model_dir).pipe
    cond, _ = _oracle(pipe, CHUNKS, xl=False)
    uncond, _ = _oracle(pipe, NEGATIVE_CHUNKS, xl=False)
    want = reference_image(pipe, None, 9, guidance_scale=7.5, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert_pixels_close(png(response.json()["images"][0]), want)
    (as_text,) = generate(http, prompt=PROMPT, negative_prompt=NEGATIVE, seed=9, guidance_scale=7.5)
    assert_pixels_close(as_text, reference_image(pipe, PROMPT, 9, guidance_scale=7.5, negative_prompt=NEGATIVE))
    assert np.abs(as_text - want).max() > 8  # the two readings give other images
    bad = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a (cat:1.2.3)"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_prompt", bad.text


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"CLIP_stop_at_last_layers": 0}, "must be a whole number from 1"),
        ({"CLIP_stop_at_last_layers": "2"}, "must be a whole number from 1"),
        ({"CLIP_stop_at_last_layers": 40}, "override_settings.CLIP_stop_at_last_layers must be in [1, "),
        ({"sd_vae": "other.vae"}, "override_settings not served: sd_vae"),
        ({"sd_model_checkpoint": "other"}, "serves one checkpoint, 'tiny'"),
    ],
)  # fmt: skip
def test_override_settings_are_honoured_or_refused(http: httpx.Client, overrides: dict, says: str) -> None:
    body = {"prompt": "a", "steps": 2, "width": 32, "height": 32, "override_settings": overrides}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


A1111_DEFAULTS = {
    "restore_faces": False, "tiling": False, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
    "seed_resize_from_w": 0, "styles": [], "script_name": "", "script_args": [], "alwayson_scripts": {},
    "send_images": True, "save_images": False, "do_not_save_grid": False, "eta": 0,
}  # fmt: skip  # what A1111 clients send when they use none of these


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("restore_faces", True, "restore_faces: face restoration"),
        ("tiling", True, "tiling: seamless tiling"),
        ("subseed_strength", 0.3, "subseed_strength: variation seeds"),
        ("seed_resize_from_w", 512, "seed_resize_from_w: seed resize"),
        ("styles", ["cinematic"], "styles: A1111's saved styles"),
        ("script_name", "x/y/z plot", "script_name: scripts are not served"),
        ("alwayson_scripts", {"ADetailer": {"args": [{"ad_model": "face"}]}}, "other than ControlNet are not served"),
        ("alwayson_scripts", {"controlnet": {"args": [{"image": "aGVsbG8="}]}}, "needs a ControlNet pipeline"),
    ],
)  # fmt: skip
def test_a1111_features_not_served_are_400s_not_other_images(
    http: httpx.Client, field: str, value: Any, says: str
) -> None:
    body = {"prompt": "a", "steps": 2, "width": 32, "height": 32, **A1111_DEFAULTS}
    assert http.post("/sdapi/v1/txt2img", json=body).status_code == 200  # a client's full default payload
    response = http.post("/sdapi/v1/txt2img", json={**body, field: value})
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
    img2img = {**body, field: value, "init_images": [b64_png(picture(32, 32))]}
    assert http.post("/sdapi/v1/img2img", json=img2img).status_code == 400


def test_a1111_hires_fix_is_txt2img_then_img2img_from_the_upscaled_image(
    http: httpx.Client, image_world: World
) -> None:
    """`enable_hr`: each image of the first pass, upscaled with PIL (Lanczos) to `hr_scale` x its size, is the
    starting picture of diffusers' img2img at `denoising_strength` over `hr_second_pass_steps`, same seed."""
    body = {"prompt": "a red cat", "steps": 3, "cfg_scale": 7.5, "seed": 3, "width": 32, "height": 32,
            "batch_size": 2, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
            "hr_second_pass_steps": 4, "denoising_strength": 0.5, "hr_sampler_name": "Use same sampler"}  # fmt: skip
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["hr_resize_x"], info["hr_resize_y"], info["hr_second_pass_steps"]) == (48, 48, 4)
    pipe = load(image_world.model_dir).pipe
    for k, got in enumerate(response.json()["images"]):
        first = pipe("a red cat", height=32, width=32, num_inference_steps=3, negative_prompt="",
                     generator=torch.Generator("cpu").manual_seed(3 + k)).images[0]  # fmt: skip
        upscaled = first.resize((48, 48), Image.Resampling.LANCZOS)
        _, want = img2img_reference(pipe, "sd", upscaled, "a red cat", 3 + k, strength=0.5, num_inference_steps=4,
                                    guidance_scale=7.5, negative_prompt="")  # fmt: skip
        assert_pixels_close(png(got), want)


@pytest.mark.parametrize(
    ("upscaler", "mode", "antialias"), [(None, "bilinear", False), ("Latent (nearest-exact)", "nearest-exact", False)]
)
def test_a1111_hires_fix_with_latent_upscalers(
    http: httpx.Client, image_world: World, upscaler: str | None, mode: str, antialias: bool
) -> None:
    """A1111's default hires upscaler, `Latent`: the first pass's latents (not decoded) interpolated to the hires
    size start diffusers' img2img (which takes 4-channel latents as its `image`) at the same seed."""
    body = {"prompt": "the dog", "steps": 3, "cfg_scale": 7.5, "seed": 8, "width": 32, "height": 32,
            "enable_hr": True, "hr_resize_x": 48, "hr_second_pass_steps": 4, "denoising_strength": 0.6}  # fmt: skip
    if upscaler is not None:
        body["hr_upscaler"] = upscaler
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["hr_upscaler"] == (upscaler or "Latent")
    pipe = load(image_world.model_dir).pipe
    first = pipe("the dog", height=32, width=32, num_inference_steps=3, negative_prompt="", output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(8)).images  # fmt: skip
    f = pipe.vae_scale_factor
    latents = torch.nn.functional.interpolate(first, size=(48 // f, 48 // f), mode=mode, antialias=antialias)
    _, want = img2img_reference(pipe, "sd", latents, "the dog", 8, strength=0.6, num_inference_steps=4,
                                guidance_scale=7.5, negative_prompt="")  # fmt: skip
    (got,) = response.json()["images"]
    assert_pixels_close(png(got), want)


def test_the_edits_form_is_in_the_openapi_document(http: httpx.Client) -> None:
    operation = http.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["image"]["format"] == "binary" and {"strength", "prompt"} <= set(schema["properties"])
