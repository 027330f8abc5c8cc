"""Smoke test of the layer benchmark: `--tiny` runs end to end and writes its report and plot.

No timings are asserted and no wall-clock limit is set: this box may be shared and slow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_layers_quick_writes_report_and_plot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layers.py"), "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
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
