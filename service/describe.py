"""`lokr-serve inspect`: what an adapter holds, as a short readable summary or as JSON."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from lokr.formats import ParsedAdapter

__all__ = ["adapter_report", "adapter_summary"]

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def adapter_report(parsed: ParsedAdapter) -> dict[str, Any]:
    """Everything `inspect --json` prints: format, config, metadata and each module's tensors and scale."""
    modules = {
        name: {
            "tensors": {k: [list(t.shape), _dtype(t.dtype)] for k, t in m.tensors.items()},
            "scale": m.scale,
        }
        for name, m in parsed.modules.items()
    }
    return {
        "format": parsed.format,
        "source": parsed.source,
        "num_modules": len(parsed.modules),
        "nbytes": parsed.nbytes,
        "config": parsed.config.to_dict() if parsed.config else None,
        "metadata": parsed.metadata,
        "modules": modules,
    }


def adapter_summary(parsed: ParsedAdapter) -> str:
    """A few lines: format, scale, config, totals, and the modules grouped by factor shapes."""
    tensors = [t for m in parsed.modules.values() for t in m.tensors.values()]
    params = sum(t.numel() for t in tensors)
    dtypes = ", ".join(sorted({_dtype(t.dtype) for t in tensors}))
    scales = sorted({round(m.scale, 6) for m in parsed.modules.values()})
    kind = "PEFT LoKr directory" if parsed.format == "peft" else "LyCORIS / kohya LoKr file"
    lines = [f"{parsed.source}: {kind}"]
    if parsed.config is not None:
        c = parsed.config
        targets = c.target_modules if isinstance(c.target_modules, str) else _folded(c.target_modules or [])
        lines.append(f"  config: r={c.r} alpha={c.alpha:g} decompose_both={c.decompose_both} target_modules={targets}")
    scale_text = f"{scales[0]:g} on every module" if len(scales) == 1 else ", ".join(f"{s:g}" for s in scales)
    lines.append(f"  scale: {scale_text}")
    lines.append(
        f"  total: {len(parsed.modules)} modules, {len(tensors)} tensors, {params:,} parameters, "
        f"{_size(parsed.nbytes)} ({dtypes})"
    )
    lines.append("  modules by factor shapes:")
    for shapes, names in _by_shapes(parsed).items():
        lines.append(f"    {len(names):>4} x {shapes}: {_folded(names)}")
    return "\n".join(lines)


def _folded(names: Iterable[str], shown: int = 6) -> str:
    """Module names with layer indices folded to `*` (`model.layers.*.mlp.up_proj`), the first `shown` of them."""
    patterns = sorted({_LAYER_INDEX.sub("*", n) for n in names})
    more = f" (+{len(patterns) - shown} more)" if len(patterns) > shown else ""
    return ", ".join(patterns[:shown]) + more


def _by_shapes(parsed: ParsedAdapter) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, m in parsed.modules.items():
        key = "  ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(m.tensors.items()))
        groups[key].append(name)
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"  # pragma: no cover
