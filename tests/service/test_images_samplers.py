"""Samplers by name (A1111's, their aliases, diffusers classes) and schedule types: what each resolves to, the 400s,
and images equal to diffusers' with `pipe.scheduler = Class.from_config(config, **overrides)`, mixed in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from service.errors import BadRequestError
from service.images.rows import ImageSpec
from service.images.samplers import SAMPLERS, Sampler, resolve, sampler_listing, schedule_listing

from .images_world import assert_pixels_close, load, reference_image, reference_latents
from .test_images_parity import TOL, Run


@pytest.fixture(scope="module")
def base() -> Any:
    """A pipeline's scheduler as the tiny SD pipeline has it."""
    return diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)


@pytest.mark.parametrize(
    ("name", "schedule", "cls", "overrides"),
    [
        ("Euler a", None, "EulerAncestralDiscreteScheduler", {}),
        ("euler A", "Automatic", "EulerAncestralDiscreteScheduler", {}),  # A1111 matches names in any case
        ("k_dpmpp_2m", None, "DPMSolverMultistepScheduler", {}),
        ("DPM++ 2M Karras", None, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # old style
        ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # A1111 >= 1.9
        ("DPM++ 2M SDE Karras", "karras", "DPMSolverMultistepScheduler",
         {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
        ("UniPCMultistepScheduler", "sgm_uniform", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("Heun", "beta", "HeunDiscreteScheduler", {"use_beta_sigmas": True}),
        (None, "exponential", "PNDMScheduler", None),  # the pipeline's own: PNDM has no exponential sigmas
    ],
)  # fmt: skip
def test_names_resolve_to_diffusers_classes(
    base: Any, name: str | None, schedule: str | None, cls: str, overrides: dict[str, Any] | None
) -> None:
    if overrides is None:
        with pytest.raises(BadRequestError, match="use_exponential_sigmas, which PNDMScheduler"):
            resolve(name, schedule, base, flow=False)
        return
    sampler = resolve(name, schedule, base, flow=False)
    assert sampler is not None and sampler.cls == cls and dict(sampler.overrides) == overrides
    made = sampler.make(base)
    assert type(made).__name__ == cls
    assert made.config.steps_offset == 1  # built from the pipeline's config
    assert all(made.config[k] == v for k, v in overrides.items())


def test_a_schedule_alone_applies_to_the_pipelines_own_scheduler() -> None:
    euler = diffusers.EulerDiscreteScheduler()
    sampler = resolve(None, "karras", euler, flow=False)
    assert sampler == Sampler(
        "EulerDiscreteScheduler", "Karras", "EulerDiscreteScheduler", (("use_karras_sigmas", True),)
    )
    assert resolve(None, None, euler, flow=False) is None
    assert resolve("", "automatic", euler, flow=False) is None  # what A1111 clients send by default


@pytest.mark.parametrize(
    ("name", "schedule", "flow", "code", "says"),
    [
        ("Euler b", None, False, "invalid_sampler", "'Euler a'"),  # lists what there is
        ("DPM fast", None, False, "invalid_sampler", "GET /sdapi/v1/samplers"),
        ("Euler a", "karras", False, "invalid_scheduler", "use_karras_sigmas, which Euler a"),
        ("DPM++ 2M Karras", "exponential", False, "invalid_sampler", "give one"),
        ("Euler", "DPMSolverMultistepScheduler", False, "invalid_scheduler", "is a sampler"),
        ("Euler", "polyexponential", False, "invalid_scheduler", "'karras'"),
        ("Euler a", None, True, "invalid_sampler", "'Euler'"),  # Flux: flow matching has its own Euler only
        (None, "karras", True, "invalid_scheduler", "'simple'"),
    ],
)  # fmt: skip
def test_unknown_or_unfit_names_are_400s_that_say_what_there_is(
    base: Any, name: str | None, schedule: str | None, flow: bool, code: str, says: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        resolve(name, schedule, base, flow=flow)
    assert caught.value.code == code and says in str(caught.value)


def test_flux_takes_its_own_euler_and_schedules(base: Any) -> None:
    for name, schedule in [("Euler", "Simple"), ("k_euler", None), ("FlowMatchEulerDiscreteScheduler", "automatic")]:
        assert resolve(name, schedule, base, flow=True) is None
    assert [s["name"] for s in schedule_listing(flow=True)] == ["automatic", "simple"]


def test_listings_name_every_sampler_that_builds(base: Any) -> None:
    listing = sampler_listing(base, flow=False)
    assert [e["name"] for e in listing] == [e.name for e in SAMPLERS]
    karras = next(s for s in schedule_listing(flow=False) if s["name"] == "karras")
    assert karras["label"] == "Karras"
    heun = next(e for e in listing if e["name"] == "Heun")
    assert heun == {"name": "Heun", "aliases": ["k_heun"], "options": {"diffusers": "HeunDiscreteScheduler"}}


@pytest.mark.slow
def test_images_with_mixed_samplers_in_one_batch_equal_diffusers(sd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stochastic (Euler a, DPM++ 2M SDE: the image's generator feeds each step), second-order (Heun: two denoiser
    forwards per step) and Karras-spaced samplers, one image each, all in the same denoiser forwards."""
    loaded = load(sd_dir)
    base = loaded.pipe.scheduler
    named = [("Euler a", None), ("DPM++ 2M", "karras"), ("Heun", None), ("DPM++ 2M SDE", None), (None, None)]
    samplers = [resolve(name, schedule, base, flow=False) for name, schedule in named]
    specs = [ImageSpec("a red cat", None, 32, 32, 3, 7.5, 40 + i, sampler=s) for i, s in enumerate(samplers)]
    run = Run(loaded, monkeypatch)
    jobs = run([(s, None) for s in specs], joins=[0, 0, 1, 0, 2])
    ref = load(sd_dir).pipe
    images = []
    for job, s in zip(jobs, specs, strict=True):
        ref.scheduler = base if s.sampler is None else s.sampler.make(base)
        want = reference_latents(ref, s.prompt, s.seed)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(ref, s.prompt, s.seed))
        images.append(run.pixels(job))
    assert len({im.tobytes() for im in images}) == len(images)  # each sampler made its own image


def test_progress_counts_the_running_images_forwards(sd_dir: Path) -> None:
    """What `/sdapi/v1/progress` reports: images waiting, then running with their forwards done of all, and an
    estimate of the seconds left; nothing once they are done."""
    from service.images.backend import ImageBackend
    from service.images.rows import ImageJob
    from service.metrics import Metrics

    backend = ImageBackend(load(sd_dir), Metrics(), max_batch_size=4)
    heun = resolve("Heun", None, backend.loaded.pipe.scheduler, flow=False)  # two forwards per step
    jobs = [
        ImageJob([], None, None, lambda _: None, spec=ImageSpec("a cat", None, 32, 32, 3, 7.5, 1)),  # type: ignore[arg-type]
        ImageJob([], None, None, lambda _: None, spec=ImageSpec("a dog", None, 32, 32, 2, 7.5, 2, sampler=heun)),  # type: ignore[arg-type]
    ]
    for job in jobs:
        assert backend.offer(job)
    idle = backend.progress()
    assert (idle.running, idle.waiting, idle.done, idle.total) == (0, 2, 0, 0)
    backend.step()
    now = backend.progress()
    forwards = [len(row.scheduler.timesteps) for row in backend._rows]
    assert sorted(forwards) == [3, 4]  # PNDM: 3 steps are 4 forwards (its first is repeated); Heun: 2 steps, 3
    assert (now.running, now.waiting, now.done, now.total) == (2, 0, 2, sum(forwards)) and now.eta_s > 0
    while backend.jobs():
        backend.step()
    assert backend.progress().total == 0 and all(job.image is not None for job in jobs)
