"""What an adapter was loaded from, as a digest of the files read, so a later re-read (a disk-tier miss) serves the
same adapter or none: a file replaced after its load is a different adapter, to be loaded again on purpose."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from lokr.formats import CONFIG_NAME, WEIGHTS_NAME, FileRead

__all__ = ["SourceChangedError", "source_digest"]


class SourceChangedError(Exception):
    """An adapter's files changed since it was loaded. Raised on the registry's mover thread and logged there; the
    request hears `adapter_unavailable` (503), which names no path."""


def source_digest(source: Path, read: Mapping[str, FileRead] | None = None) -> str:
    """SHA-256 over the files `lokr.read_adapter(source)` reads: a `.safetensors` file, or a PEFT dir's config and
    weights (each file's name and length go in too, so no two file sets share a digest). `read`: what the parse
    itself read of them (`ParsedAdapter.files`, keyed by path), so the digest is of the bytes it used; the files
    it lacks are read here."""
    folder = source.parent if source.name in (CONFIG_NAME, WEIGHTS_NAME) else source if source.is_dir() else None
    files = [source] if folder is None else [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
    digest = hashlib.sha256()
    for path in files:
        seen = (read or {}).get(str(path))
        if seen is None:
            with path.open("rb") as handle:
                seen = FileRead(path.stat().st_size, hashlib.file_digest(handle, "sha256").digest())
        digest.update(f"{path.name}:{seen.size}:".encode())
        digest.update(seen.sha256)
    return digest.hexdigest()
