"""Hypothesis over the adapter-file parser: hostile bytes and configs fail only with `lokr.LoKrError`.

Whatever the input (mutated safetensors bytes, a forged 8-byte header length, random JSON headers with
odd dtypes / shapes / offsets, structurally valid files with random tensors, random adapter_config.json),
`lokr.read_adapter` / `lokr.load_adapter` either succeed or raise a `lokr.LoKrError` subclass, promptly,
and a failed load never changes the model (state dict, module types, adapter list).
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file
from torch import nn

import lokr

from .nets import Net, assert_unchanged, snapshot

pytestmark = pytest.mark.slow
EXAMPLES = 500
SLOW_S = 10.0  # one parse + validation of a file of a few KiB; anything near this is a hang in the making
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


STEMS = [
    "lora_unet_down_blocks_0_to_q",
    "lora_unet_down_blocks_1_proj_out",
    "lora_unet_down_blocks_0_conv_1d",
    "down_blocks.1.to_q",
    "lora_unet_down_blocks_0_embed",
    "lora_unet_nothing_here",
    "",
]
LEAVES = ["lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "lora_up", "x"]
PEFT_MODULES = ["down_blocks.0.to_q", "down_blocks.1.proj_out", "down_blocks.0.conv_1d", "down_blocks.0.embed", "nope"]


def _valid_lycoris() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "lora_unet_down_blocks_0_to_q.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_down_blocks_0_to_q.lokr_w2_a": torch.randn(6, 2, generator=g),
        "lora_unet_down_blocks_0_to_q.lokr_w2_b": torch.randn(2, 4, generator=g),
        "lora_unet_down_blocks_0_to_q.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_1_proj_out.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_down_blocks_1_proj_out.lokr_w2": torch.randn(3, 2, 3, 3, generator=g),
    }


VALID_BYTES = save(_valid_lycoris())
VALID_CONFIG: dict[str, Any] = {
    "peft_type": "LOKR",
    "r": 2,
    "alpha": 4,
    "target_modules": ["to_q"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "decompose_both": False,
    "init_weights": True,
}


def _peft_weights(module: str) -> bytes:
    return save({f"base_model.model.{module}.lokr_w1": torch.randn(2, 2), f"base_model.model.{module}.lokr_w2":
                 torch.randn(6, 4)})  # fmt: skip


PEFT_WEIGHTS = _peft_weights("down_blocks.0.to_q")


# ------------------------------------------------------------------------------------------ harness
@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A model already serving one adapter, so that a failed load must also leave that one intact."""
    torch.manual_seed(0)
    net = Net().eval()
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(tmp) / "keep.safetensors"
        save_file(
            {"lora_unet_down_blocks_1_to_q.lokr_w1": torch.randn(2, 2), "lora_unet_down_blocks_1_to_q.lokr_w2":
             torch.randn(6, 4)},
            str(keep),
        )  # fmt: skip
        lokr.load_adapter(net, keep, "keep")
    return net


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lokr-fuzz-") as tmp:
        yield Path(tmp)


_counter = iter(range(10**9))
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    refused = sum(v for k, v in OUTCOMES.items() if k != "ok")
    print(f"\nparser fuzz: {sum(OUTCOMES.values())} cases, {OUTCOMES['ok']} loaded, {refused} refused cleanly: "
          f"{dict(OUTCOMES.most_common())}")  # fmt: skip


def _try_load(model: nn.Module, source: Path) -> str:
    """Load `source`; our own errors only, nothing changed on failure. Returns 'ok' or the error's class."""
    before = snapshot(model)
    started = time.monotonic()
    outcome = "ok"
    try:
        lokr.read_adapter(source, max_bytes=1 << 20)
        lokr.load_adapter(model, source, "fz", max_bytes=1 << 20)
    except lokr.LoKrError as exc:
        outcome = type(exc).__name__
        assert_unchanged(model, before)
    else:
        lokr.delete_adapter(model, "fz")
        assert_unchanged(model, before)  # and a successful load + delete is a round trip
    assert time.monotonic() - started < SLOW_S, f"parsing {source} took too long"
    OUTCOMES[outcome] += 1
    return outcome


def _file(workdir: Path, data: bytes, suffix: str = ".safetensors") -> Path:
    path = workdir / f"case{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ strategies
