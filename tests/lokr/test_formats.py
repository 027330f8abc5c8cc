"""LyCORIS / kohya single files, PEFT dirs, and every malformed input (refused, model untouched)."""

from __future__ import annotations

import copy
import json
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lokr
from lokr.inject import iter_lokr_layers

from .nets import Block, Net, assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[2]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture
def model(tmp_path: Path) -> nn.Module:
    """A model that already serves one adapter, so that a failed load must also leave that intact."""
    net = _model()
    keep = _write(
        tmp_path / "keep.safetensors",
        {"lora_unet_down_blocks_1_to_q.lokr_w1": _r(2, 2), "lora_unet_down_blocks_1_to_q.lokr_w2": _r(6, 4)},
    )
    lokr.load_adapter(net, keep, "keep")
    return net


# --------------------------------------------------------------------------------------------- scale rule
PREFIXED = [
    ("lora_unet", "lora_unet_down_blocks_0_{}"),
    ("lora_te", "lora_te_down_blocks_0_{}"),
    ("lora_te1", "lora_te1_down_blocks_0_{}"),
    ("lora_te2", "lora_te2_down_blocks_0_{}"),
    ("lycoris", "lycoris_down_blocks_0_{}"),
    ("dotted", "down_blocks.0.{}"),
    ("dotted diffusion_model", "diffusion_model.down_blocks.0.{}"),
]


def _linear_variants() -> dict[str, tuple[dict[str, torch.Tensor], float | None, float]]:
    """name -> (factors, alpha tensor value or None, expected scale), for Linear(8, 12): O = 3*4, I = 2*4."""
    torch.manual_seed(3)
    return {
        "w2 low rank": ({"lokr_w1": _r(3, 2), "lokr_w2_a": _r(4, 2), "lokr_w2_b": _r(2, 4)}, 3.0, 1.5),
        "w2 low rank, no alpha": (
            {"lokr_w1": _r(3, 2), "lokr_w2_a": _r(4, 2), "lokr_w2_b": _r(2, 4)},
            None,
            1.0,
        ),
        "w1 low rank": ({"lokr_w1_a": _r(3, 1), "lokr_w1_b": _r(1, 2), "lokr_w2": _r(4, 4)}, 4.0, 4.0),
        "both low rank": (
            {"lokr_w1_a": _r(3, 3), "lokr_w1_b": _r(3, 2), "lokr_w2_a": _r(4, 2), "lokr_w2_b": _r(2, 4)},
            1.0,
            0.5,  # LyCORIS takes the rank from the w2 side
        ),
        "both full, alpha ignored": ({"lokr_w1": _r(3, 2), "lokr_w2": _r(4, 4)}, 5.0, 1.0),
        "both full, no alpha": ({"lokr_w1": _r(3, 2), "lokr_w2": _r(4, 4)}, None, 1.0),
    }


