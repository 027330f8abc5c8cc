"""Read PEFT adapter directories and LyCORIS / kohya single files; write PEFT directories.

safetensors only: pickle-based files are refused, never opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import CONFIG_NAME, LoKrConfig
from .errors import AdapterFormatError, ConfigError, UnexpectedKeysError, UnsupportedAdapterError
from .functional import FACTOR_NAMES

__all__ = [
    "LYCORIS_PREFIXES",
    "FileRead",
    "ModuleWeights",
    "ParsedAdapter",
    "SafetensorsFile",
    "map_lycoris_stems",
    "read_adapter",
    "read_safetensors",
    "write_peft_dir",
]

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LYCORIS_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te", "lycoris")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_MAX_BYTES = 8 << 30
_OTHER_ADAPTER_KEYS = {
    "lora_up": "LoRA",
    "lora_down": "LoRA",
    "lora_A": "LoRA",
    "lora_B": "LoRA",
    "hada_": "LoHa",
    "oft_": "OFT",
    "dora_scale": "DoRA (LyCORIS weight_decompose)",
    "lora_magnitude_vector": "DoRA",
    "magnitude": "DoRA",
}


@dataclass
class ModuleWeights:
    """The factors for one module, with the scale its format prescribes."""

    tensors: dict[str, Tensor]
    scale: float
    r: int
    alpha: float
    swapped: bool = False  # PEFT's Conv1d layout for a full 3-D w2; decided once the target is known

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class FileRead(NamedTuple):
    """A file as it was read: its length in bytes and the SHA-256 digest of those bytes."""

    size: int
    sha256: bytes


class SafetensorsFile(NamedTuple):
    """A safetensors file read: its tensors (on CPU, in name order), metadata, and what was read (`FileRead`)."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    read: FileRead


@dataclass
class ParsedAdapter:
    """An adapter read from disk, not yet matched to a model.

    `modules` keys are module paths for PEFT; for LyCORIS they are the file's key stems
    (`lora_unet_down_blocks_0_...`), mapped to module paths against a model by `resolve_lycoris_name`.
    """

    format: Literal["peft", "lycoris"]
    source: str
    modules: dict[str, ModuleWeights]
    config: LoKrConfig | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileRead] = field(default_factory=dict)  # tensor file path -> what of it was read

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.modules.values())).tensors.values())).dtype


