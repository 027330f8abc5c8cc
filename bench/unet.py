"""Whole-UNet benchmark: one denoiser step, bare vs one LoKr adapter vs mixed adapters vs PEFT vs merged.

A diffusers `UNet2DConditionModel` built from a config at SD-like widths (320/640/1280; fewer blocks and a small
latent so a step runs in seconds on 2 CPU cores), with an r=8 LoKr adapter on every Linear and Conv2d layer.
All variants run in one process, interleaved round by round (`bench.report.measure`), under
`torch.inference_mode()`, float32, `torch.set_num_threads(--threads)`.

    python bench/unet.py                       # SD-like widths (a few minutes on 2 cores)
    python bench/unet.py --quick --out /tmp/x  # tiny config, smoke test

Variants (rows = images in the step's batch, dim 0 of the latents):
  base    the bare UNet
  one     `lokr.adapter_batch` with the same adapter on every row (what the server runs)
  mixed   `lokr.adapter_batch` with each row on another adapter (NUM_MIXED adapters)
  peft    PEFT's LoKr on every layer (`get_peft_model`, same factors as `one`)
  merged  the UNet with `W + dW` merged in

Writes `<out>/unet.md`, `<out>/unet.png` and `<out>/unet.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script: make `lokr` and `bench` importable from the checkout
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import lokr  # noqa: E402
from bench.report import environment, markdown_table, measure, plot_loglog  # noqa: E402

VARIANTS = ("base", "one", "mixed", "peft", "merged")
NUM_MIXED = 4
R, ALPHA = 8, 8
TARGETS = {"one/base": 1.15, "mixed/base": 1.25}


def unet_config(quick: bool, side: int) -> dict[str, Any]:
    """SD-like widths with one block per level (or a tiny net for `--quick`)."""
    widths = (32, 64) if quick else (320, 640, 1280)
    down = ["CrossAttnDownBlock2D"] * (len(widths) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(widths) - 1)
    return {
        "sample_size": side,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": widths,
        "layers_per_block": 1,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": 32 if quick else 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def targets(model: nn.Module) -> list[str]:
    """Every Linear and Conv2d layer."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def build(quick: bool, side: int, seed: int) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from peft import LoKrConfig as PeftLoKrConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = UNet2DConditionModel(**unet_config(quick, side)).eval()
    names = targets(base)
    ours = copy.deepcopy(base)
    for i in range(NUM_MIXED):
        config = lokr.LoKrConfig(target_modules=names, r=R, alpha=ALPHA, init_weights=False)
        lokr.inject(ours, config, f"a{i}")
    merged = copy.deepcopy(ours)
    lokr.set_adapter(merged, "a0")
    lokr.merge_adapter(merged, "a0")
    peft = get_peft_model(
        copy.deepcopy(base), PeftLoKrConfig(target_modules=names, r=R, alpha=ALPHA, init_weights=False)
    ).eval()
    state = {k.replace(".a0", ".default"): v for k, v in _lokr_state(ours, "a0").items()}
    missing = peft.load_state_dict(state, strict=False)
    assert not [k for k in missing.unexpected_keys], missing.unexpected_keys
    return {"base": base, "ours": ours, "merged": merged, "peft": peft, "layers": len(names)}


def _lokr_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """`base_model.model.<module>.lokr_w1.<name>`-style keys of PEFT's state dict for adapter `name`."""
    from lokr.inject import iter_lokr_layers

    out = {}
    for module, layer in iter_lokr_layers(model):
        for pname, p in layer.lokr_adapters[name].named_parameters():
            out[f"base_model.model.{module}.{pname}.{name}"] = p.detach()
    return out


def inputs(rows: int, side: int, cross_dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, side, side, generator=g)
    timestep = torch.randint(0, 1000, (rows,), generator=g)
    text = torch.randn(rows, 16, cross_dim, generator=g)
    return sample, timestep, text


