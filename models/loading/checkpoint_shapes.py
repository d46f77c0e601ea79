"""What a single original-layout SDXL `.safetensors` checkpoint is, read from its header alone.

The safetensors header (8-byte length, then JSON) gives every tensor's name and shape. From those
this module tells SDXL from other families, and infers each component's configuration: fields the
shapes fix come from the shapes; the rest (attention heads, group-norm groups, activation, VAE
scaling) from the known architecture the shapes match, or from SDXL conventions, with a sidecar
`<file>.json` to override them. Torch-free: `check()` uses it without loading a weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models import architectures as arch
from models.errors import ModelSpecError
from models.loading.source import MODEL_PARTS, read_json

log = logging.getLogger(__name__)

SIDECAR_KEYS = (*MODEL_PARTS, "scheduler")

# Key prefixes of the original SDXL checkpoint layout.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
PREFIXES = {"unet": UNET, "vae": VAE, "text_encoder": TE1, "text_encoder_2": TE2}

Shapes = dict[str, tuple[int, ...]]


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_safetensors_shapes(path: Path) -> Shapes:
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
        raise ModelSpecError(f"{path} is not a readable .safetensors file ({exc}). Is the download complete?") from exc


def infer_configs(path: Path) -> dict[str, dict[str, Any]]:
    """The configs of `path`'s unet, vae, text_encoder, text_encoder_2 and scheduler, from its header."""
    shapes = read_safetensors_shapes(path)
    _check_sdxl_layout(path, shapes)
    sidecar = _read_sidecar(path)
    try:
        te2 = _resolve(path, "text_encoder_2", _infer_open_clip(shapes), sidecar, _TE2_KNOWN, _te2_fallback)
        te1 = _resolve(path, "text_encoder", _infer_clip(shapes), sidecar, _TE1_KNOWN, _te1_fallback)
        unet = _resolve(path, "unet", _infer_unet(shapes, te2["projection_dim"]), sidecar, _UNET_KNOWN, _unet_fallback)
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
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "scheduler": scheduler}


def _check_sdxl_layout(path: Path, shapes: Shapes) -> None:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("cond_stage_model."):
        raise ModelSpecError(f"{path} is a Stable Diffusion 1.x/2.x checkpoint; beyond runs SDXL models only.")
    if has("conditioner.embedders.0.model.") and not has(TE1):
        raise ModelSpecError(f"{path} is an SDXL refiner checkpoint; beyond needs an SDXL base or inpainting one.")
    if has("down_blocks.") or has("unet.down_blocks."):
        raise ModelSpecError(
            f"{path} holds weights in diffusers layout, not a whole original-layout SDXL checkpoint;"
            " use the diffusers folder it came from instead."
        )
    missing = [
        what
        for prefix, what in (
            (UNET, f"a UNet ({UNET}*)"),
            (VAE, f"a VAE ({VAE}*)"),
            (TE1, f"the CLIP ViT-L text encoder ({TE1}*)"),
            (TE2, f"the OpenCLIP ViT-bigG text encoder ({TE2}*)"),
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
    where = sidecar_path(path)
    if not where.is_file():
        return {}
    data = read_json(where)
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown or not all(isinstance(v, dict) for v in data.values()):
        raise ModelSpecError(
            f"{where} must be a JSON object whose keys are among {', '.join(SIDECAR_KEYS)}, each"
            f" holding config overrides (an object); found {', '.join(unknown) or 'a non-object value'}."
        )
    return data


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise ModelSpecError(
            f"The checkpoint lacks {key}: it is not a standard SDXL checkpoint in the original layout,"
            " or it is truncated."
        ) from None


def _numbered(shapes: Shapes, prefix: str) -> list[int]:
    """The distinct n of keys `prefix + "<n>." ...`, sorted."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _infer_unet(shapes: Shapes, text_embed_dim: int) -> dict[str, Any]:
    """The UNet config fields that tensor shapes determine."""
    p = UNET
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
        raise ModelSpecError("The checkpoint's UNet text-time embedding does not fit its second text encoder.")
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    return {
        "in_channels": _shape(shapes, p + "input_blocks.0.0.weight")[1],
        "out_channels": _shape(shapes, p + "out.2.weight")[0],
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "block_out_channels": [_shape(shapes, p + f"input_blocks.{lv[0]}.0.out_layers.3.weight")[0] for lv in levels],
        "layers_per_block": layers.pop(),
        # diffusers wants an entry for attention-free levels too; SDXL's config puts 1 there.
        "transformer_layers_per_block": [d or 1 for d in depth],
        "cross_attention_dim": _shape(shapes, attn + "transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(_shape(shapes, attn + "proj_in.weight")) == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": add_time,
        "projection_class_embeddings_input_dim": add_in,
    }


def _infer_vae(shapes: Shapes) -> dict[str, Any]:
    p = VAE
    levels = _numbered(shapes, p + "encoder.down.")
    if not levels:
        raise ModelSpecError("The checkpoint's VAE has no encoder levels.")
    return {
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(shapes, p + "post_quant_conv.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [_shape(shapes, p + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        "layers_per_block": len(_numbered(shapes, p + "encoder.down.0.block.")),
    }


def _infer_clip(shapes: Shapes) -> dict[str, Any]:
    p = TE1 + "text_model."
    vocab, hidden = _shape(shapes, p + "embeddings.token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": len(_numbered(shapes, p + "encoder.layers.")),
        "max_position_embeddings": _shape(shapes, p + "embeddings.position_embedding.weight")[0],
    }


def _infer_open_clip(shapes: Shapes) -> dict[str, Any]:
    p = TE2
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
        ((name, cfg) for name, cfg in known.items() if all(_same(cfg.get(k), inferred[k]) for k in structure)),
        ("inferred", None),
    )
    base = {k: v for k, v in (base or fallback(inferred)).items() if k not in _TOKEN_ID_FIELDS}
    config = {**base, **inferred, **sidecar.get(part, {})}
    unknown = sorted(k for k, v in config.items() if v is None)
    if unknown:
        example = json.dumps({part: {k: "..." for k in unknown}})
        raise ModelSpecError(
            f"The {part} in {path} matches no architecture beyond knows, and its {', '.join(unknown)}"
            f" cannot be told from the tensor shapes. Write them into {sidecar_path(path)}, e.g.\n"
            f"  {example}"
        )
    if name == "inferred" and part not in sidecar:
        log.warning(
            "%s: the %s matches no known architecture; assuming SDXL conventions (64-channel attention"
            " heads, 32 norm groups) where its shapes allow. Put its true config in %s if it differs.",
            path.name,
            part,
            sidecar_path(path),
        )
    else:
        log.info("%s: %s architecture for %s", path.name, name, part)
    return config


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
