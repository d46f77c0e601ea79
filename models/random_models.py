"""`random:tiny` and `random:sdxl`: SDXL-architecture inpainting pipelines with seeded random weights.

They need no download. `random:tiny` is the offline demo and the test model; `random:sdxl` has the
full-size shapes, for timing on a GPU. Their images are noise: they prove plumbing, not quality.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models import architectures as arch
from models.components import Components

RANDOM_SPECS = ("random:tiny", "random:sdxl")


def _byte_symbols() -> list[str]:
    # The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_char_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer with a character-level vocabulary (no merges): every character is a token.

    Built from files we write ourselves, so no tokenizer is downloaded. Ids stay below 514, which
    fits both the tiny and the full-size embedding tables.
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token=pad_token)


def _text_config(base: dict, tokenizer: CLIPTokenizer, vocab_size: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        **{k: v for k, v in base.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")},
        vocab_size=vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random(spec: str, seed: int = 0, device: str | torch.device = "cpu") -> Components:
    """Build `random:tiny` or `random:sdxl` with weights drawn from `seed` (fp32, on `device`)."""
    if spec not in RANDOM_SPECS:
        raise ValueError(f"unknown random model {spec!r}; known: {', '.join(RANDOM_SPECS)}")
    full = spec == "random:sdxl"
    unet_cfg, vae_cfg = (arch.SDXL_UNET, arch.SDXL_VAE) if full else (arch.TINY_UNET, arch.TINY_VAE)
    te_cfg, te2_cfg = (
        (arch.SDXL_TEXT_ENCODER, arch.SDXL_TEXT_ENCODER_2)
        if full
        else (arch.TINY_TEXT_ENCODER, arch.TINY_TEXT_ENCODER_2)
    )
    tokenizer = build_char_tokenizer()
    tokenizer_2 = build_char_tokenizer(pad_token="!")
    vocab = arch.SDXL_TEXT_ENCODER["vocab_size"] if full else None
    # Building on the target device avoids a slow CPU initialisation of 3.5 B parameters.
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(te_cfg, tokenizer, vocab))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(te2_cfg, tokenizer_2, vocab))
    scheduler = EulerDiscreteScheduler.from_config(arch.SCHEDULER)
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
