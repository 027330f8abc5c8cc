"""Serving benchmark: the real `lokr-serve` server under a closed-loop streaming load, vs a naive PEFT loop.

    python bench/serve.py                         # full run (~6-10 min on 2 cores)
    python bench/serve.py --quick --out /tmp/x    # smoke test (tiny model, N in {1, 16}, < 60 s)
    python bench/serve.py --scenarios batch-16 peft-16 --requests 128
    python bench/serve.py --server-arg=--max-resident-adapters=64   # extra server flags (repeatable)
    python bench/serve.py --repeats 3             # every scenario 3 times, interleaved; medians reported

Setup (cached under `--work`, default `bench/.work/`): a randomly initialised Llama of a realistic shape for
a 2-core CPU (word-level tokenizer of a few hundred words, built with `service.demo` helpers; the `</s>` row
of `lm_head` is zeroed so greedy decoding never stops early and every request generates exactly
`--max-tokens` tokens) saved with `save_pretrained`, and N distinct PEFT-format LoKr adapters on every linear
layer of the decoder (q, k, v, o, gate, up, down). The adapters share one `adapter_config.json` made by
`peft.get_peft_model`; only the random factor values differ, written with `safetensors.torch.save_file`.

Scenarios (`--scenarios`, names `KIND-N` with N distinct adapters, N = 0 means the base model):
  batch-N   the server with `--max-batch-size` (default 32); N adapters loaded through the admin API first
            (timed); each request names one of them, uniformly at random
  single-N  the same with `--max-batch-size 1`: one request at a time
  peft-N    no server: an in-process loop over the same request list, one request at a time, through
            `peft.PeftModel` (`set_adapter(name)` then greedy `generate`); at most `--peft-max-loaded`
            adapters are held in PEFT, others are loaded on demand (LRU) and that load counts in the request
  limit-0   no server: in-process `generate` over static batches of `--concurrency` rows (no adapters)
  engine-N  no HTTP: our engine in-process with N adapters, the same closed loop submitting straight into it
            (a finished request's client sends its next at once); engine-N against limit-0 is the engine's own
            share of the gap, batch-N against engine-N the HTTP server's and load generator's
  hf-0      `transformers serve <model dir> --continuous-batching`, the same load generator (text prompts)
  itl-N     batch-N plus one `--long-prompt`-token prompt sent `--long-after` s into the run; reports the
            per-token p99 of the other rows while it prefills over the run's p50 (see bench/serve_kinds.py)
  hotload-N batch-N while `--hotload` more adapters load through the admin API (4 at a time) from `--long-after`
            s into the run (requests keep naming the N); reports the per-token p99 during the loads over the
            run's p50, and the loads per second

Load generator: `--concurrency` clients (httpx.AsyncClient, streaming `/v1/completions`, temperature 0) each
send requests back to back until `--requests` (per scenario) have been sent or `--duration` / `--time-cap`
seconds passed. Throughput is counted over the steady window: from the start until the first client runs out of
work (the drain of the last requests in flight is excluded).
TTFT is measured from sending a request to receiving its first token, so it includes queueing in the server;
per-token latency is every gap between consecutive tokens of a request (all requests pooled). The PEFT loop
has no queue (it serves one request at a time), so its TTFT is the service time of one prefill.

Writes `<out>/serve.md`, `<out>/serve.png` and `<out>/serve.json`; prints the table and the issue's ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import hashlib
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script: make `lokr`, `service` and `bench` importable
    sys.path.insert(0, str(_ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.report import environment, markdown_table, measure, paired_ratio, plot_loglog  # noqa: E402
from bench.serve_kinds import (  # noqa: E402
    hf_serve_command,
    long_prompt_probe,
    loopback_client,
    run_engine,
    run_limit,
)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_NAME = "bench-llama"
ADMIN_TOKEN = "bench-admin-token"
FULL_SCENARIOS = (
    "limit-0",
    "engine-1",
    "batch-0",
    "hf-0",
    "batch-1",
    "batch-16",
    "batch-128",
    "batch-1000",
    "single-16",
    "peft-16",
    "itl-16",
    "hotload-16",
)
QUICK_SCENARIOS = (
    "limit-0",
    "engine-1",
    "batch-0",
    "hf-0",
    "batch-1",
    "batch-16",
    "single-16",
    "peft-16",
    "itl-1",
    "hotload-1",
)
KINDS = ("batch", "single", "peft", "limit", "engine", "hf", "itl", "hotload")
# (name, numerator scenario, denominator scenario, target (None: informational), what it compares)
RATIOS = (
    ("1 adapter / limit", "batch-1", "limit-0", 0.85, "server, 1 adapter vs in-process static-batch generate"),
    ("16 adapters / 1 adapter", "batch-16", "batch-1", 0.95, "throughput with 16 vs 1 distinct adapters"),
    ("1000 adapters / 1 adapter", "batch-1000", "batch-1", 0.9, "throughput with 1000 vs 1 distinct adapters"),
    ("ours / transformers serve", "batch-0", "hf-0", 1.3, "base model: ours vs transformers serve --cb"),
    ("batching / one-at-a-time", "batch-16", "single-16", 3.0, "16 adapters, same clients, max batch vs 1"),
    ("ours / naive peft", "batch-16", "peft-16", 5.0, "16 adapters: server vs PEFT set_adapter loop"),
    ("engine, 1 adapter / limit", "engine-1", "limit-0", None, "our engine in-process (no HTTP) vs the limit"),
    ("server / engine, 1 adapter", "batch-1", "engine-1", None, "what HTTP and the client on the same cores cost"),
)


# ============================================================================================ setup
@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    words: int  # tokenizer vocabulary words (plus specials)
    max_positions: int
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


FULL_MODEL = ModelSpec(hidden=512, layers=4, heads=8, intermediate=1408, words=500, max_positions=4096)
QUICK_MODEL = ModelSpec(hidden=64, layers=2, heads=4, intermediate=128, words=200, max_positions=512)


@dataclass(frozen=True)
class AdapterSpec:
    r: int = 8
    alpha: int = 8
    std: float = 0.1  # every factor entry ~ N(0, std^2)
    seed: int = 0

    def key(self, model: ModelSpec) -> str:
        payload = {"model": asdict(model), "adapter": asdict(self), "targets": TARGET_MODULES}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _build_model(spec: ModelSpec) -> tuple[Any, Any]:
    from service.demo import build_tiny_llama, build_word_tokenizer

    tokenizer = build_word_tokenizer([f"w{i}" for i in range(spec.words)])
    model = build_tiny_llama(
        len(tokenizer),
        hidden_size=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_positions,
        seed=spec.seed,
    )
    with torch.no_grad():  # a random model would sometimes pick </s>: zero its logit so every row runs to length
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model, tokenizer


def ensure_model(work: Path, spec: ModelSpec) -> Path:
    """The saved model dir for `spec` (built once; `config.json` + safetensors + tokenizer)."""
    out = work / f"model-{spec.key()}"
    if (out / "bench-model.json").is_file():
        return out
    tmp = work / f".model-{spec.key()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer = _build_model(spec)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "bench-model.json").write_text(json.dumps(asdict(spec)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def adapter_template(model_spec: ModelSpec, spec: AdapterSpec) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """PEFT's `adapter_config.json` contents and the shapes of every saved tensor, from ONE PEFT LoKr model."""
    from peft import LoKrConfig, get_peft_model, get_peft_model_state_dict

    model, _ = _build_model(model_spec)
    config = LoKrConfig(r=spec.r, alpha=spec.alpha, target_modules=list(TARGET_MODULES), init_weights=False)
    peft_model = get_peft_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    config_dict = peft_model.peft_config["default"].to_dict()
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config_dict.items()}
    return config_dict, {k: tuple(v.shape) for k, v in state.items()}


