"""Run a `bench/` script as a user would (no wall-clock limit: this box may be shared and slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str | Path) -> None:
    """`python bench/<script> <args>` from the checkout; fails with the tail of its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
