"""Samplers by the names image clients send, made per image from the pipeline's own scheduler config.

A request names a sampler as AUTOMATIC1111 does (`"Euler a"`, `"DPM++ 2M"`, old-style `"DPM++ 2M Karras"`, the
`k_` aliases) or as diffusers does (`"EulerAncestralDiscreteScheduler"`), and optionally a schedule type (A1111's
`scheduler`: `"karras"`, `"exponential"`, ...). Each maps to a diffusers scheduler class and config overrides, as
diffusers' scheduler overview tabulates them, so an image is reproduced in diffusers with
`pipe.scheduler = Class.from_config(pipe.scheduler.config, **overrides)`. Names are resolved (or refused with a
400) as the request arrives: `resolve` -> a `Sampler`, whose `make` builds one image's scheduler.

Flux (flow matching) has one sampler, its own flow-matching Euler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequestError

__all__ = ["SAMPLERS", "SCHEDULES", "Sampler", "resolve", "sampler_listing", "schedule_listing"]

Overrides = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class SamplerName:
    """One sampler: A1111's name, the diffusers class and overrides it stands for, and its aliases."""

    name: str
    cls: str
    overrides: Overrides = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleName:
    """One schedule type (A1111's `scheduler`): its name, label and the config overrides it sets."""

    name: str
    label: str
    overrides: Overrides = ()