def _header(length: int, header: bytes) -> bytes:
    return struct.pack("<Q", length) + header


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID_BYTES) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID_BYTES) - 1), st.just(0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID_BYTES) - 1), st.binary(min_size=1, max_size=16)),
    st.tuples(
        st.just("length"),
        st.sampled_from([0, 1, 7, 8, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, 100_000_001]),
        st.just(0),
    ),
    st.tuples(st.just("length-delta"), st.integers(-64, 64), st.just(0)),
)


def _mutate(data: bytes, ops: list[tuple[str, Any, Any]]) -> bytes:
    buf = bytearray(data)
    for kind, a, b in ops:
        if kind == "flip" and buf:
            buf[a % len(buf)] ^= b
        elif kind == "truncate":
            del buf[a:]
        elif kind == "append":
            buf += a
        elif kind == "insert":
            buf[a:a] = b
        elif kind == "length":
            buf[:8] = struct.pack("<Q", a)
        elif kind == "length-delta" and len(buf) >= 8:
            (n,) = struct.unpack("<Q", bytes(buf[:8]))
            buf[:8] = struct.pack("<Q", max(0, min(2**64 - 1, n + a)))
    return bytes(buf)


dtype_names = st.sampled_from(
    ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
     "C64", "X", "", "f32"]
)  # fmt: skip
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(dtype_names, json_scalars),
        "shape": st.one_of(
            st.lists(st.integers(-2, 2**40), max_size=5), st.lists(st.integers(0, 12), max_size=4), json_scalars
        ),
        "data_offsets": st.one_of(
            st.tuples(st.integers(-2, 4096), st.integers(-2, 4096)).map(list),
            st.lists(st.integers(0, 2**64), max_size=3),
            json_scalars,
        ),
    }  # fmt: skip
)
tensor_key = st.one_of(st.builds(lambda s, leaf: f"{s}.{leaf}" if s else leaf, st.sampled_from(STEMS),
                                 st.sampled_from(LEAVES)), st.text(max_size=20))  # fmt: skip
json_header = st.dictionaries(
    st.one_of(tensor_key, st.just("__metadata__")),
    st.one_of(tensor_entry, st.dictionaries(st.text(max_size=5), json_scalars, max_size=3), json_scalars),
    max_size=6,
)

torch_dtypes = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8,
     torch.bool, torch.float8_e4m3fn]
)  # fmt: skip
special = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e30, 6e4])


@st.composite
def random_tensor(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
    dtype = draw(torch_dtypes)
    t = torch.randn(*shape) if shape else torch.randn(())
    if t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(special)
    return t.to(dtype)


json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4)), max_leaves=12
)  # fmt: skip
config_field = st.sampled_from(
    ["peft_type", "r", "alpha", "target_modules", "rank_pattern", "alpha_pattern", "decompose_both",
     "decompose_factor", "init_weights", "rank_dropout", "module_dropout", "layers_to_transform", "layers_pattern",
     "exclude_modules", "use_effective_conv2d", "modules_to_save", "task_type", "unknown_option"]
)  # fmt: skip
config_value = st.one_of(
    json_values,
    st.sampled_from(["LOKR", "LORA", "lokr", 0, -1, 4, 2.5, "(", "[a-", ".*", "to_q", ["to_q"], {"to_q": 0},
                     {"(": 2}, {"to_q": 2}, {"to_q": float("nan")}, 2**80, None]),
)  # fmt: skip


# ------------------------------------------------------------------------------------------ tests
@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_safetensors_bytes(model: nn.Module, workdir: Path, ops: list[tuple[str, Any, Any]]) -> None:
    _try_load(model, _file(workdir, _mutate(VALID_BYTES, ops)))


@FUZZ
@given(
    header=json_header,
    length_fix=st.one_of(st.just(None), st.integers(0, 2**64 - 1)),
    pad=st.integers(0, 16),
    body=st.binary(max_size=512),
)
def test_random_json_headers(
    model: nn.Module, workdir: Path, header: dict[str, Any], length_fix: int | None, pad: int, body: bytes
) -> None:
    raw = json.dumps(header).encode() + b" " * pad
    _try_load(model, _file(workdir, _header(len(raw) if length_fix is None else length_fix, raw) + body))


