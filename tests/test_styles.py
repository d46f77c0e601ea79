"""Styles: parsing, the built-in library, operator files, and how prompts are composed (Fooocus rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.composer import ComposedPrompts, PromptComposer, build_composer
from models.errors import EngineError
from models.styles import (
    LIBRARY_PATH,
    StyleFileError,
    StyleRegistry,
    UnknownStyle,
    default_registry,
    parse_styles,
)

ENHANCE_NEG = default_registry().get("Enhance").negative
SHARP = default_registry().get("Sharp")


class FakeExpander:
    """Stands in for the language model: a deterministic function of (prompt, seed), calls recorded."""

    available = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def expand(self, prompt: str, seed: int) -> str:
        self.calls.append((prompt, seed))
        return f"detail{seed}, glow"


def write(folder: Path, name: str, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# Parsing


def test_parse_trims_ignores_case_keeps_order_and_drops_repeats() -> None:
    assert parse_styles(" sharp ,V2,  ENHANCE, v2 ,Sharp") == ["Sharp", "V2", "Enhance"]
    assert parse_styles("V2,Enhance,Sharp") == ["V2", "Enhance", "Sharp"]


def test_long_forms_are_the_same_styles() -> None:
    assert parse_styles("Fooocus V2, fooocus enhance, FOOOCUS SHARP") == ["V2", "Enhance", "Sharp"]
    assert parse_styles("Fooocus V2,V2,Enhance,Fooocus Enhance") == ["V2", "Enhance"]
    # Spacing, '-' and '_' do not matter either.
    assert parse_styles("fooocus_v2, Fooocus-Sharp, oil   painting") == ["V2", "Sharp", "Oil Painting"]


def test_empty_values_mean_no_styles() -> None:
    assert parse_styles("") == []
    assert parse_styles(" , ,") == []


def test_unknown_style_names_it() -> None:
    with pytest.raises(UnknownStyle) as caught:
        parse_styles("V2, Bogus Style ,Nope")
    # The fact, without the server's wording: the HTTP layer adds where the known styles are listed.
    assert str(caught.value) == "unknown style 'Bogus Style'"
    assert caught.value.name == "Bogus Style"
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, EngineError)


def test_styles_module_imports_without_torch() -> None:
    code = "import sys, models.styles as s; s.default_registry(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# The built-in library


def test_library_is_ours_and_complete() -> None:
    raw = json.loads(LIBRARY_PATH.read_text())
    names = [entry["name"] for entry in raw]
    assert "Enhance" in names and "Sharp" in names
    assert len(set(names) - {"Enhance", "Sharp"}) >= 20
    registry = default_registry()
    assert registry.names[0] == "V2" and len(registry) == len(raw) + 1
    for entry in raw:
        style = registry.get(entry["name"])
        assert style.positive or style.negative, style.name
        assert style.positive.count("{prompt}") <= 1, style.name
        # Our texts are plain: no attention-weight syntax that our encoder would read literally.
        assert not any(c in style.positive + style.negative for c in "()[]:"), style.name


def test_enhance_and_sharp_follow_fooocus_shapes() -> None:
    enhance = default_registry().get("Enhance")
    assert enhance.positive == "" and "watermark" in enhance.negative
    assert SHARP.has_placeholder and "blurry" in SHARP.negative


def test_describe_lists_every_style() -> None:
    listing = default_registry().describe()
    assert [d["name"] for d in listing] == default_registry().names
    v2 = listing[0]
    assert v2["kind"] == "expansion" and v2["aliases"] == ["Fooocus V2"]
    sharp = next(d for d in listing if d["name"] == "Sharp")
    assert sharp == {
        "name": "Sharp",
        "aliases": ["Fooocus Sharp"],
        "kind": "template",
        "positive": SHARP.positive,
        "negative": SHARP.negative,
        "description": "",
        "source": "builtin",
    }
    json.dumps(listing)


def test_default_registry_is_cached_per_folder(tmp_path: Path) -> None:
    assert default_registry() is default_registry()
    write(tmp_path, "a.json", [{"name": "Mine", "positive": "{prompt}, mine"}])
    assert default_registry(tmp_path) is default_registry(str(tmp_path))
    assert "Mine" in default_registry(tmp_path) and "Mine" not in default_registry()


# Operator files


def test_operator_styles_are_added_after_the_library(tmp_path: Path) -> None:
    write(tmp_path, "b.json", [{"name": "Zeta", "positive": "{prompt} z", "aliases": ["zz"]}])
    write(tmp_path, "a.json", [{"name": "Alpha", "prompt": "alpha {prompt}", "negative_prompt": "beta"}])
    write(tmp_path, "notes.txt", "not a style file")
    registry = StyleRegistry.load(tmp_path)
    assert registry.names[-2:] == ["Alpha", "Zeta"]
    assert registry.parse("ZZ, alpha") == ["Zeta", "Alpha"]
    alpha = registry.get("Alpha")
    assert (alpha.positive, alpha.negative, alpha.source) == ("alpha {prompt}", "beta", "file a.json")


def test_operator_can_replace_a_builtin_template(tmp_path: Path) -> None:
    write(tmp_path, "s.json", [{"name": "fooocus sharp", "positive": "{prompt}, razor", "negative": "soft"}])
    registry = StyleRegistry.load(tmp_path)
    sharp = registry.get("Sharp")
    assert (sharp.name, sharp.positive, sharp.negative) == ("Sharp", "{prompt}, razor", "soft")
    assert registry.parse("Fooocus Sharp") == ["Sharp"]
    assert registry.names.count("Sharp") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "bad.json"),
        ({"name": "X"}, "JSON list"),
        (["X"], "must be an object"),
        ([{"positive": "{prompt}"}], "'name'"),
        ([{"name": "  "}], "'name'"),
        ([{"name": "X", "postive": "{prompt}"}], "unknown keys ['postive']"),
        ([{"name": "X", "positive": 3}], "'positive' must be a string"),
        ([{"name": "X", "positive": "a", "prompt": "b"}], "not both"),
        ([{"name": "a, b"}], "cannot contain ','"),
        ([{"name": "X", "aliases": "y"}], "'aliases'"),
        ([{"name": "X"}, {"name": "x"}], "already"),
        ([{"name": "V2", "positive": "{prompt}"}], "prompt expansion"),
        ([{"name": "Fooocus V2"}], "prompt expansion"),
        ([{"name": "New", "aliases": ["Sharp"]}], "already taken by 'Sharp'"),
    ],
)
def test_malformed_files_fail_naming_the_file(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(StyleFileError) as caught:
        StyleRegistry.load(tmp_path)
    assert message in str(caught.value)
    assert path.name in str(caught.value)


def test_the_same_style_in_two_operator_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "one.json", [{"name": "Mine", "positive": "{prompt}"}])
    write(tmp_path, "two.json", [{"name": "MINE", "positive": "{prompt}!"}])
    with pytest.raises(StyleFileError, match=r"one\.json"):
        StyleRegistry.load(tmp_path)


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StyleFileError, match="nowhere"):
        StyleRegistry.load(tmp_path / "nowhere")
    with pytest.raises(StyleFileError, match="nowhere"):
        build_composer(tmp_path / "nowhere", None)


# Composition


def compose(styles: list[str], prompt: str = "a red barn", negative: str = "", **kw: object) -> ComposedPrompts:
    return PromptComposer(**kw).compose(prompt, negative, styles, [7])  # type: ignore[arg-type]


def test_no_styles_leaves_the_texts_alone() -> None:
    out = compose([], "  a red barn ", " people ")
    assert (out.positives, out.negatives, out.styles, out.notes) == (["a red barn"], ["people"], [], {})


def test_placeholder_template_places_the_prompt_once() -> None:
    out = compose(["Sharp"], negative="people")
    assert out.positives == [SHARP.positive.replace("{prompt}", "a red barn")]
    assert out.positives[0].count("a red barn") == 1
    assert out.negatives == [f"{SHARP.negative}, people"]


def test_template_without_placeholder_follows_the_raw_prompt() -> None:
    detailed = default_registry().get("Detailed")
    assert not detailed.has_placeholder
    assert compose(["Detailed"]).positives == [f"a red barn, {detailed.positive}"]


def test_templates_combine_in_order_with_negatives_first() -> None:
    reg = default_registry()
    watercolor, detailed = reg.get("Watercolor"), reg.get("Detailed")
    out = compose(["Detailed", "Watercolor", "Enhance"], negative="people")
    # A placeholder anywhere means the raw prompt is not prepended.
    assert out.positives == [f"{detailed.positive}, {watercolor.positive.replace('{prompt}', 'a red barn')}"]
    assert out.negatives == [f"{detailed.negative}, {watercolor.negative}, {ENHANCE_NEG}, people"]
    assert out.styles == ["Detailed", "Watercolor", "Enhance"]


def test_compose_accepts_any_spelling_and_drops_repeats() -> None:
    out = compose(["fooocus sharp", "Sharp"])
    assert out.styles == ["Sharp"]
    with pytest.raises(UnknownStyle):
        compose(["Sharp", "Nope"])


def test_an_empty_prompt_leaves_no_stray_commas() -> None:
    out = compose(["Sharp"], prompt="  ")
    assert out.positives == [SHARP.positive.replace("{prompt}, ", "")]
    assert compose(["Enhance"], prompt="").positives == [""]


def test_v2_without_a_model_is_skipped_with_a_note() -> None:
    out = PromptComposer().compose("a red barn", "", ["V2", "Enhance", "Sharp"], [5, 6])
    assert out.styles == ["Enhance", "Sharp"]
    assert out.notes["expansion"].startswith("skipped: no expansion model")
    sharp = SHARP.positive.replace("{prompt}", "a red barn")
    assert out.positives == [sharp, sharp]
    assert out.negatives == [f"{ENHANCE_NEG}, {SHARP.negative}"] * 2


def test_v2_appends_each_samples_expansion_last() -> None:
    fake = FakeExpander()
    out = PromptComposer(expander=fake).compose("a red barn", "people", ["Sharp", "V2", "Enhance"], [5, 6])
    assert fake.calls == [("a red barn", 5), ("a red barn", 6)]
    sharp = SHARP.positive.replace("{prompt}", "a red barn")
    assert out.positives == [f"{sharp}, detail5, glow", f"{sharp}, detail6, glow"]
    assert out.negatives == [f"{SHARP.negative}, {ENHANCE_NEG}, people"] * 2
    assert out.styles == ["Sharp", "V2", "Enhance"]
    assert out.notes == {"expansion": "applied", "expansions": ["detail5, glow", "detail6, glow"]}


def test_v2_alone_expands_the_raw_prompt() -> None:
    out = PromptComposer(expander=FakeExpander()).compose(" a red barn ", "", ["V2"], [1])
    assert out.positives == ["a red barn, detail1, glow"]
    assert out.negatives == [""]


def test_v2_with_an_empty_prompt_is_skipped() -> None:
    fake = FakeExpander()
    out = PromptComposer(expander=fake).compose("", "", ["V2"], [1])
    assert fake.calls == [] and out.styles == []
    assert out.notes == {"expansion": "skipped: the prompt is empty"}


def test_composer_uses_its_registry(tmp_path: Path) -> None:
    write(tmp_path, "m.json", [{"name": "Mine", "positive": "<{prompt}>", "negative": "theirs"}])
    composer = build_composer(tmp_path, None)
    out = composer.compose("cat", "", ["Mine"], [1])
    assert (out.positives, out.negatives) == (["<cat>"], ["theirs"])
    assert not composer.expander.available
