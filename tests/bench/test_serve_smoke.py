"""Smoke test of the serving benchmark: `--quick` starts real servers, runs every scenario kind end to end and
writes its report and plot (no timings asserted, no wall-clock limit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .run import run_bench


@pytest.mark.slow
def test_serve_quick_writes_report_and_plot(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    run_bench("serve.py", "--quick", "--out", out, "--work", work)
    report, plot = out / "serve.md", out / "serve.png"
    assert report.is_file()
    assert plot.is_file() and plot.stat().st_size > 0
    text = report.read_text()
    for heading in ("## Environment", "## Settings", "## Results", "load average"):
        assert heading in text
    results = json.loads((out / "serve.json").read_text())["results"]
    kinds = {"limit-0", "batch-0", "hf-0", "batch-1", "batch-16", "single-16", "peft-16", "itl-1"}
    assert {r["scenario"] for r in results} == kinds
    for r in results:
        assert r["errors"] == 0, r
        assert r["requests"] > 0
    by_name = {r["scenario"]: r for r in results}
    # how many gaps fall inside the long prompt's prefill depends on the machine's speed: only that it was counted
    assert by_name["itl-1"]["long_error"] is None and by_name["itl-1"]["itl_during_gaps"] >= 0
    for label in ("1 adapter / limit", "ours / transformers serve", "long prompt p99 / p50"):
        assert label in text
