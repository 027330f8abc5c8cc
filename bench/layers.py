"""Layer-level LoKr benchmark: base vs ours (factored, unmerged) vs 16-adapter mixed rows vs PEFT vs merged.

All variants of one case share the same base weights and run in one process, interleaved round by round
(see `bench.report.measure`), under `torch.inference_mode()`, float32, `torch.set_num_threads(--threads)`.

    python bench/layers.py                      # full run (~5-10 min on 2 cores)
    python bench/layers.py --quick --out /tmp/x # small sizes (about a minute)
    python bench/layers.py --tiny --out /tmp/x  # smoke test: small layers too (seconds)
    python bench/layers.py --cases linear4096 conv320

Variants per case and size N (tokens for Linear, images for Conv2d):
  base     the plain base layer
  ours     `lokr` single adapter (`set_adapter`), unmerged: factored deltas, or folded per call where cheaper
  mixed16  `lokr.adapter_batch` with rows cycling over 16 different adapters (rows = dim 0)
  peft     PEFT's LoKr layer (`get_peft_model`, `LoKrConfig(init_weights=False)`), same factors as `ours`
  merged   a plain layer holding `W + dW`

Writes `<out>/layers.md`, `<out>/layers.png` and `<out>/layers.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script: make `lokr` and `bench` importable from the checkout
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lokr  # noqa: E402
from bench.report import environment, markdown_table, measure, plot_loglog  # noqa: E402
from lokr.functional import factored_cost  # noqa: E402

VARIANTS = ("base", "ours", "mixed16", "peft", "merged")
NUM_MIXED = 16
R, ALPHA = 8, 8


class Wrap(nn.Module):
    """The smallest model around one layer (PEFT and `lokr` both need a parent module)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


@dataclass
class Case:
    name: str
    title: str
    kind: str  # "linear" | "conv2d"
    make_layer: Callable[[], nn.Module]
    sizes: tuple[int, ...]
    make_input: Callable[[int], Tensor]
    positions: Callable[[int], int]  # output positions (tokens or batch * pixels) for N
    unit: str


def build_cases(quick: bool, tiny: bool = False) -> dict[str, Case]:
    """The three cases; `quick` shrinks sizes, `tiny` also shrinks the layers (a smoke test in seconds)."""
    quick = quick or tiny
    tokens = (1, 16) if quick else (1, 16, 256, 2048)
    side = 8 if tiny else 16 if quick else 64  # conv latent size
    images = (1, NUM_MIXED) if quick else (1, 4, NUM_MIXED)
    hidden, ffn, channels = (256, 704, 32) if tiny else (4096, 11008, 320)

    def linear(o: int, i: int) -> Case:
        return Case(
            name=f"linear{o}" if o != i else f"linear{i}",
            title=f"Linear {i}->{o}",
            kind="linear",
            make_layer=lambda: nn.Linear(i, o),
            sizes=tokens,
            make_input=lambda n: torch.randn(n, i),
            positions=lambda n: n,
            unit="tokens",
        )

    conv = Case(
        name=f"conv{channels}",
        title=f"Conv2d {channels}->{channels} 3x3 p1, {side}x{side}",
        kind="conv2d",
        make_layer=lambda: nn.Conv2d(channels, channels, 3, padding=1),
        sizes=images,
        make_input=lambda b: torch.randn(b, channels, side, side),
        positions=lambda b: b * side * side,
        unit="images",
    )
    cases = [linear(hidden, hidden), linear(ffn, hidden), conv]
    return {c.name: c for c in cases}


# --------------------------------------------------------------------------------------------- setup
@dataclass
class Models:
    base: nn.Module
    ours: Wrap
    peft_layer: nn.Module
    merged: nn.Module


def build_models(case: Case) -> Models:
    from peft import LoKrConfig as PeftLoKrConfig
    from peft import get_peft_model

    base = case.make_layer().eval()
    for p in base.parameters():
        p.requires_grad_(False)

    peft_model = get_peft_model(
        Wrap(base), PeftLoKrConfig(r=R, alpha=ALPHA, target_modules=["layer"], init_weights=False)
    ).eval()
    peft_layer = peft_model.base_model.model.layer

    ours = Wrap(base).eval()
    config = lokr.LoKrConfig(r=R, alpha=ALPHA, target_modules=["layer"], init_weights=False, inference_mode=True)
    for k in range(NUM_MIXED):
        lokr.inject(ours, config, f"a{k}")
    layer = ours.layer
    assert isinstance(layer, lokr.LoKrLayer)
    # adapter a0 gets PEFT's factors, so `ours`, `peft` and `merged` compute the same function
    with torch.no_grad():
        for name, param in peft_layer.named_parameters():
            if name.startswith("lokr_") and name.endswith(".default"):
                getattr(layer.lokr_adapters["a0"], name.split(".")[0]).copy_(param)
    lokr.set_adapter(ours, "a0")

    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight += layer.get_delta_weight("a0")
    return Models(base, ours, peft_layer, merged)


