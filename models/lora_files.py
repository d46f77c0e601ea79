"""LoRA files: the folder that holds them, what each one is, and whether it fits the model.

Torch-free: the HTTP process reads only a file's safetensors header (names, shapes, dtypes, metadata)
to refuse an unknown name or an unusable file before a job is queued; the engine reads the weights
through the same description (models/lora_weights.py).

Two formats are read (models/lora_layout.py has their layer names):
- kohya / A1111: `<layer>.lora_down.weight` (rank x in), `<layer>.lora_up.weight` (out x rank) and
  `<layer>.alpha`; the update is up @ down * alpha / rank (alpha missing: rank).
- diffusers / PEFT: `<layer>.lora_A.weight` (down) and `<layer>.lora_B.weight` (up), or the older
  `<layer>.lora.down.weight` / `.lora.up.weight`; alpha from `<layer>.alpha`, or from the
  `lora_adapter_metadata` diffusers writes (`<part>.lora_alpha`, `<part>.alpha_pattern`), else rank.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import InvalidLoraName, LoraFileError, NoLoraFolder, UnknownLora
from models.lora_layout import PARTS, Layout, Shape
from models.params import LoraRef

SUFFIX = ".safetensors"
KOHYA, DIFFUSERS = "kohya", "diffusers"
# Tensor name endings -> (format, role) of a layer's tensors.
_ROLES = (
    (".lora_down.weight", KOHYA, "down"),
    (".lora_up.weight", KOHYA, "up"),
    (".lora_A.weight", DIFFUSERS, "down"),
    (".lora_B.weight", DIFFUSERS, "up"),
    (".lora.down.weight", DIFFUSERS, "down"),
    (".lora.up.weight", DIFFUSERS, "up"),
    (".alpha", None, "alpha"),
)
# Weights of LoRA variants (LyCORIS LoHa, LoKr, Tucker; DoRA) that are not plain low-rank updates.
_VARIANTS = re.compile(r"\.(hada_|lokr_|lora_mid\.|dora_scale|diff\b|diff_b\b)")
_FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_METADATA = "lora_adapter_metadata"
# A name is a file name of the folder without its suffix: no folders, no control characters.
_NAME = re.compile(r"[^/\\\x00-\x1f]{1,200}")


@dataclass(frozen=True)
class LoraLayer:
    """One layer a LoRA updates: the model's layer key and the file's tensors for it."""

    key: str  # models/lora_layout.py's key, e.g. unet.down_blocks.1.attentions.0.proj_in
    down: str  # tensor names in the file
    up: str
    alpha: str | None  # a scalar tensor, or None (then `alpha` below, else the rank)
    rank: int
    default_alpha: float | None = None  # from the file's metadata (diffusers/PEFT)


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file holds, from its header."""

    name: str
    path: Path
    size: int  # bytes on disk
    mtime_ns: int
    format: str  # KOHYA or DIFFUSERS
    layers: tuple[LoraLayer, ...]

    @property
    def identity(self) -> tuple[str, int, int]:
        """Changes when the file is replaced."""
        return str(self.path), self.mtime_ns, self.size

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts it updates (unet, text_encoder, text_encoder_2), in that order."""
        touched = {layer.key.split(".", 1)[0] for layer in self.layers}
        return tuple(part for part in PARTS if part in touched)


def check_name(name: str) -> None:
    """Raise InvalidLoraName for anything but a plain file name (the folder's own files are the only ones)."""
    if not _NAME.fullmatch(name) or name in (".", "..") or name.startswith(".") or name != name.strip():
        raise InvalidLoraName(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's \ud800): no file is named so
        raise InvalidLoraName(name) from None


def read_file(name: str, path: Path, layout: Layout) -> LoraFile:
    """Describe the LoRA file at `path` from its header; LoraFileError says why it cannot be used here."""
    from safetensors import SafetensorError, safe_open

    try:
        stat = path.stat()
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}  # noqa: SIM118 - a safe_open handle is no dict
    except (OSError, SafetensorError) as exc:
        raise LoraFileError(name, f"not a readable .safetensors file ({_one_line(exc)})") from None
    kind, layers = describe(tensors, metadata, layout, name)
    return LoraFile(name, path, stat.st_size, stat.st_mtime_ns, kind, layers)


def describe(
    tensors: Mapping[str, tuple[str, Shape]], metadata: Mapping[str, str], layout: Layout, name: str
) -> tuple[str, tuple[LoraLayer, ...]]:
    """The format and layers of a LoRA from its tensors' (dtype, shape) and metadata."""
    if not tensors:
        raise LoraFileError(name, "the file holds no tensors")
    variant = next((key for key in tensors if _VARIANTS.search(key)), None)
    if variant is not None:
        raise LoraFileError(
            name,
            f"it is not a plain LoRA (tensor {variant!r}: LyCORIS LoHa/LoKr, Tucker or DoRA); only low-rank"
            " updates (lora_down/lora_up or lora_A/lora_B) are supported",
        )
    roles: dict[str, dict[str, str]] = {}
    formats: set[str] = set()
    for key, (dtype, _) in tensors.items():
        found = next(((layer_of, kind, role) for layer_of, kind, role in _ROLES if key.endswith(layer_of)), None)
        if found is None:
            raise LoraFileError(name, f"tensor {key!r} is not a LoRA weight (lora_down/lora_up or lora_A/lora_B)")
        ending, kind, role = found
        if dtype not in _FLOATS:
            raise LoraFileError(name, f"tensor {key!r} is {dtype}, not a floating-point type")
        if kind is not None:
            formats.add(KOHYA if key.startswith("lora_") else kind)
        roles.setdefault(key[: -len(ending)], {})[role] = key
    if len(formats) != 1:
        if not formats:
            raise LoraFileError(name, "it holds no LoRA weights (lora_down/lora_up or lora_A/lora_B)")
        raise LoraFileError(name, "it mixes kohya and diffusers layer names")
    (kind,) = formats
    alphas = _metadata_alphas(metadata)

    layers = []
    unknown = []
    for layer_name, found in roles.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise LoraFileError(name, f"layer {layer_name!r} has no {missing} weight")
        key = layout.layer(layer_name)
        if key is None:
            unknown.append(layer_name)
            continue
        down, up = tensors[found["down"]][1], tensors[found["up"]][1]
        alpha = found.get("alpha")
        if alpha is not None and tensors[alpha][1] not in ((), (1,)):
            raise LoraFileError(name, f"tensor {alpha!r} is not a single number")
        problem = _misfit(layout.shapes[key], down, up)
        if problem:
            raise LoraFileError(name, f"made for another model: layer {key!r} {problem}")
        layers.append(LoraLayer(key, found["down"], found["up"], alpha, down[0], _alpha_of(key, alphas)))
    if unknown:
        raise LoraFileError(
            name,
            f"made for another model: {len(unknown)} of its {len(roles)} layers are no layer of this SDXL model"
            f" (first: {sorted(unknown)[0]!r})",
        )
    return kind, tuple(sorted(layers, key=lambda layer: layer.key))


def _misfit(module: Shape, down: Shape, up: Shape) -> str | None:
    """Why low-rank factors of these shapes cannot update a weight of shape `module`, or None."""
    out, inputs, kernel = module[0], module[1], module[2:]
    point = kernel in ((), (1, 1))
    fits = (
        len(down) >= 2
        and len(up) >= 2
        and down[1] == inputs
        and up[0] == out
        and up[1] == down[0]
        and (down[2:] == kernel or (point and down[2:] in ((), (1, 1))))
        and up[2:] in ((), (1, 1))
    )
    if fits:
        return None
    here = "x".join(str(d) for d in module)
    theirs = f"{'x'.join(str(d) for d in up)} @ {'x'.join(str(d) for d in down)}"
    return f"has a {here} weight here; the LoRA's factors are {theirs}"


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' adapter metadata: {"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}."""
    raw = metadata.get(_METADATA)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _alpha_of(key: str, alphas: Mapping[str, Any]) -> float | None:
    part, path = key.split(".", 1)
    pattern = alphas.get(f"{part}.alpha_pattern") or {}
    # PEFT's rule: a pattern names a module by the end of its path.
    for name, value in pattern.items() if isinstance(pattern, dict) else ():
        if re.fullmatch(rf"(.*\.)?{name}", path):
            return float(value)
    value = alphas.get(f"{part}.lora_alpha")
    return float(value) if isinstance(value, int | float) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class LoraLibrary:
    """The LoRA folder: its files by name, each described once per version of the file.

    `layout` is the served model's (models/lora_layout.py): a file must fit it to be used. Names are
    looked up as file names in the folder itself, never as paths.
    """

    def __init__(self, folder: Path | None, layout: Layout | None) -> None:
        self.folder = folder
        self.layout = layout
        self._lock = threading.Lock()
        self._described: dict[str, tuple[tuple[int, int], LoraFile | LoraFileError]] = {}

    @property
    def configured(self) -> bool:
        return self.folder is not None

    def path_of(self, name: str) -> Path:
        if self.folder is None:
            raise NoLoraFolder()
        check_name(name)
        path = self.folder / f"{name}{SUFFIX}"
        if not path.is_file():
            raise UnknownLora(name)
        return path

    def read(self, name: str) -> LoraFile:
        """The file of LoRA `name`, described; UnknownLora, InvalidLoraName or LoraFileError if it cannot be used."""
        path = self.path_of(name)
        try:
            stat = path.stat()
        except OSError:
            raise UnknownLora(name) from None
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known = self._described.get(name)
        if known is None or known[0] != version:
            try:
                known = (version, read_file(name, path, self._layout()))
            except LoraFileError as exc:
                known = (version, exc)
            with self._lock:
                self._described[name] = known
        if isinstance(known[1], LoraFileError):
            raise known[1]
        return known[1]

    def check(self, refs: Iterable[LoraRef]) -> None:
        """Raise a LoraError for the first LoRA of a request that cannot be used (named twice included)."""
        seen: set[str] = set()
        for ref in refs:
            if ref.name in seen:
                raise LoraFileError(ref.name, "it is named twice in the request")
            seen.add(ref.name)
            self.read(ref.name)

    def describe(self) -> list[dict[str, Any]]:
        """Every LoRA of the folder: name, size in bytes, format, and why it cannot be used when it cannot."""
        if self.folder is None:
            return []
        try:
            entries = sorted(os.scandir(self.folder), key=lambda entry: entry.name)
        except OSError:
            return []
        listed = []
        for entry in entries:
            name = entry.name[: -len(SUFFIX)]
            if not entry.name.endswith(SUFFIX) or entry.name.startswith(".") or not entry.is_file():
                continue
            item: dict[str, Any] = {"name": name, "size": entry.stat().st_size, "format": None}
            try:
                found = self.read(name)
            except (LoraFileError, InvalidLoraName) as exc:
                item["error"] = exc.reason if isinstance(exc, LoraFileError) else str(exc)
            except UnknownLora:  # gone since the listing
                continue
            else:
                item["format"] = found.format
                item["parts"] = list(found.parts)
            listed.append(item)
        return listed

    def _layout(self) -> Layout:
        if self.layout is None:
            raise RuntimeError("a LoRA library needs the model's layout to check files")
        return self.layout
