"""Styles, as Fooocus defines them: named prompt templates, plus "V2", the prompt expansion.

A template style has a positive text, which may hold a `{prompt}` placeholder, and a negative text.
The built-in ones (Enhance, Sharp and a library) are ours, in `data/styles.json`; operators add or
replace template styles with JSON files in a folder of their own. This module imports neither torch
nor transformers, so that request validation can use the registry in the HTTP process; the engine's
composer, which applies the styles to a prompt, is `models.composer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.errors import StyleFileError, UnknownStyle

__all__ = [
    "EXPANSION",
    "EXPANSION_KIND",
    "TEMPLATE",
    "Style",
    "StyleFileError",
    "StyleRegistry",
    "UnknownStyle",
    "default_registry",
    "parse_styles",
    "style_key",
]

PLACEHOLDER = "{prompt}"
LIBRARY_PATH = Path(__file__).parent / "data" / "styles.json"
EXPANSION = "V2"
TEMPLATE, EXPANSION_KIND = "template", "expansion"
# Fooocus's own key names are accepted too, so an operator can drop in a style file written for it.
_POSITIVE_KEYS, _NEGATIVE_KEYS = ("positive", "prompt"), ("negative", "negative_prompt")
_FILE_KEYS = {"name", "aliases", "description", *_POSITIVE_KEYS, *_NEGATIVE_KEYS}


def style_key(name: str) -> str:
    """How names are compared: case, spacing, '-' and '_' do not matter ("fooocus_v2" is V2)."""
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


@dataclass(frozen=True)
class Style:
    name: str
    positive: str = ""
    negative: str = ""
    aliases: tuple[str, ...] = ()
    kind: str = TEMPLATE
    description: str = ""
    source: str = "builtin"

    @property
    def has_placeholder(self) -> bool:
        return PLACEHOLDER in self.positive

    def apply(self, prompt: str) -> str:
        """The positive text for `prompt` ("" when the style has none)."""
        if not self.has_placeholder:
            return self.positive.strip()
        return _tidy(self.positive.replace(PLACEHOLDER, prompt))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "kind": self.kind,
            "positive": self.positive,
            "negative": self.negative,
            "description": self.description,
            "source": self.source,
        }


V2 = Style(
    name=EXPANSION,
    aliases=("Fooocus V2",),
    kind=EXPANSION_KIND,
    description=(
        "Prompt expansion: a local language model adds descriptive words to the prompt, seeded per "
        "sample; skipped (with a note in the result) when the server has no expansion model."
    ),
)


def _tidy(text: str) -> str:
    # An empty prompt in "{prompt}, detail" must not leave stray separators behind.
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def _read_styles(path: Path, source: str) -> list[Style]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StyleFileError(f"style file {path}: {exc}") from None
    if not isinstance(data, list):
        raise StyleFileError(f"style file {path}: must hold a JSON list of style objects")
    styles = []
    for index, entry in enumerate(data):
        where = f"style file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise StyleFileError(f"{where}: must be an object")
        unknown = sorted(set(entry) - _FILE_KEYS)
        if unknown:
            raise StyleFileError(f"{where}: unknown keys {unknown}; allowed: {sorted(_FILE_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not style_key(name):
            raise StyleFileError(f"{where}: 'name' must be a non-empty string")
        where = f"style file {path}, style {name!r}"
        positive = _one_of(entry, _POSITIVE_KEYS, where)
        negative = _one_of(entry, _NEGATIVE_KEYS, where)
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and style_key(a) for a in aliases):
            raise StyleFileError(f"{where}: 'aliases' must be a list of non-empty strings")
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise StyleFileError(f"{where}: 'description' must be a string")
        for label in (name, *aliases):
            # The request field is comma-separated: such a name could never be selected.
            if "," in label:
                raise StyleFileError(f"{where}: names and aliases cannot contain ','")
        styles.append(
            Style(
                name=name.strip(),
                positive=positive,
                negative=negative,
                aliases=tuple(a.strip() for a in aliases),
                description=description,
                source=source,
            )
        )
    return styles


def _one_of(entry: dict, keys: tuple[str, str], where: str) -> str:
    present = [k for k in keys if k in entry]
    if len(present) > 1:
        raise StyleFileError(f"{where}: give either {keys[0]!r} or {keys[1]!r}, not both")
    value = entry[present[0]] if present else ""
    if not isinstance(value, str):
        raise StyleFileError(f"{where}: {present[0]!r} must be a string")
    return value.strip()


class StyleRegistry:
    """The known styles, in listing order, looked up by name or alias (see `style_key`)."""

    def __init__(self, styles: Iterable[Style]) -> None:
        self._styles: dict[str, Style] = {}
        self._keys: dict[str, str] = {}
        for style in styles:
            self._add(style)

    def _add(self, style: Style) -> None:
        for label in (style.name, *style.aliases):
            owner = self._keys.get(style_key(label))
            if owner is not None:
                raise StyleFileError(
                    f"style {style.name!r} ({style.source}): the name {label!r} is already taken "
                    f"by {owner!r} ({self._styles[owner].source})"
                )
        self._styles[style.name] = style
        for label in (style.name, *style.aliases):
            self._keys[style_key(label)] = style.name

    def _override(self, style: Style) -> None:
        """An operator's style: new, or replacing the texts of a built-in template of that name."""
        target = self._keys.get(style_key(style.name))
        if target is None:
            self._add(style)
            return
        current = self._styles[target]
        if current.kind != TEMPLATE:
            raise StyleFileError(f"{style.source}: {target!r} is the prompt expansion; it cannot be redefined")
        if current.source != "builtin":
            raise StyleFileError(f"{style.source}: style {style.name!r} is already defined in {current.source}")
        for alias in style.aliases:
            owner = self._keys.get(style_key(alias))
            if owner is not None and owner != target:
                raise StyleFileError(f"{style.source}: alias {alias!r} is already taken by {owner!r}")
        merged = replace(
            style,
            name=target,
            aliases=tuple(dict.fromkeys((*current.aliases, *style.aliases))),
        )
        self._styles[target] = merged
        for label in merged.aliases:
            self._keys[style_key(label)] = target

    @classmethod
    def load(cls, styles_dir: str | Path | None = None, library: Path = LIBRARY_PATH) -> StyleRegistry:
        """V2, the built-in library, then every `*.json` in `styles_dir` (in name order)."""
        registry = cls([V2, *_read_styles(library, "builtin")])
        if styles_dir is None:
            return registry
        folder = Path(styles_dir)
        if not folder.is_dir():
            raise StyleFileError(f"styles folder {folder} does not exist or is not a folder")
        for path in sorted(folder.glob("*.json")):
            for style in _read_styles(path, f"file {path.name}"):
                registry._override(style)
        return registry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and style_key(name) in self._keys

    def __len__(self) -> int:
        return len(self._styles)

    @property
    def names(self) -> list[str]:
        return list(self._styles)

    def get(self, name: str) -> Style:
        canonical = self._keys.get(style_key(name))
        if canonical is None:
            raise UnknownStyle(name.strip())
        return self._styles[canonical]

    def parse(self, text: str) -> list[str]:
        """Canonical names from a comma-separated request value: order kept, repeats dropped."""
        names: list[str] = []
        for raw in text.split(","):
            if not raw.strip():
                continue
            name = self.get(raw).name
            if name not in names:
                names.append(name)
        return names

    def describe(self) -> list[dict[str, Any]]:
        return [style.describe() for style in self._styles.values()]


@lru_cache(maxsize=8)
def _cached_registry(styles_dir: str | None) -> StyleRegistry:
    return StyleRegistry.load(styles_dir)


def default_registry(styles_dir: str | Path | None = None) -> StyleRegistry:
    """The registry for a styles folder (None: built-ins only), loaded once per process."""
    return _cached_registry(str(Path(styles_dir).resolve()) if styles_dir is not None else None)


def parse_styles(text: str, registry: StyleRegistry | None = None) -> list[str]:
    return (registry or default_registry()).parse(text)
