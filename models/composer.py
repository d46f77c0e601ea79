"""The engine's prompt composer: the user's prompt, negative prompt and styles in, per-sample texts out.

Template styles come from the registry (`models.styles`); the V2 expansion from an `Expander`
(`models.expansion`), loaded only when a model folder is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.styles import EXPANSION, EXPANSION_KIND, TEMPLATE, StyleRegistry, default_registry

if TYPE_CHECKING:
    import torch

    from models.expansion import Expander


def _join(pieces: Iterable[str]) -> str:
    return ", ".join(p for p in (q.strip() for q in pieces) if p)


@dataclass
class ComposedPrompts:
    positives: list[str]  # one per sample
    negatives: list[str]
    styles: list[str]  # the styles applied, canonical names
    notes: dict = field(default_factory=dict)


class PromptComposer:
    """Turns the user's prompt, negative prompt and styles into the texts encoded per sample.

    As in Fooocus: template positives follow in style order, preceded by the raw prompt unless a
    template placed it with `{prompt}`; the V2 expansion (expanding the raw prompt, seeded per
    sample) comes last; style negatives come first and the user's negative prompt last.
    """

    def __init__(self, registry: StyleRegistry | None = None, expander: Expander | None = None) -> None:
        if expander is None:
            from models.expansion import NoExpansion

            expander = NoExpansion()
        self.registry = registry if registry is not None else default_registry()
        self.expander = expander

    def compose(self, prompt: str, negative: str, styles: Sequence[str], seeds: Sequence[int]) -> ComposedPrompts:
        prompt, negative = prompt.strip(), (negative or "").strip()
        chosen = list({s.name: s for s in (self.registry.get(n) for n in styles)}.values())
        templates = [s for s in chosen if s.kind == TEMPLATE]
        positives = [s.apply(prompt) for s in templates]
        if not any(s.has_placeholder for s in templates):
            positives.insert(0, prompt)
        base = _join(positives)
        negative_text = _join([*(s.negative for s in templates), negative])

        notes: dict[str, Any] = {}
        expansions = [""] * len(seeds)
        applied = [s.name for s in chosen]
        if any(s.kind == EXPANSION_KIND for s in chosen):
            skipped = None
            if not self.expander.available:
                skipped = getattr(self.expander, "reason", "no expansion model")
            elif not prompt:
                skipped = "the prompt is empty"
            if skipped:
                notes["expansion"] = f"skipped: {skipped}"
                applied.remove(EXPANSION)
            else:
                expansions = [self.expander.expand(prompt, seed) for seed in seeds]
                notes["expansion"] = "applied"
                notes["expansions"] = expansions
        return ComposedPrompts(
            positives=[_join([base, e]) for e in expansions],
            negatives=[negative_text] * len(seeds),
            styles=applied,
            notes=notes,
        )


def build_composer(
    styles_dir: str | Path | None = None,
    expansion_model: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> PromptComposer:
    """The composer for a styles folder and an expansion model folder (None: none); a bad one fails here."""
    from models.expansion import LanguageModelExpander, NoExpansion

    expander: Expander = (
        LanguageModelExpander(expansion_model, device=device) if expansion_model is not None else NoExpansion()
    )
    return PromptComposer(default_registry(styles_dir), expander)
