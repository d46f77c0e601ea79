"""The V2 prompt expansion: a small local causal language model adds descriptive words to a prompt.

Only words from our own list (`data/expansion_words.txt`) and commas can be generated, so a model
trained on anything cannot put names, brands or unwanted content into the prompt. Sampling uses a
private, seeded generator: the same prompt and seed give the same words, and the process-wide
random state is never touched (the worker runs other seeded work beside it).

torch and transformers are imported only when a model is loaded: `NoExpansion` and the word
list stay importable in the HTTP process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

WORDS_PATH = Path(__file__).parent / "data" / "expansion_words.txt"
# CLIP encodes 75 content tokens per chunk; the expansion fills the prompt's last chunk, as Fooocus does.
CHUNK_TOKENS = 75
TOP_K = 100


class ExpansionModelError(ValueError):
    """The configured expansion model folder cannot be used (raised at startup, not per request)."""


class Expander(Protocol):
    available: bool

    def expand(self, prompt: str, seed: int) -> str:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        text = clean_prompt(prompt)
        if not text:
            return ""
        ids: list[int] = self.tokenizer.encode(text + ",")
        budget = self.budget(len(ids))
        if budget == 0:
            return ""
        ids = ids[-(self.context - budget) :]  # the model's window must hold context and new tokens
        walk = WordWalk(self.spellings, self.comma, used=words_in(text) & set(self.spellings))
        chooser = _Chooser(walk, torch.Generator().manual_seed(int(seed)), self.top_k, self.stop)
        # The chooser samples; generate() only runs the model (with its cache) and follows the choice.
        config = GenerationConfig(
            max_new_tokens=budget,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop,
            pad_token_id=self.stop,
        )
        with torch.inference_mode():
            self.model.generate(
                input_ids=torch.tensor([ids], device=self.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([chooser]),
            )
        return tidy_expansion(self.tokenizer.decode(walk.finish()))


class _Chooser:
    """A logits processor that samples the next token itself, among the words the walk allows.

    Sampling here, with a generator of our own, keeps expansions reproducible per seed without
    touching torch's global random state; it leaves a single finite score, so greedy decoding
    emits exactly the chosen token. When the walk allows nothing, it chooses `stop` to end early.
    """

    def __init__(self, walk: WordWalk, generator: torch.Generator, top_k: int, stop: int) -> None:
        self.walk, self.generator, self.top_k, self.stop = walk, generator, top_k, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        allowed = self.walk.allowed()
        if allowed:
            candidates = torch.tensor(sorted(allowed))
            logits = scores[0].float().cpu()[candidates]
            top, where = logits.topk(min(self.top_k, len(candidates)))
            pick = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=self.generator)
            token = int(candidates[where[pick]].item())
            self.walk.advance(token)
        else:
            token = self.stop
        chosen = torch.full_like(scores, torch.finfo(scores.dtype).min)
        chosen[:, token] = 0
        return chosen
