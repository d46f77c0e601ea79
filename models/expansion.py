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

from models.errors import EngineError

if TYPE_CHECKING:
    import torch

WORDS_PATH = Path(__file__).parent / "data" / "expansion_words.txt"
# CLIP encodes 75 content tokens per chunk; the expansion fills the prompt's last chunk, as Fooocus does.
CHUNK_TOKENS = 75
TOP_K = 100


class ExpansionModelError(EngineError, ValueError):
    """The configured expansion model folder cannot be used (raised at startup, not per request)."""


class Expander(Protocol):
    available: bool

    def expand(self, prompt: str, seed: int) -> str:
        """The words to add after `prompt` (without the prompt itself); "" for none."""
        ...


class NoExpansion:
    """What V2 does when no model is configured: nothing, and the composer says so in the notes."""

    available = False
    reason = "no expansion model configured"

    def expand(self, prompt: str, seed: int) -> str:
        return ""


def load_words(path: Path = WORDS_PATH) -> list[str]:
    """The allowed words, lowercase, in file order, without comments, blanks or repeats."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.strip().lower()
        if word and not word.startswith("#") and word not in words:
            words.append(word)
    return words


def clean_prompt(text: str) -> str:
    """Single spaces, no leading or trailing separators: the text the language model continues."""
    return re.sub(r"\s+", " ", text).strip(",. ")


def words_in(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9][a-z0-9'-]*", text.lower()))


def tidy_expansion(text: str) -> str:
    parts = [re.sub(r"\s+", " ", p).strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)


class WordWalk:
    """Keeps a token-by-token generation inside "word word, word, ..." over a fixed word list.

    Words may span several tokens (small or unusual tokenizers split them), so the state is the
    token prefix of the word being spelled. A word is used at most once, and words already in the
    prompt are never added: the expansion should add detail, not repeat.
    """

    def __init__(self, spellings: dict[str, tuple[int, ...]], comma: int, used: Iterable[str] = ()) -> None:
        self.spellings = spellings
        self.comma = comma
        self.used = set(used)
        self.partial: tuple[int, ...] = ()
        self.kept: list[int] = []

    def _open(self, prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
        n = len(prefix)
        return [
            ids for word, ids in self.spellings.items() if word not in self.used and len(ids) > n and ids[:n] == prefix
        ]

    def _complete(self) -> str | None:
        for word, ids in self.spellings.items():
            if ids == self.partial and word not in self.used:
                return word
        return None

    def allowed(self) -> set[int]:
        """Token ids that keep the text well formed; empty when nothing more can be said."""
        tokens = {ids[len(self.partial)] for ids in self._open(self.partial)}
        word = self._complete() if self.partial else None
        if word is not None:
            # After a whole word: another word, or a comma (never two commas, never one first).
            tokens |= {ids[0] for w, ids in self.spellings.items() if w not in self.used and w != word}
            tokens.add(self.comma)
        return tokens

    def advance(self, token: int) -> None:
        extended = self.partial + (token,)
        if any(ids[: len(extended)] == extended for ids in self._open(self.partial)):
            self.partial = extended
            return
        self._commit()
        if token == self.comma:
            self.kept.append(token)
            self.partial = ()
        else:
            self.partial = (token,)

    def _commit(self) -> None:
        word = self._complete()
        if word is not None:
            self.used.add(word)
            self.kept.extend(self.partial)
        self.partial = ()

    def finish(self) -> list[int]:
        """The tokens of whole words and commas; a word cut off by the length limit is dropped."""
        self._commit()
        while self.kept and self.kept[-1] == self.comma:
            self.kept.pop()
        return self.kept


class _Chooser:
    """A logits processor that samples the next token itself, among the tokens the walk allows.

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


class LanguageModelExpander:
    """Fooocus-style V2 on a local causal LM folder (GPT-2 family), limited to our word list."""

    available = True

    def __init__(
        self,
        model_dir: str | Path,
        words: list[str] | None = None,
        device: str | torch.device = "cpu",
        top_k: int = TOP_K,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(model_dir)
        if not folder.is_dir():
            raise ExpansionModelError(f"expansion model: {folder} is not a folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # any loading failure is a configuration error, reported at startup
            raise ExpansionModelError(f"expansion model: cannot load {folder}: {exc}") from exc
        if self.tokenizer.eos_token_id is None:
            raise ExpansionModelError(f"expansion model: {folder}: its tokenizer has no end-of-text token")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.top_k = top_k
        self.stop = int(self.tokenizer.eos_token_id)
        self.words = words if words is not None else load_words()
        self.comma = self._single_token(",")
        self.spellings = self._spell(self.words)
        if not self.spellings:
            raise ExpansionModelError(f"expansion model: {folder}: its tokenizer cannot spell any list word")
        self.context = int(getattr(self.model.config, "n_positions", None) or 1024)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ExpansionModelError(f"expansion model: its tokenizer has no single token for {text!r}")
        return ids[0]

    def _spell(self, words: list[str]) -> dict[str, tuple[int, ...]]:
        spellings: dict[str, tuple[int, ...]] = {}
        seen: set[tuple[int, ...]] = set()
        for word in words:
            # With a leading space: the word as it appears after another word or a comma.
            ids = tuple(self.tokenizer.encode(" " + word, add_special_tokens=False))
            # A spelling must round-trip (unknown-token fallbacks would not) and avoid the stop token.
            if ids and ids not in seen and self.stop not in ids and self.tokenizer.decode(list(ids)).strip() == word:
                spellings[word] = ids
                seen.add(ids)
        return spellings

    def budget(self, prompt_tokens: int) -> int:
        """New tokens allowed: up to the end of the prompt's last 75-token chunk."""
        fill = CHUNK_TOKENS * math.ceil(prompt_tokens / CHUNK_TOKENS) - prompt_tokens
        return max(0, min(fill, self.context // 2))

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