def _full(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w1, w2


@pytest.mark.parametrize("variant", list(_linear_variants()))
@pytest.mark.parametrize(("prefix", "pattern"), PREFIXED, ids=[p for p, _ in PREFIXED])
def test_lycoris_linear_scale_and_delta(prefix: str, pattern: str, variant: str, tmp_path: Path) -> None:
    factors, alpha, scale = _linear_variants()[variant]
    stem = pattern.format("to_q")
    tensors = {f"{stem}.{k}": v for k, v in factors.items()}
    if alpha is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    net = _model()
    base = copy.deepcopy(net)
    info = lokr.load_adapter(net, _write(tmp_path / "a.safetensors", tensors), "x")
    assert info.modules == ["down_blocks.0.to_q"]
    assert info.format == "lycoris"
    assert info.scales == {"down_blocks.0.to_q": pytest.approx(scale)}
    w1, w2 = _full(factors)
    expected = scale * torch.kron(w1, w2)
    layer = dict(iter_lokr_layers(net))["down_blocks.0.to_q"]
    torch.testing.assert_close(layer.get_delta_weight("x"), expected, **TOL)
    lokr.set_adapter(net, "x")
    x = torch.randn(5, 8)
    with torch.no_grad():
        got = net.down_blocks[0].to_q(x)
        want = base.down_blocks[0].to_q(x) + F.linear(x, expected)
    torch.testing.assert_close(got, want, **TOL)


def test_lycoris_conv_layouts(tmp_path: Path) -> None:
    """Conv2d LoRA-style w2 (module 2-D and functional 4-D w2_b), Conv2d CP, Conv1d full w2 (LyCORIS layout)."""
    torch.manual_seed(4)
    w1, w2a, w2b = _r(2, 2), _r(3, 2), _r(2, 2 * 9)
    t2, cpa, cpb = _r(2, 2, 3, 3), _r(2, 3), _r(2, 2)
    c1_w1, c1_w2 = _r(2, 2), _r(3, 2, 3)
    net, base = _model(), _model()
    stem0, stem1, stem_c1 = (
        "lora_unet_down_blocks_0_proj_out",
        "lora_unet_down_blocks_1_proj_out",
        "lycoris_down_blocks_0_conv_1d",
    )
    tensors = {
        f"{stem0}.lokr_w1": w1,
        f"{stem0}.lokr_w2_a": w2a,
        f"{stem0}.lokr_w2_b": w2b.reshape(2, 2, 3, 3),  # LyCORIS functional layout
        f"{stem0}.alpha": torch.tensor(1.0),
        f"{stem1}.lokr_w1": w1.clone(),
        f"{stem1}.lokr_t2": t2,
        f"{stem1}.lokr_w2_a": cpa,
        f"{stem1}.lokr_w2_b": cpb,
        f"{stem1}.alpha": torch.tensor(6.0),
        f"{stem_c1}.lokr_w1": c1_w1,
        f"{stem_c1}.lokr_w2": c1_w2,
        f"{stem_c1}.alpha": torch.tensor(2.0),
    }
    lokr.load_adapter(net, _write(tmp_path / "c.safetensors", tensors), "x")
    lokr.set_adapter(net, "x")
    layers = dict(iter_lokr_layers(net))
    expected = {
        "down_blocks.0.proj_out": 0.5 * torch.kron(w1[:, :, None, None], (w2a @ w2b).reshape(3, 2, 3, 3)),
        "down_blocks.1.proj_out": 3.0
        * torch.kron(
            w1[:, :, None, None],
            torch.empty(3, 2, 3, 3).copy_(torch.einsum("ijkl,ip,jr->prkl", t2, cpa, cpb)),
        ),
        "down_blocks.0.conv_1d": 1.0 * torch.kron(c1_w1[:, :, None], c1_w2),
    }
    for name, delta in expected.items():
        torch.testing.assert_close(layers[name].get_delta_weight("x"), delta, **TOL)
    x2, x1 = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 7)
    with torch.no_grad():
        for name, x, fn in [
            ("down_blocks.0.proj_out", x2, F.conv2d),
            ("down_blocks.1.proj_out", x2, F.conv2d),
            ("down_blocks.0.conv_1d", x1, F.conv1d),
        ]:
            base_layer = base.get_submodule(name)
            want = base_layer(x) + fn(x, expected[name], None, base_layer.stride, base_layer.padding)
            torch.testing.assert_close(net.get_submodule(name)(x), want, **TOL)


def test_lycoris_file_exports_to_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    torch.manual_seed(5)
    stem = "lora_unet_down_blocks_0_to_q"
    tensors = {
        f"{stem}.lokr_w1": _r(3, 2),
        f"{stem}.lokr_w2_a": _r(4, 1),
        f"{stem}.lokr_w2_b": _r(1, 4),
        f"{stem}.alpha": torch.tensor(3.0),
    }
    net = _model()
    lokr.load_adapter(net, _write(tmp_path / "l.safetensors", tensors), "x")
    lokr.set_adapter(net, "x")
    lokr.save_adapter(net, "x", tmp_path / "peft")
    pm = PeftModel.from_pretrained(_model(), tmp_path / "peft").eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(pm.base_model.model.down_blocks[0].to_q(x), net.down_blocks[0].to_q(x), **TOL)


