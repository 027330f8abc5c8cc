"""`lokr-serve`: serve a model, run the offline demo, or inspect an adapter file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from .startup import StartupError, bind_socket, check_adapter_sources, check_model_source

__all__ = ["main"]

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"help": "causal LM dir or hub id, or a diffusers SD / SDXL / Flux pipeline dir (model_index.json)"}),
    ("--served-model-name", {"help": "name clients use for the base model (default: the model dir name)"}),
    ("--adapter", {"action": "append", "help": "NAME=SOURCE to load at start (repeatable)"}),
    ("--adapter-root", {"action": "append", "help": "directory admin loads may read from (repeatable)"}),
    ("--host", {"help": "bind address"}),
    ("--port", {"type": int, "help": "port"}),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "where the model runs (auto: cuda when there is one)"}),
    (
        "--dtype",
        {"choices": ["auto", "float32", "bfloat16", "float16"], "help": "base model dtype (auto: bfloat16 on cuda)"},
    ),
    ("--adapter-dtype", {"choices": ["auto", "float32", "bfloat16", "float16"], "help": "adapter dtype"}),
    ("--admin-token", {"help": "Bearer token for the admin API (without it: admin on loopback binds only)"}),
    ("--api-key", {"action": "append", "help": "Bearer key required on inference routes (repeatable)"}),
    ("--cors-origin", {"action": "append", "help": "allowed CORS origin (repeatable; CORS is off by default)"}),
    ("--max-batch-size", {"type": int, "help": "rows (sequences or images) in one forward"}),
    ("--max-queue", {"type": int, "help": "waiting requests before 503"}),
    ("--max-prefill-tokens", {"type": int, "help": "prompt tokens admitted into the running batch per step"}),
    (
        "--prefill-stall",
        {"type": float, "help": "while rows decode, a step's prompt chunk costs at most this many decode steps"},
    ),
    (
        "--fold-cache",
        {
            "metavar": "N|auto",
            "help": "weight copies per adapted layer kept with adapters folded in (0: none; auto, the default: "
            "1 for a causal LM, --max-batch-size for an image pipeline, fewer where memory is short)",
        },
    ),
    (
        "--max-image-pixels",
        {"type": int, "help": "largest image (width x height) a request may ask for; lower it on CPU"},
    ),
    ("--max-resident-adapters", {"type": int, "help": "adapters attached to the model (device tier)"}),
    ("--max-resident-bytes", {"metavar": "BYTES", "help": "bytes of resident adapters (0: no limit)"}),
    ("--max-host-adapters", {"type": int, "help": "offloaded adapters kept in host memory (LRU)"}),
    ("--max-host-bytes", {"metavar": "BYTES", "help": "bytes of host-tier adapters (0: no limit)"}),
    (
        "--max-body-bytes",
        {
            "metavar": "BYTES",
            "help": "largest request body but uploads (413 above; default 4MiB, 64MiB on an image server, whose "
            "img2img bodies carry pictures)",
        },
    ),
    ("--max-upload-bytes", {"metavar": "BYTES", "help": "largest adapter upload (PUT /v1/adapters/NAME)"}),
    ("--max-adapter-bytes", {"metavar": "BYTES", "help": "largest adapter read from disk"}),
    ("--upload-dir", {"help": "where uploaded adapters are kept while loaded (default: a dir under the temp dir)"}),
    ("--shutdown-grace-s", {"type": float, "help": "on SIGTERM, how long running requests may finish"}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"], "help": "log level"}),
]


# flags that name the model or its adapters: `demo` brings its own
_MODEL_FLAGS = ("--model", "--served-model-name", "--adapter", "--adapter-root")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lokr-serve", description="Serve many LoKr adapters on one base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model (every flag is also env LOKR_<FLAG>)", allow_abbrev=False)
    demo = sub.add_parser(
        "demo",
        allow_abbrev=False,  # `--adapter` must not pass for `--adapter-dtype`
        help="build (once, offline) a tiny model + adapters and serve them",
        description="Serve the offline demo: a tiny word-level model (about 150 words; others become <unk>) "
        "and its style adapters. It brings its own model and adapters, so --model/--adapter do not apply.",
    )
    flags = _with_defaults(_FLAGS)
    for flag, kwargs in flags:
        serve.add_argument(flag, default=None, **kwargs)
        if flag not in _MODEL_FLAGS:
            demo.add_argument(flag, default=None, **kwargs)
    ray = sub.add_parser(
        "ray", help="serve as a Ray Serve application, replicas routed by adapter (extra [ray])", allow_abbrev=False
    )
    for flag, kwargs in flags + _ray_flags():
        ray.add_argument(flag, default=None, **kwargs)
    demo.add_argument("--cache-dir", default=None, help="where the demo assets are built and cached")
    inspect = sub.add_parser("inspect", help="summarise what an adapter dir or file holds")
    inspect.add_argument("source")
    inspect.add_argument("--json", action="store_true", help="every module's tensors as JSON (for machines)")
    return parser


def _with_defaults(flags: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Each flag's help with its default (from `Settings`) and its env var; byte counts also as MiB / GiB."""
    from .settings import BYTE_FIELDS, Settings

    out = []
    for flag, kwargs in flags:
        name = flag[2:].replace("-", "_")
        field = Settings.model_fields.get(name)
        notes = [f"env LOKR_{name.upper()}"]
        if field is not None and field.default not in (None, PydanticUndefined) and not isinstance(field.default, bool):
            default = field.default
            notes.insert(0, f"default {_human_bytes(default) if name in BYTE_FIELDS else default}")
        help_text = kwargs.get("help", "")
        out.append((flag, {**kwargs, "help": f"{help_text} ({'; '.join(notes)})".lstrip()}))
    return out


