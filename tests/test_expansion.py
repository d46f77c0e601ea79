"""V2 expansion on a tiny random GPT-2 built here (its tokenizer trained in-process): no download."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.composer import build_composer
from models.expansion import (
    WORDS_PATH,
    ExpansionModelError,
    LanguageModelExpander,
    NoExpansion,
    WordWalk,
    clean_prompt,
    load_words,
)
from tests.helpers import build_tiny_gpt2

WORDS = load_words()
PROMPT = "a red barn in the snow, soft light"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("expansion"))


@pytest.fixture(scope="module")
def expander(model_dir: Path) -> LanguageModelExpander:
    return LanguageModelExpander(model_dir)


def added_words(expansion: str) -> list[str]:
    return [w for group in expansion.split(", ") for w in group.split(" ")]


# The word list


def test_word_list_is_a_few_hundred_plain_words() -> None:
    assert 250 <= len(WORDS) <= 1000
    assert all(re.fullmatch(r"[a-z0-9]+", w) for w in WORDS)
    raw = [ln.strip() for ln in WORDS_PATH.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(raw) == len(set(raw)) == len(WORDS)


def test_clean_prompt() -> None:
    assert clean_prompt("  a  red\n barn,. ") == "a red barn"


# The walk that keeps generation inside the list


def test_word_walk_spells_multi_token_words_and_commas() -> None:
    comma = 0
    walk = WordWalk({"sun": (1,), "sunset": (1, 2), "glow": (3, 4)}, comma, used={"glow"})
    assert walk.allowed() == {1}  # glow is used; no comma first
    walk.advance(1)  # "sun" complete, or "sunset" continuing
    assert walk.allowed() == {2, comma, 1}  # on to "sunset", a comma, or "sunset" as a new word
    walk.advance(2)  # "sunset"
    assert walk.allowed() == {1, comma}
    walk.advance(comma)
    assert walk.allowed() == {1}  # no two commas in a row
    walk.advance(1)
    assert walk.allowed() == {comma}  # "sun" is spelled and every other word is used
    assert walk.finish() == [1, 2, comma, 1]
    assert walk.used == {"glow", "sunset", "sun"}


def test_word_walk_drops_a_cut_off_word_and_trailing_comma() -> None:
    walk = WordWalk({"soft": (5,), "glowing": (6, 7, 8)}, 0)
    for token in (5, 0, 6, 7):
        walk.advance(token)
    assert walk.finish() == [5]


# The language model expander


def test_same_seed_same_words_and_other_seeds_differ(expander: LanguageModelExpander, model_dir: Path) -> None:
    first = expander.expand(PROMPT, 1234)
    assert first and first == expander.expand(PROMPT, 1234)
    # A second instance (a restarted server) agrees too.
    assert LanguageModelExpander(model_dir).expand(PROMPT, 1234) == first
    assert len({expander.expand(PROMPT, s) for s in (1, 2, 3)} | {first}) > 1


def test_only_new_list_words_are_added(expander: LanguageModelExpander) -> None:
    allowed = set(expander.spellings)
    assert len(allowed) > 300
    assert any(len(ids) == 1 for ids in expander.spellings.values())
    assert any(len(ids) > 1 for ids in expander.spellings.values())
    for seed in (1, 2):
        words = added_words(expander.expand(PROMPT, seed))
        assert set(words) <= allowed
        assert len(words) == len(set(words))  # no repeats
        assert not {"red", "barn", "snow", "soft", "light"} & set(words)  # nothing from the prompt


def test_forbidden_tokens_stay_out_even_when_the_model_wants_them(expander: LanguageModelExpander) -> None:
    tok = expander.tokenizer
    favourite = tok.encode(" zebra")
    comma = tok.encode(",")[0]

    def push(module: torch.nn.Module, args: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., favourite] += 50.0  # never in the list
        logits[..., tok.eos_token_id] += 50.0
        logits[..., comma] += 8.0  # commas, when allowed, become likely
        return logits

    hook = expander.model.lm_head.register_forward_hook(push)
    try:
        text = expander.expand(PROMPT, 7)
    finally:
        hook.remove()
    assert "zebra" not in text and "," in text
    assert set(added_words(text)) <= set(expander.spellings)
    assert re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*(, [a-z0-9]+( [a-z0-9]+)*)*", text)


def test_the_expansion_fills_the_prompts_last_chunk(expander: LanguageModelExpander) -> None:
    assert expander.budget(5) == 70
    assert expander.budget(75) == 0
    assert expander.budget(76) == 74
    assert expander.budget(1001) == 49
    tok = expander.tokenizer
    prompt_tokens = len(tok.encode(PROMPT + ","))
    added = len(tok.encode(" " + expander.expand(PROMPT, 3)))
    assert 0 < added <= 75 - prompt_tokens + 1  # the leading space may merge into the first word


def test_prompts_longer_than_the_model_window_still_expand(expander: LanguageModelExpander) -> None:
    long_prompt = "lighthouse on a cliff " * 80
    tokens = len(expander.tokenizer.encode(long_prompt.strip() + ","))
    assert tokens > expander.context and expander.budget(tokens) > 0
    words = added_words(expander.expand(long_prompt, 2))
    assert words and set(words) <= set(expander.spellings)


def test_empty_prompt_adds_nothing(expander: LanguageModelExpander) -> None:
    assert expander.expand("  , ", 1) == ""


def test_global_random_state_is_untouched(expander: LanguageModelExpander) -> None:
    torch.manual_seed(99)
    want = torch.rand(3)
    torch.manual_seed(99)
    expander.expand(PROMPT, 5)
    torch.testing.assert_close(torch.rand(3), want)


def test_bad_model_folders_fail_at_load(tmp_path: Path) -> None:
    with pytest.raises(ExpansionModelError, match="not a folder"):
        LanguageModelExpander(tmp_path / "missing")
    with pytest.raises(ExpansionModelError, match="cannot load"):
        LanguageModelExpander(tmp_path)


def test_no_expansion_is_a_no_op() -> None:
    assert NoExpansion().expand(PROMPT, 1) == "" and not NoExpansion.available


# Through the composer, as the engine calls it


def test_composer_expands_sample_i_with_seed_plus_i(model_dir: Path, expander: LanguageModelExpander) -> None:
    composer = build_composer(None, model_dir)
    assert composer.expander.available
    out = composer.compose(PROMPT, "", ["V2"], [40, 41])
    assert out.styles == ["V2"]
    assert out.notes["expansion"] == "applied"
    assert out.notes["expansions"] == [expander.expand(PROMPT, 40), expander.expand(PROMPT, 41)]
    assert out.positives == [f"{PROMPT}, {e}" for e in out.notes["expansions"]]
    assert out.positives[0] != out.positives[1]
