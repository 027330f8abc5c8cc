"""Smoke test of the prepared device check: on the CPU, `--quick` passes every check and writes its report.

A session with a GPU runs the same script with `--device cuda`; no test depends on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from .run import run_bench


def test_device_check_quick_passes_on_cpu(tmp_path: Path) -> None:
    run_bench("device_check.py", "--device", "cpu", "--quick", "--work", tmp_path / "work", "--out", tmp_path)
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert [c["check"] for c in data["checks"]] == ["parity", "tier", "memory"]
    assert all(c["ok"] for c in data["checks"])
    assert data["checks"][0]["adapter_effect"] > 0  # the adapters change the rows they are on
    assert [row["rows"] for row in data["speed"]] == [1, 4]
    report = (tmp_path / "device_check.md").read_text()
    assert "| parity | yes |" in report and "mixed_ms" in report
