"""Smoke test of the layer benchmark: `--tiny` runs end to end and writes its report and plot.

No timings are asserted and no wall-clock limit is set: this box may be shared and slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .run import run_bench


@pytest.mark.slow
def test_layers_quick_writes_report_and_plot(tmp_path: Path) -> None:
    run_bench("layers.py", "--tiny", "--out", tmp_path)
    report = tmp_path / "layers.md"
    plot = tmp_path / "layers.png"
    assert report.is_file()
    assert plot.is_file()
    assert plot.stat().st_size > 0
    text = report.read_text()
    for heading in ("## Environment", "## Ratios", "## Targets"):
        assert heading in text
    assert "torch" in text and "| mode | tiny |" in text
    assert "linear256" in text and "conv32" in text  # every case ran
