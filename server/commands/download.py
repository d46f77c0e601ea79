"""`beyond download`: put a Hugging Face Hub model into the local cache ahead of time.

Only the files the engine's hub loader reads are fetched (models/loading.py: model_index.json, the
scheduler and both tokenizers, and per model part its config.json and one .safetensors weight set,
the fp16 variant where the repo has one). Once cached, `beyond serve` and `beyond outpaint` load it
with no network, HF_HUB_OFFLINE=1 included.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from models.names import DEFAULT_MODEL

PROG = "beyond download"
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SHARED_FOLDERS = ("scheduler/", "tokenizer/", "tokenizer_2/")
# Weight sets the loader accepts, in the order it prefers them for a download.
VARIANT_ORDER = ("fp16", None, "bf16")
_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?"
    r"(?:-\d+-of-\d+)?\.safetensors$"
)
_WEIGHT_INDEX = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)\.safetensors\.index(?:\.(?P<variant>\w+))?\.json$"
)
_ENV_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DownloadError(Exception):
    """Why the model cannot be downloaded, and what to do instead; printed as is, exit status 2."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "download",
        help="fetch a hub model into the Hugging Face cache ahead of time",
        description="Download the files the engine needs of a Hugging Face Hub model into the local cache.",
    )
    parser.add_argument(
        "spec", nargs="?", metavar="SPEC", help=f"a hub id owner/name (BEYOND_MODEL, default {DEFAULT_MODEL})"
    )


def wanted_files(repo_id: str, files: list[str]) -> list[str]:
    """The files of the repo the engine loads; DownloadError if it is no SDXL diffusers pipeline."""
    wanted = [f for f in files if f == "model_index.json" or f.startswith(SHARED_FOLDERS)]
    problems = [] if "model_index.json" in files else ["it has no model_index.json (not in diffusers layout)"]
    for part in MODEL_PARTS:
        names = [f.removeprefix(part + "/") for f in files if f.startswith(part + "/") and f.count("/") == 1]
        sets: dict[str | None, list[str]] = {}
        for name in names:
            match = _WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name)
            if match:
                sets.setdefault(match["variant"], []).append(name)
        chosen = next((v for v in VARIANT_ORDER if v in sets), "none")
        if "config.json" not in names:
            problems.append(f"it has no {part}/config.json")
        elif chosen == "none":
            problems.append(f"it publishes no .safetensors weights for {part}")
        else:
            wanted += [f"{part}/config.json", *(f"{part}/{n}" for n in sets[chosen])]
    if problems:
        raise DownloadError(
            f"{repo_id} is not an SDXL diffusers pipeline beyond can load:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return wanted


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return env in _ENV_TRUE or bool(constants.HF_HUB_OFFLINE)


def what_to_do(repo_id: str) -> str:
    folder = "models--" + repo_id.replace("/", "--")
    return (
        "What to do:\n"
        f"  - on a machine with internet, run `beyond download {repo_id}` (or `hf download {repo_id}`), then copy"
        f" its cache folder {folder}/ (under ~/.cache/huggingface/hub/ there) into {cache_dir()}/ here,"
        " or point HF_HOME at the copied cache;\n"
        "  - or run this command here again with network access and HF_HUB_OFFLINE unset;\n"
        "  - or use a local model instead: --model /path/to/diffusers-folder or --model /path/to/sdxl.safetensors."
    )


def repo_files(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        siblings = HfApi().model_info(repo_id).siblings or []
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in"
            " (`hf auth login`) or set HF_TOKEN, and run this again."
        ) from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"There is no model {repo_id} on the Hugging Face Hub (or it is private: log in with"
            " `hf auth login` or set HF_TOKEN)."
        ) from None
    # Transport errors differ between huggingface_hub versions; whatever stops the listing means
    # the Hub cannot be reached from here.
    except Exception as exc:
        raise DownloadError(
            f"Cannot reach the Hugging Face Hub to download {repo_id} ({type(exc).__name__}: {exc}).\n"
            + what_to_do(repo_id)
        ) from None
    return [s.rfilename for s in siblings]


def download(spec: str) -> Path:
    """Download `spec` into the cache and return its snapshot folder; DownloadError says why not."""
    from huggingface_hub import snapshot_download

    from models.loading import ModelSpecError, check_spec

    if offline():
        try:
            check_spec(spec)  # offline, this passes only for a complete cached copy
        except ModelSpecError:
            raise DownloadError(
                f"{spec} is not (completely) in the Hugging Face cache ({cache_dir()}), and downloads are off"
                " (HF_HUB_OFFLINE=1).\n" + what_to_do(spec)
            ) from None
        return Path(snapshot_download(spec, local_files_only=True))
    files = wanted_files(spec, repo_files(spec))
    print(f"{PROG}: fetching {len(files)} files of {spec} into {cache_dir()}", file=sys.stderr)
    try:
        folder = Path(snapshot_download(spec, allow_patterns=files))
    except Exception as exc:  # as in repo_files: the transport's errors vary
        raise DownloadError(f"Downloading {spec} failed ({type(exc).__name__}: {exc}).\n" + what_to_do(spec)) from None
    try:
        check_spec(spec)
    except ModelSpecError as exc:
        raise DownloadError(f"{spec} was downloaded to {folder} but cannot be loaded:\n{exc}") from None
    return folder


def run(args: argparse.Namespace) -> int:
    from models.loading import ModelSpecError, check_spec

    spec = (args.spec or os.environ.get("BEYOND_MODEL") or DEFAULT_MODEL).strip()
    # Anything but a hub id is either local (nothing to fetch) or an error check_spec explains.
    local = not _REPO_ID.match(spec) or os.path.exists(os.path.expanduser(spec))
    try:
        if local:
            check_spec(spec)
            print(f"{spec} is {'built in' if spec.startswith('random:') else 'a local model'}: nothing to download.")
            return 0
        folder = download(spec)
    except ModelSpecError as exc:
        print(f"{PROG}: cannot use {spec!r}: {exc}", file=sys.stderr)
        return 2
    except DownloadError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run it again to resume the download", file=sys.stderr)
        return 130
    print(f"{spec} is in the cache: {folder}")
    return 0
