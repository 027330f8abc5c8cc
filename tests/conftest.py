"""Session-wide fixtures shared by several test directories."""

from __future__ import annotations

import pytest

from service import demo


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoAssets:
    """The offline demo, built once per session (training it is the costliest fixture of the suite).

    Lives at `<tmp>/cache/demo-v1`, so `LOKR_SERVE_CACHE=<tmp>/cache` makes `lokr-serve demo` reuse it.
    """
    return demo.ensure_demo(tmp_path_factory.mktemp("demo") / "cache" / demo.DEMO_VERSION)
