"""Streamed images (OpenAI's `stream: true` with `partial_images`): the denoiser's estimate of the finished image is
exact where the scheduler's last step reaches it, previews come evenly spaced and never change the finished image,
the `openai` client reads the events of generations and edits, refusals are HTTP errors before the stream starts,
and a client that leaves a stream cancels its images."""

from __future__ import annotations

import asyncio
import base64
import copy
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
from PIL import Image

from service.errors import OverloadedError
from service.images.backend import ImageBackend
from service.images.load import LoadedPipeline
from service.images.rows import ImageJob, ImageSpec, preview_steps
from service.images.samplers import resolve
from service.images.streaming import ImageStream, JobHooks
from service.jobs import Event, FinishEvent, PreviewEvent
from service.metrics import Metrics

from .conftest import ADMIN_TOKEN, Server, World, start_server, stop_server
from .images_world import assert_pixels_close, load, peft_unet_adapter, picture, pipeline_dir

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# ------------------------------------------------------------------------------------------ in process
def test_previews_are_spaced_evenly_and_never_after_the_last_step() -> None:
    assert preview_steps(10, 3) == {2, 5, 8}
    assert preview_steps(20, 1) == {10}
    assert preview_steps(3, 3) == {1, 2}  # too short for three: fewer
    assert preview_steps(1, 2) == frozenset()  # one step: only the finished image
    assert preview_steps(10, 0) == frozenset()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images-stream")


def _run(loaded: LoadedPipeline, jobs: list[ImageJob]) -> None:
    backend = ImageBackend(loaded, Metrics(), max_batch_size=8)
    for job in jobs:
        assert backend.offer(job)
    while backend.jobs():
        backend.step()


def _job(spec: ImageSpec, events: list[Event]) -> ImageJob:
    return ImageJob([], None, None, events.append, spec=spec)  # type: ignore[arg-type]