def ensure_adapters(work: Path, model_spec: ModelSpec, spec: AdapterSpec, n: int) -> tuple[Path, list[Path], int]:
    """`n` PEFT LoKr adapter dirs (`a0000`, `a0001`, ...) under one root; returns (root, dirs, bytes each)."""
    from safetensors.torch import save_file

    root = work / f"adapters-{spec.key(model_spec)}"
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root / f"a{i:04d}" for i in range(n)]
    missing = [(i, d) for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").is_file()]
    template = root / "template.json"
    if not template.is_file():
        config, shapes = adapter_template(model_spec, spec)
        template.write_text(json.dumps({"config": config, "shapes": shapes}))
    data = json.loads(template.read_text())
    shapes = {k: tuple(v) for k, v in data["shapes"].items()}
    config_text = json.dumps(data["config"], indent=2, sort_keys=True)
    for i, d in missing:
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        tensors = {k: torch.randn(shape, generator=gen) * spec.std for k, shape in shapes.items()}
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(exist_ok=True)
        (tmp / "adapter_config.json").write_text(config_text)
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    nbytes = 4 * sum(math.prod(s) for s in shapes.values())
    return root, dirs, nbytes


# ============================================================================================ requests
@dataclass(frozen=True)
class Request:
    index: int
    adapter: int | None  # index into the adapter list, None for the base model
    prompt: list[int]


def make_requests(count: int, n_adapters: int, prompt_tokens: int, vocab: range, seed: int) -> list[Request]:
    """A fixed, seeded request list: uniform adapter choice, `<s>` + random word ids as the prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        adapter = rng.randrange(n_adapters) if n_adapters > 0 else None
        prompt = [2] + [rng.choice(vocab) for _ in range(prompt_tokens - 1)]
        out.append(Request(i, adapter, prompt))
    return out


@dataclass
class Result:
    index: int
    start: float
    first: float | None = None  # first token received
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_times)


# ============================================================================================ server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Server:
    """A `python -m service.cli serve` subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(
        self,
        model_dir: Path,
        adapter_root: Path,
        max_batch_size: int,
        extra: Sequence[str],
        log_path: Path,
        hf: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hf = hf
        self.ready_path = "/health" if hf else "/ready"
        self.command = (
            hf_serve_command(model_dir, self.port)
            if hf
            else [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--model",
                str(model_dir),
                "--served-model-name",
                BASE_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--adapter-root",
                str(adapter_root),
                "--admin-token",
                ADMIN_TOKEN,
                "--max-batch-size",
                str(max_batch_size),
                *extra,
            ]
        )
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> float:
        """Start and wait for `/ready`; returns the seconds it took."""
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() - t0 < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}{self.ready_path}").status_code == 200:
                        return time.perf_counter() - t0
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def cpu_s(self) -> float | None:
        return _proc_cpu_s(self.proc.pid) if self.proc is not None else None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:  # `transformers serve` logs its shutdown, then its batching thread keeps the process alive: kill it
            self.proc.wait(timeout=5 if self.hf else 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def metrics(self) -> dict[str, float]:
        """Unlabelled Prometheus samples of interest (batch-size histogram sum/count)."""
        out: dict[str, float] = {}
        with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=10.0) as client:
            text = client.get(f"{self.url}/metrics").text
            for line in text.splitlines():
                if line.startswith(("lokr_batch_size_sum ", "lokr_batch_size_count ")):
                    name, value = line.split()
                    out[name] = float(value)
        return out


async def load_adapters(url: str, names: Sequence[str], dirs: Sequence[Path], parallel: int = 4) -> float:
    """Load every adapter through `POST /v1/adapters` (`parallel` at a time); returns seconds."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    todo = collections.deque(zip(names, dirs))
    t0 = time.perf_counter()
    async with loopback_client(url, headers=headers, timeout=120.0) as client:

        async def worker() -> None:
            while todo:
                name, path = todo.popleft()
                r = await client.post("/v1/adapters", json={"name": name, "source": str(path)})
                if r.status_code != 201:
                    raise RuntimeError(f"loading adapter {name} failed: {r.status_code} {r.text[:500]}")

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.perf_counter() - t0


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], result: Result) -> None:
    """Stream one completion; fill `result` with the arrival time of each token chunk."""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    continue
                choice = chunk["choices"][0]
                result.text += choice.get("text") or ""
                if choice.get("finish_reason") is None:
                    now = time.perf_counter()
                    if result.first is None:
                        result.first = now
                    result.token_times.append(now)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result.end = time.perf_counter()


@dataclass
class Run:
    """A measured phase: every request's result, its start, when sending stopped, and when the last finished."""

    results: list[Result]
    t0: float
    t_stop: float  # the first client found no more work (count or time limit): the end of the steady window
    t_end: float


async def run_load(
    url: str,
    requests: Sequence[Request],
    names: Sequence[str],
    *,
    concurrency: int,
    max_tokens: int,
    deadline_s: float | None,
    timeout_s: float = 600.0,
    base_name: str = BASE_NAME,
    as_text: Callable[[list[int]], str] | None = None,
) -> Run:
    """Closed loop: `concurrency` clients send the requests in order, back to back, until the list is used up
    or `deadline_s` passed (requests in flight then still finish)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[Result] = []
    pending = iter(requests)
    t0 = time.perf_counter()
    deadline = t0 + deadline_s if deadline_s else math.inf
    stops: list[float] = []
    async with loopback_client(url, limits=limits, timeout=timeout_s) as client:

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                req = next(pending, None)
                if req is None:
                    break
                model = base_name if req.adapter is None else names[req.adapter]
                body = {
                    "model": model,
                    "prompt": req.prompt if as_text is None else as_text(req.prompt),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                }
                result = Result(req.index, time.perf_counter())
                results.append(result)
                await one_request(client, body, result)
            stops.append(time.perf_counter())

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return Run(results, t0, min(stops), time.perf_counter())


# ============================================================================================ peft baseline
class _TimingStreamer:
    """A `generate` streamer that stamps the arrival of every generated token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.extend([time.perf_counter()] * int(value.numel()))

    def end(self) -> None:
        pass


def run_peft(
    model_dir: Path,
    requests: Sequence[Request],
    names: Sequence[str],
    dirs: Sequence[Path],
    *,
    max_tokens: int,
    max_loaded: int,
    deadline_s: float | None,
) -> tuple[Run, float, int]:
    """Serve `requests` one at a time through PEFT; returns (the run, setup s, on-demand loads)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_setup = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU of adapters held by PEFT
    model: Any = base
    if names:
        model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0]).eval()
        loaded[names[0]] = None
        for name, path in list(zip(names, dirs))[1:max_loaded]:
            model.load_adapter(str(path), adapter_name=name)
            loaded[name] = None
    setup_s = time.perf_counter() - t_setup
    on_demand = 0

    def select(i: int) -> None:
        nonlocal on_demand
        name = names[i]
        if name in loaded:
            loaded.move_to_end(name)
        else:
            if len(loaded) >= max_loaded:
                oldest = next(iter(loaded))
                model.delete_adapter(oldest)
                del loaded[oldest]
            model.load_adapter(str(dirs[i]), adapter_name=name)
            loaded[name] = None
            on_demand += 1
        model.set_adapter(name)

    def generate(req: Request) -> Result:
        result = Result(req.index, time.perf_counter())
        streamer = _TimingStreamer()
        if req.adapter is not None:
            select(req.adapter)
        ids = torch.tensor([req.prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
        result.end = time.perf_counter()
        result.token_times = streamer.times
        result.first = streamer.times[0] if streamer.times else None
        # the completion as OpenAI returns it: what follows the prompt in the decoded prompt + completion
        full = str(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
        head = str(tokenizer.decode(out[0, : len(req.prompt)].tolist(), skip_special_tokens=True))
        result.text = full[len(head) :]
        return result

    with torch.inference_mode():
        generate(Request(-1, 0 if names else None, requests[0].prompt))  # warm-up, untimed
        results: list[Result] = []
        t0 = time.perf_counter()
        deadline = t0 + deadline_s if deadline_s else math.inf
        for req in requests:
            if time.perf_counter() >= deadline:
                break
            results.append(generate(req))
    end = time.perf_counter()
    return Run(results, t0, end, end), setup_s, on_demand


# ============================================================================================ decode step
def decode_step_times(
    model_dir: Path, dirs: Sequence[Path], batches: Sequence[int], budget_s: float
) -> list[list[Any]]:
    """In-process medians of one decode step (KV cache of 64 tokens): base vs rows over 16 lokr adapters."""
    from transformers import AutoModelForCausalLM, DynamicCache

    import lokr

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    names = []
    for i, path in enumerate(dirs[:16]):
        lokr.load_adapter(model, path, f"a{i}")
        names.append(f"a{i}")
    rows_out: list[list[Any]] = []
    vocab = model.config.vocab_size
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        prefix = torch.randint(4, vocab, (b, 64), generator=gen)
        step = torch.randint(4, vocab, (b, 1), generator=gen)
        rows = [names[i % len(names)] for i in range(b)] if names else [None] * b
        with torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=prefix, use_cache=True, **{cache_kwarg: cache}, logits_to_keep=1)

            def base_step(cache: Any = cache, step: torch.Tensor = step) -> None:
                model(input_ids=step, use_cache=True, **{cache_kwarg: cache})
                cache.crop(-1)

            def mixed_step(cache: Any = cache, rows: list[Any] = rows, step: torch.Tensor = step) -> None:
                with lokr.adapter_batch(model, rows):
                    model(input_ids=step, use_cache=True, **{cache_kwarg: cache})
                cache.crop(-1)

            res = measure({"base": base_step, "mixed": mixed_step}, budget_s=budget_s, min_repeats=5, warmup=2)
        rows_out.append([b, res["base"].median_ms, res["mixed"].median_ms, res["base"].repeats])
    return rows_out


# ============================================================================================ summary
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: Run, max_tokens: int) -> dict[str, Any]:
    """Throughput over the steady window (all clients busy: start until the first client ran out of work),
    latency percentiles over every request."""
    results = run.results
    ok = [r for r in results if r.error is None]
    ttft = [(r.first - r.start) * 1e3 for r in ok if r.first is not None]
    gaps = [(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    window = run.t_stop - run.t0
    steady_tokens = sum(1 for r in ok for t in r.token_times if t <= run.t_stop)
    steady_done = sum(1 for r in ok if r.end <= run.t_stop)
    tokens = sum(r.tokens for r in ok)
    wall = run.t_end - run.t0

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "short": sum(1 for r in ok if r.tokens != max_tokens),
        "wall_s": round(wall, 3),
        "steady_s": round(window, 3),
        "req_per_s": steady_done / window if window > 0 else 0.0,
        "tok_per_s": steady_tokens / window if window > 0 else 0.0,
        "req_per_s_wall": len(ok) / wall if wall > 0 else 0.0,
        "tok_per_s_wall": tokens / wall if wall > 0 else 0.0,
        "tokens": tokens,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "latency_p50_s": percentile([r.end - r.start for r in ok], 50),
        "first_errors": sorted({r.error for r in results if r.error})[:3],
    }


# ============================================================================================ scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    n: int

    @staticmethod
    def parse(name: str) -> Scenario:
        kind, _, n = name.partition("-")
        if kind not in KINDS or not n.isdigit():
            raise ValueError(f"scenario {name!r}: expected KIND-N with KIND in {KINDS} and N >= 0")
        return Scenario(name, kind, int(n))


def run_scenario(
    sc: Scenario,
    args: argparse.Namespace,
    model_dir: Path,
    adapter_root: Path,
    dirs: Sequence[Path],
    requests: Sequence[Request],
    log_dir: Path,
) -> dict[str, Any]:
    names = [d.name for d in dirs[: sc.n]]
    info: dict[str, Any] = {"scenario": sc.name, "kind": sc.kind, "adapters": sc.n, "load_before": os.getloadavg()[0]}
    cpu0 = _self_cpu_s()
    if sc.kind == "peft":
        run, setup_s, on_demand = run_peft(
            model_dir,
            requests,
            names,
            dirs[: sc.n],
            max_tokens=args.max_tokens,
            max_loaded=args.peft_max_loaded,
            deadline_s=args.duration or args.time_cap,
        )
        info.update(
            max_batch=1,
            clients=1,
            setup_s=round(setup_s, 2),
            peft_loaded=min(sc.n, args.peft_max_loaded),
            on_demand_loads=on_demand,
        )
        info["client_cpu_s"] = round(_self_cpu_s() - cpu0, 2)
    elif sc.kind == "limit":
        run, setup_s = run_limit(model_dir, [r.prompt for r in requests], args.concurrency, args.max_tokens)
        info.update(max_batch=args.concurrency, clients=0, setup_s=round(setup_s, 2))
        info["client_cpu_s"] = round(_self_cpu_s() - cpu0, 2)
    elif sc.kind == "engine":
        run, setup_s, info["mean_batch_rows"] = run_engine(
            model_dir,
            [(d.name, d) for d in dirs[: sc.n]],
            requests,
            clients=args.concurrency,
            max_tokens=args.max_tokens,
            max_batch=args.max_batch_size,
            deadline_s=args.duration or args.time_cap,
        )
        info.update(max_batch=args.max_batch_size, clients=args.concurrency, setup_s=round(setup_s, 2))
        info["client_cpu_s"] = round(_self_cpu_s() - cpu0, 2)  # the engine runs in this process
    else:
        run = _run_server(sc, args, model_dir, adapter_root, dirs, requests, log_dir, names, info)
    info.update(summarize(run, args.max_tokens))
    if "long_sent" in info:
        info.update(itl_during(run, info.pop("long_sent"), info.pop("long_first")))
    if "hot_start" in info:
        info.update(itl_during(run, info.pop("hot_start"), info.pop("hot_end")))
    info["load_after"] = os.getloadavg()[0]
    info["texts"] = {r.index: r.text for r in run.results if r.error is None}
    return info


def quiet_collector() -> None:
    """Collect, then exempt everything alive in this process from later collections (`gc.freeze`), before a measured
    load: the in-process phases leave torch, transformers and models behind, and a full pass over them here paused
    the load generator for 150-290 ms while it read the streams, which showed up as per-token gaps of the server
    (the long-prompt ratio moved 2.4-4.3 between runs with one such pause in its 5-s window or none). The server
    freezes its own start-up heap the same way (`service/heap.py`); its pauses stay in the figures."""
    gc.collect()
    gc.freeze()


def _run_server(
    sc: Scenario,
    args: argparse.Namespace,
    model_dir: Path,
    adapter_root: Path,
    dirs: Sequence[Path],
    requests: Sequence[Request],
    log_dir: Path,
    names: list[str],
    info: dict[str, Any],
) -> Run:
    """batch-N, single-N, itl-N: our server; hf-0: transformers serve (text prompts, the model dir as name)."""
    max_batch = 1 if sc.kind == "single" else args.max_batch_size
    hf = sc.kind == "hf"
    server = Server(model_dir, adapter_root, max_batch, args.server_arg, log_dir / f"server-{sc.name}.log", hf=hf)
    info.update(max_batch=max_batch, clients=args.concurrency)
    load: dict[str, Any] = {"concurrency": args.concurrency}
    if hf:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        load.update(base_name=str(model_dir), as_text=lambda ids: tokenizer.decode(ids[1:]))  # it adds <s>
    try:
        info["startup_s"] = round(server.start(), 2)
        info["adapter_load_s"] = round(asyncio.run(load_adapters(server.url, names, dirs[: sc.n])), 3)
        warm = [Request(-1 - i, r.adapter, r.prompt) for i, r in enumerate(requests[: args.concurrency])]
        asyncio.run(run_load(server.url, warm, names, max_tokens=4, deadline_s=None, **load))
        quiet_collector()
        m0, cpu_server0, cpu0 = server.metrics(), server.cpu_s(), _self_cpu_s()
        deadline = args.duration or args.time_cap
        if sc.kind == "itl":
            run = asyncio.run(_with_long_prompt(server.url, requests, names, args, info))
        elif sc.kind == "hotload":
            extra = dirs[sc.n : sc.n + args.hotload]
            run = asyncio.run(_with_hot_loads(server.url, requests, names, extra, args, info))
        else:
            run = asyncio.run(
                run_load(server.url, requests, names, max_tokens=args.max_tokens, deadline_s=deadline, **load)
            )
        m1, cpu_server1 = server.metrics(), server.cpu_s()
        info["client_cpu_s"] = round(_self_cpu_s() - cpu0, 2)
        if cpu_server0 is not None and cpu_server1 is not None:
            info["server_cpu_s"] = round(cpu_server1 - cpu_server0, 2)
        count = m1.get("lokr_batch_size_count", 0.0) - m0.get("lokr_batch_size_count", 0.0)
        if count > 0:
            info["engine_batches"] = int(count)
            info["mean_batch_rows"] = (m1["lokr_batch_size_sum"] - m0["lokr_batch_size_sum"]) / count
    finally:
        server.stop()
    return run


def _usual_load(
    url: str, requests: Sequence[Request], names: list[str], args: argparse.Namespace
) -> Coroutine[Any, Any, Run]:
    """The scenario's closed loop (`run_load` with the run's clients, tokens and time cap), not started yet."""
    deadline = args.duration or args.time_cap
    return run_load(url, requests, names, concurrency=args.concurrency, max_tokens=args.max_tokens, deadline_s=deadline)


async def _with_long_prompt(
    url: str, requests: Sequence[Request], names: list[str], args: argparse.Namespace, info: dict[str, Any]
) -> Run:
    """The usual closed loop, and one `--long-prompt`-token prompt sent `--long-after` seconds into it."""
    rng = random.Random(args.seed + 1)
    prompt = [2] + [rng.randrange(8, 8 + 200) for _ in range(args.long_prompt - 1)]

    def stamp(sent: float, first: float) -> None:
        info.update(long_sent=sent, long_first=first, long_ttft_ms=round((first - sent) * 1e3, 1))

    load = _usual_load(url, requests, names, args)
    probe = long_prompt_probe(url, BASE_NAME, prompt, args.long_after, 4, stamp)
    run, error = await asyncio.gather(load, probe)
    info["long_error"] = error
    info["long_prompt_tokens"] = args.long_prompt
    return run


async def _with_hot_loads(
    url: str,
    requests: Sequence[Request],
    names: list[str],
    extra: Sequence[Path],
    args: argparse.Namespace,
    info: dict[str, Any],
) -> Run:
    """The usual closed loop, and `extra` adapters loaded through the admin API `--long-after` seconds into it."""

    async def hot_loads() -> None:
        await asyncio.sleep(args.long_after)
        start = time.perf_counter()
        await load_adapters(url, [d.name for d in extra], extra)
        end = time.perf_counter()
        info.update(
            hot_start=start, hot_end=end, hotload_n=len(extra), hotload_per_s=round(len(extra) / (end - start), 1)
        )

    run, _ = await asyncio.gather(_usual_load(url, requests, names, args), hot_loads())
    return run


def itl_during(run: Run, start: float, end: float) -> dict[str, Any]:
    """Per-token gaps of the other requests that end while the long prompt is prefilled (sent .. first token,
    plus one step), against the whole run's median gap."""
    gaps = [(b - a) * 1e3 for r in run.results if r.error is None for a, b in zip(r.token_times, r.token_times[1:])]
    during = [
        (b - a) * 1e3
        for r in run.results
        if r.error is None
        for a, b in zip(r.token_times, r.token_times[1:])
        if start <= b <= end + (b - a)
    ]
    p50, p99 = percentile(gaps, 50), percentile(during, 99)
    return {
        "itl_during_gaps": len(during),
        "itl_p99_during_ms": None if p99 is None else round(p99, 3),
        "itl_p99_during_over_p50": None if p99 is None or not p50 else round(p99 / p50, 3),
    }


