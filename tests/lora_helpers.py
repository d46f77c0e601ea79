"""Small LoRA files for random:tiny, written the way kohya/A1111 and diffusers/PEFT write theirs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import architectures as arch
from models.lora_layout import KOHYA_PREFIXES, Layout, layout

TINY_LAYOUT = layout(arch.TINY_UNET, arch.TINY_TEXT_ENCODER, arch.TINY_TEXT_ENCODER_2)
SDXL_LAYOUT = layout(arch.SDXL_UNET, arch.SDXL_TEXT_ENCODER, arch.SDXL_TEXT_ENCODER_2)
# What a kohya LoRA for SDXL patches: the transformers' linear layers (attention, feed-forward,
# projections) and the text encoders' attention and MLP layers; `conv` adds the residual blocks'
# convolutions, as kohya's LoCon (conv_dim) does.
TRANSFORMER_LAYERS = (".attn1.", ".attn2.", ".ff.net.", ".proj_in", ".proj_out")
TEXT_LAYERS = (".self_attn.", ".mlp.")


def lora_layers(model: Layout = TINY_LAYOUT, *, text: bool = True, conv: bool = False) -> list[str]:
    keys = []
    for key in model.shapes:
        part = key.split(".", 1)[0]
        if part == "unet":
            if any(p in key for p in TRANSFORMER_LAYERS) or (conv and ".resnets." in key and ".conv" in key):
                keys.append(key)
        elif text and any(p in key for p in TEXT_LAYERS):
            keys.append(key)
    return keys


def sgm_name(model: Layout, key: str) -> str:
    """kohya's name of a layer in an SDXL LoRA: the original (SGM) UNet's path."""
    names = [name for name, target in model.kohya.items() if target == key]
    original = [name for name in names if not any(p in name for p in ("down_blocks", "mid_block", "up_blocks"))]
    return (original or names)[0]


def factors(shape: tuple[int, ...], rank: int, generator: torch.Generator, strength: float):
    out, inputs, kernel = shape[0], shape[1], shape[2:]
    down = torch.randn((rank, inputs, *kernel), generator=generator) * strength
    up = torch.randn((out, rank, *((1, 1) if kernel else ())), generator=generator) * strength
    return down, up


def write_kohya(
    path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 2.0,
    strength: float = 0.3,
    text: bool = True,
    conv: bool = False,
    model: Layout = TINY_LAYOUT,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """A kohya-format LoRA (lora_unet_input_blocks_..., lora_te1_..., lora_te2_...)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in lora_layers(model, text=text, conv=conv):
        name = sgm_name(model, key)
        assert name.startswith(tuple(KOHYA_PREFIXES.values()))
        down, up = factors(model.shapes[key], rank, generator, strength)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def write_peft(
    path: Path,
    *,
    seed: int = 1,
    rank: int = 4,
    alpha: float = 8.0,
    strength: float = 0.3,
    text: bool = True,
    model: Layout = TINY_LAYOUT,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A diffusers/PEFT-format LoRA (unet.<path>.lora_A.weight ...), its alpha in diffusers' metadata."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in lora_layers(model, text=text):
        down, up = factors(model.shapes[key], rank, generator, strength)
        tensors[f"{key}.lora_A.weight"] = down.to(dtype)
        tensors[f"{key}.lora_B.weight"] = up.to(dtype)
    config = {f"{part}.{k}": v for part in ("unet", "text_encoder", "text_encoder_2") for k, v in
              (("r", rank), ("lora_alpha", alpha))}  # fmt: skip
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path
