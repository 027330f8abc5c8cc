"""A1111's ControlNet extension arguments (`alwayson_scripts.controlnet.args`): the one unit this server serves.

Each unit is a dict; the served subset is one enabled unit with a preprocessed control image (`module` "none"),
A1111's resize modes, `weight`, `guidance_start` / `guidance_end` and the "Balanced" control mode. Anything else that
would change the image is a 400 naming it, never a silently other image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BadRequestError

__all__ = ["RESIZE_MODES", "ControlUnit", "control_unit"]

# A1111's ControlNet resize modes (names or their indexes) -> diffusers' `VaeImageProcessor` resize modes
RESIZE_MODES = {"just resize": "default", "crop and resize": "crop", "resize and fill": "fill"}
_RESIZE_INDEX = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}
_NO_PREPROCESSOR = ("none", "")
_BALANCED = ("balanced", 0)
_FIELD = "alwayson_scripts.controlnet"


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: its control image (base64), resize mode (diffusers'), weight and the share of the
    schedule it acts on (`start` to `end`, as diffusers' `control_guidance_start` / `_end`)."""

    image: str
    resize_mode: str = "crop"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


def control_unit(scripts: dict[str, Any] | None) -> ControlUnit | None:
    """The enabled ControlNet unit of A1111's `alwayson_scripts` (None without one); a 400 for other scripts,
    several enabled units, a preprocessor, another control mode or a unit without an image."""
    scripts = {str(k).lower(): v for k, v in (scripts or {}).items()}
    others = sorted(k for k, v in scripts.items() if k != "controlnet" and _has_args(v))
    if others:
        raise BadRequestError(f"alwayson_scripts {others}: extensions other than ControlNet are not served",
                              code="invalid_request")  # fmt: skip
    args = (scripts.get("controlnet") or {}).get("args") or []
    if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
        raise BadRequestError(f"{_FIELD}.args must be a list of ControlNet units (objects)", code="invalid_request")
    enabled = [unit for unit in args if unit.get("enabled", True)]
    if len(enabled) > 1:
        raise BadRequestError(f"{_FIELD}: {len(enabled)} enabled units; this server serves one ControlNet",
                              code="invalid_request")  # fmt: skip
    return _unit(enabled[0]) if enabled else None


def _has_args(script: Any) -> bool:
    return isinstance(script, dict) and bool(script.get("args"))


def _unit(unit: dict[str, Any]) -> ControlUnit:
    module = str(unit.get("module") or "none").lower()
    if module not in _NO_PREPROCESSOR:
        raise BadRequestError(
            f"{_FIELD}: module {unit.get('module')!r}: preprocessors are not served; send the preprocessed control "
            "image (an edge map, a depth map, ...) with module 'none'",
            code="invalid_request",
        )
    mode = unit.get("control_mode", "Balanced")
    if (mode.lower() if isinstance(mode, str) else mode) not in _BALANCED:
        raise BadRequestError(f"{_FIELD}: control_mode {mode!r} is not served; 'Balanced' is",
                              code="invalid_request")  # fmt: skip
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # {"image": b64, "mask": ...}, as newer clients send it
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise BadRequestError(f"{_FIELD}: the unit has no image (base64, in 'image')", code="invalid_request")
    return ControlUnit(image, _resize_mode(unit.get("resize_mode", "Crop and Resize")), _number(unit, "weight", 1.0),
                       _number(unit, "guidance_start", 0.0), _number(unit, "guidance_end", 1.0))  # fmt: skip


def _resize_mode(value: Any) -> str:
    name = _RESIZE_INDEX.get(value) if isinstance(value, int) and not isinstance(value, bool) else value
    mode = RESIZE_MODES.get(str(name).lower())
    if mode is None:
        raise BadRequestError(f"{_FIELD}: resize_mode {value!r}; served: {sorted(RESIZE_MODES)} (or 0, 1, 2)",
                              code="invalid_request")  # fmt: skip
    return mode


def _number(unit: dict[str, Any], key: str, default: float) -> float:
    value = unit.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError(f"{_FIELD}: {key} must be a number, got {value!r}", code="invalid_request")
    return float(value)