def _estimates(
    root: Path, monkeypatch: pytest.MonkeyPatch, kind: str, sampler: str | None, prediction: str | None
) -> tuple[list[tuple[int, int, torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """Run a 4-step image (its latents as the answer) recording before each step: the step's index, the steps in
    all, `clean_estimate`, and the scheduler's own estimate where its step reports one (`pred_original_sample`,
    from a copy of the scheduler)."""
    loaded = load(pipeline_dir(root, kind))
    if prediction is not None:
        config = {**loaded.pipe.scheduler.config, "prediction_type": prediction, "set_alpha_to_one": True}
        loaded.pipe.scheduler = type(loaded.pipe.scheduler).from_config(config)
    family = type(loaded.ops)
    seen: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
    real = family.predictions

    def recording(ops: Any, rows: Any, output: torch.Tensor) -> list[torch.Tensor]:
        preds = real(ops, rows, output)
        for row, pred in zip(rows, preds, strict=True):
            kwargs = {
                k: torch.Generator().manual_seed(0) if k == "generator" else v for k, v in row.step_kwargs.items()
            }
            out = copy.deepcopy(row.scheduler).step(pred, row.timestep, row.latents.clone(), **kwargs)
            theirs = getattr(out, "pred_original_sample", None)
            seen.append((row.index, len(row.scheduler.timesteps), ops.clean_estimate(row, pred).clone(), theirs))
        return preds

    monkeypatch.setattr(family, "predictions", recording)
    chosen = None if sampler is None else resolve(sampler, None, loaded.pipe.scheduler, loaded.ops.flow)
    spec = ImageSpec("a red cat", None, 32, 32, 4, 3.0, 7, sampler=chosen, latent_output=True)
    job = _job(spec, [])
    _run(loaded, [job])
    return seen, job.image


@pytest.mark.parametrize(
    ("kind", "sampler", "prediction"),
    [("sd", "Euler", None), ("sd", "Euler Karras", None), ("sd", "Euler a", None), ("sd", "DPM++ 2M", None),
     ("sd", "Euler", "v_prediction"), ("sd", "DDIM", "v_prediction"), ("flux", None, None), ("sd3", None, None)],
)  # fmt: skip
def test_the_estimate_before_the_last_step_is_where_that_step_lands(
    root: Path, monkeypatch: pytest.MonkeyPatch, kind: str, sampler: str | None, prediction: str | None
) -> None:
    """`clean_estimate` before a scheduler's last step equals the latents that step returns, on the schedulers
    whose last step lands on the clean latents (sigma-based and multistep to sigma 0, DDIM to alpha 1, flow
    matching), for noise and v prediction: the formula, not a resemblance."""
    seen, final = _estimates(root, monkeypatch, kind, sampler, prediction)
    index, total, last, _ = seen[-1]
    assert index == total - 1
    torch.testing.assert_close(last, final, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seen[0][2], final, atol=1e-3)  # the first estimate is only an estimate


@pytest.mark.parametrize(
    ("sampler", "prediction"),
    [("Euler Karras", None), ("Euler a", None), ("LMS Karras", None), ("DDIM", None), ("DDIM", "v_prediction"),
     ("Euler", "v_prediction")],
)  # fmt: skip
def test_the_estimate_at_every_step_is_the_schedulers_own(
    root: Path, monkeypatch: pytest.MonkeyPatch, sampler: str, prediction: str | None
) -> None:
    """Where a scheduler's step reports its estimate of the clean latents (`pred_original_sample`), ours equals it
    at every step, sigma-based (latents scaled for the UNet, Karras timesteps between the trained ones) or not."""
    seen, _ = _estimates(root, monkeypatch, "sd", sampler, prediction)
    assert len(seen) == 4
    for _, _, ours, theirs in seen:
        assert theirs is not None
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_previews_come_before_the_image_and_leave_it_as_it_is(root: Path) -> None:
    """Three previews of a 5-step image arrive in order (`index` 0, 1, 2) before it finishes, each an image of its
    size, and the finished image is the one its twin without previews gets in the same batch."""
    loaded = load(pipeline_dir(root, "sd"))
    spec = ImageSpec("a red cat", None, 32, 24, 5, 7.5, 3, previews=3)
    events: list[Event] = []
    plain_events: list[Event] = []
    streamed, plain = _job(spec, events), _job(ImageSpec("a red cat", None, 32, 24, 5, 7.5, 3), plain_events)
    _run(loaded, [streamed, plain])
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [type(e) for e in events] == [PreviewEvent] * 3 + [FinishEvent]
    assert [p.index for p in previews] == [0, 1, 2]
    assert all(p.image.size == (32, 24) for p in previews)
    assert [type(e) for e in plain_events] == [FinishEvent]
    assert np.array_equal(np.asarray(streamed.image), np.asarray(plain.image))


def test_an_image_stream_admits_every_image_or_raises_the_refusal() -> None:
    """`admitted()` returns once every image's job was launched, and raises the error of one refused (before any
    byte of the answer); updates come in arrival order; a failure after admission is raised by `updates()`."""

    class FakeJob:
        def __init__(self, done: bool) -> None:
            self.done = done

    async def scenario() -> None:
        async def fine(k: int, hooks: JobHooks) -> str:
            hooks.launched(FakeJob(False))  # type: ignore[arg-type]
            await asyncio.sleep(0.01 * (2 - k))
            hooks.preview(PreviewEvent(0, f"preview-{k}"))
            return f"image-{k}"

        running = ImageStream(2, fine)
        await running.admitted()
        got = [(u.image, u.picture, u.preview) async for u in running.updates()]
        assert sorted(got) == [(0, "image-0", None), (0, "preview-0", 0), (1, "image-1", None), (1, "preview-1", 0)]
        assert got.index((1, "preview-1", 0)) < got.index((1, "image-1", None))

        async def refused(k: int, hooks: JobHooks) -> str:
            if k == 1:
                hooks.launched(FakeJob(True))  # a refused job is done at once; its error ends the run
                raise OverloadedError("the request queue is full")
            hooks.launched(FakeJob(False))
            await asyncio.sleep(10)
            return "never"

        running = ImageStream(2, refused)
        with pytest.raises(OverloadedError):
            await running.admitted()
        running.close()

        async def fails_later(k: int, hooks: JobHooks) -> str:
            hooks.launched(FakeJob(False))
            raise RuntimeError("the forward failed")

        running = ImageStream(1, fails_later)
        await running.admitted()
        with pytest.raises(RuntimeError, match="forward failed"):
            async for _ in running.updates():
                pass

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[Server]:
    model = pipeline_dir(root, "sd")
    adapter = peft_unet_adapter(model, root / "adapters" / "ink", seed=5)
    world = World(root, model, root / "adapters", {"ink": adapter})
    srv = start_server(world, "--adapter", f"ink={adapter}", "--device", "cpu")
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


@pytest.mark.e2e
def test_the_openai_client_streams_partial_images_then_each_image(server: Server, http: httpx.Client) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)
    extra = {"seed": 21, "num_inference_steps": 4}
    stream = client.images.generate(
        model="ink", prompt="a red cat", n=2, size="32x32", stream=True, partial_images=2, extra_body=extra
    )
    events = list(stream)
    whole = http.post("/v1/images/generations", json={"model": "ink", "prompt": "a red cat", "n": 2, "size": "32x32",
                                                       **extra}).json()["data"]  # fmt: skip
    for k in range(2):
        mine = [e for e in events if e.model_extra and e.model_extra["index"] == k]
        assert [e.type for e in mine] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [getattr(e, "partial_image_index", None) for e in mine] == [0, 1, None]
        assert all(e.size == "32x32" and e.output_format == "png" for e in mine)
        assert all(_pixels(e.b64_json).shape == (32, 32, 3) for e in mine)
        assert mine[-1].model_extra is not None and mine[-1].model_extra["seed"] == 21 + k
        assert_pixels_close(_pixels(mine[-1].b64_json), _pixels(whole[k]["b64_json"]))  # streamed or not, one image


@pytest.mark.e2e
def test_streamed_edits_and_a_stream_without_partial_images(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)
    buf = io.BytesIO()
    picture(32, 32, seed=3).save(buf, format="PNG")
    stream = client.images.edit(
        model="tiny", image=("start.png", buf.getvalue(), "image/png"), prompt="a red cat", stream=True,
        partial_images=1, extra_body={"seed": 4, "num_inference_steps": 4, "strength": "0.75"},
    )  # fmt: skip
    assert [e.type for e in stream] == ["image_edit.partial_image", "image_edit.completed"]
    plain = client.images.generate(model="tiny", prompt="a cat", size="32x32", stream=True,
                                   extra_body={"seed": 4, "num_inference_steps": 2})  # fmt: skip
    assert [e.type for e in plain] == ["image_generation.completed"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("body", "status", "says"),
    [({"partial_images": 2}, 400, "partial_images needs stream: true"),
     ({"stream": True, "partial_images": 4}, 400, "partial_images"),
     ({"stream": True, "model": "nobody"}, 404, "nobody")],
)  # fmt: skip
def test_stream_refusals_are_http_errors_not_streams(http: httpx.Client, body: dict, status: int, says: str) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "32x32", **body})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert says in json.dumps(response.json())