def check_outputs(models: Models, x: Tensor) -> dict[str, float]:
    """Max |variant - ours| relative to max |ours - base| (the delta's size): all should be ~1e-6."""
    with torch.inference_mode():
        base = models.base(x)
        ours = models.ours.layer(x)
        scale = (ours - base).abs().max().item()
        out = {
            "peft": (models.peft_layer(x) - ours).abs().max().item() / scale,
            "merged": (models.merged(x) - ours).abs().max().item() / scale,
        }
        rows = [f"a{i % NUM_MIXED}" for i in range(x.shape[0])]
        with lokr.adapter_batch(models.ours, rows):
            mixed = models.ours.layer(x)
        lokr.set_adapter(models.ours, rows[0])
        out["mixed16[row0]"] = (mixed[:1] - models.ours.layer(x[:1])).abs().max().item() / scale
        lokr.set_adapter(models.ours, "a0")
    return out


def variants(models: Models, x: Tensor) -> dict[str, Callable[[], object]]:
    layer = models.ours.layer
    rows = [f"a{i % NUM_MIXED}" for i in range(x.shape[0])]

    def mixed() -> Tensor:
        with lokr.adapter_batch(models.ours, rows):
            return layer(x)

    return {
        "base": lambda: models.base(x),
        "ours": lambda: layer(x),
        "mixed16": mixed,
        "peft": lambda: models.peft_layer(x),
        "merged": lambda: models.merged(x),
    }


# --------------------------------------------------------------------------------------------- flops
def flop_rows(case: Case, models: Models) -> tuple[list[list[object]], str]:
    layer = models.ours.layer
    adapter = layer.lokr_adapters["a0"]
    spec = layer.spec
    factors = adapter.factors()
    base_per = spec.out_features * spec.in_features * spec.kernel_numel * spec.groups
    delta_per = factored_cost(factors, spec)
    shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in adapter.named_parameters())
    rows: list[list[object]] = []
    for n in case.sizes:
        pos = case.positions(n)
        rows.append([case.title, n, f"{base_per * pos:.4g}", f"{delta_per * pos:.4g}", delta_per / base_per])
    return rows, shapes


# --------------------------------------------------------------------------------------------- targets
def ratio(results: dict[str, dict[int, dict[str, float]]], case: str, n: int, a: str, b: str) -> float:
    r = results[case][n]
    return r[a] / r[b]