def test_peft_dir_round_trip_and_describe(tmp_path: Path) -> None:
    net = _model()
    torch.manual_seed(6)
    lokr.inject(net, lokr.LoKrConfig(target_modules=["to_q", "proj_out"], init_weights=False, r=2), "a")
    lokr.save_adapter(net, "a", tmp_path / "a")
    parsed = lokr.read_adapter(tmp_path / "a")
    assert parsed.format == "peft"
    assert parsed.config is not None
    # r is not recoverable when both factors are full; the exporter keeps alpha / r instead
    assert {n: m.scale for n, m in parsed.modules.items()} == {
        n: layer.lokr_adapters["a"].scale for n, layer in iter_lokr_layers(net)
    }
    other = _model()
    info = lokr.load_adapter(other, tmp_path / "a", "a")
    assert sorted(info.modules) == sorted(n for n, _ in iter_lokr_layers(net))
    assert info.to_dict()["num_modules"] == 4
    for name, layer in iter_lokr_layers(net):
        theirs = dict(iter_lokr_layers(other))[name]
        torch.testing.assert_close(theirs.get_delta_weight("a"), layer.get_delta_weight("a"), atol=0, rtol=0)


def test_half_precision_file_is_served_in_fp32_unless_asked(tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_0_to_q"
    path = _write(
        tmp_path / "h.safetensors",
        {f"{stem}.lokr_w1": _r(3, 2).half(), f"{stem}.lokr_w2": _r(4, 4).bfloat16()},
    )
    assert lokr.load_adapter(_model(), path, "x").dtype == "float32"
    assert lokr.load_adapter(_model(), path, "x", dtype=torch.bfloat16).dtype == "bfloat16"


# --------------------------------------------------------------------------------------------- malformed input
STEM = "lora_unet_down_blocks_0_to_q"
GOOD = {f"{STEM}.lokr_w1": (3, 2), f"{STEM}.lokr_w2": (4, 4)}


def _good() -> dict[str, torch.Tensor]:
    return {k: _r(*s) for k, s in GOOD.items()}


def _with(**changes: Any) -> dict[str, torch.Tensor]:
    tensors = _good()
    for key, value in changes.items():
        full = key if "." in key or key.startswith("lora_") else f"{STEM}.{key}"
        if value is None:
            tensors.pop(full)
        else:
            tensors[full] = value
    return tensors


BAD_TENSORS: dict[str, tuple[dict[str, torch.Tensor], type[Exception]]] = {
    "unknown module": (
        {
            **_good(),
            "lora_unet_down_blocks_7_to_q.lokr_w1": _r(3, 2),
            "lora_unet_down_blocks_7_to_q.lokr_w2": _r(4, 4),
        },
        lokr.UnknownModuleError,
    ),
    "not a supported layer": (
        {
            **_good(),
            "lora_unet_down_blocks_0_embed.lokr_w1": _r(1, 1),
            "lora_unet_down_blocks_0_embed.lokr_w2": _r(8, 5),
        },
        lokr.UnknownModuleError,
    ),
    "shape mismatch": (_with(lokr_w2=_r(5, 4)), lokr.ShapeMismatchError),
    "wrong rank of tensor": (_with(lokr_w2=_r(4, 4, 1)), lokr.ShapeMismatchError),
    "inner rank mismatch": (
        _with(lokr_w2=None, lokr_w2_a=_r(4, 2), lokr_w2_b=_r(3, 4)),
        lokr.ShapeMismatchError,
    ),
    "missing w2": (_with(lokr_w2=None), lokr.MissingKeysError),
    "missing half of w1": (_with(lokr_w1=None, lokr_w1_a=_r(3, 1)), lokr.MissingKeysError),
    "unknown factor key": (_with(lokr_w3=_r(2, 2)), lokr.UnexpectedKeysError),
    "ambiguous factors": (_with(lokr_w1_a=_r(3, 1), lokr_w1_b=_r(1, 2)), lokr.UnexpectedKeysError),
    "stray key": ({**_good(), "something_else": _r(2)}, lokr.UnexpectedKeysError),
    "NaN": (_with(lokr_w1=torch.tensor([[1.0, float("nan")], [0, 0], [0, 0]])), lokr.NonFiniteError),
    "Inf": (_with(lokr_w2=torch.full((4, 4), float("inf"))), lokr.NonFiniteError),
    "integer dtype": (_with(lokr_w1=torch.ones(3, 2, dtype=torch.int32)), lokr.AdapterFormatError),
    "DoRA dora_scale": (_with(dora_scale=_r(12, 1)), lokr.UnsupportedAdapterError),
    "LoRA file": (
        {
            f"{STEM}.lora_up.weight": _r(12, 4),
            f"{STEM}.lora_down.weight": _r(4, 8),
            f"{STEM}.alpha": torch.tensor(4.0),
        },
        lokr.UnsupportedAdapterError,
    ),
    "LoHa file": (
        {f"{STEM}.hada_w1_a": _r(12, 2), f"{STEM}.hada_w1_b": _r(2, 8)},
        lokr.UnsupportedAdapterError,
    ),
    "alpha not scalar": (
        _with(lokr_w2=None, lokr_w2_a=_r(4, 2), lokr_w2_b=_r(2, 4), alpha=torch.ones(2)),
        lokr.AdapterFormatError,
    ),
    "alpha NaN": (
        _with(lokr_w2=None, lokr_w2_a=_r(4, 2), lokr_w2_b=_r(2, 4), alpha=torch.tensor(float("nan"))),
        lokr.AdapterFormatError,
    ),
}


def _refused(model: nn.Module, load: Callable[[], Any], error: type[Exception]) -> pytest.ExceptionInfo[Any]:
    snap = snapshot(model)
    with pytest.raises(error) as info:
        load()
    assert_unchanged(model, snap)
    assert isinstance(info.value, lokr.LoKrError)
    assert str(info.value)
    return info


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_lycoris_file_is_refused_without_changes(case: str, model: nn.Module, tmp_path: Path) -> None:
    tensors, error = BAD_TENSORS[case]
    path = _write(tmp_path / "bad.safetensors", tensors)
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), error)
    # the adapter already loaded still works
    lokr.set_adapter(model, "keep")
    model.down_blocks[1].to_q(torch.randn(2, 8))


