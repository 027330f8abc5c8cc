"""The README tells a new user what issue 10 item 14 found missing (and what items 8, 11 changed)."""

from __future__ import annotations

from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_explains_cpu_torch_demo_and_upload() -> None:
    assert "bundles CUDA" in README and "https://download.pytorch.org/whl/cpu" in README
    assert "TORCH_INDEX=" in README
    assert "<unk>" in README and "~/.cache/lokr-serve/demo-v1/adapters" in README
    assert "file parts under any form field name" in README
    assert "not at all when `--api-key` is set" in README
