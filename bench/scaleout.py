"""Scale-out benchmark: adapter-affinity routing vs random routing, and tokens/s of 2 Ray replicas vs 1.

    python bench/scaleout.py                    # simulation + real Ray run, writes bench/results/scaleout.{md,png,json}
    python bench/scaleout.py --skip-ray         # the routing simulation only (a second)

Routing (simulated: replaying 1,000s of requests through real Ray on two CPU cores would measure the
box, not the policy). The simulation replays Ray Serve 2.60's multiplexed request router
(`ray/serve/_private/request_router/request_router.py`, `apply_multiplex_routing` + the power-of-two
choice in `pow_2_router.py`) on requests sent one at a time:
  1. candidates = the replicas whose multiplexed LRU holds the adapter;
  2. none: the replicas holding the fewest adapters;
  3. two random candidates, the one with the shorter queue wins (equal queues here: a coin flip).
Each replica's LRU holds at most `--per-replica` adapters (Serve's `max_num_models_per_replica`, set to our
`--max-resident-adapters`); a request for an adapter not in its replica's LRU is a load. Random routing
sends each request to a uniformly random replica with the same LRUs. Traffic: `--adapters` adapters,
Zipf(`--zipf`) popularity, `--requests` requests after `--warmup` warm-up requests, `--seeds` seeds.

Tokens/s (real): `lokr-serve`'s Ray application on a local Ray instance (`--num-cpus`), the demo model
(`service.demo`, CPU), 1 replica then 2 replicas of 1 CPU each, `--concurrency` clients sending greedy
completions of `--max-tokens` tokens for `--seconds` seconds, adapters drawn from the same Zipf law over
`--real-adapters` names registered through the admin API (copies of the demo adapters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------------- simulation
def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def simulate(policy: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Loads per 1,000 requests and hit rate of `policy` ("affinity" or "random")."""
    rng = random.Random(seed)
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(args.replicas)]
    weights = zipf_weights(args.adapters, args.zipf)
    traffic = rng.choices(range(args.adapters), weights, k=args.warmup + args.requests)
    loads = 0
    for i, adapter in enumerate(traffic):
        if policy == "affinity":
            candidates = [r for r, cache in enumerate(caches) if adapter in cache]
            if not candidates:
                fewest = min(len(cache) for cache in caches)
                candidates = [r for r, cache in enumerate(caches) if len(cache) == fewest]
        else:
            candidates = list(range(args.replicas))
        chosen = rng.sample(candidates, min(2, len(candidates)))
        replica = rng.choice(chosen)  # equal queue lengths: the power-of-two choice is a coin flip
        cache = caches[replica]
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        loads += i >= args.warmup
        cache[adapter] = None
        if len(cache) > args.per_replica:
            cache.popitem(last=False)
    per_1000 = 1000.0 * loads / args.requests
    return {"loads_per_1000": per_1000, "hit_rate": 1.0 - per_1000 / 1000.0}


def static_bound(args: argparse.Namespace) -> float:
    """The best ratio any routing could reach with static caches: a partition keeping the top
    `replicas * per_replica` adapters resident, against every replica keeping the same top `per_replica`."""
    w = zipf_weights(args.adapters, args.zipf)
    miss = [1.0 - sum(w[:k]) / sum(w) for k in (args.per_replica, args.replicas * args.per_replica)]
    return miss[0] / miss[1]


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for zipf in args.zipf_sweep:
        args.zipf = zipf
        row = {}
        for policy in ("affinity", "random"):
            runs = [simulate(policy, args, seed) for seed in range(args.seeds)]
            row[policy] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        row["ratio"] = row["random"]["loads_per_1000"] / max(row["affinity"]["loads_per_1000"], 1e-9)
        row["bound"] = static_bound(args)
        out[str(zipf)] = row
    return out


# ---------------------------------------------------------------------------------------------- real Ray
async def _load(url: str, names: list[str], weights: list[float], args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    rng = random.Random(0)
    tokens, requests, per_replica = 0, 0, {}
    deadline = time.monotonic() + args.seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens, requests
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            body = {"model": name, "prompt": "the garden", "max_tokens": args.max_tokens, "temperature": 0}
            r = await c.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
            requests += 1
            replica = r.headers["x-lokr-replica"]
            per_replica[replica] = per_replica.get(replica, 0) + 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(client(c) for _ in range(args.concurrency)))
    wall = time.monotonic() - started
    return {"tokens_per_s": tokens / wall, "requests": requests, "seconds": wall, "per_replica": per_replica}


