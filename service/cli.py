"""`lokr-serve`: serve a model, run the offline demo, or inspect an adapter file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"help": "causal LM dir or hub id, or a diffusers SD / SDXL pipeline dir (model_index.json)"}),
    ("--served-model-name", {"help": "name clients use for the base model (default: the model dir name)"}),
    ("--adapter", {"action": "append", "help": "NAME=SOURCE to load at start (repeatable)"}),
    ("--adapter-root", {"action": "append", "help": "directory admin loads may read from (repeatable)"}),
    ("--host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", {"type": int, "help": "port (default 8000)"}),
    ("--device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--dtype", {"choices": ["auto", "float32", "bfloat16", "float16"], "help": "base model dtype"}),
    ("--adapter-dtype", {"choices": ["auto", "float32", "bfloat16", "float16"], "help": "adapter dtype"}),
    ("--admin-token", {"help": "Bearer token for the admin API (without it: admin on loopback binds only)"}),
    ("--api-key", {"action": "append", "help": "Bearer key required on inference routes (repeatable)"}),
    ("--cors-origin", {"action": "append", "help": "allowed CORS origin (repeatable; CORS is off by default)"}),
    ("--max-batch-size", {"type": int}),
    ("--max-queue", {"type": int, "help": "waiting requests before 503"}),
    ("--max-prefill-tokens", {"type": int, "help": "prompt tokens admitted into the running batch per step"}),
    ("--max-resident-adapters", {"type": int, "help": "adapters attached to the model (device tier)"}),
    ("--max-resident-bytes", {"type": int, "help": "bytes of resident adapters (0: no limit)"}),
    ("--max-host-adapters", {"type": int, "help": "offloaded adapters kept in host memory (LRU)"}),
    ("--max-host-bytes", {"type": int, "help": "bytes of host-tier adapters (0: no limit)"}),
    ("--max-body-bytes", {"type": int}),
    ("--max-upload-bytes", {"type": int}),
    ("--max-adapter-bytes", {"type": int}),
    ("--upload-dir", {"help": "where uploaded adapters are kept"}),
    ("--shutdown-grace-s", {"type": float}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lokr-serve", description="Serve many LoKr adapters on one base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model (every flag is also env LOKR_<FLAG>)")
    demo = sub.add_parser("demo", help="build (once, offline) a tiny model + adapters and serve them")
    for p in (serve, demo):
        for flag, kwargs in _FLAGS:
            p.add_argument(flag, default=None, **kwargs)
    demo.add_argument("--cache-dir", default=None, help="where the demo assets are built and cached")
    inspect = sub.add_parser("inspect", help="print what an adapter dir or file holds")
    inspect.add_argument("source")
    return parser


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from .settings import Settings

    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _ in _FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    given.update({k: v for k, v in overrides.items() if k not in given})
    return Settings(**given)


def _serve(settings: Any) -> int:
    from .logs import configure_logging
    from .server import serve

    configure_logging(settings.log_level, settings.log_json)
    return serve(settings)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import demo_examples, ensure_demo

    print("lokr-serve demo: building (first run) or reusing the cached demo model and adapters...", flush=True)
    assets = ensure_demo(Path(args.cache_dir) if args.cache_dir else None)
    pairs = [f"{name}={path}" for name, path in assets.adapters.items()]
    settings = _settings(
        args,
        model=str(assets.model_dir),
        served_model_name=assets.base_name,
        adapter=pairs,
        adapter_root=[str(next(iter(assets.adapters.values())).parent)],
    )
    host = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    print(demo_examples(f"http://{host}:{settings.port}", assets.base_name, list(assets.adapters)), flush=True)
    return _serve(settings)


def _inspect(source: str) -> int:
    import lokr

    try:
        parsed = lokr.read_adapter(source)
    except lokr.LoKrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    modules = {
        name: {
            "tensors": {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in m.tensors.items()},
            "scale": m.scale,
        }
        for name, m in parsed.modules.items()
    }
    report = {
        "format": parsed.format,
        "source": parsed.source,
        "num_modules": len(parsed.modules),
        "nbytes": parsed.nbytes,
        "config": parsed.config.to_dict() if parsed.config else None,
        "metadata": parsed.metadata,
        "modules": modules,
    }
    print(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.source)
    if args.command == "demo":
        return _demo(args)
    settings = _settings(args)
    if not settings.model:
        print("no --model / LOKR_MODEL given: serving the offline embedded demo", file=sys.stderr)
        args.cache_dir = None
        return _demo(args)
    return _serve(settings)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
