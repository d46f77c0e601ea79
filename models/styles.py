"""Styles: prompt templates (Fooocus conventions) and the V2 prompt expansion."""

from __future__ import annotations

from dataclasses import dataclass, field

KNOWN = {"v2": "V2", "fooocus v2": "V2", "enhance": "Enhance", "fooocus enhance": "Enhance",
         "sharp": "Sharp", "fooocus sharp": "Sharp"}


class UnknownStyle(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown style {name!r}")
        self.name = name


def parse_styles(text: str) -> list[str]:
    names: list[str] = []
    for raw in text.split(","):
        key = raw.strip().lower()
        if not key:
            continue
        if key not in KNOWN:
            raise UnknownStyle(raw.strip())
        if KNOWN[key] not in names:
            names.append(KNOWN[key])
    return names


@dataclass
class ComposedPrompts:
    positives: list[str]  # one per sample
    negatives: list[str]
    styles: list[str]
    notes: dict = field(default_factory=dict)


class PromptComposer:
    """Turns the user's prompt, negative prompt and styles into the texts encoded per sample."""

    def compose(self, prompt: str, negative: str, styles: list[str], seeds: list[int]) -> ComposedPrompts:
        return ComposedPrompts([prompt] * len(seeds), [negative] * len(seeds), styles)


def build_composer(styles_dir=None, expansion_model=None) -> PromptComposer:
    return PromptComposer()
