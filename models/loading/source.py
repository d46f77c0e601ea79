"""The interface every kind of model spec implements, and what the kinds share.

A `ModelSource` is made from a spec by `models.loading.spec.source_for`. `check()` is the cheap
pre-flight: it reads only JSON, file names and safetensors headers (never torch, never a weight)
and raises `ModelSpecError` for a spec that cannot possibly load. `load()` returns `Components`, in
fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from models.errors import ModelSpecError
from models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from models.components import Components

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2")

ACCEPTED_FORMS = (
    "Accepted model specs:\n"
    "  - random:tiny or random:sdxl (random weights, for tests and timing)\n"
    "  - a local diffusers folder (holding model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,"
    " tokenizer/, tokenizer_2/, scheduler/)\n"
    "  - a single SDXL checkpoint file ending in .safetensors (original SGM/ComfyUI/A1111 layout)\n"
    f"  - a Hugging Face Hub id such as {DEFAULT_MODEL}"
)


class ModelSource(Protocol):
    """One accepted form of model spec."""

    def check(self) -> None:
        """Raise `ModelSpecError` if this source cannot possibly load. No torch, no weights read."""
        ...

    def load(self, *, progress: bool = True) -> Components:
        """The model's components in fp32 on the CPU. `progress` shows download progress bars."""
        ...

    def configs(self) -> dict[str, dict[str, Any]]:
        """The configs of its unet, text_encoder and text_encoder_2 (diffusers' and transformers' forms),
        read without torch or weights; SDXL's where they cannot be read yet (a Hub model not downloaded)."""
        ...


def sdxl_configs() -> dict[str, dict[str, Any]]:
    from models import architectures as arch

    return {"unet": arch.SDXL_UNET, "text_encoder": arch.SDXL_TEXT_ENCODER, "text_encoder_2": arch.SDXL_TEXT_ENCODER_2}


def folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """The configs of a diffusers folder's unet and text encoders."""
    return {part: read_json(folder / part / "config.json") for part in ("unet", "text_encoder", "text_encoder_2")}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} does not hold a JSON object.")
    return data


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def tokenizer_download_hint(target: Path) -> str:
    """How to fetch SDXL's two tokenizers (and nothing else) into `target` on a connected machine."""
    return (
        f"The SDXL tokenizers are in {SDXL_BASE_REPO}; on a connected machine, `hf download {SDXL_BASE_REPO}`"
        f" with the include patterns 'tokenizer/*' 'tokenizer_2/*' and {target} as its local folder fetches"
        " just them."
    )


def fit_tokenizer(tokenizer: CLIPTokenizer, positions: int) -> CLIPTokenizer:
    # A tokenizer built from bare vocab/merges files reports an "unlimited" length; SDXL's text
    # encoders have 77 positions and the prompt code pads to model_max_length.
    if not tokenizer.model_max_length or tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
    return tokenizer