class _Boom:
    """Unpickling this touches a marker file: proves a pickle was (not) opened."""

    marker = ""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_is_refused_unopened(
    suffix: str, model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps(boom))

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr("lokr.formats.safe_open", forbidden)
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.UnsupportedAdapterError)
    with pytest.raises(lokr.UnsupportedAdapterError, match=rf"^{path}: \{suffix} is a pickle checkpoint's suffix"):
        lokr.read_adapter(path)  # the whole path, and no claim about contents it never read
    # a PEFT dir that only has the pickle weights
    peft_dir = tmp_path / "peftdir"
    peft_dir.mkdir()
    (peft_dir / "adapter_model.bin").write_bytes(pickle.dumps(boom))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 2}))
    _refused(model, lambda: lokr.load_adapter(model, peft_dir, "new"), lokr.UnsupportedAdapterError)
    assert not marker.exists()


def _valid_bytes(tmp_path: Path) -> bytes:
    return _write(tmp_path / "valid.safetensors", _good()).read_bytes()


BAD_BYTES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "garbage": lambda good: b"\x00\xff not a safetensors file at all " * 7,
    "truncated": lambda good: good[: len(good) - 9],
    "truncated header": lambda good: good[:20],
    "huge header length": lambda good: struct.pack("<Q", 1 << 62) + b"{}",
    "header length past end": lambda good: struct.pack("<Q", 10_000) + b'{"a": 1}',
    "header not json": lambda good: struct.pack("<Q", 4) + b"{{{{",
    "no tensors": lambda good: struct.pack("<Q", 2) + b"{}",
}


@pytest.mark.parametrize("case", list(BAD_BYTES))
def test_corrupt_safetensors_is_refused(case: str, model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(BAD_BYTES[case](_valid_bytes(tmp_path)))
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.AdapterFormatError)


def test_missing_source_and_max_bytes(model: nn.Module, tmp_path: Path) -> None:
    _refused(model, lambda: lokr.load_adapter(model, tmp_path / "nope.safetensors", "new"), lokr.AdapterFormatError)
    path = tmp_path / "valid.safetensors"
    path.write_bytes(_valid_bytes(tmp_path))
    _refused(model, lambda: lokr.load_adapter(model, path, "new", max_bytes=10), lokr.AdapterFormatError)


def test_reading_a_file_again_and_again_keeps_no_python_objects(tmp_path: Path) -> None:
    """A server re-reads adapter files on every disk-tier miss and every reload: reading must hold nothing back
    (safetensors' `get_tensor` kept two Python ints per tensor, ~4 KB per read of a 68-tensor file)."""
    import gc
    import tracemalloc

    from lokr.formats import read_safetensors

    path = tmp_path / "many.safetensors"
    save_file({f"layer{i}.lokr_w1": torch.randn(4, 4) for i in range(68)}, path, metadata={"ss_note": "x"})
    tensors, metadata, _ = read_safetensors(path)
    assert len(tensors) == 68 and metadata == {"ss_note": "x"}
    for _ in range(5):
        read_safetensors(path)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            read_safetensors(path)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes of Python objects kept after 100 reads"


