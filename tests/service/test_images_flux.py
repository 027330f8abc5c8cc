"""Flux pipelines in the image backend against plain diffusers `FluxPipeline`: same seed => same latents / pixels
for the base model, a LyCORIS LoKr file (made by `create_lycoris` on the transformer) and peft's LoKr; mixed
concurrent rows equal their one-at-a-time runs; keys for modules the transformer lacks are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import lokr
from lokr.errors import UnknownModuleError, UnsupportedAdapterError
from lokr.inject import iter_lokr_layers
from service.errors import BadRequestError
from service.images.backend import check_spec
from service.images.sd import StableDiffusion
from service.images.tiny_flux import save_peft_flux_lokr

from ..lokr.lyco import EVERY_LAYER, kohya_file, register_presets
from .flux_world import (
    MULT,
    bfl_twin,
    lycoris_flux_file,
    lycoris_networks_file,
    peft_flux_reference,
    register_linear_preset,
    twin_to_diffusers,
    with_extra_key,
)
from .images_world import assert_pixels_close, load, pipeline_dir, reference_image, reference_latents
from .test_images_parity import PROMPTS, TOL, Run, spec

PEFT_SEED = 5


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipeline_dir(tmp_path_factory.mktemp("images-flux"), "flux")


def test_flux_rows_equal_diffusers_base_lycoris_and_peft(
    flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One backend run: a base row, a LyCORIS-file row joining at step 1 and a peft row with other steps and
    guidance share the forwards; each equals the plain pipeline with that adapter applied by its own package."""
    register_linear_preset(monkeypatch)
    lyco_pipe = load(flux_dir).pipe  # LyCORIS wraps its transformer's Linear layers in place, at MULT
    lyco_file = tmp_path / "flux-lokr.safetensors"
    lycoris_flux_file(lyco_file, lyco_pipe.transformer)
    loaded = load(flux_dir)
    linears = [n for n, m in loaded.pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    info = lokr.load_adapter(loaded.container, lyco_file, "ly")
    assert sorted(info.modules) == sorted(f"transformer.{n}" for n in linears)  # every Linear, nothing else
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(flux_dir, tmp_path / "peft", PEFT_SEED), "pe")
    run = Run(loaded, monkeypatch)
    s, s2 = spec(PROMPTS[2], 11, guidance=3.5), spec(PROMPTS[0], 12, steps_=4, guidance=5.0)
    base, ly, pe = run([(s, None), (s, [("ly", MULT)]), (s2, "pe")], joins=[0, 1, 0])
    assert np.abs(run.pixels(ly) - run.pixels(base)).max() > 8  # the adapters really change the image
    references = [
        (base, load(flux_dir).pipe, s),
        (ly, lyco_pipe, s),
        (pe, peft_flux_reference(flux_dir, PEFT_SEED), s2),
    ]
    for job, pipe, sp in references:
        kwargs = {"guidance_scale": sp.guidance_scale}
        want = reference_latents(pipe, sp.prompt, sp.seed, sp.width, sp.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(pipe, sp.prompt, sp.seed, sp.width, sp.steps, **kwargs))
    assert np.abs(run.pixels(pe) - run.pixels(base)).max() > 8


