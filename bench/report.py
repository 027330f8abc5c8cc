"""Shared benchmark helpers: interleaved median timing, environment facts, markdown tables, log-log plots.

Used by `bench/layers.py` and meant to be reused by the serving benchmark. Only the standard library,
torch and (for plots) matplotlib are needed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Timing",
    "cpu_model",
    "environment",
    "markdown_table",
    "measure",
    "plot_loglog",
    "time_fn",
]


@dataclass
class Timing:
    """Per-call wall times (seconds) of one variant; `median_ms` is what reports quote."""

    samples: list[float] = field(default_factory=list)

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3 if self.samples else float("nan")

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1e3 if self.samples else float("nan")

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range in ms (0 with fewer than 4 samples)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) * 1e3

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "iqr_ms": self.iqr_ms, "repeats": self.repeats}


def measure(
    fns: Mapping[str, Callable[[], Any]],
    *,
    budget_s: float = 2.0,
    min_repeats: int = 3,
    max_repeats: int = 200,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time every callable, interleaved: each round calls every variant once, in the given order.

    Interleaving makes the ratios between variants robust to machine-wide drift (other processes, turbo,
    thermal). Rounds continue until `budget_s` per variant has been spent in total (i.e. `budget_s * len(fns)`
    for the whole set) and at least `min_repeats` rounds ran, or `max_repeats` rounds ran. `warmup` untimed
    calls of each variant come first.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing() for name in fns}
    total_budget = budget_s * len(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < total_budget):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].samples.append(time.perf_counter() - t0)
        rounds += 1
    return out


def time_fn(fn: Callable[[], Any], **kwargs: Any) -> Timing:
    """`measure` for a single callable."""
    return measure({"fn": fn}, **kwargs)["fn"]


# --------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Facts a benchmark report should carry: versions, threads, CPU, date."""
    import os

    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": cpu_model(),
        "logical cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        env["load average (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------------------------- output
def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of each round's own ratio. Rounds are interleaved, so pairing each round's figures cancels the
    drift of a shared machine between rounds (the ratio of the medians does not)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, floatfmt: str = ".3g") -> str:
    """A GitHub markdown table; floats formatted with `floatfmt`, None as an em dash."""

    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_loglog(
    path: str | Path,
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    *,
    xlabel: str | Mapping[str, str] = "tokens",
    ylabel: str = "ms (median)",
    title: str | None = None,
) -> Path:
    """One log-log panel per entry of `panels` (`{panel title: {series: [(x, y), ...]}}`), saved as PNG.

    `xlabel` is one label for all panels or `{panel title: label}`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for label, points in series.items():
            pts = sorted(p for p in points if p[1] == p[1] and p[1] > 0)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel.get(panel, ""))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
