"""Smoke test of the UNet benchmark: `--quick` (a tiny UNet) runs end to end and writes its report and plot.

No timings are asserted; it checks that every variant ran and that the served output equals the merged one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .run import run_bench


@pytest.mark.slow
def test_unet_quick_writes_report_and_plot(tmp_path: Path) -> None:
    run_bench("unet.py", "--quick", "--out", tmp_path)
    assert (tmp_path / "unet.png").stat().st_size > 0
    text = (tmp_path / "unet.md").read_text()
    for heading in ("## Median milliseconds", "## Ratios", "## Targets", "## Environment"):
        assert heading in text
    (result,) = json.loads((tmp_path / "unet.json").read_text())["results"]
    assert set(result["ms"]) == {"base", "one", "mixed", "peft", "merged"}
    assert result["max_err"] < 1e-4 and result["peft_err"] < 1e-4  # ours and PEFT serve the merged model's output
