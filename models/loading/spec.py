"""Telling the accepted forms of model spec apart, and making the matching `ModelSource`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.errors import ModelSpecError
from models.loading.folder import FolderSource
from models.loading.hub import HubSource
from models.loading.random_weights import RandomSource
from models.loading.single_file import SingleFileSource
from models.loading.source import ACCEPTED_FORMS, ModelSource

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in {".safetensors", ".json", *_PICKLE_SUFFIXES}
    )


def source_for(spec: str, tokenizer_dir: str | Path | None = None) -> ModelSource:
    """The source `spec` names; raises ModelSpecError for a spec of no accepted form.

    `tokenizer_dir` (holding tokenizer/ and tokenizer_2/) is where a single-file checkpoint's
    tokenizers are looked for first; the other forms carry their own.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ModelSpecError(f"No model given.\n{ACCEPTED_FORMS}")
    if spec.startswith("random:"):
        source = RandomSource(spec)
        source.check()
        return source
    path = Path(os.path.expanduser(spec))
    # A folder or file that exists wins over a Hub id of the same spelling ("models/sdxl").
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return SingleFileSource(path, Path(tokenizer_dir) if tokenizer_dir is not None else None)
        if suffix in _PICKLE_SUFFIXES:
            raise ModelSpecError(
                f"{path} is a pickle checkpoint ({suffix}); beyond loads only .safetensors files, because"
                " unpickling can run arbitrary code. Convert it to .safetensors (for example with"
                " safetensors.torch.save_file on its state dict) or use a diffusers folder."
            )
        raise ModelSpecError(f"{path} is a file but not a .safetensors checkpoint.\n{ACCEPTED_FORMS}")
    if _looks_like_path(spec):
        raise ModelSpecError(
            f"No such file or folder: {path.resolve()}\n"
            "Check the path (relative paths are taken from the current working directory).\n"
            f"{ACCEPTED_FORMS}"
        )
    if _REPO_ID.match(spec) and ".." not in spec and "--" not in spec:
        return HubSource(spec)
    raise ModelSpecError(f"{spec!r} is neither a local file or folder nor a Hugging Face Hub id.\n{ACCEPTED_FORMS}")