@pytest.mark.e2e
def test_leaving_a_stream_cancels_its_images(server: Server, http: httpx.Client) -> None:
    body = {"model": "ink", "prompt": "a cat", "size": "256x256", "num_inference_steps": 200, "seed": 1,
            "stream": True, "partial_images": 3}  # fmt: skip
    with (
        httpx.Client(base_url=server.url, timeout=300) as leaving,
        leaving.stream("POST", "/v1/images/generations", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert http.get("/v1/adapters/ink", headers=AUTH).json()["in_use"] == 1
    # the client closed the connection: minutes of work no one will read
    deadline = time.monotonic() + 120  # far less than 200 steps at 256x256 take
    while http.get("/v1/adapters/ink", headers=AUTH).json()["in_use"] != 0:
        assert time.monotonic() < deadline, "the images of a stream left behind still hold their adapter"
        time.sleep(0.2)
    assert "never retrieved" not in server.log.read_text()


@pytest.mark.e2e
def test_images_and_their_denoiser_steps_are_counted_per_adapter(server: Server, http: httpx.Client) -> None:
    """`lokr_images_total` and `lokr_denoiser_steps_total` by adapter: two 4-step Euler images of `ink` add 2 and 8."""

    def counts() -> tuple[float, float]:
        text = http.get("/metrics").text
        series = ('lokr_images_total{adapter="ink"}', 'lokr_denoiser_steps_total{adapter="ink"}')
        return _sample(text, series[0]), _sample(text, series[1])

    before = counts()
    body = {
        "model": "ink",
        "prompt": "a cat",
        "size": "32x32",
        "num_inference_steps": 4,
        "seed": 9,
        "n": 2,
        "sampler": "Euler",
    }  # one forward a step (the tiny pipeline's PNDM runs one more)
    assert http.post("/v1/images/generations", json=body).status_code == 200
    images, steps = counts()
    assert (images - before[0], steps - before[1]) == (2, 8)


def _sample(text: str, series: str) -> float:
    """A Prometheus series' value in `/metrics` text (0 when it is not there yet)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0
