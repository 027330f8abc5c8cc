"""AUTOMATIC1111's extra-network tags in a prompt, which select adapters: `<lora:NAME>`, `<lora:NAME:TE>`,
`<lora:NAME:TE:UNET>`, or with named arguments `<lora:NAME:te=TE:unet=UNET>`; `<lyco:...>` alike.

As A1111's built-in Lora extension reads them: the arguments are split at ':', an argument with one '=' is named,
the others positional; the first positional is the adapter, the second the text encoders' multiplier (1 when
absent, `te=` overrides it), the third the denoiser's (the text encoders' when absent, `unet=` overrides it). A
fourth, or `dyn=`, is DyLoRA's rank, which A1111 applies to DyLoRA networks only: an integer is accepted and has no
effect on a LoKr. Other named arguments (block weights and the like, from extensions) are a 400: the image would
not be the one asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadRequestError

__all__ = ["LoraTag", "parse_lora_tags"]

_TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
_LIMIT = 100.0  # |multiplier|, as an adapter scale anywhere


@dataclass(frozen=True)
class LoraTag:
    """One tag: the adapter and its multipliers on the text encoders (`te`) and the denoiser (`unet`)."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """`"a cat <lora:ink:0.8> <lora:b:1:0.5>"` -> `("a cat", [LoraTag("ink", 0.8, 0.8), LoraTag("b", 1.0, 0.5)])`;
    the prompt without its tags, whitespace collapsed. A 400 naming the tag for one A1111 would not take."""
    tags = [_read(match.group(0), match.group(2)) for match in _TAG.finditer(prompt)]
    return " ".join(_TAG.sub(" ", prompt).split()), tags


def _read(tag: str, arguments: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in arguments.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise BadRequestError(f"{tag}: {', '.join(unknown)}= is not served (te=, unet= and dyn= are)",
                              code="invalid_lora_tag")  # fmt: skip
    name = positional[0].strip() if positional else ""
    if not name:
        raise BadRequestError(f"{tag}: name the adapter, e.g. <lora:NAME:0.8>", code="invalid_lora_tag")
    te = _multiplier(tag, named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = _multiplier(tag, named.get("unet", positional[2] if len(positional) > 2 else str(te)))
    dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
    if dyn is not None and not dyn.strip().lstrip("+-").isdigit():
        raise BadRequestError(f"{tag}: dyn (DyLoRA's rank) must be an integer, got {dyn!r}", code="invalid_lora_tag")
    return LoraTag(name, te, unet)


def _multiplier(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not abs(value) <= _LIMIT:  # NaN too
        raise BadRequestError(
            f"{tag}: the multipliers must be numbers in [-{_LIMIT:g}, {_LIMIT:g}], got {text!r}",
            code="invalid_lora_tag",
        )
    return value
