"""The serving benchmark's reference rows (used by `bench/serve.py`):

limit-0  no server: the same model's raw batched greedy decode in-process (transformers `generate`, a static
         batch of `--concurrency` rows of the same prompts, no adapters), in tokens/s; the ceiling the server
         is compared with
engine-N no HTTP: our engine in-process (`service.engine.Engine` over the server's causal-LM backend, its default
         settings), N adapters attached, driven by the same closed loop without the network: each of the
         `--concurrency` clients submits its next request the moment its last one finished. Against limit-0 it is
         what the engine costs; batch-N against it, what the HTTP server and load generator add
hf-0     `transformers serve --continuous-batching` (transformers' own OpenAI server, paged attention) on the
         same model dir, driven by the same load generator (text prompts: its /v1/completions takes strings)
itl-N    the server with N adapters under the usual load, plus one `--long-prompt`-token prompt sent
         mid-run: the per-token latency of the other rows (p99 vs p50) shows whether prefill stalls them
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

__all__ = ["hf_serve_command", "long_prompt_probe", "run_engine", "run_limit"]


def run_limit(model_dir: Path, prompts: Sequence[list[int]], batch: int, max_tokens: int) -> tuple[Any, float]:
    """Static batches of `batch` rows through `generate` (greedy, exactly `max_tokens` new tokens each), one
    after another over `prompts`; returns the results as a `Run` (token times per row) and the load seconds."""
    from transformers import AutoModelForCausalLM

    from bench.serve import Result, Run

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    setup_s = time.perf_counter() - t0
    ids = torch.tensor([list(p) for p in prompts[:batch]])
    warm = max(1, min(4, max_tokens))
    with torch.inference_mode():  # one short warm-up batch
        model.generate(ids, max_new_tokens=warm, min_new_tokens=warm, do_sample=False, pad_token_id=1)
    results: list[Any] = []
    start = time.perf_counter()
    for first in range(0, len(prompts) - batch + 1, batch):
        ids = torch.tensor([list(p) for p in prompts[first : first + batch]])
        stamps = _StepTimes()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=1,
                streamer=stamps,
            )
        for i in range(batch):
            results.append(Result(first + i, t, stamps.times[0] if stamps.times else None, time.perf_counter()))
            results[-1].token_times = list(stamps.times)
    end = time.perf_counter()
    return Run(results, start, end, end), setup_s


def run_engine(
    model_dir: Path, adapters: Sequence[tuple[str, Path]], requests: Sequence[Any], *, clients: int, max_tokens: int,
    max_batch: int, deadline_s: float | None,
) -> tuple[Any, float, float | None]:  # fmt: skip
    """The engine alone under the closed loop (`requests`: `bench.serve.Request`, adapter index into `adapters`);
    returns a `Run` (per-request token times, stamped as the engine emits them), the setup seconds and the mean
    rows per engine step (its `lokr_batch_size` histogram, as the server's)."""
    import lokr
    from service.backend import load_causal_lm
    from service.engine import Engine
    from service.foldsize import fold_copies
    from service.lm import CausalLMBackend
    from service.metrics import Metrics
    from service.settings import Settings

    t0 = time.perf_counter()
    loaded = load_causal_lm(str(model_dir), "cpu", "float32")
    for name, path in adapters:
        lokr.load_adapter(loaded.model, path, name)
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    fold = fold_copies(defaults["fold_cache"], loaded.model, loaded.device, images=False, max_batch_size=max_batch)
    metrics = Metrics()
    backend = CausalLMBackend(
        loaded, metrics, max_batch, defaults["max_prefill_tokens"], defaults["prefill_stall"], fold
    )
    engine = Engine(backend, metrics, max_queue=max(clients, 1) * 2)
    engine.start()

    def batches() -> tuple[float, float]:
        value = metrics.registry.get_sample_value
        return value("lokr_batch_size_sum") or 0.0, value("lokr_batch_size_count") or 0.0

    try:
        setup_s = time.perf_counter() - t0
        names = [name for name, _ in adapters]
        _closed_loop(engine, requests[:clients], names, max_tokens, None)  # warm-up, as the server's
        (rows0, steps0) = batches()
        run = _closed_loop(engine, requests, names, max_tokens, deadline_s, clients=clients)
        (rows1, steps1) = batches()
    finally:
        engine.stop()
    return run, setup_s, (rows1 - rows0) / (steps1 - steps0) if steps1 > steps0 else None


def _closed_loop(
    engine: Any, requests: Sequence[Any], names: Sequence[str], max_tokens: int, deadline_s: float | None,
    clients: int | None = None,
) -> Any:  # fmt: skip
    """`clients` loops (default: one per request) submitting `requests` in order straight into `engine`."""
    import threading

    from bench.serve import Result, Run
    from service.jobs import ErrorEvent, FinishEvent, Job, SamplingParams, TokenEvent

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    pending, lock, idle = iter(requests), threading.Lock(), threading.Event()
    results: list[Any] = []
    stops: list[float] = []
    running = clients or len(requests)
    t0 = time.perf_counter()
    deadline = t0 + deadline_s if deadline_s else float("inf")

    def send() -> None:
        nonlocal running
        with lock:
            req = next(pending, None) if time.perf_counter() < deadline else None
            if req is None:
                stops.append(time.perf_counter())
                running -= 1
                if running == 0:
                    idle.set()
                return
            result = Result(req.index, time.perf_counter())
            results.append(result)
        selection = None if req.adapter is None else names[req.adapter]
        try:
            engine.submit(Job(list(req.prompt), params, selection, lambda event: on_event(result, event)))
        except Exception as exc:  # refused (queue full, too long): counted as an error, the client goes on
            on_event(result, ErrorEvent(exc))

    def on_event(result: Any, event: Any) -> None:  # on the engine thread
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            result.first = result.first or now
            result.token_times.append(now)
            result.text += event.text
            return
        if isinstance(event, ErrorEvent):
            result.error = repr(event.error)
        elif isinstance(event, FinishEvent):
            result.text += event.text
        result.end = now
        send()

    for _ in range(running):
        send()
    idle.wait()
    return Run(results, t0, min(stops), time.perf_counter())


class _StepTimes:
    """A `generate` streamer that stamps each decode step (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_serve_command(model_dir: Path, port: int, max_batch_tokens: int | None = None) -> list[str]:
    """`transformers serve` pinned to `model_dir` with continuous batching (the venv's console script)."""
    import shutil
    import sys

    exe = Path(sys.executable).parent / "transformers"
    binary = str(exe) if exe.exists() else (shutil.which("transformers") or "transformers")
    cmd = [binary, "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    if max_batch_tokens:
        cmd += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    return cmd + ["--log-level", "warning"]


def loopback_client(url: str, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for the plain-HTTP loopback server, made without an SSL context: httpx builds one by default
    (28-117 ms here, loading the CA bundle), which a client made while the load runs would spend on the load
    generator's event loop, holding back every stream's tokens (it showed as the server's largest per-token gaps)."""
    return httpx.AsyncClient(base_url=url, verify=False, **kwargs)


async def long_prompt_probe(
    url: str, model: str, prompt: list[int], after_s: float, max_tokens: int, stamp: Callable[[float, float], None]
) -> str | None:
    """After `after_s` seconds, send one long prompt; `stamp(sent, first_token)`; returns an error or None."""
    await asyncio.sleep(after_s)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    async with (
        loopback_client(url, timeout=600.0) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
        first = None
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: ") and line[6:] != "[DONE]":
                first = time.perf_counter()
                stamp(sent, first)
    return None