def _peft_dir(tmp_path: Path) -> Path:
    net = _model()
    torch.manual_seed(8)
    lokr.inject(net, lokr.LoKrConfig(target_modules=["to_q"], init_weights=False, r=2), "a")
    lokr.save_adapter(net, "a", tmp_path / "peft")
    return tmp_path / "peft"


def _edit_config(path: Path, **changes: Any) -> None:
    file = path / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


BAD_CONFIGS: dict[str, Callable[[Path], None]] = {
    "wrong peft_type": lambda p: _edit_config(p, peft_type="LORA"),
    "r zero": lambda p: _edit_config(p, r=0),
    "r negative": lambda p: _edit_config(p, r=-3),
    "r not int": lambda p: _edit_config(p, r="8"),
    "unknown option": lambda p: _edit_config(p, use_dora=True),
    "dropout out of range": lambda p: _edit_config(p, rank_dropout=1.5),
    "bad init_weights": lambda p: _edit_config(p, init_weights="gaussian"),
    "bad regex": lambda p: _edit_config(p, target_modules="(unclosed"),
    "no peft_type": lambda p: (p / "adapter_config.json").write_text(json.dumps({"r": 2})),
    "invalid JSON": lambda p: (p / "adapter_config.json").write_text("{not json"),
    "not an object": lambda p: (p / "adapter_config.json").write_text("[1, 2]"),
    "deeply nested JSON": lambda p: (p / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
    "binary": lambda p: (p / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage"),
    "missing config": lambda p: (p / "adapter_config.json").unlink(),
    "layers_pattern without indexes": lambda p: _edit_config(p, layers_pattern="layers"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_adapter_config_is_refused(case: str, model: nn.Module, tmp_path: Path) -> None:
    path = _peft_dir(tmp_path)
    BAD_CONFIGS[case](path)
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.ConfigError)


def test_peft_dir_with_bad_weights_is_refused(model: nn.Module, tmp_path: Path) -> None:
    path = _peft_dir(tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = {
        "base_model.model.down_blocks.0.to_q.lokr_w1": _r(3, 2),
        "base_model.model.down_blocks.0.to_q.alpha": _r(1),
    }
    _write(weights, tensors)
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.UnexpectedKeysError)
    _write(weights, {"down_blocks.0.to_q.lokr_w1": _r(3, 2)})  # missing the PEFT prefix
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.UnexpectedKeysError)
    weights.unlink()
    _refused(model, lambda: lokr.load_adapter(model, path, "new"), lokr.AdapterFormatError)


def test_duplicate_name_and_unknown_delete(model: nn.Module, tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.safetensors", _good())
    _refused(model, lambda: lokr.load_adapter(model, path, "keep"), lokr.AdapterExistsError)
    _refused(
        model,
        lambda: lokr.inject(model, lokr.LoKrConfig(target_modules=["to_q"]), "keep"),
        lokr.AdapterExistsError,
    )
    _refused(model, lambda: lokr.delete_adapter(model, "nope"), lokr.AdapterNotFoundError)
    _refused(model, lambda: lokr.set_adapter(model, "nope"), lokr.AdapterNotFoundError)
    _refused(model, lambda: lokr.save_adapter(model, "nope", tmp_path / "out"), lokr.AdapterNotFoundError)
    _refused(model, lambda: lokr.merge_adapter(model, "nope"), lokr.AdapterNotFoundError)
    with pytest.raises(KeyError):  # AdapterNotFoundError is also a KeyError
        lokr.delete_adapter(model, "nope")


def test_delete_restores_plain_modules(model: nn.Module, tmp_path: Path) -> None:
    lokr.load_adapter(model, _write(tmp_path / "ok.safetensors", _good()), "new")
    assert set(lokr.list_adapters(model)) == {"keep", "new"}
    lokr.delete_adapter(model, "new")
    assert lokr.list_adapters(model) == ["keep"]
    assert isinstance(model.down_blocks[0].to_q, nn.Linear)
    lokr.merge_adapter(model, "keep")
    with pytest.raises(lokr.AdapterStateError):
        lokr.delete_adapter(model, "keep")
    lokr.unmerge_adapter(model)
    lokr.delete_adapter(model, "keep")
    assert lokr.list_adapters(model) == []
    assert all(
        type(m) in (Net, Block, nn.ModuleList, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding) for m in model.modules()
    )


def test_inject_refuses_unsupported_layers_and_missing_targets(model: nn.Module) -> None:
    _refused(
        model,
        lambda: lokr.inject(model, lokr.LoKrConfig(target_modules=["embed"]), "e"),
        lokr.UnsupportedLayerError,
    )
    _refused(model, lambda: lokr.inject(model, lokr.LoKrConfig(target_modules=["nothing"]), "e"), lokr.ConfigError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"alpha": float("nan")},
        {"module_dropout": -0.1},
        {"decompose_factor": 1.5},
        {"layers_pattern": "layers"},
        {"rank_pattern": {"x": 0}},
        {"target_modules": 3},
        {"peft_type": "LORA"},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(lokr.ConfigError):
        lokr.LoKrConfig(**kwargs)


def test_config_round_trip_matches_peft_fields() -> None:
    from peft import LoKrConfig as PeftLoKrConfig

    ours = lokr.LoKrConfig()
    theirs = PeftLoKrConfig()
    for name in (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    data = lokr.LoKrConfig(target_modules=["b", "a"], rank_pattern={"a": 2}).to_dict()
    assert data["target_modules"] == ["a", "b"]
    assert lokr.LoKrConfig.from_dict(json.loads(json.dumps(data))) == lokr.LoKrConfig(
        target_modules=["a", "b"], rank_pattern={"a": 2}
    )


# --------------------------------------------------------------------------------------------- package hygiene
def test_import_lokr_does_not_import_the_service_stack() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import lokr; "
        "assert lokr.__file__; "
        "banned = {'fastapi', 'pydantic', 'starlette', 'service', 'uvicorn'}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in banned); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api() -> None:
    assert lokr.__all__ == sorted(lokr.__all__)
    assert len(set(lokr.__all__)) == len(lokr.__all__)
    for name in lokr.__all__:
        assert hasattr(lokr, name), name
    assert callable(lokr.inject)
    assert callable(lokr.load_adapter)
    for name in [n for n in lokr.__all__ if n.endswith("Error")]:
        assert issubclass(getattr(lokr, name), lokr.LoKrError)


def test_wrapping_keeps_the_model_in_eval_mode(model: nn.Module, tmp_path: Path) -> None:
    """A fresh wrapper must not switch an eval model's layers to training mode (dropout at inference)."""
    lokr.inject(model, lokr.LoKrConfig(target_modules=["proj_out"], module_dropout=0.9), "d")
    assert all(not m.training for m in model.modules())
    train_model = _model().train()
    lokr.load_adapter(train_model, _write(tmp_path / "ok.safetensors", _good()), "x")
    assert all(m.training for m in train_model.modules())


def test_a_peft_lora_config_is_named_as_such() -> None:
    """A real peft LoRA config (its options are not LoKr's) is refused as a LoRA, not as a list of odd options."""
    from peft import LoraConfig

    data = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data["peft_type"] = "LORA"  # as `adapter_config.json` stores it
    with pytest.raises(lokr.ConfigError, match=r"'LORA' adapter config; only LoKr adapters"):
        lokr.LoKrConfig.from_dict(data)


def test_a_file_truncated_after_it_was_read_leaves_the_tensors_intact(tmp_path: Path) -> None:
    """A training run saving over its checkpoint (`open(path, "wb")`) while the server reads it: the tensors read are
    the process's own bytes (a mapped file's pages past the new end would kill the process with SIGBUS)."""
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(1 << 18)}, path)
    size = path.stat().st_size
    script = (
        "import sys; from pathlib import Path; from lokr.formats import read_safetensors\n"
        "tensors, _, read = read_safetensors(Path(sys.argv[1]))\n"
        "open(sys.argv[1], 'wb').close()\n"
        "print(int(tensors['w'].sum()), read.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == [str(1 << 18), str(size)] and path.stat().st_size == 0
