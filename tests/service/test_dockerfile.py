"""The Dockerfile installs as the Makefile does (no Docker engine needed): one torch install at the pinned
version, a CPU wheel index for the CPU variant, no CUDA base image, and a .dockerignore that keeps what
the install needs (issue 10 item 13)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_image_entry", ROOT / "scripts" / "run_image_entry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRY = _entry_script()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def _make_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(.*)$", MAKEFILE, re.M)
    assert match, f"Makefile has no {name} ?="
    return match.group(1).strip()


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for name, args in ENTRY.instructions(DOCKERFILE):
        if name == "FROM":
            parts = args.split()
            current = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else "final"
            stages[current] = [(name, args)]
        elif current:
            stages[current].append((name, args))
    return stages


def test_torch_is_installed_once_at_the_pinned_version() -> None:
    runs = [args for name, args in ENTRY.instructions(DOCKERFILE) if name == "RUN"]
    installs = [r for r in runs if "make install" in r]
    assert len(installs) == 1, runs
    assert not any("TORCH_SPEC" in args for _, args in ENTRY.instructions(DOCKERFILE)), "the Makefile pins torch"
    assert not any(re.search(r"\bpip\d* install\b", r) for r in runs), "all installs go through make install"
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and _make_var("TORCH_SPEC") == f"torch=={pinned.group(1)}"  # so `-c constraints.txt` keeps it
    recipe = MAKEFILE.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    torch_lines = [line for line in recipe.splitlines() if "TORCH_SPEC" in line]
    assert len(torch_lines) == 1 and "$(TORCH_INDEX)" in torch_lines[0]
    assert "TORCH_INDEX=" in installs[0]


def test_cpu_variant_uses_the_cpu_wheel_index_and_no_base_bundles_cuda() -> None:
    stages = _stages()
    assert {"base-cpu", "base-cuda", "final"} <= set(stages)
    for variant, index in (("base-cpu", "https://download.pytorch.org/whl/cpu"), ("base-cuda", "")):
        env = ENTRY.image_env("\n".join(f"{n} {a}" for n, a in stages[variant]))
        assert env["TORCH_INDEX"] == index, variant
        base = stages[variant][0][1].split()[0]
        assert not base.startswith("nvidia/"), f"{variant}: the torch wheel bundles CUDA; {base} duplicates it"
    assert re.search(r"^ARG VARIANT=cuda$", DOCKERFILE, re.M) and "FROM base-${VARIANT}" in DOCKERFILE
    python = re.search(r"python:(\d+\.\d+)", DOCKERFILE)
    requires = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (
        python
        and requires
        and tuple(map(int, python.group(1).split("."))) >= tuple(map(int, requires.group(1).split(".")))
    )


def test_dockerignore_keeps_what_the_install_copies() -> None:
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    assert {".git", ".venv", "tests"} <= set(ignored)
    copied = [
        path
        for name, args in ENTRY.instructions(DOCKERFILE)
        if name == "COPY"
        for path in args.split()[:-1]
        if not path.startswith("--")
    ]
    assert {"pyproject.toml", "constraints.txt", "Makefile", "README.md", "lokr", "service"} <= set(copied)
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not any(Path(path).match(pattern) for pattern in ignored), f"{path} is copied but dockerignored"


def test_entry_script_reads_the_image_command_and_environment(tmp_path: Path) -> None:
    assert ENTRY.image_command(DOCKERFILE) == ["lokr-serve", "serve"]
    env = ENTRY.entry_environment(DOCKERFILE, {"PATH": "/usr/bin", "LOKR_PORT": "9123"})
    assert env["LOKR_PORT"] == "9123"  # the caller wins, as with `docker run -e`
    assert env["LOKR_HOST"] == "0.0.0.0" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert not env["LOKR_SERVE_CACHE"].startswith("/home/lokr")
    assert env["PATH"].endswith(":/usr/bin")
