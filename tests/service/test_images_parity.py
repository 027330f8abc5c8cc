"""The image backend against plain diffusers: same seed => same latents / pixels (base, peft LoKr on the UNet,
lokr's adapter on text encoder + UNet vs the same merged); mixed batches equal one-at-a-time runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lokr
import lokr.merged
from lokr.inject import iter_lokr_layers
from service.images import steps
from service.images.backend import ImageBackend
from service.images.load import LoadedPipeline
from service.images.rows import ImageJob, ImageSpec
from service.jobs import Event, FinishEvent
from service.metrics import Metrics

from .images_world import (
    assert_pixels_close,
    load,
    merged_reference_pipe,
    own_adapter,
    peft_reference_pipe,
    peft_unet_adapter,
    reference_image,
    reference_latents,
)

PROMPTS = ["a red cat", "the dog", "a cat on the red mat"]
TOL = {"rtol": 1e-3, "atol": 1e-3}  # a batch of other rows changes float sums in the last bits


class Run:
    """Jobs through an `ImageBackend`, job `i` offered before step `joins[i]`; latents kept at decode time."""

    def __init__(self, loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch, fold: int = 0) -> None:
        self.loaded, self.latents, self.fold = loaded, {}, fold
        real = steps.decode

        def keep(loaded: LoadedPipeline, rows: Sequence[Any]) -> list[Any]:
            for row in rows:
                self.latents[row.job.id] = row.latents.clone()
            return real(loaded, rows)

        monkeypatch.setattr(steps, "decode", keep)

    def __call__(self, items: Sequence[tuple[Any, ...]], joins: Sequence[int] | None = None) -> list[ImageJob]:
        """`items`: `(spec, adapters)` or `(spec, adapters, the text encoders' adapters)`."""
        backend = ImageBackend(self.loaded, Metrics(), max_batch_size=16, fold=self.fold)
        events: list[Event] = []
        jobs = [
            ImageJob([], None, item[1], events.append, spec=item[0], text_selection=item[2] if len(item) > 2 else None)  # type: ignore[arg-type]
            for item in items
        ]
        joins = joins or [0] * len(jobs)
        step = 0
        while step <= max(joins) or backend.jobs():
            for job, at in zip(jobs, joins):
                if at == step:
                    assert backend.offer(job)
            backend.step()
            step += 1
        assert all(isinstance(e, FinishEvent) and e.reason == "stop" for e in events), events
        return jobs

    def pixels(self, job: ImageJob) -> np.ndarray:
        return np.asarray(job.image).astype(np.int16)


def spec(
    prompt: str, seed: int, size: int = 32, steps_: int = 3, guidance: float = 7.5, neg: str | None = None
) -> ImageSpec:
    return ImageSpec(prompt, neg, size, size, steps_, guidance, seed)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_base_equals_diffusers_with_joins_and_sizes(
    kind: str, sd_dir: Path, sdxl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sd_dir if kind == "sd" else sdxl_dir
    run = Run(load(path), monkeypatch)
    items = [
        (spec(PROMPTS[0], 7), None),
        (spec(PROMPTS[1], 8, steps_=4, neg="red"), None),
        (spec(PROMPTS[2], 9, size=48, guidance=1.0), None),  # no CFG, its own size sub-batch
    ]
    jobs = run(items, joins=[0, 1, 2])
    ref = load(path).pipe
    for job, (s, _) in zip(jobs, items):
        kwargs = {"negative_prompt": s.negative_prompt, "guidance_scale": s.guidance_scale}
        want = reference_latents(ref, s.prompt, s.seed, s.width, s.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(ref, s.prompt, s.seed, s.width, s.steps, **kwargs))


@pytest.mark.slow
def test_peft_lokr_unet_and_own_adapter_equal_references(
    sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peft_dir = peft_unet_adapter(sd_dir, tmp_path / "peft", seed=5)
    own_dir = own_adapter(sd_dir, tmp_path / "own", seed=6)
    loaded = load(sd_dir)
    lokr.load_adapter(loaded.container, peft_dir, "p")
    lokr.load_adapter(loaded.container, own_dir, "o")
    run = Run(loaded, monkeypatch)
    s = spec(PROMPTS[2], 11)
    base, p, o = run([(s, None), (s, "p"), (s, "o")])  # one batch, three adapters (CFG rows included)
    assert np.abs(run.pixels(p) - run.pixels(base)).max() > 8  # the adapters really change the image
    assert np.abs(run.pixels(o) - run.pixels(base)).max() > 8
    peft_pipe = peft_reference_pipe(sd_dir, seed=5)
    torch.testing.assert_close(run.latents[p.id], reference_latents(peft_pipe, s.prompt, s.seed), **TOL)
    assert_pixels_close(run.pixels(p), reference_image(peft_pipe, s.prompt, s.seed))
    merged = merged_reference_pipe(sd_dir, own_dir)  # text encoder and UNet both carry the adapter
    torch.testing.assert_close(run.latents[o.id], reference_latents(merged, s.prompt, s.seed), **TOL)
    assert_pixels_close(run.pixels(o), reference_image(merged, s.prompt, s.seed))


@pytest.mark.slow
def test_mixed_batch_equals_one_at_a_time(sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own_dir = own_adapter(sdxl_dir, tmp_path / "own", seed=3)
    loaded = load(sdxl_dir)
    lokr.load_adapter(loaded.container, own_dir, "a")
    lokr.load_adapter(loaded.container, own_adapter(sdxl_dir, tmp_path / "own2", seed=4), "b")
    run = Run(loaded, monkeypatch)
    items = [
        (spec(PROMPTS[0], 1), "a"),
        (spec(PROMPTS[1], 2, guidance=5.0), [("a", 0.5), ("b", 0.8)]),
        (spec(PROMPTS[2], 3, neg="dog"), None),
        (spec(PROMPTS[0], 4, size=48), [("b", -0.7)]),
        (spec(PROMPTS[1], 5, steps_=4), "b"),
    ]
    together = run(items, joins=[0, 0, 1, 1, 2])
    for job, item in zip(together, items):
        (alone,) = run([item])
        torch.testing.assert_close(run.latents[job.id], run.latents[alone.id], **TOL)
        assert_pixels_close(run.pixels(job), run.pixels(alone))


def test_rows_of_one_selection_share_one_slice(sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved adapters are regrouped per step, so every folded op reads a slice of the batch (no gather /
    scatter), and each image still equals its one-at-a-time run."""
    loaded = load(sd_dir)
    for name, seed in (("p", 5), ("q", 6)):
        lokr.load_adapter(loaded.container, peft_unet_adapter(sd_dir, tmp_path / name, seed=seed), name)
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)  # every adapted layer folds
    mixed = Run(loaded, monkeypatch)
    items = [(spec(PROMPTS[i % 3], i, steps_=2), "pq"[i % 2]) for i in range(4)]
    scatters: list[int] = []
    real = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: scatters.append(1) or real(self, *a))
    together = mixed(items)
    assert not scatters
    monkeypatch.undo()
    single = Run(loaded, monkeypatch)
    for job, item in zip(together, items):
        (alone,) = single([item])
        torch.testing.assert_close(mixed.latents[job.id], single.latents[alone.id], **TOL)


