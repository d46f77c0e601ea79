"""Prompt encoding: 77-token chunks with their own BOS/EOS, concatenated, never cut off."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models.components import Components
from models.composer import PromptComposer
from models.prompts import chunk_count, encode_prompts, token_chunks
from models.random_models import build_random

CPU = torch.device("cpu")
# The tiny model's tokenizers are character-level (one token per character that is not a space), so
# short texts fill a chunk: LONG needs 3 chunks of 75 tokens.
SHORT = "a red barn in a snowy field"
LONG = "a lighthouse on a rocky coast at dusk, waves breaking over the rocks; " * 3


@pytest.fixture(scope="module")
def parts() -> Components:
    return build_random("random:tiny")


def reference(parts: Components, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain single-window encoding, the way diffusers' SDXL pipeline does it."""
    hidden = []
    for tokenizer, encoder in (
        (parts.tokenizer, parts.text_encoder),
        (parts.tokenizer_2, parts.text_encoder_2),
    ):
        ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = encoder(ids.input_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


def manual_chunks(parts: Components, text: str, chunks: int) -> torch.Tensor:
    """Each chunk encoded by its own encoder calls, from ids built by hand, then concatenated."""
    pieces = []
    for tokenizer, encoder in (
        (parts.tokenizer, parts.text_encoder),
        (parts.tokenizer_2, parts.text_encoder_2),
    ):
        content = tokenizer(text).input_ids[1:-1]  # with the tokenizer's own BOS/EOS, then stripped
        rows = []
        for i in range(chunks):
            body = content[75 * i : 75 * (i + 1)]
            row = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
            row += [tokenizer.pad_token_id] * (77 - len(row))
            out = encoder(torch.tensor([row]), output_hidden_states=True)
            rows.append(out.hidden_states[-2])
        pieces.append(torch.cat(rows, dim=1))
    return torch.cat(pieces, dim=-1)


@torch.no_grad()
def test_short_prompts_match_the_single_window_encoding(parts: Components) -> None:
    emb = encode_prompts(parts, [SHORT], ["blurry"], CPU, torch.float32)
    want, want_pooled = reference(parts, SHORT)
    neg, neg_pooled = reference(parts, "blurry")
    assert emb.prompt_embeds.shape == (1, 77, 64)
    torch.testing.assert_close(emb.prompt_embeds, want)
    torch.testing.assert_close(emb.pooled, want_pooled)
    torch.testing.assert_close(emb.negative_embeds, neg)
    torch.testing.assert_close(emb.negative_pooled, neg_pooled)


def test_chunk_rows_have_their_own_bos_and_eos(parts: Components) -> None:
    tok = parts.tokenizer
    assert len(token_chunks(tok, "x" * 75)) == 1
    rows = token_chunks(tok, "x" * 76)
    ids = tok("x" * 76).input_ids[1:-1]
    assert len(ids) == 76 and len(rows) == 2
    assert rows[0] == [tok.bos_token_id, *ids[:75], tok.eos_token_id]
    assert rows[1] == [tok.bos_token_id, ids[75], tok.eos_token_id] + [tok.pad_token_id] * 74
    assert all(len(r) == 77 for r in rows)
    assert token_chunks(tok, "") == [[tok.bos_token_id, tok.eos_token_id] + [tok.pad_token_id] * 75]


@torch.no_grad()
def test_long_prompts_are_chunked_and_concatenated(parts: Components) -> None:
    assert 150 < len(parts.tokenizer(LONG).input_ids) - 2 <= 225
    emb = encode_prompts(parts, [LONG], [""], CPU, torch.float32)
    assert emb.prompt_embeds.shape == (1, 3 * 77, 64)
    torch.testing.assert_close(emb.prompt_embeds, manual_chunks(parts, LONG, 3))
    # The pooled vector is the first chunk's, which is what the truncating encoding sees.
    torch.testing.assert_close(emb.pooled, reference(parts, LONG)[1])


@torch.no_grad()
def test_text_beyond_77_tokens_changes_the_conditioning(parts: Components) -> None:
    head = "x" * 80
    a = encode_prompts(parts, [head + " sunny"], [""], CPU, torch.float32).prompt_embeds
    b = encode_prompts(parts, [head + " rainy"], [""], CPU, torch.float32).prompt_embeds
    assert a.shape == b.shape == (1, 2 * 77, 64)
    torch.testing.assert_close(a[:, :77], b[:, :77])
    assert not torch.allclose(a[:, 77:], b[:, 77:])


@torch.no_grad()
def test_positive_and_negative_are_padded_to_the_same_chunk_count(parts: Components) -> None:
    emb = encode_prompts(parts, [SHORT], [LONG], CPU, torch.float32)
    assert emb.prompt_embeds.shape == emb.negative_embeds.shape == (1, 3 * 77, 64)
    empty, _ = reference(parts, "")
    torch.testing.assert_close(emb.prompt_embeds[:, :77], reference(parts, SHORT)[0])
    torch.testing.assert_close(emb.prompt_embeds[:, 77:154], empty)
    torch.testing.assert_close(emb.prompt_embeds[:, 154:], empty)
    torch.testing.assert_close(emb.negative_embeds, manual_chunks(parts, LONG, 3))
    torch.testing.assert_close(emb.pooled, reference(parts, SHORT)[1])
    torch.testing.assert_close(emb.negative_pooled, reference(parts, LONG)[1])


@torch.no_grad()
def test_batch_items_of_different_lengths(parts: Components) -> None:
    emb = encode_prompts(parts, [LONG, SHORT], ["blurry", "dark"], CPU, torch.float32)
    assert emb.prompt_embeds.shape == (2, 3 * 77, 64)
    torch.testing.assert_close(emb.prompt_embeds[0:1], manual_chunks(parts, LONG, 3))
    torch.testing.assert_close(emb.prompt_embeds[1:2, :77], reference(parts, SHORT)[0])
    torch.testing.assert_close(emb.negative_embeds[1:2, :77], reference(parts, "dark")[0])
    torch.testing.assert_close(emb.pooled[1:2], reference(parts, SHORT)[1])


@torch.no_grad()
def test_all_empty_negatives_are_zero_at_the_positive_length(parts: Components) -> None:
    emb = encode_prompts(parts, [LONG, SHORT], ["", ""], CPU, torch.float32)
    assert emb.negative_embeds.shape == emb.prompt_embeds.shape == (2, 3 * 77, 64)
    assert not emb.negative_embeds.any() and not emb.negative_pooled.any()
    # One non-empty negative: the empty one is encoded for real, not zeroed.
    mixed = encode_prompts(parts, [SHORT, SHORT], ["", "dark"], CPU, torch.float32)
    torch.testing.assert_close(mixed.negative_embeds[0:1], reference(parts, "")[0])


@torch.no_grad()
def test_dtype_is_applied(parts: Components) -> None:
    emb = encode_prompts(parts, [LONG], ["x"], CPU, torch.bfloat16)
    assert {t.dtype for t in vars(emb).values()} == {torch.bfloat16}


class FakeExpander:
    available = True

    def expand(self, prompt: str, seed: int) -> str:
        return f"glow{seed}"


@torch.no_grad()
def test_engine_encodes_the_composed_prompts_in_chunks(parts: Components) -> None:
    from models.engine import OutpaintEngine, OutpaintRequest
    from models.pipeline import OutpaintPipeline

    composer = PromptComposer(expander=FakeExpander())
    engine = OutpaintEngine(OutpaintPipeline(parts, CPU, torch.float32), "random:tiny", composer)
    seen: list[torch.Size] = []
    hook = parts.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True
    )
    styles = ["V2", "Enhance", "Sharp"]
    request = OutpaintRequest(
        image=Image.new("RGB", (64, 64), "gray"),
        prompt=LONG,
        negative_prompt="people",
        styles=styles,
        left=32,
        steps=20,
        seed=3,
        samples=2,
    )
    try:
        result = engine.run(request)
    finally:
        hook.remove()
    want = composer.compose(LONG, "people", styles, [3, 4])
    assert result.positive_prompts == want.positives and result.negative_prompts == want.negatives
    assert result.positive_prompts[1].endswith(", glow4")
    assert result.styles == styles and result.notes["expansion"] == "applied"
    chunks = chunk_count(parts, [*want.positives, *want.negatives])
    assert chunks >= 4  # the long prompt and the library negatives, not cut at 77 tokens
    assert seen and set(seen) == {torch.Size((4, chunks * 77, 64))}  # 2 samples, with and without guidance
