"""The engine's errors: one base class, and each error carries the facts a caller needs to word it.

Messages say what went wrong in the engine's own terms. How the caller exposes a setting (an
environment variable, a command-line option, an HTTP endpoint) is the caller's business: it catches
these types and adds its own hints. Torch-free, so the HTTP process can catch them too.
"""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class Cancelled(EngineError):
    """Raised from a step callback to stop a run between two denoising steps."""


class OutOfMemory(EngineError, MemoryError):
    """The device (or the host) ran out of memory during a run; the run's memory has been released."""

    def __init__(self, device: str, samples: int, canvas: tuple[int, int], detail: str = "") -> None:
        width, height = canvas
        super().__init__(f"out of memory on {device} with {samples} sample(s) of a {width}x{height} canvas")
        self.device = device
        self.samples = samples
        self.canvas = canvas
        self.detail = detail  # the allocator's own message (how much it tried to allocate), for logs


class NonFiniteOutput(EngineError, FloatingPointError):
    """The model produced NaN or infinite values: typically fp16 overflowing; bf16 or fp32 avoid it."""

    def __init__(self, dtype: str) -> None:
        super().__init__(f"the model produced NaN or infinite values when computing in {dtype}")
        self.dtype = dtype


class UnknownStyle(EngineError, ValueError):
    """A style name that the registry does not know."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown style '{name}'")
        self.name = name


class StyleFileError(EngineError, ValueError):
    """A style file or folder that cannot be used; the message names it. Raised at startup."""


class InvalidSpeedOption(EngineError, ValueError):
    """A speed knob given as text (`SpeedOptions.parse`) that is none of auto, 1 or 0 (or not what `expected` says)."""

    def __init__(self, option: str, value: str, expected: str = "auto, 1 or 0") -> None:
        super().__init__(f"{option} must be {expected}; got {value!r}")
        self.option = option
        self.value = value


class ModelSpecError(EngineError):
    """The model spec cannot be loaded. The message says why and what to do; it needs no traceback."""


class TokenizersNotFound(ModelSpecError):
    """A single-file checkpoint (which never holds tokenizers), no tokenizer folder passed in, and no
    tokenizers in any other place searched. `searched` lists the places, in order, the first being the
    tokenizer_dir parameter: a caller with a setting for it should name the setting there.
    """

    def __init__(self, message: str, checkpoint: Path, searched: list[str]) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.searched = searched


class InvalidTokenizerDir(ModelSpecError):
    """The tokenizer folder passed in lacks tokenizer/ or tokenizer_2/ (it is never silently skipped)."""

    def __init__(self, message: str, tokenizer_dir: Path) -> None:
        super().__init__(message)
        self.tokenizer_dir = tokenizer_dir


class HubModelUnavailable(ModelSpecError):
    """A Hub id that is not (completely) in the local cache and cannot be downloaded now.

    `offline` is True when downloads are off (HF_HUB_OFFLINE), False when the Hub could not be
    reached or the download failed.
    """

    def __init__(self, message: str, repo_id: str, cache_dir: Path, offline: bool) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.cache_dir = cache_dir
        self.offline = offline


class LoraError(EngineError, ValueError):
    """A LoRA that a request names cannot be used; the message says why, naming the LoRA."""


class NoLoraFolder(LoraError):
    """A request names LoRAs, and this engine was given no folder of them."""

    def __init__(self) -> None:
        super().__init__("no LoRA folder is configured, so no LoRA can be used")


class InvalidLoraName(LoraError):
    """A name that cannot be a LoRA's: a path, or a name with characters no file name in the folder has."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} is not a LoRA name (the file's name in the LoRA folder, without folders)")
        self.name = name


class UnknownLora(LoraError):
    """No file of that name in the LoRA folder."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown LoRA {name!r}")
        self.name = name


class LoraFileError(LoraError):
    """The LoRA's file cannot be read, or its weights do not fit this model."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"LoRA {name!r} cannot be used: {reason}")
        self.name = name
        self.reason = reason