def test_one_adapter_steps_run_on_kept_folded_weights(
    sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `fold`, steps whose rows all use one adapter run on `W + dW` kept between steps (the UNet's adapted
    layers hold it afterwards); the images equal the peft reference, and a mixed step still folds per selection."""
    loaded = load(sd_dir)
    lokr.load_adapter(loaded.container, peft_unet_adapter(sd_dir, tmp_path / "p", seed=5), "p")
    lokr.load_adapter(loaded.container, peft_unet_adapter(sd_dir, tmp_path / "q", seed=6), "q")
    run = Run(loaded, monkeypatch, fold=1)
    s = spec(PROMPTS[2], 11)
    (alone,) = run([(s, "p")])
    layers = [layer for _, layer in iter_lokr_layers(loaded.pipe.unet)]
    assert all(
        layer._folds.nbytes == layer.weight.numel() * 4 for layer in layers if lokr.merged.eligible(layer.base_layer)
    )
    reference = peft_reference_pipe(sd_dir, seed=5)
    torch.testing.assert_close(run.latents[alone.id], reference_latents(reference, s.prompt, s.seed), **TOL)
    stored = [layer._folds._entries["p"].tensor for layer in layers if layer._folds.nbytes]
    (again,) = run([(spec(PROMPTS[0], 12), "p")])  # a new request: its prompt's encoding keeps the denoiser's folds
    kept = [layer._folds._entries["p"].tensor for layer in layers if layer._folds.nbytes]
    assert len(kept) == len(stored) and all(a is b for a, b in zip(kept, stored, strict=True))
    mixed, _ = run([(s, "p"), (s, "q")])
    torch.testing.assert_close(run.latents[mixed.id], run.latents[alone.id], **TOL)


def test_mixed_steps_reuse_kept_folds_and_stay_exact(
    sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `fold` >= the selections a step mixes, the folded weights of a step's selections are kept and the next
    steps with the same selections reuse them; images that join and leave change the selections, and every image
    still equals its one-at-a-time run without kept folds."""
    loaded = load(sd_dir)
    for name, seed in (("p", 5), ("q", 6)):
        lokr.load_adapter(loaded.container, peft_unet_adapter(sd_dir, tmp_path / name, seed=seed), name)
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)  # every adapted layer folds
    builds: list[int] = []
    real = lokr.merged._fold_all
    monkeypatch.setattr(lokr.merged, "_fold_all", lambda *a: builds.append(1) or real(*a))
    items = [(spec(PROMPTS[0], 1, steps_=4), "p"), (spec(PROMPTS[1], 2, steps_=4), "q"), (spec(PROMPTS[2], 3), "p")]
    kept = Run(loaded, monkeypatch, fold=3)
    together = kept(items, joins=[0, 0, 2])  # 5 steps: p+q, p+q, p+q+p, p+q+p (p's rows: one selection), p
    layers = [layer for _, layer in iter_lokr_layers(loaded.pipe.unet) if lokr.merged.eligible(layer.base_layer)]
    assert len(builds) == len(layers)  # each layer folded (p, q) once, not once per step
    copies = 3  # (p, q) stacked, and p alone on the last step
    assert all(layer._folds.nbytes == copies * layer.weight.numel() * 4 for layer in layers)
    single = Run(loaded, monkeypatch)
    for job, item in zip(together, items):
        (alone,) = single([item])
        torch.testing.assert_close(kept.latents[job.id], single.latents[alone.id], **TOL)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_clip_skips_in_one_batch_equal_diffusers_clip_skip(
    kind: str, sd_dir: Path, sdxl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images with and without CLIP skip join one batch (one text-encoder batch per clip_skip); each equals the
    pipeline called with its `clip_skip`."""
    path = sd_dir if kind == "sd" else sdxl_dir
    run = Run(load(path), monkeypatch)
    items = [(replace(spec(PROMPTS[0], 3), clip_skip=skip), None) for skip in (None, 1, None, 1)]
    jobs = run(items)
    ref = load(path).pipe
    for job, (s, _) in zip(jobs, items):
        want = reference_latents(ref, s.prompt, s.seed, s.width, s.steps, guidance_scale=7.5, clip_skip=s.clip_skip)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
    assert not torch.allclose(run.latents[jobs[0].id], run.latents[jobs[1].id], atol=1e-2)  # it changes the image


def v_prediction_dir(src: Path, out: Path) -> Path:
    """A copy of the pipeline dir `src` whose scheduler predicts v with zero terminal SNR and trailing timesteps (the
    settings of v-prediction SDXL finetunes such as NoobAI-XL V-Pred)."""
    import json
    import shutil

    shutil.copytree(src, out)
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_guidance_rescale_rows_equal_diffusers_on_a_v_prediction_pipeline(
    kind: str, sd_dir: Path, sdxl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with diffusers' `guidance_rescale` beside rows without, on a v-prediction, zero-terminal-SNR scheduler:
    each equals the pipeline called with the same `guidance_rescale`; the rescale changes the image."""
    path = v_prediction_dir(sd_dir if kind == "sd" else sdxl_dir, tmp_path / "vpred")
    loaded = load(path)
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"
    run = Run(loaded, monkeypatch)
    rescaled = replace(spec(PROMPTS[0], 5, steps_=4, guidance=9.0), guidance_rescale=0.7)
    items = [(rescaled, None), (replace(rescaled, guidance_rescale=0.0), None),
             (replace(spec(PROMPTS[1], 6, neg="blue"), guidance_rescale=0.3), None)]  # fmt: skip
    jobs = run(items, joins=[0, 0, 1])
    ref = load(path).pipe
    for job, (s, _) in zip(jobs, items):
        kwargs = {"negative_prompt": s.negative_prompt, "guidance_scale": s.guidance_scale,
                  "guidance_rescale": s.guidance_rescale}  # fmt: skip
        want = reference_latents(ref, s.prompt, s.seed, s.width, s.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(ref, s.prompt, s.seed, s.width, s.steps, **kwargs))
    assert not torch.allclose(run.latents[jobs[0].id], run.latents[jobs[1].id], atol=1e-2)
