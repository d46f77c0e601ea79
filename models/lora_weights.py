"""LoRAs in the engine: their weights loaded once and cached within a byte budget, and a request's set
merged into the model's own weights in place.

Why merged, in place (rather than a side branch per layer, as PEFT does):
- no cost per denoising step: an active LoRA makes each step exactly as long as without one;
- switching sets only rewrites weights, never the modules or their code, so a `torch.compile`d UNet
  keeps its compiled graphs (weights are inputs of the graph, not constants): hot-swapping for free;
- bit for bit: each layer's weight is recomputed from a copy of the original kept while the layer is
  patched, so a set's weights are the same whatever ran before, and the empty set is the original.
  A LoRA at scale 0 is left out, so it is the model as it is.
The price: a copy of each patched layer's original weight while a set is active (in the model's dtype,
on its device), and the time of a switch (benchmarks/lora.py measures both).

The text encoders and the UNet are patched separately (`LoraPatches` for each): prompts are encoded
while another batch denoises, each part under its own request's set.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.components import Components
from models.lora_files import LoraFile, LoraLibrary
from models.lora_layout import Layout, layout
from models.params import LoraRef

log = logging.getLogger("beyond.loras")
TEXT_PARTS = ("text_encoder", "text_encoder_2")


def model_layout(components: Components) -> Layout:
    """The layout of a loaded model (the same function the HTTP process applies to its configs)."""
    return layout(
        dict(components.unet.config),
        components.text_encoder.config.to_dict(),
        components.text_encoder_2.config.to_dict(),
    )


def layer_modules(components: Components) -> dict[str, nn.Module]:
    """Layer key (models/lora_layout.py) -> the model's Linear or Conv2d module."""
    modules: dict[str, nn.Module] = {}
    for part in ("unet", *TEXT_PARTS):
        for path, module in getattr(components, part).named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                # transformers' CLIPTextModel has its layers at encoder.* or text_model.encoder.*
                # depending on its version; the keys say text_model.encoder.*.
                if part != "unet" and path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
                    path = "text_model." + path
                modules[f"{part}.{path}"] = module
    return modules


@dataclass
class LoraWeights:
    """One LoRA file's factors on the engine's device, per layer: (down, up, alpha / rank)."""

    file: LoraFile
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    nbytes: int

    @classmethod
    def load(cls, file: LoraFile, device: torch.device, dtype: torch.dtype) -> LoraWeights:
        from safetensors import safe_open

        layers = {}
        nbytes = 0
        with safe_open(str(file.path), framework="pt", device="cpu") as f:
            for layer in file.layers:
                down = f.get_tensor(layer.down).to(device, dtype)
                up = f.get_tensor(layer.up).to(device, dtype)
                if layer.alpha is not None:
                    alpha = float(f.get_tensor(layer.alpha).float().reshape(()))
                else:
                    alpha = layer.default_alpha if layer.default_alpha is not None else float(layer.rank)
                layers[layer.key] = (down, up, alpha / layer.rank)
                nbytes += down.numel() * down.element_size() + up.numel() * up.element_size()
        if device.type == "cuda":
            # Loaded on one thread's stream, used on another's: done before anyone reads them.
            torch.cuda.current_stream(device).synchronize()
        return cls(file, layers, nbytes)