def test_one_file_for_clip_t5_and_transformer(flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lora_te1_` (CLIP), `lora_te3_` (sd-scripts' name for T5: Flux's `text_encoder_2`) and `lycoris_` keys in
    one file load as one adapter across the three components; the image equals diffusers with LyCORIS's three
    networks applied."""
    register_linear_preset(monkeypatch)
    reference = load(flux_dir).pipe
    parts = [
        ("lora_te1", reference.text_encoder),
        ("lora_te3", reference.text_encoder_2),
        ("lycoris", reference.transformer),
    ]
    path = lycoris_networks_file(tmp_path / "all.safetensors", parts)
    loaded = load(flux_dir)
    info = lokr.load_adapter(loaded.container, path, "all")
    assert {m.split(".")[0] for m in info.modules} == {"text_encoder", "text_encoder_2", "transformer"}
    run = Run(loaded, monkeypatch)
    s = spec(PROMPTS[0], 21, guidance=3.5)
    base, styled = run([(s, None), (s, [("all", MULT)])])
    assert np.abs(run.pixels(styled) - run.pixels(base)).max() > 8
    torch.testing.assert_close(run.latents[styled.id], reference_latents(reference, s.prompt, s.seed), **TOL)
    assert_pixels_close(run.pixels(styled), reference_image(reference, s.prompt, s.seed))


def test_flux_mixed_batch_equals_one_at_a_time(flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_linear_preset(monkeypatch)
    loaded = load(flux_dir)
    lycoris_flux_file(tmp_path / "a.safetensors", load(flux_dir).pipe.transformer, decompose_both=True)
    lokr.load_adapter(loaded.container, tmp_path / "a.safetensors", "a")
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(flux_dir, tmp_path / "b", PEFT_SEED), "b")
    run = Run(loaded, monkeypatch)
    items = [
        (spec(PROMPTS[0], 1, guidance=3.5), "a"),
        (spec(PROMPTS[1], 2, guidance=5.0), [("a", 0.5), ("b", 0.8)]),
        (spec(PROMPTS[2], 3, guidance=1.0), None),
        (spec(PROMPTS[0], 4, size=48), [("b", -0.7)]),  # its own size sub-batch
        (spec(PROMPTS[1], 5, steps_=4), "b"),
    ]
    together = run(items, joins=[0, 0, 1, 1, 2])  # rows at different steps share each forward
    for job, item in zip(together, items):
        (alone,) = run([item])
        torch.testing.assert_close(run.latents[job.id], run.latents[alone.id], **TOL)
        assert_pixels_close(run.pixels(job), run.pixels(alone))


def test_flux_refuses_unknown_modules_and_negative_prompts(
    flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_linear_preset(monkeypatch)
    lycoris_flux_file(tmp_path / "good.safetensors", load(flux_dir).pipe.transformer)
    missing = "lycoris_transformer_blocks_7_attn_to_q"  # the tiny transformer has one double-stream block
    bad = with_extra_key(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", missing)
    loaded = load(flux_dir)
    with pytest.raises(UnknownModuleError, match=missing):
        lokr.load_adapter(loaded.container, bad, "bad")
    assert not list(iter_lokr_layers(loaded.container))  # nothing of the file was loaded
    with pytest.raises(BadRequestError, match="true_cfg_scale"):
        check_spec(loaded, spec(PROMPTS[0], 1, neg="blurry"))  # ignored by diffusers without true CFG: refused
    check_spec(loaded, spec(PROMPTS[0], 1, neg=""))  # A1111 sends "" when there is none
    check_spec(loaded, replace(spec(PROMPTS[0], 1, neg="blurry"), true_cfg_scale=4.0))
    with pytest.raises(BadRequestError, match="latent upscaling .* is served on Stable Diffusion and SDXL"):
        check_spec(loaded, replace(spec(PROMPTS[0], 1), latent_output=True))
    with pytest.raises(BadRequestError, match="clip_skip applies to Stable Diffusion and SDXL's CLIP"):
        check_spec(loaded, replace(spec(PROMPTS[0], 1), clip_skip=1))
    with pytest.raises(BadRequestError, match="guidance_rescale rescales classifier-free guidance on Stable Diffusion"):
        check_spec(loaded, replace(spec(PROMPTS[0], 1), guidance_rescale=0.7))
    with pytest.raises(BadRequestError, match="true_cfg_scale applies to Flux"):
        StableDiffusion(xl=False).check(replace(spec(PROMPTS[0], 1), true_cfg_scale=4.0))


def test_true_cfg_rows_equal_diffusers(flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`true_cfg_scale` with a negative prompt (peft's LoKr on the transformer, and the base model with "" as the
    negative) shares forwards with a plain row, rows joining at different steps; each image equals
    `FluxPipeline(..., negative_prompt=..., true_cfg_scale=...)` and true CFG really changes it."""
    loaded = load(flux_dir)
    lokr.load_adapter(loaded.container, save_peft_flux_lokr(flux_dir, tmp_path / "peft", PEFT_SEED), "pe")
    run = Run(loaded, monkeypatch)
    plain = spec(PROMPTS[0], 31, guidance=3.5)
    styled = replace(spec(PROMPTS[1], 32, guidance=3.5, neg="blurry, dark"), true_cfg_scale=4.0)
    empty = replace(spec(PROMPTS[2], 33, steps_=4, guidance=2.0, neg=""), true_cfg_scale=2.5)
    a, b, c = run([(plain, "pe"), (styled, "pe"), (empty, None)], joins=[0, 1, 0])
    (without,) = run([(replace(styled, true_cfg_scale=1.0, negative_prompt=None), "pe")])
    assert np.abs(run.pixels(b) - run.pixels(without)).max() > 8
    peft_pipe, base_pipe = peft_flux_reference(flux_dir, PEFT_SEED), load(flux_dir).pipe
    for job, pipe, sp in [(a, peft_pipe, plain), (b, peft_pipe, styled), (c, base_pipe, empty)]:
        kwargs = {"guidance_scale": sp.guidance_scale, "negative_prompt": sp.negative_prompt,
                  "true_cfg_scale": sp.true_cfg_scale}  # fmt: skip
        want = reference_latents(pipe, sp.prompt, sp.seed, sp.width, sp.steps, **kwargs)
        torch.testing.assert_close(run.latents[job.id], want, **TOL)
        assert_pixels_close(run.pixels(job), reference_image(pipe, sp.prompt, sp.seed, sp.width, sp.steps, **kwargs))


def test_kohya_bfl_layout_file_splits_fused_layers_exactly(
    flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sd-scripts' Flux keys (BFL's layout, `lora_unet_double_blocks_0_img_attn_qkv`, ...) written by LyCORIS's kohya
    network on a BFL-named twin of the transformer: fused qkv / linear1 / final modulation rows split onto diffusers'
    layers; the image equals diffusers with the twin's merged weights unfused into it. Factors whose rows do not
    split at the layer boundaries are refused, naming the key."""
    register_presets(monkeypatch)
    reference = load(flux_dir).pipe
    twin = bfl_twin(reference.transformer)
    path = tmp_path / "bfl.safetensors"
    kohya_file(path, None, twin, 4, 2.0, factor=7, preset=EVERY_LAYER)  # w2 rows divide every q/k/v/MLP bound
    twin_to_diffusers(twin, reference.transformer)
    loaded = load(flux_dir)
    linears = [n for n, m in loaded.pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    info = lokr.load_adapter(loaded.container, path, "bfl")
    assert sorted(info.modules) == sorted(f"transformer.{n}" for n in linears)
    run = Run(loaded, monkeypatch)
    s = spec(PROMPTS[1], 13, guidance=4.0)
    base, styled = run([(s, None), (s, [("bfl", MULT)])])
    assert np.abs(run.pixels(styled) - run.pixels(base)).max() > 8
    torch.testing.assert_close(
        run.latents[styled.id], reference_latents(reference, s.prompt, s.seed, guidance_scale=4.0), **TOL
    )
    assert_pixels_close(run.pixels(styled), reference_image(reference, s.prompt, s.seed, guidance_scale=4.0))
    kohya_file(
        tmp_path / "f4.safetensors",
        None,
        bfl_twin(load(flux_dir).pipe.transformer),
        4,
        2.0,
        factor=4,
        preset=EVERY_LAYER,
    )
    with pytest.raises(
        UnsupportedAdapterError, match=r"lora_unet_(double_blocks_0_(img|txt)_attn_qkv|single_blocks_0_linear1)"
    ):
        lokr.load_adapter(loaded.container, tmp_path / "f4.safetensors", "f4")
    assert lokr.list_adapters(loaded.container) == ["bfl"]