def evaluate_targets(cases: dict[str, Case], results: dict[str, dict[int, dict[str, float]]]) -> list[list[object]]:
    """Rows `[target, case, N, measured, limit, met]` for the targets of the layer benchmark."""
    rows: list[list[object]] = []
    for name, case in cases.items():
        if name not in results:
            continue
        limit = 1.10 if case.kind == "linear" else 1.20
        for n in case.sizes:
            v = ratio(results, name, n, "ours", "base")
            rows.append(["ours/base <=", name, n, v, limit, v <= limit])
        if case.kind != "linear":
            continue
        for n, lim in ((1, 10.0), (256, 2.0)):
            if n in case.sizes:
                v = ratio(results, name, n, "peft", "ours")
                rows.append(["peft/ours >=", name, n, v, lim, v >= lim])
        if 256 in case.sizes:
            v = ratio(results, name, 256, "mixed16", "ours")
            rows.append(["mixed16/single <=", name, 256, v, 1.5, v <= 1.5])
    return rows


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--tiny", action="store_true", help="smoke test: --quick on small layers (seconds)")
    parser.add_argument("--cases", nargs="+", default=None, help="subset of: linear4096 linear11008 conv320")
    parser.add_argument("--budget", type=float, default=None, help="seconds per variant per size (default 2.5)")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = args.budget if args.budget is not None else (0.01 if args.tiny else 0.05 if args.quick else 2.5)
    all_cases = build_cases(args.quick, args.tiny)
    selected = args.cases or list(all_cases)
    unknown = [c for c in selected if c not in all_cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(all_cases)}")
    cases = {name: all_cases[name] for name in selected}
    t_start = time.perf_counter()

    flops: list[list[object]] = []
    factor_shapes: dict[str, str] = {}
    checks: dict[str, dict[str, float]] = {}
    timings: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    medians: dict[str, dict[int, dict[str, float]]] = {}

    for name, case in cases.items():
        models = build_models(case)
        rows, factor_shapes[name] = flop_rows(case, models)
        flops += rows
        print(f"\n== {case.title}   factors: {factor_shapes[name]}")
        print(markdown_table(["case", case.unit, "base MACs", "delta MACs", "delta/base"], rows))
        checks[name] = check_outputs(models, case.make_input(min(case.sizes[-1], 4)))
        print("max |variant - ours| / max |delta|:", {k: f"{v:.1e}" for k, v in checks[name].items()})
        timings[name], medians[name] = {}, {}
        for n in case.sizes:
            x = case.make_input(n)
            with torch.inference_mode():
                res = measure(variants(models, x), budget_s=budget, min_repeats=args.min_repeats, warmup=1)
            timings[name][n] = {v: t.to_dict() for v, t in res.items()}
            medians[name][n] = {v: t.median_ms for v, t in res.items()}
            m = medians[name][n]
            print(
                f"{case.unit}={n:5d} "
                + "  ".join(f"{v} {m[v]:9.3f}ms" for v in VARIANTS)
                + f"  (x{res['base'].repeats})"
            )
        del models

    elapsed = time.perf_counter() - t_start
    ratio_rows = [
        [
            name,
            n,
            ratio(medians, name, n, "ours", "base"),
            ratio(medians, name, n, "peft", "ours"),
            ratio(medians, name, n, "mixed16", "ours"),
            ratio(medians, name, n, "merged", "base"),
        ]
        for name, case in cases.items()
        for n in case.sizes
    ]
    ratio_table = markdown_table(["case", "N", "ours/base", "peft/ours", "mixed16/single", "merged/base"], ratio_rows)
    time_rows = [
        [name, n, *(medians[name][n][v] for v in VARIANTS), timings[name][n]["base"]["repeats"]]
        for name, case in cases.items()
        for n in case.sizes
    ]
    time_table = markdown_table(["case", "N", *(f"{v} ms" for v in VARIANTS), "repeats"], time_rows, floatfmt=".4g")
    target_rows = evaluate_targets(cases, medians)
    target_table = markdown_table(
        ["target", "case", "N", "measured", "limit", "met"],
        [[t, c, n, v, lim, "yes" if ok else "**NO**"] for t, c, n, v, lim, ok in target_rows],
    )
    print("\n== ratios (medians)\n" + ratio_table)
    print("\n== targets\n" + target_table)

    env = environment(
        args.threads, {"peft": _peft_version(), "mode": "tiny" if args.tiny else "quick" if args.quick else "full"}
    )
    env["budget per variant per size (s)"] = budget
    env["wall time (s)"] = round(elapsed, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    md = _markdown(cases, env, flops, factor_shapes, checks, time_table, ratio_table, target_table)
    (args.out / "layers.md").write_text(md)
    panels = {
        cases[name].title: {v: [(n, medians[name][n][v]) for n in cases[name].sizes] for v in VARIANTS}
        for name in cases
    }
    plot_loglog(
        args.out / "layers.png",
        panels,
        xlabel={c.title: c.unit for c in cases.values()},
        title=f"LoKr layer forward, fp32, {args.threads} threads (median)",
    )
    (args.out / "layers.json").write_text(
        json.dumps({"environment": env, "timings": timings, "checks": checks}, indent=1, default=str)
    )
    print(f"\nwrote {args.out / 'layers.md'}, {args.out / 'layers.png'} in {elapsed:.0f}s")
    return 0


def _peft_version() -> str:
    import peft

    return peft.__version__


def _markdown(
    cases: dict[str, Case],
    env: dict[str, object],
    flops: list[list[object]],
    factor_shapes: dict[str, str],
    checks: dict[str, dict[str, float]],
    time_table: str,
    ratio_table: str,
    target_table: str,
) -> str:
    parts = [
        "# LoKr layer benchmark",
        "",
        "Generated by `bench/layers.py`. Medians of interleaved rounds (every variant once per round), after one "
        "warm-up call each, under `torch.inference_mode()`, float32. LoKr `r=8, alpha=8`, `init_weights=False`. "
        "`mixed16`: rows (tokens for Linear, images for Conv2d) cycle over 16 different adapters in one "
        "`lokr.adapter_batch` (with N < 16 only N adapters are used); the plan is built inside the timed call. "
        "Conv2d: batch 1 and 4 for the single-adapter comparison, batch 16 (one adapter per image) for the "
        "mixed case. Ratios compare variants at the same N.",
        "",
        "## Environment",
        "",
        markdown_table(["", ""], [[k, v] for k, v in env.items()]),
        "",
        "## Analytic multiply-adds (whole call)",
        "",
        "\n".join(f"- {cases[n].title}: {s}" for n, s in factor_shapes.items()),
        "",
        markdown_table(["case", "N", "base MACs", "ours delta MACs", "delta/base"], flops),
        "",
        "Output check, max |variant - ours| / max |ours - base|: "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.1e}" for k, v in c.items()) for n, c in checks.items()),
        "",
        "## Median ms",
        "",
        time_table,
        "",
        "## Ratios",
        "",
        ratio_table,
        "",
        "## Targets",
        "",
        target_table,
        "",
        "![ms vs N](layers.png)",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