class LoraCache:
    """Loaded LoRAs, least recently used first out, within `budget` bytes of factors."""

    def __init__(self, library: LoraLibrary, device: torch.device, dtype: torch.dtype, budget: int) -> None:
        self.library = library
        self.device, self.dtype = device, dtype
        self.budget = budget
        self._entries: OrderedDict[tuple, LoraWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # files read so far (for tests and benchmarks)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def names(self) -> list[str]:
        """The cached LoRAs, least recently used first."""
        with self._lock:
            return [entry.file.name for entry in self._entries.values()]

    def get(self, name: str) -> LoraWeights:
        file = self.library.read(name)  # checks the file again: it may have changed or gone
        key = file.identity
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        entry = LoraWeights.load(file, self.device, self.dtype)
        with self._lock:
            self.loads += 1
            for older in [k for k, e in self._entries.items() if e.file.name == name]:
                del self._entries[older]  # an earlier version of the file
            self._entries[key] = entry
            self._entries.move_to_end(key)
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.budget and self._entries:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
                log.info(
                    "LoRA cache: dropped %s (%d bytes) to stay within %d",
                    evicted.file.name,
                    evicted.nbytes,
                    self.budget,
                )
        return entry


def canonical(refs: Iterable[LoraRef]) -> tuple[tuple[str, float], ...]:
    """A set as the engine applies it: by name, without the LoRAs at scale 0 (they change nothing)."""
    return tuple(sorted((ref.name, float(ref.scale)) for ref in refs if ref.scale != 0))


# What a set's patches are made of: each LoRA's (name, scale, file identity), in canonical order.
SetKey = tuple[tuple[str, float, tuple[str, int, int]], ...]


class LoraPatches:
    """The LoRA set applied to some of the model's layers, changed in place by `apply`."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.active: SetKey = ()
        self._originals: dict[str, torch.Tensor] = {}  # layer key -> its weight before any patch
        self._cuda = any(module.weight.is_cuda for module in modules.values())

    @property
    def patched(self) -> int:
        """Bytes of original weights kept while the current set is applied."""
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    @torch.no_grad()
    def apply(self, key: SetKey, weights: list[LoraWeights]) -> None:
        """Make the layers those of the original model plus, for each LoRA of `key` (canonical order),
        its scale times its update; `weights` are the loaded LoRAs in the same order."""
        if key == self.active:
            return
        try:
            self._apply(key, weights)
        except BaseException:
            # Half a set is no set: back to the original model, then the error.
            self._apply((), [])
            raise

    def _apply(self, key: SetKey, weights: list[LoraWeights]) -> None:
        updates: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for (_, scale, _), lora in zip(key, weights, strict=True):
            for layer, (down, up, factor) in lora.layers.items():
                if layer in self.modules:
                    updates.setdefault(layer, []).append((down, up, scale * factor))
        # Layers patched now and not by the new set get their original weight back.
        for layer in [layer for layer in self._originals if layer not in updates]:
            self.modules[layer].weight.copy_(self._originals.pop(layer))
        for layer, parts in updates.items():
            weight = self.modules[layer].weight
            original = self._originals.get(layer)
            if original is None:
                original = self._originals[layer] = weight.detach().clone()
            merged = original.to(torch.float32, copy=True)
            for down, up, factor in parts:
                update = up.float().flatten(1) @ down.float().flatten(1)
                merged.add_(update.reshape(merged.shape), alpha=factor)
            weight.copy_(merged)
        if self._cuda:
            # Done before returning: the factors read here may be evicted and their memory reused by
            # the next LoRA loaded, on another thread's stream.
            torch.cuda.current_stream().synchronize()
        self.active = key


class EngineLoras:
    """The engine's LoRAs: one cache, and the patches of the text encoders and of the UNet."""

    def __init__(
        self, library: LoraLibrary, components: Components, device: torch.device, dtype: torch.dtype, budget: int
    ) -> None:
        self.library = library
        self.cache = LoraCache(library, device, dtype, budget)
        modules = layer_modules(components)
        self.text = LoraPatches({k: m for k, m in modules.items() if k.split(".", 1)[0] in TEXT_PARTS})
        self.unet = LoraPatches({k: m for k, m in modules.items() if k.startswith("unet.")})
        self._text_lock = threading.Lock()

    def check(self, refs: Iterable[LoraRef]) -> None:
        """Raise a LoraError if a LoRA of the set cannot be used (read its header; cheap once seen)."""
        self.library.check(refs)

    def _key(self, refs: Iterable[LoraRef]) -> SetKey:
        # With each file's identity: a file replaced on disk is a new set (and is read again).
        return tuple((name, scale, self.library.read(name).identity) for name, scale in canonical(refs))

    def _weights(self, key: SetKey) -> list[LoraWeights]:
        return [self.cache.get(name) for name, _, _ in key]

    @contextmanager
    def text_encoders(self, refs: Iterable[LoraRef]) -> Iterator[None]:
        """The text encoders under this set for as long as the block runs (prompts are encoded on
        another thread than the denoising, one at a time)."""
        key = self._key(refs)
        with self._text_lock:
            if key != self.text.active:
                self.text.apply(key, self._weights(key))
            yield

    def activate_unet(self, refs: Iterable[LoraRef]) -> None:
        """The UNet under this set, from now on (the denoising thread's)."""
        key = self._key(refs)
        if key != self.unet.active:
            self.unet.apply(key, self._weights(key))
