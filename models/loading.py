"""Turn a model spec (what `--model` / BEYOND_MODEL says) into `Components`.

Accepted specs:

- `random:tiny`, `random:sdxl`: seeded random weights, no files at all (see `models.random_models`).
- a local diffusers folder (with `model_index.json`): an SDXL inpainting (9-channel UNet) or base
  (4-channel UNet) pipeline, saved with `save_pretrained`. Weights in `.safetensors` (or `.bin`), plain
  or as an `fp16` / `bf16` variant.
- a single SDXL checkpoint `.safetensors` in the original (SGM / ComfyUI / A1111) key layout. No hub
  call: the component configurations come from the tensor shapes (see `_single_file_plan`), and the
  tokenizers, which such files do not hold, from a local folder (see `_find_tokenizers`).
- a Hugging Face Hub id `owner/name` in diffusers layout: used from the local cache when it is there,
  else downloaded into it (only the files the engine needs, the `fp16` variant when the repo has one).

Everything comes back in fp32 on the CPU; the engine moves and casts. The SDXL VAE overflows in fp16:
its config says so with `force_upcast=True`, which is kept as loaded (the engine then runs the VAE in
fp32). A single-file checkpoint gets `force_upcast=True` too, unless its sidecar says otherwise.

`check_spec` is the cheap pre-flight that `beyond serve` runs before starting: it reads only JSON,
file names and the safetensors header (never torch), and raises `ModelSpecError` for a spec that
cannot possibly load. The error messages are for people: they say what is wrong and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import architectures as arch
from models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from models.components import Components

__all__ = ["DEFAULT_MODEL", "ModelSpecError", "check_spec", "load_components"]

log = logging.getLogger(__name__)

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
TOKENIZER_DIR_ENV = "BEYOND_TOKENIZER_DIR"
# Single files have no tokenizers; these repos' cached copies have the right ones, in this order.
TOKENIZER_REPOS = (SDXL_BASE_REPO, DEFAULT_MODEL)

# Spelled out rather than imported: models.random_models imports torch, and check_spec must not.
RANDOM_SPECS = ("random:tiny", "random:sdxl")
_MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_TOKENIZER_PARTS = ("tokenizer", "tokenizer_2")
_SIDECAR_KEYS = (*_MODEL_PARTS, "scheduler")

# Key prefixes of the original SDXL checkpoint layout.
_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_TE1 = "conditioner.embedders.0.transformer."
_TE2 = "conditioner.embedders.1.model."

_ENV_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
_WEIGHTS = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?\.(?P<ext>safetensors|bin)$"
)
_WEIGHTS_INDEX = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)\.(?P<ext>safetensors|bin)\.index"
    r"(?:\.(?P<variant>\w+))?\.json$"
)
_SHARD = re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(\w+))?-\d+-of-\d+\.safetensors$")
# Preference among complete weight sets: safetensors before pickles, full precision before fp16.
_VARIANT_ORDER = (None, "fp16", "bf16")


class ModelSpecError(Exception):
    """The model spec cannot be loaded. The message says why and what to do; it needs no traceback."""


ACCEPTED_FORMS = (
    "Accepted model specs:\n"
    "  - random:tiny or random:sdxl (random weights, for tests and timing)\n"
    "  - a local diffusers folder (holding model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,"
    " tokenizer/, tokenizer_2/, scheduler/)\n"
    "  - a single SDXL checkpoint file ending in .safetensors (original SGM/ComfyUI/A1111 layout)\n"
    f"  - a Hugging Face Hub id such as {DEFAULT_MODEL}"
)


# --------------------------------------------------------------------------------------------------
# Public API


def load_components(spec: str, *, progress: bool = True) -> Components:
    """Load the model that `spec` names, in fp32 on the CPU. `progress` shows download progress bars."""
    kind, target = _classify(spec)
    if kind == "random":
        from models.random_models import build_random

        return build_random(target)
    if kind == "folder":
        return _load_folder(Path(target))
    if kind == "file":
        return _load_single_file(_single_file_plan(Path(target)))
    return _load_hub(target, progress=progress)


def check_spec(spec: str) -> None:
    """Raise `ModelSpecError` if `spec` cannot possibly load. Cheap: no torch, no weights read."""
    kind, target = _classify(spec)
    if kind == "folder":
        _raise_folder_problems(Path(target))
    elif kind == "file":
        _single_file_plan(Path(target))
    elif kind == "hub":
        _check_hub(target)


# --------------------------------------------------------------------------------------------------
# Telling the forms apart


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in {".safetensors", ".json", *_PICKLE_SUFFIXES}
    )


def _classify(spec: str) -> tuple[str, str]:
    """("random" | "folder" | "file" | "hub", what to load); raises ModelSpecError for anything else."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelSpecError(f"No model given.\n{ACCEPTED_FORMS}")
    if spec.startswith("random:"):
        if spec not in RANDOM_SPECS:
            raise ModelSpecError(f"Unknown random model {spec!r}.\n{ACCEPTED_FORMS}")
        return "random", spec
    path = Path(os.path.expanduser(spec))
    # A folder or file that exists wins over a Hub id of the same spelling ("models/sdxl").
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return "file", str(path)
        if suffix in _PICKLE_SUFFIXES:
            raise ModelSpecError(
                f"{path} is a pickle checkpoint ({suffix}); beyond loads only .safetensors files, because"
                " unpickling can run arbitrary code. Convert it to .safetensors (for example with"
                " safetensors.torch.save_file on its state dict) or use a diffusers folder."
            )
        raise ModelSpecError(f"{path} is a file but not a .safetensors checkpoint.\n{ACCEPTED_FORMS}")
    if _looks_like_path(spec):
        raise ModelSpecError(
            f"No such file or folder: {path.resolve()}\n"
            "Check the path (relative paths are taken from the directory beyond was started in).\n"
            f"{ACCEPTED_FORMS}"
        )
    if _REPO_ID.match(spec) and ".." not in spec and "--" not in spec:
        return "hub", spec
    raise ModelSpecError(
        f"{spec!r} is neither a local file or folder nor a Hugging Face Hub id.\n{ACCEPTED_FORMS}"
    )


