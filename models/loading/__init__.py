"""Turn a model spec into `Components`.

Accepted specs, one `ModelSource` each (see `spec.source_for`):

- `random:tiny`, `random:sdxl`: seeded random weights, no files at all (`random_weights`).
- a local diffusers folder with `model_index.json`: an SDXL inpainting or base pipeline (`folder`).
- a single SDXL checkpoint `.safetensors` in the original (SGM / ComfyUI / A1111) key layout
  (`single_file`); its configs are read from the header alone (`checkpoint_shapes`), its
  tokenizers from `tokenizer_dir` or a folder beside it or the Hugging Face cache.
- a Hugging Face Hub id `owner/name` in diffusers layout, from the local cache or downloaded (`hub`).

Everything comes back in fp32 on the CPU; the engine moves and casts. `check_spec` is the cheap
pre-flight for a caller to run before starting: it reads only JSON, file names and the safetensors
header (never torch), and raises `ModelSpecError` for a spec that cannot possibly load. The error
messages are for people: they say what is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import HubModelUnavailable, InvalidTokenizerDir, ModelSpecError, TokenizersNotFound
from models.loading.random_weights import RANDOM_SPECS
from models.loading.source import ACCEPTED_FORMS, SDXL_BASE_REPO, ModelSource
from models.loading.spec import source_for
from models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    from models.components import Components

__all__ = [
    "ACCEPTED_FORMS",
    "DEFAULT_MODEL",
    "RANDOM_SPECS",
    "SDXL_BASE_REPO",
    "HubModelUnavailable",
    "InvalidTokenizerDir",
    "ModelSource",
    "ModelSpecError",
    "TokenizersNotFound",
    "check_spec",
    "load_components",
    "model_configs",
    "source_for",
]


def load_components(spec: str, *, progress: bool = True, tokenizer_dir: str | Path | None = None) -> Components:
    """Load the model that `spec` names, in fp32 on the CPU. `progress` shows download progress bars.

    `tokenizer_dir` (with tokenizer/ and tokenizer_2/ inside) is searched first for the tokenizers
    of a single-file checkpoint; other forms of spec ignore it.
    """
    return source_for(spec, tokenizer_dir).load(progress=progress)


def check_spec(spec: str, tokenizer_dir: str | Path | None = None) -> None:
    """Raise `ModelSpecError` if `spec` cannot possibly load. Cheap: no torch, no weights read."""
    source_for(spec, tokenizer_dir).check()


def model_configs(spec: str, tokenizer_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The configs of the unet and text encoders of the model `spec` names, without torch or its weights
    (SDXL's for a Hub model not in the cache yet); `ModelSpecError` for a spec of no accepted form."""
    return source_for(spec, tokenizer_dir).configs()
