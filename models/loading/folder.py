"""Local diffusers folders (with `model_index.json`): SDXL inpainting (9-channel UNet) or base (4-channel).

Saved with `save_pretrained`; weights in `.safetensors` (or `.bin`), plain or as an `fp16` / `bf16`
variant, whole or sharded. The VAE's `force_upcast` is kept as loaded (the SDXL VAE overflows in fp16).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import architectures as arch
from models.errors import ModelSpecError
from models.loading.source import (
    MODEL_PARTS,
    TOKENIZER_PARTS,
    fit_tokenizer,
    folder_configs,
    has_tokenizer_files,
    read_json,
    tokenizer_download_hint,
)

if TYPE_CHECKING:
    from models.components import Components

log = logging.getLogger(__name__)

WEIGHTS = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?\.(?P<ext>safetensors|bin)$"
)
WEIGHTS_INDEX = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?P<ext>safetensors|bin)\.index"
    r"(?:\.(?P<variant>\w+))?\.json$"
)
# Preference among complete weight sets: safetensors before pickles, full precision before fp16.
_VARIANT_ORDER = (None, "fp16", "bf16")


@dataclass(frozen=True)
class _WeightSet:
    variant: str | None
    safetensors: bool


def _complete_weight_sets(part_dir: Path) -> list[_WeightSet]:
    """The weight sets in `part_dir` with every file present, most preferred first."""
    if not part_dir.is_dir():
        return []
    sets: set[_WeightSet] = set()
    for f in part_dir.iterdir():
        if m := WEIGHTS.match(f.name):
            sets.add(_WeightSet(m["variant"], m["ext"] == "safetensors"))
        elif m := WEIGHTS_INDEX.match(f.name):
            # A sharded set is only usable if its index and every shard it lists arrived.
            try:
                shards = set(json.loads(f.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                continue
            if all((part_dir / s).is_file() for s in shards):
                sets.add(_WeightSet(m["variant"], m["ext"] == "safetensors"))
    return sorted(sets, key=_weight_set_rank)


def _weight_set_rank(s: _WeightSet) -> tuple[bool, int, str]:
    order = _VARIANT_ORDER.index(s.variant) if s.variant in _VARIANT_ORDER else len(_VARIANT_ORDER)
    return (not s.safetensors, order, s.variant or "")


def folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from loading as an SDXL diffusers pipeline; empty when nothing does."""
    if not (folder / "model_index.json").is_file():
        return ["it has no model_index.json, so it is not a diffusers pipeline folder"]
    problems = []
    index = read_json(folder / "model_index.json")
    for part in (*MODEL_PARTS, *TOKENIZER_PARTS):
        entry = index.get(part)
        if part in index and (not isinstance(entry, list) or entry[0] is None):
            problems.append(
                f"model_index.json declares no {part} (an SDXL refiner or a non-SDXL pipeline?);"
                " beyond needs both SDXL text encoders"
            )
    for part in MODEL_PARTS:
        if not (folder / part / "config.json").is_file():
            problems.append(f"{part}/config.json is missing")
        elif not _complete_weight_sets(folder / part):
            weights = "model" if part.startswith("text") else "diffusion_pytorch_model"
            problems.append(
                f"{part}/ has no complete set of weights ({weights}.safetensors, or an fp16 variant of it);"
                " a download may have been cut short"
            )
    missing_tok = [t for t in TOKENIZER_PARTS if not has_tokenizer_files(folder / t)]
    if missing_tok:
        problems.append(
            f"{' and '.join(t + '/' for t in missing_tok)} missing (need vocab.json + merges.txt or"
            f" tokenizer.json). {tokenizer_download_hint(folder)}"
        )
    unet_cfg = folder / "unet" / "config.json"
    if unet_cfg.is_file():
        cfg = read_json(unet_cfg)
        if cfg.get("in_channels") not in (4, 9):
            problems.append(
                f"its UNet takes {cfg.get('in_channels')} input channels; beyond runs SDXL UNets with 9"
                " (inpainting) or 4 (base)"
            )
        if cfg.get("addition_embed_type") != "text_time":
            problems.append("its UNet has no SDXL text-time conditioning: this is not an SDXL model")
    return problems


def raise_folder_problems(folder: Path, what: str | None = None) -> None:
    problems = folder_problems(folder)
    if problems:
        raise ModelSpecError(
            f"{what or folder} cannot be loaded as an SDXL diffusers folder:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def load_folder(folder: Path, what: str | None = None) -> Components:
    """Load a diffusers folder; `what` names it in errors (a Hub cache snapshot, say)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.components import Components

    raise_folder_problems(folder, what)
    classes = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    models: dict[str, Any] = {}
    for part, cls in classes.items():
        chosen = _complete_weight_sets(folder / part)[0]
        if chosen.variant:
            log.info("loading %s/%s from its %s weights", folder.name, part, chosen.variant)
        kwargs: dict[str, Any] = {"variant": chosen.variant, "use_safetensors": chosen.safetensors}
        if cls.__module__.startswith("diffusers"):
            # diffusers casts on load (and warns about a later .to()).
            kwargs["torch_dtype"] = torch.float32
        model = cls.from_pretrained(str(folder), subfolder=part, local_files_only=True, **kwargs)
        # An fp16 variant can still arrive in half precision (transformers' dtype="auto"): we promise fp32.
        if model.dtype != torch.float32:
            model = model.to(torch.float32)
        models[part] = model.eval()
    tokenizers = [
        fit_tokenizer(
            CLIPTokenizer.from_pretrained(str(folder / part), local_files_only=True),
            models[encoder].config.max_position_embeddings,
        )
        for part, encoder in zip(TOKENIZER_PARTS, ("text_encoder", "text_encoder_2"), strict=True)
    ]
    return Components(
        **models,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler=_folder_scheduler(folder),
    )


def _folder_scheduler(folder: Path) -> Any:
    import diffusers
    from diffusers import EulerDiscreteScheduler

    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        log.warning("%s has no scheduler/scheduler_config.json; using SDXL's standard noise schedule", folder)
        return EulerDiscreteScheduler.from_config(arch.SCHEDULER)
    config = read_json(path)
    # The engine builds each request's sampler from this config; the class only has to accept it.
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = EulerDiscreteScheduler
    return cls.from_config(config)


@dataclass(frozen=True)
class FolderSource:
    """A local diffusers folder."""

    folder: Path

    def check(self) -> None:
        raise_folder_problems(self.folder)

    def load(self, *, progress: bool = True) -> Components:
        return load_folder(self.folder)

    def configs(self) -> dict[str, dict[str, Any]]:
        return folder_configs(self.folder)
