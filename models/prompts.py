"""Text conditioning for SDXL: both CLIP encoders, penultimate hidden states, pooled projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.components import Components


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (batch, tokens, 2048 for SDXL)
    negative_embeds: torch.Tensor
    pooled: torch.Tensor  # (batch, 1280 for SDXL)
    negative_pooled: torch.Tensor


def _encode(
    components: Components, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders, and on the second one's projection.
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts(
    components: Components, prompts: list[str], negatives: list[str], device: torch.device, dtype: torch.dtype
) -> PromptEmbeddings:
    """Encode one positive and one negative text per batch item."""
    embeds, pooled = _encode(components, prompts, device)
    if all(not n for n in negatives):
        # SDXL was trained with zeroed unconditional embeddings for empty negatives.
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = _encode(components, negatives, device)
    return PromptEmbeddings(embeds.to(dtype), neg_embeds.to(dtype), pooled.to(dtype), neg_pooled.to(dtype))
