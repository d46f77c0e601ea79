"""Text conditioning for SDXL: both CLIP encoders, penultimate hidden states, pooled projection.

CLIP sees 77 tokens at a time. A longer text is cut into chunks of 75 content tokens, each wrapped
in its own BOS/EOS and padded to 77, encoded separately and concatenated along the token axis (the
UNet's cross-attention takes any number of tokens), as Fooocus and ComfyUI do, so nothing is cut
off. Every text in one call gets the same number of chunks, because the batch (positives and
negatives together, for classifier-free guidance) must be one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from models.components import Components


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (batch, 77 * chunks, 2048 for SDXL)
    negative_embeds: torch.Tensor
    pooled: torch.Tensor  # (batch, 1280 for SDXL)
    negative_pooled: torch.Tensor


def token_chunks(tokenizer: PreTrainedTokenizerBase, text: str) -> list[list[int]]:
    """The 77-token rows a text is encoded as: BOS, up to 75 content tokens, EOS, then padding."""
    size = tokenizer.model_max_length
    content = size - 2
    # verbose=False: texts longer than 77 tokens are expected here, the tokenizer need not warn.
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    rows = []
    for start in range(0, max(len(ids), 1), content):
        row = [tokenizer.bos_token_id, *ids[start : start + content], tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (size - len(row)))
    return rows


def chunk_count(components: Components, texts: list[str]) -> int:
    """How many chunks the longest of `texts` needs with either tokenizer."""
    return max(
        len(token_chunks(tokenizer, text))
        for tokenizer in (components.tokenizer, components.tokenizer_2)
        for text in texts
    )


def _encode(
    components: Components, texts: list[str], chunks: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = []
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        # Shorter texts are padded with empty chunks (BOS, EOS, padding): what an empty prompt encodes to.
        empty = token_chunks(tokenizer, "")[0]
        rows = []
        for text in texts:
            own = token_chunks(tokenizer, text)
            rows += own + [empty] * (chunks - len(own))
        out = encoder(torch.tensor(rows, device=device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders, and on the second one's projection.
        states = out.hidden_states[-2]
        hidden.append(states.reshape(len(texts), chunks * states.shape[1], states.shape[2]))
    # The pooled vector describes the whole image in SDXL: it comes from each text's first chunk.
    pooled = out.text_embeds.reshape(len(texts), chunks, -1)[:, 0]
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts(
    components: Components, prompts: list[str], negatives: list[str], device: torch.device, dtype: torch.dtype
) -> PromptEmbeddings:
    """Encode one positive and one negative text per batch item, in as many chunks as the longest needs."""
    zero_negatives = all(not n for n in negatives)
    chunks = chunk_count(components, prompts if zero_negatives else [*prompts, *negatives])
    embeds, pooled = _encode(components, prompts, chunks, device)
    if zero_negatives:
        # SDXL was trained with zeroed unconditional embeddings for empty negatives.
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = _encode(components, negatives, chunks, device)
    return PromptEmbeddings(embeds.to(dtype), neg_embeds.to(dtype), pooled.to(dtype), neg_pooled.to(dtype))