# --------------------------------------------------------------------------------------------------
# Diffusers folders


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
        if m := _WEIGHTS.match(f.name):
            sets.add(_WeightSet(m["variant"], m["ext"] == "safetensors"))
        elif m := _WEIGHTS_INDEX.match(f.name):
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


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} does not hold a JSON object.")
    return data


def _folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from loading as an SDXL diffusers pipeline; empty when nothing does."""
    if not (folder / "model_index.json").is_file():
        return ["it has no model_index.json, so it is not a diffusers pipeline folder"]
    problems = []
    index = _read_json(folder / "model_index.json")
    for part in (*_MODEL_PARTS, *_TOKENIZER_PARTS):
        entry = index.get(part)
        if part in index and (not isinstance(entry, list) or entry[0] is None):
            problems.append(
                f"model_index.json declares no {part} (an SDXL refiner or a non-SDXL pipeline?);"
                " beyond needs both SDXL text encoders"
            )
    for part in _MODEL_PARTS:
        if not (folder / part / "config.json").is_file():
            problems.append(f"{part}/config.json is missing")
        elif not _complete_weight_sets(folder / part):
            weights = "model" if part.startswith("text") else "diffusion_pytorch_model"
            problems.append(
                f"{part}/ has no complete set of weights ({weights}.safetensors, or an fp16 variant of it);"
                " a download may have been cut short"
            )
    missing_tok = [t for t in _TOKENIZER_PARTS if not _has_tokenizer_files(folder / t)]
    if missing_tok:
        problems.append(
            f"{' and '.join(t + '/' for t in missing_tok)} missing (need vocab.json + merges.txt or"
            f" tokenizer.json). The SDXL tokenizers are in {SDXL_BASE_REPO}; on a connected machine:"
            f" `hf download {SDXL_BASE_REPO} --include 'tokenizer/*' 'tokenizer_2/*' --local-dir {folder}`"
        )
    unet_cfg = folder / "unet" / "config.json"
    if unet_cfg.is_file():
        cfg = _read_json(unet_cfg)
        if cfg.get("in_channels") not in (4, 9):
            problems.append(
                f"its UNet takes {cfg.get('in_channels')} input channels; beyond runs SDXL UNets with 9"
                " (inpainting) or 4 (base)"
            )
        if cfg.get("addition_embed_type") != "text_time":
            problems.append("its UNet has no SDXL text-time conditioning: this is not an SDXL model")
    return problems


def _raise_folder_problems(folder: Path, what: str | None = None) -> None:
    problems = _folder_problems(folder)
    if problems:
        raise ModelSpecError(
            f"{what or folder} cannot be loaded as an SDXL diffusers folder:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _load_folder(folder: Path, what: str | None = None) -> Components:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.components import Components

    _raise_folder_problems(folder, what)
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
        _fit_tokenizer(
            CLIPTokenizer.from_pretrained(str(folder / part), local_files_only=True),
            models[encoder].config.max_position_embeddings,
        )
        for part, encoder in zip(_TOKENIZER_PARTS, ("text_encoder", "text_encoder_2"), strict=True)
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
    config = _read_json(path)
    # The engine builds each request's sampler from this config; the class only has to accept it.
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = EulerDiscreteScheduler
    return cls.from_config(config)


def _fit_tokenizer(tokenizer: CLIPTokenizer, positions: int) -> CLIPTokenizer:
    # A tokenizer built from bare vocab/merges files reports an "unlimited" length; SDXL's text
    # encoders have 77 positions and the prompt code pads to model_max_length.
    if not tokenizer.model_max_length or tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Single-file checkpoints


@dataclass
class _SingleFilePlan:
    path: Path
    configs: dict[str, dict[str, Any]]  # unet, vae, text_encoder, text_encoder_2, scheduler
    tokenizer_dirs: tuple[Path, Path]
    tokenizer_source: str


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header (8-byte length, then JSON): cheap, and torch-free."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("the file is too short")
            length = int.from_bytes(head, "little")
            if not 2 <= length <= min(size - 8, 200_000_000):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelSpecError(
            f"{path} is not a readable .safetensors file ({exc}). Is the download complete?"
        ) from exc


def _single_file_plan(path: Path) -> _SingleFilePlan:
    """Everything needed to load `path`, found without reading a weight: configs and tokenizers."""
    shapes = _read_safetensors_shapes(path)
    _check_sdxl_layout(path, shapes)
    sidecar = _read_sidecar(path)
    try:
        te2 = _resolve(path, "text_encoder_2", _infer_open_clip(shapes), sidecar, _TE2_KNOWN, _te2_fallback)
        te1 = _resolve(path, "text_encoder", _infer_clip(shapes), sidecar, _TE1_KNOWN, _te1_fallback)
        unet = _resolve(
            path, "unet", _infer_unet(shapes, te2["projection_dim"]), sidecar, _UNET_KNOWN, _unet_fallback
        )
        vae = _resolve(path, "vae", _infer_vae(shapes), sidecar, _VAE_KNOWN, _vae_fallback)
    except ModelSpecError as exc:
        if str(path) in str(exc):
            raise
        raise ModelSpecError(f"{path}: {exc}") from exc
    if unet["in_channels"] not in (4, 9):
        raise ModelSpecError(
            f"{path}: its UNet takes {unet['in_channels']} input channels; beyond runs SDXL UNets with 9"
            " (inpainting) or 4 (base)."
        )
    scheduler = dict(arch.SCHEDULER)
    # ComfyUI's markers for v-prediction and zero-terminal-SNR checkpoints (empty tensors).
    if "v_pred" in shapes:
        scheduler["prediction_type"] = "v_prediction"
    if "ztsnr" in shapes:
        scheduler["rescale_betas_zero_snr"] = True
    scheduler.update(sidecar.get("scheduler", {}))
    dirs, source = _find_tokenizers(path)
    return _SingleFilePlan(
        path=path,
        configs={
            "unet": unet,
            "vae": vae,
            "text_encoder": te1,
            "text_encoder_2": te2,
            "scheduler": scheduler,
        },
        tokenizer_dirs=dirs,
        tokenizer_source=source,
    )


def _check_sdxl_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("cond_stage_model."):
        raise ModelSpecError(
            f"{path} is a Stable Diffusion 1.x/2.x checkpoint; beyond runs SDXL models only."
        )
    if has("conditioner.embedders.0.model.") and not has(_TE1):
        raise ModelSpecError(
            f"{path} is an SDXL refiner checkpoint; beyond needs an SDXL base or inpainting one."
        )
    if has("down_blocks.") or has("unet.down_blocks."):
        raise ModelSpecError(
            f"{path} holds weights in diffusers layout, not a whole original-layout SDXL checkpoint;"
            " use the diffusers folder it came from instead."
        )
    missing = [
        what
        for prefix, what in (
            (_UNET, f"a UNet ({_UNET}*)"),
            (_VAE, f"a VAE ({_VAE}*)"),
            (_TE1, f"the CLIP ViT-L text encoder ({_TE1}*)"),
            (_TE2, f"the OpenCLIP ViT-bigG text encoder ({_TE2}*)"),
        )
        if not has(prefix)
    ]
    if missing:
        raise ModelSpecError(
            f"{path} is not a complete SDXL checkpoint in the original layout: it has no "
            + ", no ".join(missing)
            + ". Files without a baked-in VAE or text encoders (UNet-only files, LoRAs) cannot be served;"
            " use a full checkpoint or a diffusers folder."
        )


def _read_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """`<file>.json` beside the checkpoint: {"unet": {...}, "vae": {...}, ...} config overrides."""
    sidecar_path = _sidecar_path(path)
    if not sidecar_path.is_file():
        return {}
    data = _read_json(sidecar_path)
    unknown = sorted(set(data) - set(_SIDECAR_KEYS))
    if unknown or not all(isinstance(v, dict) for v in data.values()):
        raise ModelSpecError(
            f"{sidecar_path} must be a JSON object whose keys are among {', '.join(_SIDECAR_KEYS)}, each"
            f" holding config overrides (an object); found {', '.join(unknown) or 'a non-object value'}."
        )
    return data


def _shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise ModelSpecError(
            f"The checkpoint lacks {key}: it is not a standard SDXL checkpoint in the original layout,"
            " or it is truncated."
        ) from None


def _numbered(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[int]:
    """The distinct n of keys `prefix + "<n>." ...`, sorted."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _infer_unet(shapes: dict[str, tuple[int, ...]], text_embed_dim: int) -> dict[str, Any]:
    """The UNet config fields that tensor shapes determine."""
    p = _UNET
    levels: list[list[int]] = [[]]  # ids of the input blocks holding a ResNet, per resolution level
    for n in _numbered(shapes, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{n}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(n)
    layers = {len(level) for level in levels}
    if len(layers) != 1 or 0 in layers:
        raise ModelSpecError("The checkpoint's UNet does not have the same number of layers on every level.")
    depth = [len(_numbered(shapes, p + f"input_blocks.{lv[0]}.1.transformer_blocks.")) for lv in levels]
    attn_block = next((lv[0] for lv, d in zip(levels, depth, strict=True) if d), None)
    if attn_block is None:
        raise ModelSpecError("The checkpoint's UNet has no cross-attention: it is not an SDXL UNet.")
    attn = p + f"input_blocks.{attn_block}.1."
    add_in = _shape(shapes, p + "label_emb.0.0.weight")[1]
    add_time, rest = divmod(add_in - text_embed_dim, 6)  # 6 size/crop numbers, each Fourier-embedded
    if rest or add_time <= 0:
        raise ModelSpecError(
            "The checkpoint's UNet text-time embedding does not fit its second text encoder."
        )
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    return {
        "in_channels": _shape(shapes, p + "input_blocks.0.0.weight")[1],
        "out_channels": _shape(shapes, p + "out.2.weight")[0],
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "block_out_channels": [
            _shape(shapes, p + f"input_blocks.{lv[0]}.0.out_layers.3.weight")[0] for lv in levels
        ],
        "layers_per_block": layers.pop(),
        # diffusers wants an entry for attention-free levels too; SDXL's config puts 1 there.
        "transformer_layers_per_block": [d or 1 for d in depth],
        "cross_attention_dim": _shape(shapes, attn + "transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(_shape(shapes, attn + "proj_in.weight")) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": add_time,
        "projection_class_embeddings_input_dim": add_in,
    }


def _infer_vae(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    p = _VAE
    levels = _numbered(shapes, p + "encoder.down.")
    if not levels:
        raise ModelSpecError("The checkpoint's VAE has no encoder levels.")
    return {
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(shapes, p + "post_quant_conv.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [
            _shape(shapes, p + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels
        ],
        "layers_per_block": len(_numbered(shapes, p + "encoder.down.0.block.")),
    }


def _infer_clip(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    p = _TE1 + "text_model."
    vocab, hidden = _shape(shapes, p + "embeddings.token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": len(_numbered(shapes, p + "encoder.layers.")),
        "max_position_embeddings": _shape(shapes, p + "embeddings.position_embedding.weight")[0],
    }


def _infer_open_clip(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    p = _TE2
    vocab, hidden = _shape(shapes, p + "token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_hidden_layers": len(_numbered(shapes, p + "transformer.resblocks.")),
        "max_position_embeddings": _shape(shapes, p + "positional_embedding")[0],
        # OpenCLIP stores the projection as (width, embed_dim), applied as x @ P.
        "projection_dim": _shape(shapes, p + "text_projection")[1],
    }


# Fields that shapes fix and that tell one known architecture from another. The rest of a known
# architecture's config (attention heads, group-norm groups, activation, VAE scaling) leaves no trace
# in the shapes, so a checkpoint that matches one structurally takes them from it.
_UNET_STRUCTURE = (
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "use_linear_projection",
    "projection_class_embeddings_input_dim",
)
_VAE_STRUCTURE = ("block_out_channels", "layers_per_block", "latent_channels")
_TEXT_STRUCTURE = ("hidden_size", "intermediate_size", "num_hidden_layers")
_UNET_KNOWN = {"full-size SDXL": arch.SDXL_UNET, "tiny": arch.TINY_UNET}
_VAE_KNOWN = {"full-size SDXL": arch.SDXL_VAE, "tiny": arch.TINY_VAE}
_TE1_KNOWN = {"full-size SDXL": arch.SDXL_TEXT_ENCODER, "tiny": arch.TINY_TEXT_ENCODER}
_TE2_KNOWN = {"full-size SDXL": arch.SDXL_TEXT_ENCODER_2, "tiny": arch.TINY_TEXT_ENCODER_2}
_STRUCTURE = {
    "unet": _UNET_STRUCTURE,
    "vae": _VAE_STRUCTURE,
    "text_encoder": _TEXT_STRUCTURE,
    "text_encoder_2": _TEXT_STRUCTURE,
}
# Token ids come from the tokenizer actually used, not from a known architecture's table.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _per_64(channels: list[int]) -> list[int] | None:
    # SDXL-style models use 64-channel attention heads.
    return [c // 64 for c in channels] if all(c % 64 == 0 for c in channels) else None


def _unet_fallback(cfg: dict[str, Any]) -> dict[str, Any]:
    chans = cfg["block_out_channels"]
    return {
        "sample_size": 128,
        "attention_head_dim": _per_64(chans),
        "norm_num_groups": 32 if all(c % 32 == 0 for c in chans) else None,
    }


def _vae_fallback(cfg: dict[str, Any]) -> dict[str, Any]:
    chans = cfg["block_out_channels"]
    return {
        "sample_size": 1024,
        "norm_num_groups": 32 if all(c % 32 == 0 for c in chans) else None,
        "scaling_factor": arch.SDXL_VAE["scaling_factor"],
        "force_upcast": True,
    }


def _text_fallback(cfg: dict[str, Any], act: str) -> dict[str, Any]:
    heads = _per_64([cfg["hidden_size"]])
    return {
        "num_attention_heads": heads[0] if heads else None,
        "hidden_act": act,
        "projection_dim": cfg["hidden_size"],
    }


def _te1_fallback(cfg: dict[str, Any]) -> dict[str, Any]:
    return _text_fallback(cfg, "quick_gelu")  # OpenAI CLIP


def _te2_fallback(cfg: dict[str, Any]) -> dict[str, Any]:
    return _text_fallback(cfg, "gelu")  # OpenCLIP


def _resolve(
    path: Path,
    part: str,
    inferred: dict[str, Any],
    sidecar: dict[str, dict[str, Any]],
    known: dict[str, dict[str, Any]],
    fallback: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """inferred shapes + (matching known architecture or generic defaults) + sidecar overrides."""
    structure = _STRUCTURE[part]
    name, base = next(
        (
            (name, cfg)
            for name, cfg in known.items()
            if all(_same(cfg.get(k), inferred[k]) for k in structure)
        ),
        ("inferred", None),
    )
    base = {k: v for k, v in (base or fallback(inferred)).items() if k not in _TOKEN_ID_FIELDS}
    config = {**base, **inferred, **sidecar.get(part, {})}
    unknown = sorted(k for k, v in config.items() if v is None)
    if unknown:
        example = json.dumps({part: {k: "..." for k in unknown}})
        raise ModelSpecError(
            f"The {part} in {path} matches no architecture beyond knows, and its {', '.join(unknown)}"
            f" cannot be told from the tensor shapes. Write them into {_sidecar_path(path)}, e.g.\n"
            f"  {example}"
        )
    if name == "inferred" and part not in sidecar:
        log.warning(
            "%s: the %s matches no known architecture; assuming SDXL conventions (64-channel attention"
            " heads, 32 norm groups) where its shapes allow. Put its true config in %s if it differs.",
            path.name,
            part,
            _sidecar_path(path),
        )
    else:
        log.info("%s: %s architecture for %s", path.name, name, part)
    return config


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _find_tokenizers(path: Path) -> tuple[tuple[Path, Path], str]:
    """Where the tokenizers for single file `path` are: (tokenizer dir, tokenizer_2 dir), source."""
    env = os.environ.get(TOKENIZER_DIR_ENV)
    if env:
        root = Path(os.path.expanduser(env))
        dirs = (root / "tokenizer", root / "tokenizer_2")
        if not all(_has_tokenizer_files(d) for d in dirs):
            raise ModelSpecError(
                f"{TOKENIZER_DIR_ENV}={env} must hold tokenizer/ and tokenizer_2/ sub-folders, each with"
                " vocab.json + merges.txt (or tokenizer.json)."
            )
        return dirs, f"{TOKENIZER_DIR_ENV} ({root})"
    candidates = [
        (path.parent / f"{path.stem}.tokenizers", f"{path.stem}.tokenizers/ beside the checkpoint"),
        (path.parent, "the checkpoint's folder"),
    ]
    for root, source in candidates:
        dirs = (root / "tokenizer", root / "tokenizer_2")
        if all(_has_tokenizer_files(d) for d in dirs):
            return dirs, source
    for repo in TOKENIZER_REPOS:
        snapshot = _cached_snapshot(repo)
        if snapshot:
            dirs = (snapshot / "tokenizer", snapshot / "tokenizer_2")
            if all(_has_tokenizer_files(d) for d in dirs):
                return dirs, f"the Hugging Face cache of {repo}"
    raise ModelSpecError(
        f"{path} holds no tokenizers (single-file checkpoints never do), and none were found.\n"
        "Put SDXL's two CLIP tokenizers (tokenizer/ and tokenizer_2/ folders, each with vocab.json +"
        " merges.txt or tokenizer.json) in one of these places, searched in this order:\n"
        f"  1. a folder named by the {TOKENIZER_DIR_ENV} environment variable;\n"
        f"  2. {path.parent / (path.stem + '.tokenizers')}/ (i.e. <checkpoint name>.tokenizers/);\n"
        f"  3. {path.parent}/ itself (tokenizer/ and tokenizer_2/ next to the file);\n"
        f"  4. the Hugging Face cache ({_hub_cache_dir()}) of {' or '.join(TOKENIZER_REPOS)}.\n"
        f"On a connected machine: `hf download {SDXL_BASE_REPO} --include 'tokenizer/*' 'tokenizer_2/*'"
        f" --local-dir {path.parent / (path.stem + '.tokenizers')}`"
    )


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    # Parameters start on the meta device (no random init of billions of values, no second copy of
    # the weights); buffers such as CLIP's position ids are still made for real, as the state dict
    # does not carry them.
    try:
        from accelerate import init_empty_weights
    except ImportError:  # slower and twice the memory, but correct
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], part: str, path: Path) -> None:
    """Load `state` (from `_to_diffusers`) into `model` in fp32. Converts `state` in place, so that
    each checkpoint tensor is freed once its fp32 copy exists (SDXL's UNet: 5 GB fp16 -> 10 GB fp32)."""
    import torch

    for key in list(state):
        state[key] = state.pop(key).to(torch.float32).contiguous()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelSpecError(
            f"The {part} weights in {path} do not fit the architecture read from them: {exc}\n"
            f"Give its config in {_sidecar_path(path)}."
        ) from exc
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"{part}: some tensors were left unloaded")
    model.eval()


_PREFIXES = {"unet": _UNET, "vae": _VAE, "text_encoder": _TE1, "text_encoder_2": _TE2}


def _to_diffusers(
    part: str, tensors: dict[str, torch.Tensor], model: Any, path: Path
) -> dict[str, torch.Tensor]:
    """`part`'s original-layout tensors (keys with their checkpoint prefix) keyed as `model`'s state."""
    from diffusers.loaders import single_file_utils as conv

    if part == "unet":
        state = conv.convert_ldm_unet_checkpoint(tensors, dict(model.config))
    elif part == "vae":
        state = conv.convert_ldm_vae_checkpoint(tensors, dict(model.config))
    elif part == "text_encoder":
        state = conv.convert_ldm_clip_checkpoint(tensors)
    else:
        # OpenCLIP fuses q/k/v into in_proj and stores the projection transposed; this splits and flips.
        state = conv.convert_open_clip_checkpoint(model, tensors, prefix=_TE2)
    expected = model.state_dict().keys()
    # Older transformers nest CLIPTextModel under `text_model.`, newer ones do not.
    if not any(k.startswith("text_model.") for k in expected):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # Some checkpoints carry CLIP's position ids, which transformers no longer saves.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelSpecError(
            f"The {part} weights in {path} do not fit the {part} architecture read from their shapes"
            f" ({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g."
            f" {unexpected[:3]}). If it is not a standard SDXL layout, give its config in"
            f" {_sidecar_path(path)}."
        )
    return state


def _load_single_file(plan: _SingleFilePlan) -> Components:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.components import Components

    cfg, path = plan.configs, plan.path
    log.info("loading %s with tokenizers from %s", path, plan.tokenizer_source)
    tokenizers = [CLIPTokenizer.from_pretrained(str(d), local_files_only=True) for d in plan.tokenizer_dirs]
    for tok, part in zip(tokenizers, ("text_encoder", "text_encoder_2"), strict=True):
        _fit_tokenizer(tok, cfg[part]["max_position_embeddings"])
        if len(tok) > cfg[part]["vocab_size"]:
            raise ModelSpecError(
                f"The tokenizer for {part} (from {plan.tokenizer_source}) has {len(tok)} tokens, but the"
                f" checkpoint's {part} knows only {cfg[part]['vocab_size']}: these are not its tokenizers."
            )

    def text_config(part: str, tok: CLIPTokenizer) -> CLIPTextConfig:
        ids = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
        return CLIPTextConfig(**{**cfg[part], **ids})

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())

        # One component at a time, so the file's tensors are never all in memory at once.
        def part_of(prefix: str) -> dict[str, torch.Tensor]:
            return {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}

        with _parameters_on_meta():
            unet = UNet2DConditionModel(**cfg["unet"])
            vae = AutoencoderKL(**cfg["vae"])
            te1 = CLIPTextModel(text_config("text_encoder", tokenizers[0]))
            te2 = CLIPTextModelWithProjection(text_config("text_encoder_2", tokenizers[1]))
        for part, model in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
            state = _to_diffusers(part, part_of(_PREFIXES[part]), model, path)
            _load_weights(model, state, part, path)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub ids


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later setting counts.
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return env in _ENV_TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> Path:
    # Same precedence as huggingface_hub, but evaluated now rather than at its import.
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(os.path.expandvars(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expanduser(os.path.expandvars(home))) / "hub"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id`'s main revision, if any; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=_hub_cache_dir(), local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; bad ids are ValueErrors
        return None


def _not_cached_message(repo_id: str, reason: str, problems: list[str] | None = None) -> str:
    cache = _hub_cache_dir()
    folder = "models--" + repo_id.replace("/", "--")
    where, detail = "not", ""
    if problems:
        where = "only partly"
        detail = "The cached copy is incomplete:\n" + "\n".join(f"  - {p}" for p in problems) + "\n"
    return (
        f"Model {repo_id} is {where} in the local Hugging Face cache ({cache}), and {reason}.\n{detail}"
        "To fix this, either:\n"
        f"  - on a machine with internet, run `hf download {repo_id}` (older huggingface_hub:"
        f" `huggingface-cli download {repo_id}`), then copy its cache folder {folder}/ into {cache}/"
        " here (or point HF_HOME at a copied cache);\n"
        "  - or start beyond once with network access and HF_HUB_OFFLINE unset, so it downloads the"
        " model into the cache;\n"
        "  - or pass a local diffusers folder or a single SDXL .safetensors file as the model instead."
    )


def _hub_files(repo_id: str) -> list[str]:
    """The repo's file list, or a ModelSpecError saying why it cannot be had."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        # model_info fails at once when the Hub is unreachable; list_repo_files retries for ~20 s.
        siblings = HfApi().model_info(repo_id).siblings or []
    except GatedRepoError as exc:
        raise ModelSpecError(
            f"Model {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in"
            " (`hf auth login`) or set HF_TOKEN."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSpecError(
            f"There is no model {repo_id} on the Hugging Face Hub (or it is private: log in with"
            f" `hf auth login` or set HF_TOKEN).\n{ACCEPTED_FORMS}"
        ) from exc
    # Transport errors differ between huggingface_hub versions (requests, httpx, httpx2): whatever
    # stops the listing means the model cannot be had, and the message keeps the cause.
    except Exception as exc:
        raise ModelSpecError(
            _not_cached_message(
                repo_id, f"the Hugging Face Hub cannot be reached ({type(exc).__name__}: {exc})"
            )
        ) from exc
    return [s.rfilename for s in siblings]


def _hub_download_list(repo_id: str, files: list[str]) -> list[str]:
    """The files of `repo_id` the engine needs: configs, tokenizers, one safetensors set per model."""
    wanted = [
        f
        for f in files
        if f == "model_index.json" or f.startswith(("scheduler/", "tokenizer/", "tokenizer_2/"))
    ]
    problems = [] if "model_index.json" in files else ["it has no model_index.json (not in diffusers layout)"]
    for part in _MODEL_PARTS:
        names = [f[len(part) + 1 :] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        variants: dict[str | None, list[str]] = {}
        for name in names:
            m = _WEIGHTS.match(name) or _WEIGHTS_INDEX.match(name)
            # Shards ("model.fp16-00001-of-00002.safetensors") belong to the set their index names.
            shard = _SHARD.match(name)
            if m and m["ext"] == "safetensors":
                variants.setdefault(m["variant"], []).append(name)
            elif shard:
                variants.setdefault(shard[1], []).append(name)
        # fp16 halves the download; the weights are cast to fp32 at load, and GPUs run fp16 anyway.
        choices = [v for v in ("fp16", None, "bf16") if v in variants]
        if "config.json" not in names:
            problems.append(f"it has no {part}/config.json")
        elif not choices:
            problems.append(f"it publishes no .safetensors weights for {part}")
        else:
            wanted += [f"{part}/config.json", *(f"{part}/{n}" for n in variants[choices[0]])]
    if problems:
        raise ModelSpecError(
            f"Hub model {repo_id} is not an SDXL pipeline beyond can load:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return wanted


def _check_hub(repo_id: str) -> None:
    snapshot = _cached_snapshot(repo_id)
    problems = _folder_problems(snapshot) if snapshot else None
    if snapshot and not problems:
        return
    if _offline():
        raise ModelSpecError(_not_cached_message(repo_id, "downloads are off (HF_HUB_OFFLINE=1)", problems))
    _hub_download_list(repo_id, _hub_files(repo_id))


def _load_hub(repo_id: str, *, progress: bool) -> Components:
    # A complete cached copy is used without asking the Hub: start-up then works on a flaky network.
    snapshot = _cached_snapshot(repo_id)
    problems = _folder_problems(snapshot) if snapshot else None
    if snapshot and not problems:
        return _load_folder(snapshot, what=f"the cached copy of {repo_id} ({snapshot})")
    if _offline():
        raise ModelSpecError(_not_cached_message(repo_id, "downloads are off (HF_HUB_OFFLINE=1)", problems))
    wanted = _hub_download_list(repo_id, _hub_files(repo_id))
    log.info("downloading %s (%d files) into %s", repo_id, len(wanted), _hub_cache_dir())
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=_hub_cache_dir(), allow_patterns=wanted))
    except Exception as exc:  # as in _hub_files
        raise ModelSpecError(
            _not_cached_message(repo_id, f"downloading it failed ({type(exc).__name__}: {exc})")
        ) from exc
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return _load_folder(folder, what=f"the downloaded copy of {repo_id} ({folder})")
