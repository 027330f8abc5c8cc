"""`LoKrConfig` with PEFT's field names and defaults, and PEFT's pattern-key rules."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["CONFIG_NAME", "LoKrConfig", "get_pattern_key"]

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; refuse absurd ones

InitWeights = bool | Literal["lycoris"]
TargetSpec = str | list[str] | set[str] | None

# Fields PEFT writes that carry no LoKr semantics for inference; accepted and kept on round trips.
_PASSTHROUGH_FIELDS = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "modules_to_save",
    "target_parameters",
}


@dataclass
class LoKrConfig:
    """LoKr hyper-parameters, field for field as `peft.LoKrConfig` (peft 0.21.2).

    `target_modules`: a list/set matches a module name exactly or as a dotted suffix, a str is a regex
    `fullmatch`, and "all-linear" targets every `nn.Linear` except the output embedding.
    `rank_pattern` / `alpha_pattern` map a regex suffix of the module name to an override of `r` / `alpha`.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: InitWeights = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    peft_type: str = "LOKR"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_number("alpha", self.alpha)
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            _check_number(name, value)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"`{name}` must be in [0, 1], got {value!r}")
        _check_int("decompose_factor", self.decompose_factor)
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"`init_weights` must be True, False or 'lycoris', got {self.init_weights!r}")
        _check_peft_type(self.peft_type)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        for key, value in self.rank_pattern.items():
            _check_pattern_key("rank_pattern", key)
            _check_int(f"rank_pattern[{key!r}]", value, minimum=1)
        for key, value in self.alpha_pattern.items():
            _check_pattern_key("alpha_pattern", key)
            _check_number(f"alpha_pattern[{key!r}]", value)

    # ----------------------------------------------------------------------------------- patterns
    def rank_for(self, module_name: str) -> int:
        """r for `module_name` (full dotted path), honouring `rank_pattern` like PEFT."""
        key = get_pattern_key(self.rank_pattern.keys(), module_name)
        return int(self.rank_pattern.get(key, self.r))

    def alpha_for(self, module_name: str) -> float:
        """alpha for `module_name`, honouring `alpha_pattern` like PEFT."""
        key = get_pattern_key(self.alpha_pattern.keys(), module_name)
        return float(self.alpha_pattern.get(key, self.alpha))

    def scaling_for(self, module_name: str) -> float:
        """PEFT's scaling `alpha / r` for one module."""
        return self.alpha_for(module_name) / self.rank_for(module_name)

    # ----------------------------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoKrConfig:
        """Build from a PEFT `adapter_config.json` dict; unknown LoKr options are an error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        if "peft_type" not in data:
            raise ConfigError("adapter config has no `peft_type`; expected a PEFT LoKr config ('LOKR')")
        _check_peft_type(data["peft_type"])  # before the options: a LoRA's options are not LoKr's
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _PASSTHROUGH_FIELDS)
        if unknown:
            raise ConfigError(f"unknown LoKr config option(s) {unknown}; known options: {sorted(known)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(name) is None:
                kwargs[name] = {}
            elif not isinstance(kwargs[name], dict):
                raise ConfigError(f"`{name}` must be an object mapping patterns to numbers")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - defensive, dataclass signature mismatch
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LoKrConfig:
        """Read `adapter_config.json` from a PEFT adapter directory (or the file itself)."""
        file = Path(path)
        if file.is_dir():
            file = file / CONFIG_NAME
        if not file.is_file():
            raise ConfigError(f"no {CONFIG_NAME} at {file}")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{file} is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
            raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as `adapter_config.json` (sets become sorted lists)."""
        out = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], set):
                out[name] = sorted(out[name])
        out["peft_type"] = "LOKR"
        return out


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str:
    """PEFT's rule: the first key (in order) with `re.match(rf"(.*\\.)?({key})$", module_name)`.

    Returns `module_name` itself when no key matches (so a dict lookup falls back to the default).
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"`{name}` must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"`{name}` should be a positive integer value but the value passed is {value}")


def _check_peft_type(value: object) -> None:
    if str(value).upper() != "LOKR":
        raise ConfigError(f"this is a {value!r} adapter config; only LoKr adapters (peft_type 'LOKR') are served")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}")
    if value in (float("inf"), float("-inf")):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}")


def _check_pattern_key(name: str, key: object) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"`{name}` keys must be strings (regex suffixes of module names), got {key!r}")
    try:
        re.compile(key)
    except re.error as exc:
        raise ConfigError(f"`{name}` key {key!r} is not a valid regular expression: {exc}") from exc


def _check_targets(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"`{name}` is not a valid regular expression: {exc}") from exc
        return
    if not isinstance(value, (set, list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"`{name}` must be a string (regex) or a list of module names, got {value!r}")
