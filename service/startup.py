"""Start-up checks that fail fast, in one line, before the model is loaded (light imports only: no torch)."""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Sequence
from pathlib import Path

__all__ = ["StartupError", "bind_socket", "check_adapter_sources", "check_model_source"]

# transformers' hub id form: `name` or `namespace/name`
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class StartupError(Exception):
    """The server cannot start with these settings; the CLI prints the message and exits 2 (never HTTP)."""


def check_model_source(model: str) -> None:
    """A local model path must be a directory with `config.json`; anything else must look like a hub id."""
    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_ID.fullmatch(model) and not model.startswith((".", "~")):
            return  # a hub id: transformers reports what goes wrong with it
        raise StartupError(f"--model {model}: directory does not exist")
    if not path.is_dir():
        raise StartupError(f"--model {model}: not a directory (expected a transformers model directory)")
    if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        raise StartupError(
            f"--model {model}: no config.json (a transformers model) or model_index.json (a diffusers pipeline) in it"
        )


def check_adapter_sources(pairs: Sequence[tuple[str, str]]) -> None:
    """Every `--adapter NAME=SOURCE` must name an existing adapter directory or file, each name once."""
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise StartupError(f"--adapter: each name may be given once; given more than once: {', '.join(twice)}")
    for name, source in pairs:
        if not Path(source).expanduser().exists():
            raise StartupError(f"--adapter {name}={source}: {source} does not exist")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on `host:port` now, so a port in use is reported before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: allows a quick restart
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(f"cannot listen on {host}:{port}: {reason} (pick another with --port)") from exc
    sock.set_inheritable(True)
    return sock
