"""`lokr-serve inspect` and settings from env vars."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import lokr
from service.settings import Settings

from .conftest import World


def test_inspect_summary_is_short_and_readable(world: World) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "inspect", str(world.adapters["alpha"])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = out.stdout
    assert not text.lstrip().startswith("{") and len(text.splitlines()) <= 12, text
    assert "PEFT LoKr directory" in text and "scale: 0.5 on every module" in text
    tensors = sum(len(m.tensors) for m in lokr.read_adapter(world.adapters["alpha"]).modules.values())
    assert f"total: 14 modules, {tensors} tensors" in text and "float32" in text
    # modules grouped by factor shapes, layer indices folded: q/k/v/o share shapes across both layers
    group = next(line for line in text.splitlines() if "self_attn.q_proj" in line)
    assert "model.layers.*.self_attn.q_proj" in group and "lokr_w1 (" in group and "lokr_w2 (" in group


def test_inspect_json_prints_adapter_contents(world: World) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "inspect", "--json", str(world.adapters["alpha"])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["format"] == "peft" and report["num_modules"] == 14 and report["nbytes"] > 0
    module = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert set(module["tensors"]) == {"lokr_w1", "lokr_w2"} and module["scale"] == pytest.approx(0.5)


def test_inspect_refuses_pickle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "adapter.bin"
    bad.write_bytes(b"\x80\x04junk")
    out = subprocess.run([sys.executable, "-m", "service.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "safetensors" in out.stderr


def test_every_flag_reads_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LOKR_MODEL", "/models/m")
    monkeypatch.setenv("LOKR_ADMIN_TOKEN", "secret")
    monkeypatch.setenv("LOKR_ADAPTER", "a=/x,b=/y")
    monkeypatch.setenv("LOKR_ADAPTER_ROOT", str(tmp_path))
    monkeypatch.setenv("LOKR_PORT", "9001")
    settings = Settings()
    assert settings.model == "/models/m" and settings.admin_token == "secret" and settings.port == 9001
    assert settings.preload_pairs() == [("a", "/x"), ("b", "/y")]
    assert settings.adapter_root == [tmp_path.resolve()]


@pytest.mark.parametrize(
    ("text", "count"),
    [("4194304", 4 << 20), ("4MiB", 4 << 20), ("4Mi", 4 << 20), ("2 GiB", 2 << 30), ("500MB", 500 * 10**6),
     ("1.5GiB", 3 << 29), ("64k", 64_000)],
)  # fmt: skip
def test_byte_flags_take_units(text: str, count: int) -> None:
    assert Settings(max_body_bytes=text).max_body_bytes == count


@pytest.mark.parametrize("text", ["4XB", "MiB", "4ib", "-1", ""])
def test_byte_flags_refuse_what_is_not_a_byte_count(text: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="expects a byte count"):
        Settings(max_upload_bytes=text)


def test_help_names_every_flag_with_its_default_and_env() -> None:
    from service.cli import _FLAGS, _parser

    subs = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.option_strings[0]: a.help or "" for a in subs.choices["serve"]._actions if a.option_strings}
    for flag, _ in _FLAGS:
        assert f"env LOKR_{flag[2:].replace('-', '_').upper()}" in helps[flag]
        assert not helps[flag].startswith("("), f"{flag} has no help of its own"
    assert "default 4MiB, 64MiB on an image server" in helps["--max-body-bytes"]  # the default by kind, said once
    assert "default 30.0" in helps["--shutdown-grace-s"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_demo_refuses_a_missing_gpu_before_building(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--device", "cuda", "--cache-dir", str(tmp_path / "demo")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "no CUDA device is available" in out.stderr
    assert not (tmp_path / "demo").exists() and "building" not in out.stdout


def test_logging_setup_leaves_diffusers_unimported() -> None:
    """A causal-LM server does not pay diffusers' import (about 3 s here) to configure its logs."""
    script = (
        "import sys; from service.logs import configure_logging; configure_logging()\n"
        "print('diffusers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