def _human_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def _ray_flags() -> list[tuple[str, dict[str, Any]]]:
    from .scaleout.cli import RAY_FLAGS  # no Ray import: the flags are plain data

    return RAY_FLAGS


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from pydantic import ValidationError

    from .settings import Settings

    names = [flag[2:].replace("-", "_") for flag, _ in _FLAGS]
    given: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    given.update({k: v for k, v in overrides.items() if k not in given})
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise StartupError(problems) from None


def _serve(settings: Any, on_ready: Callable[[], None] | None = None) -> int:
    """Fail fast (one line) on a missing model dir, adapter or busy port, then load and serve."""
    check_model_source(str(settings.model))
    check_adapter_sources(settings.preload_pairs())
    sock = bind_socket(settings.host, settings.port)
    try:
        from .logs import configure_logging

        configure_logging(settings.log_level, settings.log_json)
        import lokr

        from .errors import ServiceError
        from .scratch import run_in_scratch_thread
        from .server import serve

        try:
            run_in_scratch_thread(_read_preloads, settings)  # see service.scratch
            return serve(settings, sock, on_ready)
        except (ServiceError, lokr.LoKrError) as exc:
            raise StartupError(str(exc)) from exc
    finally:
        sock.close()


def _read_preloads(settings: Any) -> None:
    """Read every `--adapter` file before the model loads (which may take minutes), so one that is not a LoKr
    adapter (a LoRA, a pickle, NaN weights...) fails at once; whether it fits the model is checked after."""
    import lokr

    for name, source in settings.preload_pairs():
        try:
            lokr.read_adapter(Path(source).expanduser(), max_bytes=settings.max_adapter_bytes)
        except lokr.LoKrError as exc:
            raise StartupError(f"--adapter {name}={source}: {exc}") from exc


def _demo(args: argparse.Namespace) -> int:
    from .backend import resolve_device
    from .demo import demo_banner, demo_examples, ensure_demo
    from .errors import ServiceError

    try:  # every flag, and the device, checked before the (first run's) build
        resolve_device(_settings(args).device)
    except ServiceError as exc:
        raise StartupError(str(exc)) from None
    print("lokr-serve demo: building (first run) or reusing the cached demo model and adapters...", flush=True)
    assets = ensure_demo(Path(args.cache_dir) if args.cache_dir else None)
    pairs = [f"{name}={path}" for name, path in assets.adapters.items()]
    adapter_root = next(iter(assets.adapters.values())).parent
    settings = _settings(
        args,
        model=str(assets.model_dir),
        served_model_name=assets.base_name,
        adapter=pairs,
        adapter_root=[str(adapter_root)],
    )
    host = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    print(demo_banner(assets), flush=True)

    def ready() -> None:
        print(demo_examples(f"http://{host}:{settings.port}", assets.base_name, list(assets.adapters)), flush=True)

    return _serve(settings, on_ready=ready)


def _inspect(source: str, as_json: bool) -> int:
    import lokr

    from .describe import adapter_report, adapter_summary

    try:
        parsed = lokr.read_adapter(source)
    except lokr.LoKrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(adapter_report(parsed), indent=2) if as_json else adapter_summary(parsed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.source, args.json)
    try:
        if args.command == "demo":
            return _demo(args)
        settings = _settings(args)
        if args.command == "ray":
            from .logs import configure_logging
            from .scaleout.cli import run

            configure_logging(settings.log_level, settings.log_json)
            return run(settings, args)
        if not settings.model:
            if settings.adapter:
                raise StartupError("--adapter needs --model (without a model the offline demo serves its own)")
            print("no --model / LOKR_MODEL given: serving the offline embedded demo", file=sys.stderr)
            args.cache_dir = None
            return _demo(args)
        return _serve(settings)
    except StartupError as exc:
        print(f"lokr-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