def run_case(models: dict[str, Any], rows: int, side: int, cross_dim: int, args: argparse.Namespace) -> dict[str, Any]:
    sample, timestep, text = inputs(rows, side, cross_dim, args.seed)
    ours = models["ours"]
    one, mixed = ["a0"] * rows, [f"a{i % NUM_MIXED}" for i in range(rows)]

    def call(model: nn.Module) -> Tensor:
        return model(sample, timestep, encoder_hidden_states=text).sample

    def with_rows(selection: list[Any]) -> Tensor:
        with lokr.adapter_batch(ours, selection):
            return call(ours)

    fns = {
        "base": lambda: call(models["base"]),
        "one": lambda: with_rows(one),
        "mixed": lambda: with_rows(mixed),
        "peft": lambda: call(models["peft"]),
        "merged": lambda: call(models["merged"]),
    }
    with torch.inference_mode():
        ref = call(models["merged"])
        err = (with_rows(one) - ref).abs().max().item()
        peft_err = (call(models["peft"]) - ref).abs().max().item()
        timings = measure(fns, budget_s=args.budget, min_repeats=args.min_repeats, max_repeats=args.max_repeats)
    ms = {name: t.median_ms for name, t in timings.items()}
    return {"rows": rows, "ms": ms, "repeats": len(timings["base"].samples), "max_err": err, "peft_err": peft_err}


def report(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, layers: int) -> str:
    times = markdown_table(
        ["rows", *[f"{v} ms" for v in VARIANTS], "repeats"],
        [[r["rows"], *[r["ms"][v] for v in VARIANTS], r["repeats"]] for r in results],
    )
    ratios = markdown_table(
        ["rows", "one/base", "mixed/base", "mixed/one", "peft/one", "merged/base", "max |one - merged|"],
        [
            [
                r["rows"],
                r["ms"]["one"] / r["ms"]["base"],
                r["ms"]["mixed"] / r["ms"]["base"],
                r["ms"]["mixed"] / r["ms"]["one"],
                r["ms"]["peft"] / r["ms"]["one"],
                r["ms"]["merged"] / r["ms"]["base"],
                r["max_err"],
            ]
            for r in results
        ],
    )
    checks = []
    for r in results:
        for key, limit in TARGETS.items():
            a, b = key.split("/")
            value = r["ms"][a] / r["ms"][b]
            checks.append(
                f"- rows={r['rows']}: {key} = {value:.3f} (target <= {limit}): {'met' if value <= limit else 'MISSED'}"
            )
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    return (
        "# UNet step benchmark\n\n"
        f"`python bench/unet.py{' --quick' if args.quick else ''}`: one denoiser step of a diffusers "
        f"UNet2DConditionModel ({unet_config(args.quick, args.side)['block_out_channels']} channels, latent "
        f"{args.side}x{args.side}, 16 text tokens), LoKr r={R} on all {layers} Linear/Conv2d layers, "
        f"{NUM_MIXED} adapters in `mixed`. Medians of interleaved rounds.\n\n"
        f"## Median milliseconds\n\n{times}\n\n## Ratios\n\n{ratios}\n\n## Targets\n\n" + "\n".join(checks) + "\n\n"
        f"## Environment\n\n{env_lines}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny config, few repeats (smoke test)")
    parser.add_argument("--side", type=int, default=None, help="latent side (default 32; 8 with --quick)")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="batch sizes (default 2 4)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per variant per size")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.side = args.side or (8 if args.quick else 32)
    args.rows = args.rows or ([2] if args.quick else [2, 4])
    args.budget = args.budget if args.budget is not None else (0.1 if args.quick else 20.0)
    if args.quick:
        args.min_repeats, args.max_repeats = 1, 2
    torch.set_num_threads(args.threads)
    models = build(args.quick, args.side, args.seed)
    cross_dim = unet_config(args.quick, args.side)["cross_attention_dim"]
    results = [run_case(models, rows, args.side, cross_dim, args) for rows in args.rows]
    env = environment(args.threads, {"diffusers": _version("diffusers"), "peft": _version("peft")})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet.md").write_text(report(results, env, args, models["layers"]))
    (args.out / "unet.json").write_text(json.dumps({"results": results, "environment": env}, indent=1, default=str))
    panels = {"UNet step": {v: [(r["rows"], r["ms"][v]) for r in results] for v in VARIANTS}}
    plot_loglog(args.out / "unet.png", panels, xlabel="rows (images)")
    print((args.out / "unet.md").read_text())
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
