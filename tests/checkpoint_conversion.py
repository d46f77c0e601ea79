"""Write `Components` as ONE SDXL checkpoint in the original (SGM / ComfyUI / A1111) key layout.

The inverse of what `models.loading` reads, written independently of diffusers' own converters so
that a round trip through both tests the loader against the layout, not against itself:

    unet            -> model.diffusion_model.*                  (SGM UNet names)
    vae             -> first_stage_model.*                      (LDM autoencoder, 1x1-conv attention)
    text_encoder    -> conditioner.embedders.0.transformer.*    (Hugging Face CLIP names)
    text_encoder_2  -> conditioner.embedders.1.model.*          (OpenCLIP names, fused in_proj)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.components import Components

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(
    state: dict[str, torch.Tensor],
    modules: dict[str, tuple[str, dict[str, str]]],
) -> dict[str, torch.Tensor]:
    """Move each key's longest matching module prefix to its new name, and rename inside that module.

    `modules` maps an old module path to (new module path, {old sub-name: new sub-name}).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
        if match is None:
            out[key] = value
            continue
        new_module, inner = modules[match]
        rest = key[len(match) + 1 :]
        sub = max((s for s in inner if rest.startswith(s + ".")), key=len, default=None)
        if sub is not None:
            rest = inner[sub] + rest[len(sub) :]
        out[f"{new_module}.{rest}"] = value
    return out


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    per_level = config.layers_per_block
    levels = len(config.block_out_channels)
    modules: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    for i in range(levels):
        # SGM numbers blocks flatly: per level, its layers and then (but for the last) a resampler.
        for j in range(per_level):
            block = 1 + i * (per_level + 1) + j
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{block}.0", _UNET_RESNET)
            modules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", {})
        modules[f"down_blocks.{i}.downsamplers.0.conv"] = (
            f"input_blocks.{(i + 1) * (per_level + 1)}.0.op",
            {},
        )
        for j in range(per_level + 1):
            block = i * (per_level + 1) + j
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", _UNET_RESNET)
            modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", {})
        # The upsampler follows the last layer's attention when the level has one.
        slot = 2 if config.up_block_types[i].startswith("CrossAttn") else 1
        last = i * (per_level + 1) + per_level
        modules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{last}.{slot}.conv", {})
    return {UNET_PREFIX + k: v for k, v in _rename(state, modules).items()}


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    per_level = config.layers_per_block
    levels = len(config.block_out_channels)
    modules: dict[str, tuple[str, dict[str, str]]] = {}
    for coder in ("encoder", "decoder"):
        modules[f"{coder}.conv_norm_out"] = (f"{coder}.norm_out", {})
        modules[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", _VAE_RESNET)
        modules[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", _VAE_RESNET)
        modules[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(per_level):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        # The LDM decoder numbers its levels from the lowest resolution up, diffusers top down.
        level = levels - 1 - i
        for j in range(per_level + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    out = {}
    for key, value in _rename(state, modules).items():
        # LDM's mid-block attention projections are 1x1 convolutions.
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]
        out[VAE_PREFIX + key] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
    # Checkpoints written with older transformers carry the position ids; the loader must cope.
    positions = state.get("embeddings.position_embedding.weight")
    if positions is None:
        positions = state["text_model.embeddings.position_embedding.weight"]
    out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
    return out


def open_clip_to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {
        "token_embedding.weight": take("embeddings.token_embedding.weight"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "ln_final.weight": take("final_layer_norm.weight"),
        "ln_final.bias": take("final_layer_norm.bias"),
        # OpenCLIP applies the projection as x @ P; a torch Linear stores P transposed.
        "text_projection": take("text_projection.weight").T.contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [take(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = take(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = take(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = take(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = take(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = take(src + f"mlp.fc2.{kind}")
    left = sorted(set(state) - used)
    if left:
        raise AssertionError(f"open_clip_to_original left out {left}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def components_to_original(components: Components) -> dict[str, torch.Tensor]:
    """One original-layout state dict for the whole pipeline (tensors cloned, contiguous)."""
    c = components
    state = {
        **unet_to_original(c.unet.state_dict(), c.unet.config),
        **vae_to_original(c.vae.state_dict(), c.vae.config),
        **clip_to_original(c.text_encoder.state_dict()),
        **open_clip_to_original(c.text_encoder_2.state_dict(), c.text_encoder_2.config.num_hidden_layers),
    }
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_original_checkpoint(components: Components, path: str | Path) -> Path:
    """Write `components` as one original-layout SDXL .safetensors file, and return its path."""
    path = Path(path)
    save_file(components_to_original(components), str(path), metadata={"format": "pt"})
    return path


def save_tokenizers(components: Components, folder: str | Path) -> Path:
    """Write tokenizer/ and tokenizer_2/ under `folder`, as a single-file checkpoint needs beside it."""
    folder = Path(folder)
    components.tokenizer.save_pretrained(str(folder / "tokenizer"))
    components.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    return folder
