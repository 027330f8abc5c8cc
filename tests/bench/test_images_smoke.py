"""Smoke test of the image benchmark: `--quick` starts real servers and the peft loop, writes report and plot
(no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .run import run_bench

SCENARIOS = {"batch-8", "batch-1", "single-8", "peft-8", "peft-set-8", "edit-8", "edit-single-8", "inpaint-8",
             "inpaint-single-8", "stream-8"}  # fmt: skip


@pytest.mark.slow
def test_images_quick_writes_report_and_plot(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    run_bench("images.py", "--quick", "--out", out, "--work", work)
    assert (out / "images.png").stat().st_size > 0
    text = (out / "images.md").read_text()
    for heading in ("## Environment", "## Settings", "## Results", "## Ratios", "## Denoiser batching ceiling"):
        assert heading in text
    results = json.loads((out / "images.json").read_text())["results"]
    assert set(results) == SCENARIOS
    assert all(r["errors"] == 0 and r["images"] > 0 for r in results.values())


@pytest.mark.slow
def test_images_quick_flux_writes_its_own_report(tmp_path: Path) -> None:
    """The Flux pipeline: its own report, the bare transformer's ceiling, every scenario served without errors."""
    out, work = tmp_path / "out", tmp_path / "work"
    run_bench("images.py", "--quick", "--pipeline", "flux", "--out", out, "--work", work)
    text = (out / "images-flux.md").read_text()
    assert "tiny FLUX pipeline" in text and "## Denoiser batching ceiling (bare transformer" in text
    data = json.loads((out / "images-flux.json").read_text())
    assert set(data["results"]) == SCENARIOS
    assert all(r["errors"] == 0 and len(r["runs"]) == 1 for r in data["results"].values())
    assert data["ceiling"]["mflop_per_image_step"] > 0


def test_rounds_report_each_scenarios_median() -> None:
    """`--repeats`: the median images/s over the rounds, every round's figure, and the median run's seconds."""
    from bench.images import median_results

    runs = {"batch-8": [{"images": 8, "seconds": s, "errors": 0} for s in (4.0, 1.0, 2.0)]}
    (result,) = median_results(runs).values()
    assert result["runs"] == [2.0, 8.0, 4.0] and result["images_per_s"] == 4.0 and result["seconds"] == 2.0
    two = median_results({"x": [{"images": 4, "seconds": s, "errors": 0} for s in (1.0, 2.0)]})["x"]
    assert two["images_per_s"] == 3.0 and two["runs"] == [4.0, 2.0]


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    from bench.images import round_speeds
    from bench.report import paired_ratio

    results = {
        "batch-8": {"runs": [2.0, 6.0, 5.0]},
        "batch-1": {"runs": [8.0, 6.0, 5.5]},
        "peft-8": {"runs": [1.0, 3.0, 2.0]},
        "peft-set-8": {"runs": [2.0, 1.0, 2.5]},
    }
    speeds = {name: round_speeds(results, name) for name in ("batch-8", "batch-1", "naive")}
    assert speeds["naive"] == [2.0, 3.0, 2.5]  # the faster peft baseline of each round
    assert paired_ratio(speeds["batch-8"], speeds["batch-1"]) == 5.0 / 5.5  # rounds: 0.25, 1.0, 0.909...
    assert paired_ratio(speeds["batch-8"], speeds["naive"]) == 2.0