def output_agreement(by_name: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """For every peft-N or engine-N and batch-N pair: how many of the requests both served gave the same text."""
    rows = []
    for name, res in by_name.items():
        if res["kind"] not in ("peft", "engine") or f"batch-{res['adapters']}" not in by_name:
            continue
        other = by_name[f"batch-{res['adapters']}"]["texts"]
        common = [i for i in res["texts"] if i in other]
        same = sum(1 for i in common if res["texts"][i] == other[i])
        rows.append([f"batch-{res['adapters']} vs {name}", len(common), same])
    return rows


# ============================================================================================ report
TABLE_HEADERS = [
    "scenario",
    "adapters",
    "max batch",
    "clients",
    "requests",
    "errors",
    "steady s",
    "req/s",
    "tok/s",
    "tok/s runs",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "per-token p50 ms",
    "per-token p99 ms",
    "mean batch rows",
    "adapter load s",
]


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["scenario"],
            r["adapters"],
            r["max_batch"],
            r["clients"],
            r["requests"],
            r["errors"] + r["short"],
            r["steady_s"],
            r["req_per_s"],
            r["tok_per_s"],
            " / ".join(f"{v:.0f}" for v in r["tok_per_s_runs"]),
            r["ttft_p50_ms"],
            r["ttft_p99_ms"],
            r["itl_p50_ms"],
            r["itl_p99_ms"],
            r.get("mean_batch_rows"),
            r.get("adapter_load_s", r.get("setup_s")),
        ]
        for r in results
    ]


