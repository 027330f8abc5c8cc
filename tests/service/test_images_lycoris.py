"""One kohya LoKr file written by the real `lycoris-lora` (text-encoder and UNet keys together) served on an SD
pipeline: the image equals plain diffusers' pipeline with LyCORIS's own network applied at the same multiplier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lokr

from ..lokr.lyco import MULT, kohya_file, register_presets
from .images_world import assert_pixels_close, load, pipeline_dir, reference_image, reference_latents
from .test_images_parity import PROMPTS, TOL, Run, spec


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"factor": 4}, {"factor": 4, "decompose_both": True, "use_tucker": True}])
def test_kohya_file_served_equals_pipeline_with_lycoris_network(
    options: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_presets(monkeypatch)
    sd = pipeline_dir(tmp_path, "sd")
    reference = load(sd).pipe  # LyCORIS wraps its text encoder and UNet in place, at multiplier MULT
    path = tmp_path / "style.safetensors"
    kohya_file(path, reference.text_encoder, reference.unet, 4, 2.0, **options)
    loaded = load(sd)
    info = lokr.load_adapter(loaded.container, path, "style")
    assert {m.split(".")[0] for m in info.modules} == {"text_encoder", "unet"}  # one file, both components
    run = Run(loaded, monkeypatch)
    s = spec(PROMPTS[2], 11)
    base, styled = run([(s, None), (s, [("style", MULT)])])  # one batch: a base row beside the adapter's
    assert np.abs(run.pixels(styled) - run.pixels(base)).max() > 8  # the adapter really changes the image
    torch.testing.assert_close(run.latents[styled.id], reference_latents(reference, s.prompt, s.seed), **TOL)
    assert_pixels_close(run.pixels(styled), reference_image(reference, s.prompt, s.seed))


@pytest.mark.slow
def test_text_encoder_and_unet_multipliers_equal_lycoris_per_module_multipliers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A1111's `<lora:NAME:TE:UNET>`: the prompt encoded under the adapter at TE, the UNet at UNET, beside a row at
    one multiplier; equal to LyCORIS's network with its text-encoder and UNet modules at those multipliers."""
    register_presets(monkeypatch)
    sd = pipeline_dir(tmp_path, "sd")
    reference = load(sd).pipe
    path = tmp_path / "style.safetensors"
    network = kohya_file(path, reference.text_encoder, reference.unet, 4, 2.0, factor=4)
    for module in network.text_encoder_loras:
        module.multiplier = 0.3
    for module in network.unet_loras:
        module.multiplier = 1.2
    loaded = load(sd)
    lokr.load_adapter(loaded.container, path, "style")
    run = Run(loaded, monkeypatch)
    s = spec(PROMPTS[2], 11)
    split, same = run([(s, [("style", 1.2)], [("style", 0.3)]), (s, [("style", 1.2)])])
    torch.testing.assert_close(run.latents[split.id], reference_latents(reference, s.prompt, s.seed), **TOL)
    assert_pixels_close(run.pixels(split), reference_image(reference, s.prompt, s.seed))
    assert (run.latents[split.id] - run.latents[same.id]).abs().max() > 0.05  # the text encoders' own multiplier


@pytest.mark.slow
def test_kohya_file_through_the_library_equals_pipeline_with_lycoris_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the server: the pipeline's components as one module tree, `load_adapter` + `set_adapter`, then the
    pipeline's own call (its convs run on weights folded per call) give LyCORIS's latents."""
    register_presets(monkeypatch)
    sd = pipeline_dir(tmp_path, "sd")
    reference = load(sd).pipe
    path = tmp_path / "style.safetensors"
    kohya_file(path, reference.text_encoder, reference.unet, 4, 2.0, factor=4).set_multiplier(1.0)
    pipe = load(sd).pipe
    base = reference_latents(pipe, PROMPTS[2], 11)
    parts = lokr.pipeline_modules(pipe)
    lokr.load_adapter(parts, path, "style")
    lokr.set_adapter(parts, "style")
    folds: list[str] = []
    real = lokr.layer.folded_weight
    monkeypatch.setattr(lokr.layer, "folded_weight", lambda *a: _seen(real(*a), folds))
    got = reference_latents(pipe, PROMPTS[2], 11)
    assert folds  # some layers folded (the UNet's convs), others ran the factored delta
    assert (got - base).abs().max() > 0.05  # the adapter really changes the latents
    torch.testing.assert_close(got, reference_latents(reference, PROMPTS[2], 11), **TOL)


def _seen(weight: torch.Tensor | None, folds: list[str]) -> torch.Tensor | None:
    if weight is not None:
        folds.append("fold")
    return weight
