"""Image serving benchmark: the real `lokr-serve` on a tiny SD pipeline, images/s under concurrent clients.

    python bench/images.py                        # full run (~2 min a round on 2 cores)
    python bench/images.py --repeats 3            # 3 interleaved rounds; medians reported
    python bench/images.py --pipeline flux        # the tiny Flux pipeline (DiT, T5 + CLIP) instead of SD
    python bench/images.py --quick --out /tmp/x   # smoke test (tiny sizes, few requests)

Scenarios (each: `--clients` concurrent clients sending `--requests` image requests in total, back to back):
  batch-8    the server (`--max-batch-size` = clients), 8 peft LoKr adapters on the denoiser (SD's UNet, Flux's
             transformer), request i names adapter i % 8
  batch-1    the same server, every request names adapter 0
  single-8   a server with `--max-batch-size 1` (one image at a time), 8 adapters
  peft-8     no server: a loop that serves each request as weight-patching UIs do: merge the request's peft
             adapter into the UNet, run the diffusers pipeline, unmerge
  peft-set-8 no server: peft's 8 LoKr adapters injected once, `set_adapter` per request (unmerged), the pipeline
             call a user would write
  edit-8     the batch-8 server, img2img through A1111's /sdapi/v1/img2img (`<lora:aI:1>`, one starting picture,
             denoising_strength 0.6: 6 of 10 steps run), adapter i % 8
  edit-single-8  the same img2img requests on the one-image-at-a-time server
  inpaint-8  the batch-8 server, the img2img requests with a mask (the picture's middle half repainted)
  inpaint-single-8  the same inpainting requests on the one-image-at-a-time server
  stream-8   the batch-8 server, batch-8's requests streamed (`stream: true`) with 2 partial images each (each a
             VAE decode of the image's estimate part way)
The naive baselines' ratio is taken against the faster of the two. With `--repeats N` the scenarios run N times,
in rounds (each round runs every scenario once; batch-8 and batch-1 swap order every round), and each scenario's
median is reported. Then the denoiser's own batching ceiling on this machine: the bare denoiser's step per image
(SD: both CFG rows; Flux: one row, guidance distilled) at 1 image vs `--clients` images in one forward, and its
FLOPs per image-step; no server can batch its way past that ratio on the same hardware.
Writes `<out>/images.md`, `<out>/images.png` and `<out>/images.json` (`images-flux.*` for Flux; `-<size>px` added for
a `--size` other than 64); prints the ratios against the issue's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script: make `lokr`, `service` and `bench` importable
    sys.path.insert(0, str(_ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.report import environment, markdown_table, paired_ratio, plot_loglog  # noqa: E402
from bench.serve import free_port  # noqa: E402
from service.images.tiny import (  # noqa: E402
    UNET_TARGETS,
    inject_peft_lokr,
    save_peft_unet_lokr,
    save_tiny_pipeline,
)
from service.images.tiny_flux import FLUX_TARGETS, build_tiny_flux, save_peft_flux_lokr  # noqa: E402

N_ADAPTERS = 8
DEFAULT_SIZE = 64  # pixels a side; reports of other sizes are named `images-<size>px.md`
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (  # (name, numerator, denominator, issue's target)
    ("8 adapters / 1 adapter", "batch-8", "batch-1", 0.8),  # "naive" = the faster of peft-8 and peft-set-8
    ("batched / one at a time", "batch-8", "single-8", 2.0),
    ("ours / naive peft (merge per request)", "batch-8", "peft-8", 3.0),
    ("ours / naive peft (set_adapter per request)", "batch-8", "peft-set-8", 3.0),
    ("ours / faster naive peft", "batch-8", "naive", 3.0),
    ("img2img: batched / one at a time", "edit-8", "edit-single-8", None),
    ("inpainting: batched / one at a time", "inpaint-8", "inpaint-single-8", None),
    ("streamed with 2 partial images / not streamed", "stream-8", "batch-8", None),
)
EDIT_STRENGTH = 0.6


@dataclass(frozen=True)
class Kind:
    """What differs between the pipelines: how to build them and their adapters, and the naive baseline's
    pipeline class, denoiser and adapter targets."""

    name: str
    rows_per_image: int  # denoiser rows per image per step: 2 with classifier-free guidance

    def build(self, out: Path) -> None:
        if self.name == "flux":
            build_tiny_flux(seed=0).save_pretrained(out, safe_serialization=True)
        else:
            save_tiny_pipeline(out, "sd", seed=0)

    def save_adapter(self, model: Path, out: Path, seed: int) -> None:
        (save_peft_flux_lokr if self.name == "flux" else save_peft_unet_lokr)(model, out, seed=seed)

    def pipeline(self, model: Path) -> tuple[Any, torch.nn.Module, list[str]]:
        """The plain diffusers pipeline, its denoiser and the peft targets on it."""
        from diffusers import FluxPipeline, StableDiffusionPipeline

        if self.name == "flux":
            pipe = FluxPipeline.from_pretrained(model, use_safetensors=True)
            return pipe, pipe.transformer, FLUX_TARGETS
        pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True)
        return pipe, pipe.unet, UNET_TARGETS


KINDS = {"sd": Kind("sd", 2), "flux": Kind("flux", 1)}


def prepare(work: Path, kind: Kind) -> tuple[Path, list[Path]]:
    model = work / f"tiny-{kind.name}"
    if not (model / "model_index.json").is_file():
        kind.build(model)
    adapters = [work / f"adapters-{kind.name}" / f"a{i}" for i in range(N_ADAPTERS)]
    for i, path in enumerate(adapters):
        if not (path / "adapter_model.safetensors").is_file():
            kind.save_adapter(model, path, seed=100 + i)
    return model, adapters


def start(
    model: Path, adapters: list[Path], batch: int, log: Path, fold: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--served-model-name", "tiny",
           "--port", str(port), "--device", "cpu", "--max-batch-size", str(batch),
           "--log-level", "warning"]  # fmt: skip
    if fold is not None:
        cmd += ["--fold-cache", str(fold)]
    for i, path in enumerate(adapters):
        cmd += ["--adapter", f"a{i}={path}"]
    proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready")


Request = tuple[str, str, dict[str, Any]]  # (adapter, route, body)


def bodies(args: argparse.Namespace, distinct: int) -> list[Request]:
    """Text-to-image requests over `distinct` adapters (OpenAI's route)."""
    return [
        (f"a{i % distinct}", "/v1/images/generations",
         {"model": f"a{i % distinct}", "prompt": "a red cat", "size": f"{args.size}x{args.size}",
          "num_inference_steps": args.steps, "seed": i})
        for i in range(args.requests)
    ]  # fmt: skip


def stream_bodies(args: argparse.Namespace, distinct: int) -> list[Request]:
    """`bodies`, streamed with 2 partial images each (each a VAE decode of the image's estimate part way)."""
    return [
        (adapter, route, {**body, "stream": True, "partial_images": 2})
        for adapter, route, body in bodies(args, distinct)
    ]


def _png_b64(pixels: torch.Tensor, mode: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def edit_bodies(args: argparse.Namespace, distinct: int, masked: bool = False) -> list[Request]:
    """Img2img requests over `distinct` adapters (A1111's route), all from one picture of the output size;
    `masked`: inpainting its middle half (a white square mask)."""
    side = args.size
    ramp = torch.linspace(0, 255, side).to(torch.uint8)
    pixels = torch.stack([ramp.expand(side, side), ramp.expand(side, side).T, ramp.flip(0).expand(side, side)], -1)
    picture = _png_b64(pixels, "RGB")
    extra: dict[str, Any] = {}
    if masked:
        mask = torch.zeros(side, side, dtype=torch.uint8)
        mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        extra = {"mask": _png_b64(mask, "L"), "inpainting_fill": 1, "inpaint_full_res": False}
    strength = max(EDIT_STRENGTH, 1 / args.steps)  # at least one step (--quick runs one)
    return [
        (f"a{i % distinct}", "/sdapi/v1/img2img",
         {"prompt": f"a red cat <lora:a{i % distinct}:1>", "init_images": [picture], "width": side, "height": side,
          "steps": args.steps, "denoising_strength": strength, "cfg_scale": 7.5, "seed": i, **extra})
        for i in range(args.requests)
    ]  # fmt: skip


async def drive(url: str, requests: list[Request], clients: int) -> tuple[float, int]:
    """Seconds to serve every request with `clients` concurrent clients; and the number of errors.

    Warm-up first: one request per distinct adapter, concurrently (first use of an adapter builds its banks).
    """
    queue = list(reversed(requests))
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            _, route, body = queue.pop()
            response = await http.post(route, json=body)  # a stream is read whole
            errors += response.status_code != 200 or (bool(body.get("stream")) and "event: error" in response.text)

    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        firsts = {adapter: (route, body) for adapter, route, body in requests}
        await asyncio.gather(*(http.post(route, json=body) for route, body in firsts.values()))
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - started, errors


def run_server(
    args: argparse.Namespace, model: Path, adapters: list[Path], batch: int, loads: dict[str, list[Request]]
) -> dict[str, dict[str, Any]]:
    """One server, a measurement per entry of `loads` (scenario name: its requests), in order."""
    proc, url = start(model, adapters, batch, args.work / f"server-batch{batch}.log", args.fold_cache)
    out = {}
    try:
        for name, requests in loads.items():
            seconds, errors = asyncio.run(drive(url, requests, args.clients))
            out[name] = {"seconds": seconds, "errors": errors, "images": args.requests}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def run_peft(args: argparse.Namespace, model: Path, merge: bool) -> dict[str, Any]:
    """One request at a time through the plain diffusers pipeline with peft's LoKr adapters injected once: the
    request's adapter merged into the weights and unmerged after (`merge`), or selected with `set_adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe, denoiser, targets = args.kind.pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    for i in range(N_ADAPTERS):
        inject_peft_lokr(denoiser, seed=100 + i, name=f"a{i}", targets=targets)
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]

    def serve(request: Request) -> None:
        _, _, body = request
        for layer in layers:
            if merge:
                layer.merge(adapter_names=[body["model"]])
            else:
                layer.set_adapter(body["model"])
        try:
            pipe(body["prompt"], height=args.size, width=args.size, num_inference_steps=args.steps,
                 generator=torch.Generator("cpu").manual_seed(body["seed"]))  # fmt: skip
        finally:
            for layer in layers if merge else []:
                layer.unmerge()

    with torch.inference_mode():
        requests = bodies(args, N_ADAPTERS)
        serve(requests[0])  # warm-up
        started = time.perf_counter()
        for request in requests:
            serve(request)
    return {"seconds": time.perf_counter() - started, "errors": 0, "images": args.requests}


def denoiser_ceiling(args: argparse.Namespace, model: Path, rounds: int = 5) -> dict[str, float]:
    """The bare denoiser (no adapters) at this size: ms per image-step at 1 image and at `clients` images per
    forward (median of interleaved rounds), their ratio, and MFLOPs per image-step."""
    import statistics

    from torch.utils.flop_counter import FlopCounterMode

    step = _flux_step(args, model) if args.kind.name == "flux" else _unet_step(args, model)
    times: dict[int, list[float]] = {1: [], args.clients: []}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            step(1)
        for images in times:
            step(images)
        for _ in range(rounds):
            for images, seen in times.items():
                started = time.perf_counter()
                step(images)
                seen.append((time.perf_counter() - started) / images)
    one, many = (statistics.median(times[k]) * 1e3 for k in times)
    return {"ms_per_image_step_1": one, f"ms_per_image_step_{args.clients}": many, "ratio": one / many,
            "mflop_per_image_step": counter.get_total_flops() / 1e6}  # fmt: skip


def _latent_side(args: argparse.Namespace, model: Path) -> int:
    levels = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1
    return int(args.size // 2**levels)


def _unet_step(args: argparse.Namespace, model: Path) -> Any:
    """`step(images)`: one UNet forward over both CFG rows of `images` images."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", use_safetensors=True).eval()
    side, width = _latent_side(args, model), unet.config.cross_attention_dim

    def step(images: int) -> None:
        rows = 2 * images
        unet(torch.randn(rows, unet.config.in_channels, side, side), torch.full((rows,), 500),
             encoder_hidden_states=torch.randn(rows, 16, width))  # fmt: skip

    return step


def _flux_step(args: argparse.Namespace, model: Path) -> Any:
    """`step(images)`: one Flux transformer forward over `images` packed latents (2x2 patches) and 512 T5 tokens
    (`FluxPipeline` pads the prompt to its `max_sequence_length`, 512)."""
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", use_safetensors=True).eval()
    side = _latent_side(args, model) // 2
    seq, text = side * side, 512
    img_ids = torch.zeros(side, side, 3)  # (0, row, column) per packed latent, as FluxPipeline makes them
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    img_ids = img_ids.reshape(seq, 3)

    def step(images: int) -> None:
        t(hidden_states=torch.randn(images, seq, t.config.in_channels), timestep=torch.full((images,), 0.5),
          encoder_hidden_states=torch.randn(images, text, t.config.joint_attention_dim),
          pooled_projections=torch.randn(images, t.config.pooled_projection_dim),
          guidance=torch.full((images,), 3.5) if t.config.guidance_embeds else None,
          img_ids=img_ids, txt_ids=torch.zeros(text, 3))  # fmt: skip

    return step


def _size_tag(args: argparse.Namespace) -> str:
    """The reports' file-name suffix for a `--size` other than the default (none for `--quick`'s smoke test)."""
    return "" if args.quick or args.size == DEFAULT_SIZE else f"-{args.size}px"


def median_results(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each scenario's median run by images/s, with every run's images/s."""
    out = {}
    for name, seen in runs.items():
        for r in seen:
            r["images_per_s"] = r["images"] / r["seconds"]
        ordered = sorted(seen, key=lambda r: r["images_per_s"])
        out[name] = {**ordered[(len(ordered) - 1) // 2], "runs": [r["images_per_s"] for r in seen]}
        out[name]["images_per_s"] = statistics.median(r["images_per_s"] for r in seen)
    return out


def round_speeds(results: dict[str, dict[str, Any]], name: str) -> list[float]:
    """Each round's images/s of scenario `name` ("naive": the faster peft baseline of each round)."""
    if name == "naive":
        return [max(a, b) for a, b in zip(results["peft-8"]["runs"], results["peft-set-8"]["runs"], strict=True)]
    return list(results[name]["runs"])


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], ceiling: dict[str, float]) -> str:
    def runs(r: dict[str, Any]) -> str:
        return " / ".join(f"{v:.3g}" for v in r["runs"])

    rows = [[name, r["images"], r["seconds"], r["images_per_s"], runs(r), r["errors"]] for name, r in results.items()]
    speed = {name: r["images_per_s"] for name, r in results.items()}
    speed["naive"] = max(speed["peft-8"], speed["peft-set-8"])
    ratios = []
    for name, num, den, target in RATIOS:
        value = speed[num] / speed[den]
        paired = paired_ratio(round_speeds(results, num), round_speeds(results, den))
        verdict = "(no target)" if target is None else "met" if value >= target else "missed"
        ratios.append([name, f"{value:.3f}", f"{paired:.3f}", "" if target is None else f">= {target}", verdict])
    env = environment()
    settings = {"pipeline": args.kind.name, "clients": args.clients, "requests": args.requests, "size": args.size,
                "steps": args.steps, "rounds (interleaved; medians)": args.repeats,
                "server --fold-cache": "server default" if args.fold_cache is None else args.fold_cache}  # fmt: skip
    denoiser = "transformer" if args.kind.name == "flux" else "UNet"
    lines = [
        f"# Image serving benchmark (tiny {args.kind.name.upper()} pipeline, peft LoKr adapters on the {denoiser})",
        "", "## Environment", "", *[f"- {k}: {v}" for k, v in env.items()], "",
        "## Settings", "", *[f"- {k}: {v}" for k, v in settings.items()], "",
        "## Results", "", "images/s is the median over the rounds (`runs`: every round's); seconds and errors are "
        "the median run's.", "",
        markdown_table(["scenario", "images", "seconds", "images/s", "runs", "errors"], rows), "",
        "## Ratios", "", "`value`: ratio of the medians above (what the target is judged on); `paired`: median "
        "of the rounds' own ratios (rounds are interleaved, so this one cancels drift between rounds).", "",
        markdown_table(["ratio", "value", "paired", "target", ""], ratios), "",
        f"## Denoiser batching ceiling (bare {denoiser}, in process)", "",
        markdown_table(["measure", "value"], [[k, v] for k, v in ceiling.items()]), "",
        f"One forward of {args.clients} images vs {args.clients} forwards of one image: the most batching can buy "
        "the denoiser on this machine (both naive baselines run it one image at a time at bare-denoiser speed).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def run_round(args: argparse.Namespace, model: Path, adapters: list[Path], k: int) -> dict[str, dict[str, Any]]:
    """Every scenario once; batch-8 and batch-1 (one server) swap order every other round."""
    order = (N_ADAPTERS, 1) if k % 2 == 0 else (1, N_ADAPTERS)
    loads = {f"batch-{n}": bodies(args, n) for n in order}
    loads["stream-8"] = stream_bodies(args, N_ADAPTERS)
    edits = {"edit": edit_bodies(args, N_ADAPTERS), "inpaint": edit_bodies(args, N_ADAPTERS, masked=True)}
    batched = run_server(args, model, adapters, args.clients, {**loads, **{f"{k}-8": v for k, v in edits.items()}})
    one = {"single-8": bodies(args, N_ADAPTERS), **{f"{k}-single-8": v for k, v in edits.items()}}
    single = run_server(args, model, adapters, 1, one)
    return {**batched, **single, "peft-8": run_peft(args, model, merge=True),
            "peft-set-8": run_peft(args, model, merge=False)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 16x16, 1 step, 4 clients, 4 requests")
    parser.add_argument("--pipeline", choices=sorted(KINDS), default="sd")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=_ROOT / "bench" / ".work" / "images")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the scenarios (medians reported)")
    parser.add_argument("--fold-cache", type=int, default=None, help="the servers' --fold-cache (default: theirs)")
    args = parser.parse_args(argv)
    args.kind = KINDS[args.pipeline]
    if args.quick:
        args.clients, args.requests, args.size, args.steps = 4, 4, 16, 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model, adapters = prepare(args.work, args.kind)
    runs: dict[str, list[dict[str, Any]]] = {}
    for k in range(args.repeats):
        for name, result in run_round(args, model, adapters, k).items():
            runs.setdefault(name, []).append(result)
    results = median_results(runs)
    ceiling = denoiser_ceiling(args, model)
    text = report(args, results, ceiling)
    stem = ("images" if args.kind.name == "sd" else f"images-{args.kind.name}") + _size_tag(args)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"results": results, "ceiling": ceiling}, indent=2))
    series = {name: [(float(args.clients), r["images_per_s"])] for name, r in results.items()}
    title = f"tiny {args.kind.name} pipeline, {args.size}x{args.size}, {args.steps} steps"
    plot_loglog(args.out / f"{stem}.png", {"images/s by scenario": series}, xlabel="concurrent clients",
                ylabel="images/s", title=title)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