RATIO_HEADERS = ["ratio (tokens/s)", "scenarios", "measured", "paired", "target", "met", "compares"]


def ratio_rows(by_name: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for label, num, den, target, what in RATIOS:
        if num in by_name and den in by_name and by_name[den]["tok_per_s"] > 0:
            value = by_name[num]["tok_per_s"] / by_name[den]["tok_per_s"]
            paired = _paired(by_name[num], by_name[den])
            if target is None:
                rows.append([label, f"{num} / {den}", value, paired, "", "(no target)", what])
                continue
            met = "yes" if value >= target else "**NO**"
            rows.append([label, f"{num} / {den}", value, paired, f">= {target:g}", met, what])
    for name, r in by_name.items():
        value = r.get("itl_p99_during_over_p50")
        if r["kind"] == "hotload":
            rows.append(_hot_load_row(name, r))
        if r["kind"] != "itl":
            continue
        what = f"per-token p99 while a {r['long_prompt_tokens']}-token prompt prefills / p50 of the run"
        if value is None:  # the other requests' tokens all fell outside the prefill (a fast machine, a short run)
            rows.append(
                ["long prompt p99 / p50", name, "n/a", "", "<= 3", "not measured", what + ": no gap fell inside"]
            )
        else:
            rows.append(["long prompt p99 / p50", name, value, "", "<= 3", "yes" if value <= 3 else "**NO**", what])
    return rows


def _hot_load_row(name: str, r: dict[str, Any]) -> list[Any]:
    """Informational (no target): the other rows' per-token p99 while adapters load / the run's p50."""
    what = f"per-token p99 while {r['hotload_n']} adapters load ({r['hotload_per_s']:g}/s) / p50 of the run"
    value = r.get("itl_p99_during_over_p50")
    return ["hot-load p99 / p50", name, "n/a" if value is None else value, "", "", "(no target)", what]


def _paired(num: dict[str, Any], den: dict[str, Any]) -> float | str:
    """`paired_ratio` of two scenarios' rounds (tokens/s); "" when a round's figure is missing or zero."""
    nums, dens = num.get("tok_per_s_runs", []), den.get("tok_per_s_runs", [])
    if not nums or len(nums) != len(dens) or min(dens) <= 0:
        return ""
    return paired_ratio(nums, dens)


def write_report(
    out: Path,
    env: dict[str, Any],
    settings: dict[str, Any],
    step_rows: list[list[Any]],
    results: list[dict[str, Any]],
    agreement: list[list[Any]],
) -> None:
    by_name = {r["scenario"]: r for r in results}
    table = markdown_table(TABLE_HEADERS, table_rows(results), floatfmt=".4g")
    ratios = markdown_table(RATIO_HEADERS, ratio_rows(by_name))
    extra = markdown_table(
        [
            "scenario",
            "server start s",
            "phase wall s",
            "server CPU s",
            "server cores busy",
            "client CPU s",
            "lokr_batch_size samples",
            "load 1-min before/after",
        ],
        [
            [
                r["scenario"],
                r.get("startup_s", r.get("setup_s")),
                r["wall_s"],
                r.get("server_cpu_s"),
                r["server_cpu_s"] / r["wall_s"] if r.get("server_cpu_s") and r["wall_s"] else None,
                r.get("client_cpu_s"),
                r.get("engine_batches"),
                f"{r['load_before']:.2f} / {r['load_after']:.2f}",
            ]
            for r in results
        ],
        floatfmt=".3g",
    )
    parts = [
        "# Serving benchmark",
        "",
        "Generated by `bench/serve.py` (see its docstring). The real server (`python -m service.cli serve`) runs as a "
        "subprocess on a loopback port; a closed loop of concurrent streaming clients (httpx) sends `/v1/completions` "
        "requests back to back, each naming one of N adapters uniformly at random (temperature 0). The naive "
        "baseline serves the same request list in-process through `peft` (`set_adapter` + greedy `generate`), one "
        "request at a time. Client and server share the machine's cores.",
        "",
        "## Environment",
        "",
        markdown_table(["", ""], [[k, v] for k, v in env.items()]),
        "",
        "## Settings",
        "",
        markdown_table(["", ""], [[k, v] for k, v in settings.items()]),
        "",
        "One decode step in-process (KV cache of 64 tokens, fp32; `mixed` = rows cycling over 16 LoKr adapters "
        "through `lokr.adapter_batch`), median ms:",
        "",
        markdown_table(["batch rows", "base ms", "mixed16 ms", "repeats"], step_rows, floatfmt=".4g"),
        "",
        "## Results",
        "",
        "Throughput (req/s, tok/s) counts requests finished and tokens received in the steady window of the measured "
        "phase (after a warm-up round): from its start until the first client runs out of work (request count or "
        "time cap reached), so every client is busy throughout and the drain at the end is excluded (`serve.json` "
        "also has whole-phase numbers). TTFT "
        "is from sending a request to its first token (queueing included); per-token = gaps between consecutive "
        "tokens of a request, all requests pooled. `errors` counts failed requests plus requests that generated "
        "fewer than `max_tokens` tokens. `mean batch rows` is from the server's `lokr_batch_size` histogram over "
        "the measured phase. `adapter load s` is loading the N adapters through `POST /v1/adapters` (4 at a time) "
        "for the server and loading them into `PeftModel` for peft.",
        "",
        table,
        "",
        "Ratios of generated tokens/s against the issue's targets (`measured`: of the median runs, what the target "
        "is judged on; `paired`: the median of each round's own ratio, which cancels drift between interleaved "
        "rounds):",
        "",
        ratios,
        "",
        "Resources during the whole measured phase (steady window plus drain). `server cores busy` = server CPU s / "
        "phase wall s (2.0 = both cores); `lokr_batch_size samples` counts the server's batch-size observations "
        "(one per decode step with continuous batching); the load average includes this benchmark's own server "
        "and client, so above ~2.5 something else was running:",
        "",
        extra,
        "",
    ]
    if agreement:
        parts += [
            "Greedy outputs, server vs PEFT and vs the engine in-process, for the requests both served (same "
            "adapter and prompt): " + "; ".join(f"{name}: {same}/{n} identical" for name, n, same in agreement),
            "",
        ]
    parts += ["![throughput and TTFT vs adapters](serve.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.md").write_text("\n".join(parts))


def write_plot(out: Path, results: list[dict[str, Any]], title: str) -> None:
    def points(kind: str, key: str) -> list[tuple[float, float]]:
        rows = [r for r in results if r["kind"] == kind and r.get(key) and r["adapters"] > 0]  # log x axis
        return [(float(r["adapters"]), float(r[key])) for r in rows]

    # the adapter-count sweep; limit-0, hf-0 and itl-N are in the tables
    labels = {"batch": "batched", "single": "one at a time (max batch 1)", "peft": "naive peft"}
    throughput = {labels[k]: points(k, "tok_per_s") for k in labels}
    ttft: dict[str, list[tuple[float, float]]] = {}
    for k in labels:
        ttft[f"{labels[k]} p50"] = points(k, "ttft_p50_ms")
        ttft[f"{labels[k]} p99"] = points(k, "ttft_p99_ms")
    panels = {
        "throughput (generated tokens/s)": {k: v for k, v in throughput.items() if v},
        "time to first token (ms)": {k: v for k, v in ttft.items() if v},
    }
    plot_loglog(out / "serve.png", panels, xlabel="distinct adapters", ylabel="tokens/s  |  ms", title=title)


# ============================================================================================ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, N in {1, 16}, few requests")
    parser.add_argument(
        "--scenarios", nargs="+", default=None, help=f"KIND-N names (default {' '.join(FULL_SCENARIOS)})"
    )
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 32; quick 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per batch-N scenario (default 320)")
    parser.add_argument("--single-requests", type=int, default=None, help="requests for single-N (default 96)")
    parser.add_argument("--peft-requests", type=int, default=None, help="requests for peft-N (default 48)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per scenario instead of counts")
    parser.add_argument(
        "--time-cap", type=float, default=None, help="stop sending after this many seconds per scenario (default 75)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length in tokens (default 32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size for batch-N")
    parser.add_argument("--long-prompt", type=int, default=None, help="itl-N: long prompt tokens (default 2000)")
    parser.add_argument("--long-after", type=float, default=None, help="itl-N: send it after s (default 3)")
    parser.add_argument("--hotload", type=int, default=None, help="hotload-N: adapters loaded mid-run (default 200)")
    parser.add_argument("--peft-max-loaded", type=int, default=32, help="adapters held by PEFT at once (LRU)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra server flag, e.g. --server-arg=--log-level=warning"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the in-process phases")
    parser.add_argument("--work", type=Path, default=_ROOT / "bench" / ".work", help="cache dir (model, adapters)")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench" / "results", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the scenario list (interleaved); each scenario reports "
        "its median-throughput run, ratios use those medians",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so a running server is stopped too

    quick = args.quick
    spec = QUICK_MODEL if quick else FULL_MODEL
    args.concurrency = args.concurrency or (8 if quick else 32)
    args.requests = args.requests or (24 if quick else 320)
    args.single_requests = args.single_requests or (16 if quick else 96)
    args.peft_requests = args.peft_requests or (6 if quick else 48)
    args.time_cap = args.time_cap or (15.0 if quick else 75.0)
    args.prompt_tokens = args.prompt_tokens or (8 if quick else 32)
    args.max_tokens = args.max_tokens or (8 if quick else 32)
    args.long_prompt = args.long_prompt or (300 if quick else 2000)
    args.long_after = args.long_after if args.long_after is not None else (1.0 if quick else 3.0)
    args.hotload = args.hotload or (8 if quick else 200)
    try:
        scenarios = [Scenario.parse(s) for s in (args.scenarios or (QUICK_SCENARIOS if quick else FULL_SCENARIOS))]
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    env = environment(args.threads)  # load average at start

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    model_dir = ensure_model(work, spec)
    model_s = time.perf_counter() - t0
    adapter_spec = AdapterSpec(seed=args.seed)
    n_max = max([sc.n + (args.hotload if sc.kind == "hotload" else 0) for sc in scenarios] + [16])
    t0 = time.perf_counter()
    adapter_root, dirs, adapter_bytes = ensure_adapters(work, spec, adapter_spec, n_max)
    adapters_s = time.perf_counter() - t0
    print(f"model {model_dir.name} ready in {model_s:.1f}s; {n_max} adapters ready in {adapters_s:.1f}s", flush=True)

    step_rows = decode_step_times(model_dir, dirs, (1, 16) if quick else (1, 16, 32), budget_s=0.1 if quick else 1.0)
    print(markdown_table(["batch rows", "base ms", "mixed16 ms", "repeats"], step_rows, floatfmt=".4g"), flush=True)

    config = json.loads((model_dir / "config.json").read_text())
    n_params = _count_params(model_dir)
    vocab = range(8, config["vocab_size"])
    runs: dict[str, list[dict[str, Any]]] = {sc.name: [] for sc in scenarios}
    for round_ in range(max(1, args.repeats)):
        for sc in scenarios:
            runs[sc.name].append(_run_and_print(sc, args, model_dir, adapter_root, dirs, vocab, log_dir, round_))
    results = [median_run(scenario_runs) for scenario_runs in runs.values()]

    elapsed = time.perf_counter() - t_start
    by_name = {r["scenario"]: r for r in results}
    agreement = output_agreement(by_name)
    print("\n" + markdown_table(TABLE_HEADERS, table_rows(results), floatfmt=".4g"))
    ratios = ratio_rows(by_name)
    print("\n" + markdown_table(RATIO_HEADERS, ratios))
    for name, n, same in agreement:
        print(f"outputs {name}: {same}/{n} identical")

    env["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    env.update(
        {
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "httpx": httpx.__version__,
            "mode": "quick" if quick else "full",
            "code": _git_state(),
            "wall time (s)": round(elapsed, 1),
        }
    )
    settings = {
        "model": f"Llama, hidden {spec.hidden}, {spec.layers} layers, {spec.heads} heads, intermediate "
        f"{spec.intermediate}, vocab {config['vocab_size']} (word-level), {n_params / 1e6:.1f}M params, fp32, "
        "random weights",
        "adapters": f"PEFT LoKr r={adapter_spec.r} alpha={adapter_spec.alpha:g} on {', '.join(TARGET_MODULES)} "
        f"({spec.layers * len(TARGET_MODULES)} modules), random factors N(0, {adapter_spec.std}^2), "
        f"{adapter_bytes / 1024:.0f} KiB each (fp32)",
        "prompt / generated tokens per request": f"{args.prompt_tokens} / {args.max_tokens}",
        "concurrent clients (server scenarios)": args.concurrency,
        "requests per scenario (batch / single / peft)": f"timed {args.duration:g} s"
        if args.duration
        else f"{args.requests} / {args.single_requests} / {args.peft_requests}, sending stops after "
        f"{args.time_cap:g} s (time cap)",
        "server --max-batch-size (batch-N, itl-N, hf-0 / single-N)": f"{args.max_batch_size} / 1",
        "itl-N long prompt": f"{args.long_prompt} tokens, sent {args.long_after:g} s into the measured phase",
        "hotload-N": f"{args.hotload} more adapters loaded through `POST /v1/adapters` (4 at a time) from "
        f"{args.long_after:g} s into the measured phase; requests keep naming the N",
        "limit-0": f"in-process `generate`, static batches of {args.concurrency} rows (= clients), no adapters",
        "hf-0": "`transformers serve <model dir> --continuous-batching` (defaults), text prompts",
        "extra server args": " ".join(args.server_arg) or "none",
        "peft adapters held at once": f"{args.peft_max_loaded} (LRU, on-demand loads count in the request)",
        "torch threads (in-process phases; the server uses torch's default)": args.threads,
        "rounds over the scenarios (interleaved; the median run of each is reported)": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, env, settings, step_rows, results, agreement)
    write_plot(args.out, results, f"lokr-serve, {args.concurrency} clients, {args.max_tokens} tokens/request")
    for r in results:
        r.pop("texts", None)
    (args.out / "serve.json").write_text(
        json.dumps({"environment": env, "settings": settings, "decode_step": step_rows, "results": results}, indent=1)
    )
    print(f"\nwrote {args.out / 'serve.md'}, {args.out / 'serve.png'} in {elapsed:.0f}s")
    return 0


def _run_and_print(
    sc: Scenario,
    args: argparse.Namespace,
    model_dir: Path,
    adapter_root: Path,
    dirs: Sequence[Path],
    vocab: range,
    log_dir: Path,
    round_: int,
) -> dict[str, Any]:
    count = {"single": args.single_requests, "peft": args.peft_requests}.get(sc.kind, args.requests)
    if sc.kind != "peft":  # the steady window needs more requests than clients
        count = max(count, 2 * args.concurrency)
    if args.duration:
        count = 100_000 if sc.kind != "limit" else args.concurrency * 8
    if sc.kind == "limit":  # whole static batches
        count = -(-count // args.concurrency) * args.concurrency
    requests = make_requests(count, sc.n, args.prompt_tokens, vocab, args.seed)
    rounds = f", round {round_ + 1}/{args.repeats}" if args.repeats > 1 else ""
    print(f"\n== {sc.name}: {sc.n} adapters, {count if not args.duration else 'timed'} requests{rounds}", flush=True)
    res = run_scenario(sc, args, model_dir, adapter_root, dirs, requests, log_dir)
    print(
        f"   {res['req_per_s']:.2f} req/s  {res['tok_per_s']:.1f} tok/s  TTFT p50 {res['ttft_p50_ms']} ms "
        f"p99 {res['ttft_p99_ms']} ms  per-token p50 {res['itl_p50_ms']} ms p99 {res['itl_p99_ms']} ms  "
        f"errors {res['errors']} short {res['short']}  mean batch rows {res.get('mean_batch_rows')}",
        flush=True,
    )
    if res["first_errors"]:
        print("   errors:", res["first_errors"], flush=True)
    return res


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle one for an even count), with every run's tok/s and
    the errors of all runs."""
    ranked = sorted(runs, key=lambda r: r["tok_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["tok_per_s_runs"] = [r["tok_per_s"] for r in runs]
    chosen["errors"] = sum(r["errors"] for r in runs)
    chosen["short"] = sum(r["short"] for r in runs)
    return chosen


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _git_state() -> str:
    """`<short HEAD>` plus how many paths differ from it (the benchmark measures the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=_ROOT, capture_output=True, text=True)
    except OSError:
        return "?"
    changed = len([line for line in status.stdout.splitlines() if line.strip()])
    return f"{head.stdout.strip() or '?'}" + (f" + {changed} changed paths" if changed else "")


def _version(module: str) -> str:
    with contextlib.suppress(Exception):
        return str(__import__(module).__version__)
    return "?"


if __name__ == "__main__":
    sys.exit(main())