def _wait_ready(url: str, replicas: int) -> None:
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
            if r.status_code == 200 and len(r.json()["replicas"]) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the Ray application did not become ready")


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from service.demo import ensure_demo
    from service.scaleout.app import Scale, build_application
    from service.settings import Settings

    assets = ensure_demo(args.work / "demo")
    sources = list(assets.adapters.values())
    names = [f"a{i:03d}" for i in range(args.real_adapters)]
    weights = zipf_weights(len(names), args.zipf_sweep[0])
    url = f"http://127.0.0.1:{args.port}"
    root = sources[0].parent
    settings = Settings(
        model=str(assets.model_dir), served_model_name=assets.base_name, device="cpu", adapter_root=[root],
        max_resident_adapters=args.per_replica, max_batch_size=args.concurrency, port=args.port, log_level="warning",
    )  # fmt: skip
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for replicas in (1, 2):
            serve.run(build_application(settings, Scale(num_replicas=replicas)), name="bench", route_prefix="/")
            _wait_ready(url, replicas)
            for i, name in enumerate(names):
                body = {"name": name, "source": sources[i % len(sources)].name}
                httpx.post(f"{url}/v1/adapters", json=body, timeout=120).raise_for_status()
            asyncio.run(_load(url, names, weights, argparse.Namespace(**{**vars(args), "seconds": 3})))  # warm-up
            results[str(replicas)] = asyncio.run(_load(url, names, weights, args))
            print(f"{replicas} replica(s): {results[str(replicas)]['tokens_per_s']:.1f} tokens/s", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


# ---------------------------------------------------------------------------------------------- report
def write_report(sim: dict[str, Any], real: dict[str, Any] | None, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Scale-out on Ray Serve: adapter affinity and replicas",
        "",
        f"Written by `python bench/scaleout.py` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores).",
        "",
        f"## Routing: {args.adapters} adapters, {args.replicas} replicas x {args.per_replica} resident, "
        f"{args.requests} requests after {args.warmup} warm-up, mean of {args.seeds} seeds",
        "",
        "Simulated: Ray Serve 2.60's multiplexed router replayed exactly (see the script's docstring), requests",
        "one at a time. A load is a request whose replica does not hold its adapter (LRU).",
        "",
        "| Zipf s | affinity loads / 1,000 | affinity hit rate | random loads / 1,000 | random hit rate | fewer loads "
        "| static bound |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for zipf, row in sim.items():
        a, r = row["affinity"], row["random"]
        lines.append(
            f"| {zipf} | {a['loads_per_1000']:.0f} | {a['hit_rate']:.1%} | {r['loads_per_1000']:.0f} | "
            f"{r['hit_rate']:.1%} | {row['ratio']:.2f}x | {row['bound']:.2f}x |"
        )
    if real:
        lines += [
            "",
            f"## Tokens/s: real Ray run, demo model on CPU, {args.concurrency} clients, {args.max_tokens} tokens each,",
            f"{args.real_adapters} adapters (Zipf {args.zipf_sweep[0]}), {args.seconds:.0f} s per configuration,"
            f" local Ray with {args.num_cpus} CPUs",
            "",
            "| replicas | tokens/s | requests | requests per replica |",
            "|---:|---:|---:|---|",
        ]
        for replicas, row in real.items():
            spread = ", ".join(str(v) for v in sorted(row["per_replica"].values(), reverse=True))
            lines.append(f"| {replicas} | {row['tokens_per_s']:.1f} | {row['requests']} | {spread} |")
        speedup = real["2"]["tokens_per_s"] / real["1"]["tokens_per_s"]
        lines += [
            "",
            f"2 replicas / 1 replica: {speedup:.2f}x (reported, not a target: the box has two cores; load average"
            f" {os.getloadavg()[0]:.1f} when the report was written, other jobs included).",
        ]
    (args.out / "scaleout.md").write_text("\n".join(lines) + "\n")
    (args.out / "scaleout.json").write_text(json.dumps({"simulation": sim, "ray": real}, indent=2))
    _plot(sim, args.out / "scaleout.png")
    print("\n".join(lines))


def _plot(sim: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zipfs = list(sim)
    x = range(len(zipfs))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [sim[z]["affinity"]["loads_per_1000"] for z in zipfs], 0.4, label="adapter affinity")
    ax.bar([i + 0.2 for i in x], [sim[z]["random"]["loads_per_1000"] for z in zipfs], 0.4, label="random")
    ax.set_xticks(list(x), [f"Zipf s={z}" for z in zipfs])
    ax.set_ylabel("adapter loads per 1,000 requests")
    ax.set_title("2 replicas x 16 resident adapters, 100 adapters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--per-replica", type=int, default=16)
    p.add_argument("--zipf-sweep", type=float, nargs="+", default=[1.0, 0.8, 1.2, 1.5, 2.0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--real-adapters", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sim = run_simulation(args)
    real = None if args.skip_ray else run_ray(args)
    write_report(sim, real, args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