# ------------------------------------------------------------------------------------------ reading
def read_safetensors(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> SafetensorsFile:
    """All tensors (on CPU), the metadata and the digest of a safetensors file, read once; any defect (a file that
    changes while it is read included) is an AdapterFormatError."""
    _refuse_pickle(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc.strerror}") from exc
    if size == 0:
        raise AdapterFormatError(f"{path} is empty; expected a safetensors file")
    if size > max_bytes:
        raise AdapterFormatError(f"{path} is {size} bytes, over the {max_bytes}-byte limit for adapter files")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:  # checks the header and the offsets
            metadata = dict(handle.metadata() or {})
        data = _read_bytes(path, max_bytes)
        tensors = _tensors_in(data)
    except AdapterFormatError:
        raise
    except Exception as exc:  # safetensors raises several types (SafetensorError, OSError, ...)
        raise AdapterFormatError(f"{path} is not a valid safetensors file: {exc}") from exc
    return SafetensorsFile(tensors, metadata, FileRead(len(data), hashlib.sha256(data).digest()))


def _read_bytes(path: Path, max_bytes: int) -> bytearray:
    """The whole file, read once into memory. Not a map of it: a writer truncating the file in place (`open(path,
    "wb")`, as a training run saving over its checkpoint does) would kill the process with SIGBUS at the next
    read of a mapped page; a read sees the file as it is, and a short one is refused."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise AdapterFormatError(f"{path} is {size} bytes, over the {max_bytes}-byte limit for adapter files")
        data = bytearray(size)
        got = file.readinto(data)
    if got != size:
        raise AdapterFormatError(f"{path} changed while it was read ({got} of {size} bytes); load it again")
    return data


def _tensors_in(data: bytearray) -> dict[str, Tensor]:
    """The tensors of safetensors file bytes `data` (the file's header already checked by `safe_open`), in name
    order, as views of `data`: nothing is copied.

    Not `safe_open(...).get_tensor`: safetensors 0.8 keeps two Python ints alive per tensor read that way, which
    a server reading adapter files again and again accumulates."""
    (length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(bytes(data[8 : 8 + length]))
    tensors = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        dtype, (start, end) = _SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + length + start) if count else None
        tensors[name] = (flat if flat is not None else torch.empty(0, dtype=dtype)).view(entry["shape"])
    return tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedAdapterError(
            f"{path}: {path.suffix} is a pickle checkpoint's suffix, and such files are never opened; only "
            "safetensors files are accepted (convert it with safetensors.torch.save_file in a trusted environment)"
        )


def read_adapter(source: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedAdapter:
    """Read a PEFT adapter directory or a LyCORIS/kohya `.safetensors` file."""
    path = Path(source)
    if path.is_dir():
        return _read_peft_dir(path, max_bytes)
    if path.is_file():
        if path.name == CONFIG_NAME or path.name == WEIGHTS_NAME:
            return _read_peft_dir(path.parent, max_bytes)
        _refuse_pickle(path)
        return _read_lycoris_file(path, max_bytes)
    raise AdapterFormatError(f"adapter source {str(path)!r} does not exist")


def _read_peft_dir(path: Path, max_bytes: int) -> ParsedAdapter:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            raise UnsupportedAdapterError(
                f"{path} holds {pickled[0]} (pickle) but no {WEIGHTS_NAME}; only safetensors adapters are accepted"
            )
        raise _no_weights_error(path)
    try:
        config = LoKrConfig.from_pretrained(path)
    except ConfigError as exc:
        raise ConfigError(f"{path / CONFIG_NAME}: {exc}") from exc
    if config.modules_to_save:
        raise UnsupportedAdapterError(
            f"{path}: modules_to_save ({config.modules_to_save}) replaces whole modules per adapter, "
            "which cannot be switched per request; retrain without modules_to_save"
        )
    tensors, metadata, read = read_safetensors(weights, max_bytes)
    grouped = _group_by_module(tensors, str(weights), strip=PEFT_PREFIX)
    modules = {}
    for name, group in grouped.items():
        if "alpha" in group:
            raise UnexpectedKeysError(f"{weights}: {PEFT_PREFIX}{name}.alpha is not a PEFT LoKr tensor")
        r, alpha = config.rank_for(name), config.alpha_for(name)
        modules[name] = ModuleWeights(group, alpha / r, r, alpha)
    return ParsedAdapter("peft", str(path), modules, config, metadata, {str(weights): read})


def _no_weights_error(path: Path) -> AdapterFormatError:
    """No adapter in `path` itself; PEFT saves every adapter not named "default" in `<dir>/<name>/`: name those."""
    named = sorted(sub.name for sub in path.iterdir() if (sub / WEIGHTS_NAME).is_file())
    if not named:
        return AdapterFormatError(f"{path} has no {WEIGHTS_NAME}")
    shown = ", ".join(named[:10]) + (f" (+{len(named) - 10} more)" if len(named) > 10 else "")
    return AdapterFormatError(
        f"{path} has no {WEIGHTS_NAME}, but {len(named)} of its subfolders hold an adapter: {shown} (PEFT saves "
        f"each adapter not named 'default' in <dir>/<name>/); pass one of them, e.g. {path / named[0]}"
    )


def _read_lycoris_file(path: Path, max_bytes: int) -> ParsedAdapter:
    tensors, metadata, read = read_safetensors(path, max_bytes)
    grouped = _group_by_module(tensors, str(path), strip=None)
    modules = {}
    for stem, group in grouped.items():
        alpha_t = group.pop("alpha", None)
        if "lokr_t2" in group and group["lokr_t2"].dim() == 3:  # Conv1d Tucker core (r, r, k): PEFT's (r, r, k, 1)
            group["lokr_t2"] = group["lokr_t2"].unsqueeze(-1)
        rank = _lycoris_rank(group)
        if rank == 0:
            raise AdapterFormatError(f"{path}: {stem} has a rank-0 factor (an empty tensor); not a usable LoKr module")
        if rank is None:  # both factors full: LyCORIS forces scale 1 whatever alpha says
            modules[stem] = ModuleWeights(group, 1.0, 1, 1.0)
            continue
        alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None and alpha_t.numel() else 0.0
        alpha = alpha or float(rank)  # LyCORIS and kohya read a missing or zero alpha as the rank (scale 1)
        if alpha_t is not None and alpha_t.numel() != 1:
            raise AdapterFormatError(f"{path}: {stem}.alpha must be a scalar, got shape {tuple(alpha_t.shape)}")
        if alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise AdapterFormatError(f"{path}: {stem}.alpha is not finite ({alpha})")
        modules[stem] = ModuleWeights(group, alpha / rank, rank, alpha)
    return ParsedAdapter("lycoris", str(path), modules, None, metadata, {str(path): read})


def _lycoris_rank(group: Mapping[str, Tensor]) -> int | None:
    """LyCORIS's rank: from the decomposed factor (w2 side first), None when both factors are full."""
    for name in ("lokr_t2", "lokr_w2_b", "lokr_w1_b"):
        if name in group and group[name].dim() >= 1:
            return int(group[name].shape[0])
    return None


def _group_by_module(tensors: Mapping[str, Tensor], where: str, strip: str | None) -> dict[str, dict[str, Tensor]]:
    """`{module: {lokr_name: tensor}}`; refuses other adapter kinds and stray keys by name."""
    if not tensors:
        raise AdapterFormatError(f"{where} holds no tensors")
    grouped: dict[str, dict[str, Tensor]] = {}
    stray: list[str] = []
    for key, tensor in tensors.items():
        _refuse_other_kinds(key, where)
        stem, _, leaf = key.rpartition(".")
        if strip is not None:
            if not key.startswith(strip):
                stray.append(key)
                continue
            stem = stem[len(strip) :]
        if leaf not in FACTOR_NAMES and not (strip is None and leaf == "alpha") or not stem:
            stray.append(key)
            continue
        grouped.setdefault(stem, {})[leaf] = tensor
    if stray:
        shown = ", ".join(stray[:5]) + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
        raise UnexpectedKeysError(f"{where}: keys that are not LoKr factors: {shown}")
    return grouped


def _refuse_other_kinds(key: str, where: str) -> None:
    leaf = key.rpartition(".")[2] if not key.endswith(".weight") else key.split(".")[-2]
    for marker, kind in _OTHER_ADAPTER_KEYS.items():
        if leaf.startswith(marker):
            raise UnsupportedAdapterError(f"{where}: key {key!r} belongs to a {kind} adapter; only LoKr is served")


# ------------------------------------------------------------------------------------------ names
def lycoris_name_table(module_names: Iterable[str]) -> dict[str, str | None]:
    """`{prefix_path_with_underscores: dotted name}`; None marks an ambiguous underscore name."""
    table: dict[str, str | None] = {}
    for name in module_names:
        flat = name.replace(".", "_")
        for prefix in LYCORIS_PREFIXES:
            key = f"{prefix}_{flat}"
            table[key] = None if key in table and table[key] != name else name
    return table


def resolve_lycoris_name(stem: str, table: Mapping[str, str | None], module_names: set[str]) -> str | None:
    """The model's module for a LyCORIS key stem; also accepts plain dotted names (ai-toolkit style)."""
    if stem in module_names:
        return stem
    for prefix in ("diffusion_model.", "transformer.", "model."):
        if stem.startswith(prefix) and stem[len(prefix) :] in module_names:
            return stem[len(prefix) :]
    return table.get(stem)


def map_lycoris_stems(parsed: ParsedAdapter, module_names: set[str]) -> dict[str, str | None]:
    """`{key stem: the model's module (None: no such module)}`; refuses a file where two stems name one module.

    Prefixes are interchangeable on one model (`lycoris_x`, `lora_unet_x`; `lora_te1_x`, `lora_te2_x`), so a
    file holding both would silently lose one of them.
    """
    table = lycoris_name_table(module_names)
    mapped = {stem: resolve_lycoris_name(stem, table, module_names) for stem in parsed.modules}
    first: dict[str, str] = {}
    for stem, name in mapped.items():
        if name is None:
            continue
        if name in first:
            raise AdapterFormatError(
                f"{parsed.source}: key stems {first[name]!r} and {stem!r} both name module {name!r} of this "
                "model; keep one of them (a file for one model must not hold two factor sets per module)"
            )
        first[name] = stem
    return mapped


# ------------------------------------------------------------------------------------------ writing
def write_peft_dir(out_dir: str | os.PathLike[str], tensors: Mapping[str, Tensor], config: LoKrConfig) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (keys `base_model.model.<path>.lokr_*`)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    # clone: packed factors are views of one buffer, and safetensors refuses tensors that share memory
    payload = {
        f"{PEFT_PREFIX}{key}": t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for key, t in tensors.items()
    }
    save_file(payload, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    data = config.to_dict()
    data["peft_version"] = "0.21.2"
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