@FUZZ
@given(tensors=st.dictionaries(tensor_key.filter(bool), random_tensor(), min_size=1, max_size=5))
def test_structurally_valid_files_with_random_tensors(
    model: nn.Module, workdir: Path, tensors: dict[str, torch.Tensor]
) -> None:
    _try_load(model, _file(workdir, save({k: v.contiguous() for k, v in tensors.items()})))


@FUZZ
@given(
    config=st.one_of(
        st.dictionaries(config_field, config_value, max_size=6).map(lambda d: {**VALID_CONFIG, **d}),
        st.dictionaries(config_field, config_value, max_size=6),
        json_values,
    ),
    module=st.sampled_from(PEFT_MODULES),
)
def test_random_adapter_configs(model: nn.Module, workdir: Path, config: Any, module: str) -> None:
    folder = workdir / f"peft{next(_counter)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(_peft_weights(module))
    _try_load(model, folder)


@FUZZ
@given(
    patterns=st.dictionaries(
        st.sampled_from(["rank_pattern", "alpha_pattern"]),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["(", "[", ")", "*", "a{2,1}", "\\", "to_q", ".*", "down_blocks.0.to_q"]),
                st.text(max_size=4),
            ),
            st.one_of(st.integers(-2, 8), st.floats(), json_scalars),
            max_size=3,
        ),  # fmt: skip
        min_size=1,
    )
)
def test_random_rank_and_alpha_patterns(model: nn.Module, workdir: Path, patterns: dict[str, Any]) -> None:
    folder = workdir / f"peft{next(_counter)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**VALID_CONFIG, **patterns}))
    (folder / "adapter_model.safetensors").write_bytes(PEFT_WEIGHTS)
    _try_load(model, folder)


@st.composite
def perturbed_valid(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """The valid file's structure with some tensors' dtype, values or shape changed."""
    out = {}
    for key, t in _valid_lycoris().items():
        choice = draw(st.sampled_from(["keep", "dtype", "special", "shape", "drop"]))
        if choice == "dtype":
            t = t.to(draw(torch_dtypes))
        elif choice == "special" and t.numel():
            t = t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(special)
            t = t.to(draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))
        elif choice == "shape":
            t = draw(random_tensor())
        elif choice == "drop":
            continue
        out[key] = t
    return out or {"x.lokr_w1": torch.ones(1)}


@FUZZ
@given(tensors=perturbed_valid())
def test_valid_structure_with_perturbed_tensors(
    model: nn.Module, workdir: Path, tensors: dict[str, torch.Tensor]
) -> None:
    _try_load(model, _file(workdir, save({k: v.contiguous() for k, v in tensors.items()})))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=256), st.text(max_size=64).map(str.encode)))
def test_random_config_bytes(model: nn.Module, workdir: Path, raw: bytes) -> None:
    folder = workdir / f"peft{next(_counter)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(raw)
    (folder / "adapter_model.safetensors").write_bytes(PEFT_WEIGHTS)
    _try_load(model, folder)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"r": ' + "9" * 5000 + ', "peft_type": "LOKR"}', '{"a": 1}' * 3, "\ufeff{}"],
    ids=["deeply-nested", "huge-int", "trailing-data", "bom"],
)
def test_pathological_config_text(model: nn.Module, workdir: Path, text: str) -> None:
    folder = workdir / f"peft{next(_counter)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(text)
    (folder / "adapter_model.safetensors").write_bytes(PEFT_WEIGHTS)
    assert _try_load(model, folder) != "ok"


def test_valid_inputs_load(model: nn.Module, workdir: Path) -> None:
    """The seeds the fuzzers start from are themselves valid, so mutations explore near real files."""
    assert _try_load(model, _file(workdir, VALID_BYTES)) == "ok"
    folder = workdir / "valid-peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(VALID_CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(PEFT_WEIGHTS)
    assert _try_load(model, folder) == "ok"


def test_scale_beyond_float32_is_refused_before_anything_attaches(model: nn.Module, workdir: Path) -> None:
    """A finite alpha whose alpha / r overflows float32 (found by the pattern fuzz above, example set depending on
    the modules loaded) is a ConfigError, not a RuntimeError half-way through attaching the adapter."""
    folder = workdir / "huge-alpha"
    folder.mkdir()
    config = {**VALID_CONFIG, "alpha_pattern": {"down_blocks.0.to_q": -2.199784542449925e222}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(PEFT_WEIGHTS)
    assert _try_load(model, folder) == "ConfigError"
