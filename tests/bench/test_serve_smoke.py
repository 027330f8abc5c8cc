"""Smoke test of the serving benchmark: `--quick` starts real servers, runs every scenario kind end to end and
writes its report and plot (no timings asserted, no wall-clock limit)."""

from __future__ import annotations

import json
import re
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
    kinds = {
        "limit-0",
        "engine-1",
        "batch-0",
        "hf-0",
        "batch-1",
        "batch-16",
        "single-16",
        "peft-16",
        "itl-1",
        "hotload-1",
    }
    assert {r["scenario"] for r in results} == kinds
    for r in results:
        assert r["errors"] == 0, r
        assert r["requests"] > 0
    by_name = {r["scenario"]: r for r in results}
    # how many gaps fall inside the long prompt's prefill depends on the machine's speed: only that it was counted
    assert by_name["itl-1"]["long_error"] is None and by_name["itl-1"]["itl_during_gaps"] >= 0
    assert by_name["hotload-1"]["hotload_n"] == 8 and by_name["hotload-1"]["hotload_per_s"] > 0
    for label in ("1 adapter / limit", "ours / transformers serve", "long prompt p99 / p50", "hot-load p99 / p50"):
        assert label in text
    for label in ("engine, 1 adapter / limit", "server / engine, 1 adapter"):
        assert label in text
    # the engine in-process and the server answer the same requests with the same greedy text
    same = re.search(r"batch-1 vs engine-1: (\d+)/(\d+) identical", text)
    assert same is not None and int(same.group(2)) >= 8 and same.group(1) == same.group(2), text


def test_ratio_rows_give_the_paired_ratio_of_interleaved_rounds() -> None:
    """`measured` is the ratio of the median runs; `paired` the median of the rounds' own ratios."""
    from bench.serve import RATIO_HEADERS, ratio_rows

    def scenario(kind: str, runs: list[float], median: float) -> dict[str, object]:
        return {"kind": kind, "tok_per_s": median, "tok_per_s_runs": runs}

    by_name = {
        "batch-1": scenario("batch", [500.0, 600.0, 400.0], 500.0),
        "batch-16": scenario("batch", [490.0, 480.0, 400.0], 480.0),
        "limit-0": {"kind": "limit", "tok_per_s": 1000.0},  # one run, no per-round figures
    }
    rows = {row[0]: dict(zip(RATIO_HEADERS, row, strict=True)) for row in ratio_rows(by_name)}
    assert rows["16 adapters / 1 adapter"]["measured"] == 480.0 / 500.0
    assert rows["16 adapters / 1 adapter"]["paired"] == 490.0 / 500.0  # rounds: 0.98, 0.8, 1.0
    assert rows["1 adapter / limit"]["paired"] == ""