SAMPLERS: tuple[SamplerName, ...] = (
    SamplerName("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    SamplerName("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    SamplerName("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    SamplerName("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    SamplerName("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    SamplerName("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    SamplerName("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",)),
    SamplerName(
        "DPM++ 2M SDE", "DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),), ("k_dpmpp_2m_sde",)
    ),
    SamplerName("DPM++ SDE", "DPMSolverSinglestepScheduler", aliases=("k_dpmpp_sde",)),
    SamplerName("DDIM", "DDIMScheduler"),
    SamplerName("PLMS", "PNDMScheduler"),
    SamplerName("UniPC", "UniPCMultistepScheduler"),
    SamplerName("LCM", "LCMScheduler"),
    SamplerName("DEIS", "DEISMultistepScheduler"),
    SamplerName("DDPM", "DDPMScheduler"),
)
FLOW_SAMPLERS: tuple[SamplerName, ...] = (
    SamplerName("Euler", "FlowMatchEulerDiscreteScheduler", aliases=("k_euler",)),
)

SCHEDULES: tuple[ScheduleName, ...] = (
    ScheduleName("automatic", "Automatic"),  # the sampler's config as the pipeline has it
    ScheduleName("karras", "Karras", (("use_karras_sigmas", True),)),
    ScheduleName("exponential", "Exponential", (("use_exponential_sigmas", True),)),
    ScheduleName("beta", "Beta", (("use_beta_sigmas", True),)),
    ScheduleName("sgm_uniform", "SGM Uniform", (("timestep_spacing", "trailing"),)),
    ScheduleName("simple", "Simple", (("timestep_spacing", "trailing"),)),
)
FLOW_SCHEDULES: tuple[ScheduleName, ...] = (
    ScheduleName("automatic", "Automatic"),
    ScheduleName("simple", "Simple"),  # Flux's own: evenly spaced sigmas, shifted for the image's size
)


@dataclass(frozen=True)
class Sampler:
    """A resolved sampler: `name` and `schedule` as A1111 reports them, the diffusers class and its overrides."""

    name: str
    schedule: str
    cls: str
    overrides: Overrides = ()

    def make(self, base: Any) -> Any:
        """A new scheduler of this sampler, from `base`'s config (the pipeline's scheduler)."""
        return _scheduler_class(self.cls).from_config(base.config, **dict(self.overrides))


def resolve(sampler: str | None, schedule: str | None, base: Any, flow: bool) -> Sampler | None:
    """The sampler a request names (None: the pipeline's own scheduler as it is); a 400 naming what is available
    when a name is unknown, or when the schedule type or this pipeline's config does not fit the sampler."""
    samplers, schedules = (FLOW_SAMPLERS, FLOW_SCHEDULES) if flow else (SAMPLERS, SCHEDULES)
    sampler = (sampler or "").strip() or None
    schedule_entry = _find_schedule(schedule, schedules)
    entry = None
    if sampler is not None:
        entry, suffix = _find_sampler(sampler, samplers, schedules)
        if suffix is not None:
            if schedule_entry is not None and schedule_entry.name not in ("automatic", suffix.name):
                raise BadRequestError(
                    f"sampler {sampler!r} names the {suffix.label} schedule but scheduler is {schedule!r}: give one",
                    code="invalid_sampler",
                )
            schedule_entry = suffix
    if schedule_entry is not None and schedule_entry.name == "automatic":
        schedule_entry = None
    if (entry is None and schedule_entry is None) or flow:
        return None  # Flux's sampler and its schedules are the pipeline's own
    if entry is None:  # a schedule type on the pipeline's own scheduler
        entry = SamplerName(type(base).__name__, type(base).__name__)
    resolved = Sampler(
        entry.name,
        "Automatic" if schedule_entry is None else schedule_entry.label,
        entry.cls,
        entry.overrides + (() if schedule_entry is None else schedule_entry.overrides),
    )
    _check_fits(resolved, base)
    return resolved


def _find_sampler(
    text: str, samplers: tuple[SamplerName, ...], schedules: tuple[ScheduleName, ...]
) -> tuple[SamplerName, ScheduleName | None]:
    """The sampler `text` names, and the schedule an old-style name ends with (`"DPM++ 2M Karras"`)."""
    key = text.casefold()
    for entry in samplers:
        if key in _keys(entry):
            return entry, None
    for schedule in schedules:
        label = " " + schedule.label.casefold()
        if schedule.name != "automatic" and key.endswith(label):
            head = key[: -len(label)].strip()
            for entry in samplers:
                if head in _keys(entry):
                    return entry, schedule
    available = ", ".join(repr(e.name) for e in samplers)
    raise BadRequestError(
        f"unknown sampler {text!r}; this pipeline's samplers: {available} (A1111 names, their k_ aliases or "
        "diffusers class names; GET /sdapi/v1/samplers lists them)",
        code="invalid_sampler",
    )


def _find_schedule(text: str | None, schedules: tuple[ScheduleName, ...]) -> ScheduleName | None:
    if text is None or not text.strip():
        return None
    key = text.strip().casefold()
    for schedule in schedules:
        if key in (schedule.name, schedule.label.casefold()):
            return schedule
    hint = ""
    if key.endswith("scheduler"):
        hint = f" ({text.strip()!r} is a sampler: pass it as the sampler)"
    available = ", ".join(repr(s.name) for s in schedules)
    raise BadRequestError(
        f"unknown schedule type {text!r}{hint}; this pipeline's: {available}", code="invalid_scheduler"
    )


def _keys(entry: SamplerName) -> set[str]:
    return {entry.name.casefold(), entry.cls.casefold(), *(a.casefold() for a in entry.aliases)}


@functools.lru_cache(maxsize=1024)
def _check_fits(sampler: Sampler, base: Any) -> None:
    """Each override is a setting of the class, and the class builds from this pipeline's config (`base`, the
    pipeline's scheduler, which lives as long as the server: a fit is checked once, a refusal every time)."""
    cls = _scheduler_class(sampler.cls)
    accepted = set(inspect.signature(cls.__init__).parameters)
    for key, _ in sampler.overrides:
        if key not in accepted:
            raise BadRequestError(
                f"the {sampler.schedule} schedule needs {key}, which {sampler.name} ({sampler.cls}) does not have; "
                "use another sampler or scheduler 'automatic'",
                code="invalid_scheduler",
            )
    try:
        sampler.make(base)
    except Exception as exc:  # a class that cannot take this pipeline's config (or lacks an optional package)
        raise BadRequestError(
            f"sampler {sampler.name} ({sampler.cls}) cannot run on this pipeline: {exc}", code="invalid_sampler"
        ) from exc


@functools.cache
def _scheduler_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def sampler_listing(base: Any, flow: bool) -> list[dict[str, Any]]:
    """A1111's `GET /sdapi/v1/samplers`: the samplers that build on this pipeline."""
    return [
        {"name": e.name, "aliases": list(e.aliases), "options": {"diffusers": e.cls, **dict(e.overrides)}}
        for e in _usable(base, flow)
    ]


def _usable(base: Any, flow: bool) -> Iterator[SamplerName]:
    for entry in FLOW_SAMPLERS if flow else SAMPLERS:
        try:
            resolve(entry.name, None, base, flow)
        except BadRequestError:
            continue
        yield entry


def schedule_listing(flow: bool) -> list[dict[str, Any]]:
    """A1111's `GET /sdapi/v1/schedulers`."""
    return [
        {"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for s in (FLOW_SCHEDULES if flow else SCHEDULES)
    ]
