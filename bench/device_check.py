"""One prepared run for a session that has a GPU: the device path's correctness and speed, written under --out.

    python bench/device_check.py --device cuda --out "$OUT"          # on the GPU machine (a few minutes)
    python bench/device_check.py --device cpu --quick --out /tmp/x    # the script itself (CI's smoke test)

Model and adapters are `bench/serve.py`'s (a random-weight Llama, PEFT-format LoKr r=8 on every decoder linear
layer), built on the CPU and cached under `--work`. Checks, each a row of `<out>/device_check.md` (and `.json`);
the exit status is 1 when one fails:
  parity   the model in `--dtype` on the device with 4 adapters loaded by lokr and by PEFT (`PeftModel`): one
           lokr per-row batch (rows over the 4 adapters and base rows) against PEFT running each row alone with
           its adapter set (base rows: adapters disabled); max |diff| over max |logit|, within the dtype's bound
  tier     every adapter offloaded to host memory (pinned on CUDA) and restored: the batch is bitwise unchanged
  memory   each resident adapter's device bytes (its rows in the factor banks) against its factor bytes (5%)
  speed    one decode step (KV cache of 64 tokens) at each batch size: base, one adapter on every row, rows over
           16 adapters; medians of interleaved repeats, synchronised on CUDA
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script: make `lokr`, `service` and `bench` importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench.report import environment, markdown_table, measure  # noqa: E402
from bench.serve import FULL_MODEL, QUICK_MODEL, AdapterSpec, ensure_adapters, ensure_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max |diff| / max |logit|
PARITY_ADAPTERS = 4
MIXED_ADAPTERS = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def _rows(n: int) -> list[str | None]:
    """Rows over the parity adapters with base rows among them: a0, a1, None, a2, a3, a0, None, ..."""
    cycle: list[str | None] = [f"a{i}" for i in range(PARITY_ADAPTERS)]
    cycle.insert(2, None)
    return [cycle[i % len(cycle)] for i in range(n)]


def check_parity(model_dir: Path, dirs: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """lokr's mixed batch against PEFT row by row, on the same weights and device."""
    from peft import PeftModel

    import lokr

    ours = _load(model_dir, device, dtype)
    for i, path in enumerate(dirs[:PARITY_ADAPTERS]):
        lokr.load_adapter(ours, path, f"a{i}", dtype=dtype)
    peft = PeftModel.from_pretrained(_load(model_dir, device, dtype), dirs[0], adapter_name="a0")
    for i, path in enumerate(dirs[1:PARITY_ADAPTERS], start=1):
        peft.load_adapter(path, adapter_name=f"a{i}")
    peft.to(device=device, dtype=dtype).eval()
    rows = _rows(2 * (PARITY_ADAPTERS + 1))
    ids = torch.randint(4, ours.config.vocab_size, (len(rows), 12), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.inference_mode(), lokr.adapter_batch(ours, rows):
        got = ours(input_ids=ids).logits.float()
    want = []
    with torch.inference_mode():
        for i, name in enumerate(rows):
            if name is None:
                with peft.disable_adapter():
                    want.append(peft(input_ids=ids[i : i + 1]).logits.float())
            else:
                peft.set_adapter(name)
                want.append(peft(input_ids=ids[i : i + 1]).logits.float())
    reference = torch.cat(want)
    error = float((got - reference).abs().max() / reference.abs().max())
    base = float((got[[r is not None for r in rows]] - _base_logits(ours, ids, rows)).abs().max())
    ok = error <= BOUNDS[dtype] and base > 0  # the adapters really change the adapted rows
    return {"check": "parity", "ok": ok, "value": error, "bound": BOUNDS[dtype], "adapter_effect": base}


def _base_logits(model: Any, ids: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    import lokr

    with torch.inference_mode(), lokr.adapter_batch(model, [None] * len(rows)):
        out = model(input_ids=ids).logits.float()
    return out[[r is not None for r in rows]]


def check_tier_and_memory(
    model_dir: Path, dirs: list[Path], device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    """Offload every adapter (pinned host memory on CUDA) and restore it: the same logits, bit for bit; and each
    resident adapter's device bytes against its factor bytes."""
    import lokr

    model = _load(model_dir, device, dtype)
    infos = [lokr.load_adapter(model, path, f"a{i}", dtype=dtype) for i, path in enumerate(dirs[:PARITY_ADAPTERS])]
    rows = _rows(2 * (PARITY_ADAPTERS + 1))
    ids = torch.randint(4, model.config.vocab_size, (len(rows), 12), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), lokr.adapter_batch(model, rows):
            return model(input_ids=ids).logits.float().cpu()

    before = forward()
    pinned = device.type == "cuda"
    for info in infos:
        kept = lokr.offload_adapter(model, info.name, "cpu", pin_memory=pinned)
        lokr.restore_adapter(model, kept)
    _sync(device)
    same = bool(torch.equal(before, forward()))
    ratios = [lokr.describe_adapter(model, info.name).device_nbytes / info.nbytes for info in infos]
    worst = max(abs(r - 1) for r in ratios)
    return [
        {"check": "tier", "ok": same, "value": "bitwise equal" if same else "changed", "pinned": pinned},
        {"check": "memory", "ok": worst <= 0.05, "value": max(ratios), "bound": "1 +- 0.05"},
    ]


def _synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`fn`, then wait for the device: `measure`'s wall clock then covers the work queued on a GPU."""

    def run() -> None:
        fn()
        _sync(device)

    return run


def decode_speed(
    model_dir: Path, dirs: list[Path], device: torch.device, dtype: torch.dtype, batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    """One decode step after 64 cached tokens: base, one adapter on every row (folded), rows over 16 adapters."""
    from transformers import DynamicCache

    import lokr

    model = _load(model_dir, device, dtype)
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    names = [f"a{i}" for i in range(min(MIXED_ADAPTERS, len(dirs)))]
    for name, path in zip(names, dirs, strict=False):
        lokr.load_adapter(model, path, name, dtype=dtype)
    out = []
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        prefix = torch.randint(4, model.config.vocab_size, (b, 64), generator=gen).to(device)
        step = torch.randint(4, model.config.vocab_size, (b, 1), generator=gen).to(device)
        with torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=prefix, use_cache=True, **{cache_kwarg: cache})
            assert cache.get_seq_length() == 64, "the model did not fill the cache it was given"

            def run(rows: list[Any], cache: Any = cache, step: torch.Tensor = step) -> Callable[[], None]:
                def one() -> None:
                    with lokr.adapter_batch(model, rows, fold=1):
                        model(input_ids=step, use_cache=True, **{cache_kwarg: cache})
                    cache.crop(-1)

                return one

            mixed = [names[i % len(names)] for i in range(b)]
            fns = {"base": run([None] * b), "one": run([names[0]] * b), "mixed": run(mixed)}
            timed = measure(
                {k: _synced(f, device) for k, f in fns.items()}, min_repeats=repeats, max_repeats=repeats, warmup=2
            )
            ms = {k: t.median_ms for k, t in timed.items()}
        out.append({"rows": b, **{f"{k}_ms": v for k, v in ms.items()}, "mixed_over_one": ms["mixed"] / ms["one"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else fp32")
    parser.add_argument("--quick", action="store_true", help="the tiny model, few repeats (smoke test)")
    parser.add_argument("--work", type=Path, default=_ROOT / "bench" / ".work", help="cache dir (model, adapters)")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = QUICK_MODEL if args.quick else FULL_MODEL
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(args.work, spec)
    _, dirs, _ = ensure_adapters(args.work, spec, AdapterSpec(), MIXED_ADAPTERS)
    checks = [check_parity(model_dir, dirs, device, dtype), *check_tier_and_memory(model_dir, dirs, device, dtype)]
    batches, repeats = ([1, 4], 3) if args.quick else ([1, 16, 32, 64], 30)
    speed = decode_speed(model_dir, dirs, device, dtype, batches, repeats)
    env = environment(extra={"device": str(device), "dtype": str(dtype).removeprefix("torch.")})
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    report = "\n".join(
        [
            "# Device check",
            "",
            f"`python bench/device_check.py --device {args.device} --dtype {env['dtype']}"
            f"{' --quick' if args.quick else ''}`: see its docstring.",
            "",
            markdown_table(["check", "ok", "value", "details"], [_check_row(c) for c in checks]),
            "",
            "Decode step, median ms (`one`: one adapter on every row, folded; `mixed`: rows over 16 adapters):",
            "",
            markdown_table(list(speed[0]), [list(row.values()) for row in speed], floatfmt=".4g"),
            "",
            *[f"- {k}: {v}" for k, v in env.items()],
            "",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.md").write_text(report)
    (args.out / "device_check.json").write_text(json.dumps({"checks": checks, "speed": speed, "env": env}, indent=1))
    print(report)
    return 0 if all(c["ok"] for c in checks) else 1


def _check_row(check: dict[str, Any]) -> list[Any]:
    details = ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("check", "ok", "value"))
    return [check["check"], "yes" if check["ok"] else "**NO**", check["value"], details]


if __name__ == "__main__":
    sys.exit(main())
