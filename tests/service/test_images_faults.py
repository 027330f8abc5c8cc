"""Failures in the image backend stay with the images they belong to: a joiner whose start fails, or a size group
whose denoiser forward fails (an out-of-memory size), fails those images alone; every other image of the batch
finishes with the pixels it has on its own, and no row of a failed image runs on (its adapter lease is back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service.images import steps
from service.images.backend import ImageBackend
from service.images.load import LoadedPipeline
from service.images.rows import ImageJob, ImageSpec
from service.jobs import ErrorEvent, Event, FinishEvent
from service.metrics import Metrics

from .images_world import assert_pixels_close, load, pipeline_dir


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    return load(pipeline_dir(tmp_path_factory.mktemp("images-faults"), "sd"))


def _job(prompt: str, seed: int, size: int, events: dict[str, list[Event]]) -> ImageJob:
    spec = ImageSpec(prompt, None, size, size, 3, 7.5, seed)
    return ImageJob([], None, None, events.setdefault(prompt, []).append, spec=spec)


def _run(backend: ImageBackend, jobs: list[ImageJob]) -> None:
    for job in jobs:
        assert backend.offer(job)
    while backend.jobs():
        backend.step()


def _alone(loaded: LoadedPipeline, prompt: str, seed: int, size: int) -> np.ndarray:
    job = _job(prompt, seed, size, {})
    _run(ImageBackend(loaded, Metrics(), max_batch_size=4), [job])
    return np.asarray(job.image).astype(np.int16)


def _failed(events: list[Event]) -> bool:
    return len(events) == 1 and isinstance(events[0], ErrorEvent)


def test_a_joiner_whose_start_fails_fails_alone(loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    events: dict[str, list[Event]] = {}
    first, broken, last = _job("a red cat", 1, 32, events), _job("the dog", 2, 32, events), _job("a mat", 3, 32, events)
    start = type(loaded.ops).start

    def start_or_fail(ops: Any, loaded_: LoadedPipeline, job: ImageJob, cond: Any, *starts: Any) -> Any:
        if job is broken:  # e.g. its latents do not fit in memory
            raise RuntimeError("injected: this image cannot start")
        return start(ops, loaded_, job, cond, *starts)

    monkeypatch.setattr(type(loaded.ops), "start", start_or_fail)
    backend = ImageBackend(loaded, Metrics(), max_batch_size=4)
    for job in (first, broken, last):
        assert backend.offer(job)
    backend.step()
    assert _failed(events["the dog"])
    assert broken not in backend.jobs() and backend.jobs() == [first, last]  # no row of the failed image runs on
    while backend.jobs():
        backend.step()
    monkeypatch.undo()
    for job, (prompt, seed) in ((first, ("a red cat", 1)), (last, ("a mat", 3))):
        assert [type(e) for e in events[prompt]] == [FinishEvent]
        assert_pixels_close(np.asarray(job.image).astype(np.int16), _alone(loaded, prompt, seed, 32))


def test_a_failing_size_group_fails_only_its_images(loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    events: dict[str, list[Event]] = {}
    small, big = _job("a red cat", 1, 32, events), _job("the dog", 2, 48, events)
    denoise = steps.denoise

    def denoise_or_fail(loaded_: LoadedPipeline, rows: list[Any], fold: int = 0) -> None:
        if rows[0].spec.width == 48:  # the large size runs out of memory
            raise RuntimeError("injected: out of memory")
        denoise(loaded_, rows, fold)

    monkeypatch.setattr(steps, "denoise", denoise_or_fail)
    backend = ImageBackend(loaded, Metrics(), max_batch_size=4)
    _run(backend, [small, big])
    monkeypatch.undo()
    assert _failed(events["the dog"]) and big.image is None
    assert [type(e) for e in events["a red cat"]] == [FinishEvent]
    assert_pixels_close(np.asarray(small.image).astype(np.int16), _alone(loaded, "a red cat", 1, 32))


def test_decoding_takes_images_a_pixel_budget_at_a_time_and_one_by_one_when_out_of_memory(
    loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five finished images decode in VAE forwards of at most the budget's pixels (2 images of 32x32 here), each
    image's pixels as one batch decode gives; a forward of several that runs out of memory is done again one image
    at a time."""
    events: dict[str, list[Event]] = {}
    jobs = [_job("a red cat", seed, 32, events) for seed in range(5)]
    kept: list[Any] = []
    real_decode = steps.decode
    monkeypatch.setattr(steps, "decode", lambda loaded, rows: kept.extend(rows) or real_decode(loaded, rows))
    _run(ImageBackend(loaded, Metrics(), max_batch_size=8), jobs)
    whole = [np.asarray(job.image).astype(np.int16) for job in jobs]
    vae = loaded.pipe.vae
    real_vae = vae.decode
    calls: list[int] = []

    def counted(latents: Any, **kwargs: Any) -> Any:
        calls.append(int(latents.shape[0]))
        return real_vae(latents, **kwargs)

    monkeypatch.setattr(vae, "decode", counted)
    sliced = real_decode(loaded, kept, pixels=2 * 32 * 32 + 5)
    assert calls == [2, 2, 1]

    def out_of_memory_above_one(latents: Any, **kwargs: Any) -> Any:
        calls.append(int(latents.shape[0]))
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_vae(latents, **kwargs)

    calls.clear()
    monkeypatch.setattr(vae, "decode", out_of_memory_above_one)
    retried = real_decode(loaded, kept)
    assert calls == [5, 1, 1, 1, 1, 1]
    for want, a, b in zip(whole, sliced, retried, strict=True):
        assert_pixels_close(np.asarray(a).astype(np.int16), want)
        assert_pixels_close(np.asarray(b).astype(np.int16), want)
