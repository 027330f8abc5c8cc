"""Shared setup for the checks against the real `peft` package."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the working tree's `lokr` even when the editable install is stale.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
