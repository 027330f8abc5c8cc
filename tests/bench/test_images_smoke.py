"""Smoke test of the image benchmark: `--quick` starts real servers and the peft loop, writes report and plot
(no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .run import run_bench


@pytest.mark.slow
def test_images_quick_writes_report_and_plot(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    run_bench("images.py", "--quick", "--out", out, "--work", work)
    assert (out / "images.png").stat().st_size > 0
    text = (out / "images.md").read_text()
    for heading in ("## Environment", "## Settings", "## Results", "## Ratios", "## Denoiser batching ceiling"):
        assert heading in text
    results = json.loads((out / "images.json").read_text())["results"]
    assert set(results) == {"batch-8", "batch-1", "single-8", "peft-8", "peft-set-8"}
    assert all(r["errors"] == 0 and r["images"] > 0 for r in results.values())


@pytest.mark.slow
def test_images_quick_flux_in_two_rounds(tmp_path: Path) -> None:
    """The Flux pipeline, two interleaved rounds: every scenario ran twice and the medians are reported."""
    out, work = tmp_path / "out", tmp_path / "work"
    run_bench("images.py", "--quick", "--pipeline", "flux", "--repeats", "2", "--out", out, "--work", work)
    text = (out / "images-flux.md").read_text()
    assert "tiny FLUX pipeline" in text and "## Denoiser batching ceiling (bare transformer" in text
    data = json.loads((out / "images-flux.json").read_text())
    assert set(data["results"]) == {"batch-8", "batch-1", "single-8", "peft-8", "peft-set-8"}
    for r in data["results"].values():
        assert r["errors"] == 0 and len(r["runs"]) == 2
        assert min(r["runs"]) <= r["images_per_s"] <= max(r["runs"])
    assert data["ceiling"]["mflop_per_image_step"] > 0
