"""Hugging Face Hub ids `owner/name` in diffusers layout.

Used from the local cache when a complete copy is there (without asking the Hub, so start-up works
on a flaky network), else downloaded into it: only the files the engine needs, the `fp16` variant
when the repo has one. Hugging Face's own settings (HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE) are
taken from `huggingface_hub.constants`, which reads them when huggingface_hub is imported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import HubModelUnavailable, ModelSpecError
from models.loading.folder import WEIGHTS, WEIGHTS_INDEX, folder_problems, load_folder
from models.loading.source import ACCEPTED_FORMS, MODEL_PARTS, folder_configs, sdxl_configs

if TYPE_CHECKING:
    from models.components import Components

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(\w+))?-\d+-of-\d+\.safetensors$")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id`'s main revision, if any; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; bad ids are ValueErrors
        return None


def _unavailable(repo_id: str, reason: str, *, offline: bool, problems: list[str] | None = None) -> HubModelUnavailable:
    cache = hub_cache_dir()
    folder = "models--" + repo_id.replace("/", "--")
    where, detail = "not", ""
    if problems:
        where = "only partly"
        detail = "The cached copy is incomplete:\n" + "\n".join(f"  - {p}" for p in problems) + "\n"
    message = (
        f"Model {repo_id} is {where} in the local Hugging Face cache ({cache}), and {reason}.\n{detail}"
        "To fix this, either:\n"
        f"  - on a machine with internet, run `hf download {repo_id}` (older huggingface_hub:"
        f" `huggingface-cli download {repo_id}`), then copy its cache folder {folder}/ into {cache}/"
        " here (or point HF_HOME at a copied cache);\n"
        "  - or load it once with network access and HF_HUB_OFFLINE unset, so it is downloaded into"
        " the cache;\n"
        "  - or pass a local diffusers folder or a single SDXL .safetensors file as the model instead."
    )
    return HubModelUnavailable(message, repo_id=repo_id, cache_dir=cache, offline=offline)


def _hub_files(repo_id: str) -> list[str]:
    """The repo's file list, or a ModelSpecError saying why it cannot be had."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        # model_info fails at once when the Hub is unreachable; list_repo_files retries for ~20 s.
        siblings = HfApi().model_info(repo_id).siblings or []
    except GatedRepoError as exc:
        raise ModelSpecError(
            f"Model {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in"
            " (`hf auth login`) or set HF_TOKEN."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSpecError(
            f"There is no model {repo_id} on the Hugging Face Hub (or it is private: log in with"
            f" `hf auth login` or set HF_TOKEN).\n{ACCEPTED_FORMS}"
        ) from exc
    # Transport errors differ between huggingface_hub versions (requests, httpx, httpx2): whatever
    # stops the listing means the model cannot be had, and the message keeps the cause.
    except Exception as exc:
        reason = f"the Hugging Face Hub cannot be reached ({type(exc).__name__}: {exc})"
        raise _unavailable(repo_id, reason, offline=False) from exc
    return [s.rfilename for s in siblings]


def hub_download_list(repo_id: str, files: list[str]) -> list[str]:
    """The files of `repo_id` the engine needs: configs, tokenizers, one safetensors set per model."""
    wanted = [f for f in files if f == "model_index.json" or f.startswith(("scheduler/", "tokenizer/", "tokenizer_2/"))]
    problems = [] if "model_index.json" in files else ["it has no model_index.json (not in diffusers layout)"]
    for part in MODEL_PARTS:
        names = [f[len(part) + 1 :] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        variants: dict[str | None, list[str]] = {}
        for name in names:
            m = WEIGHTS.match(name) or WEIGHTS_INDEX.match(name)
            # Shards ("model.fp16-00001-of-00002.safetensors") belong to the set their index names.
            shard = _SHARD.match(name)
            if m and m["ext"] == "safetensors":
                variants.setdefault(m["variant"], []).append(name)
            elif shard:
                variants.setdefault(shard[1], []).append(name)
        # fp16 halves the download; the weights are cast to fp32 at load, and GPUs run fp16 anyway.
        choices = [v for v in ("fp16", None, "bf16") if v in variants]
        if "config.json" not in names:
            problems.append(f"it has no {part}/config.json")
        elif not choices:
            problems.append(f"it publishes no .safetensors weights for {part}")
        else:
            wanted += [f"{part}/config.json", *(f"{part}/{n}" for n in variants[choices[0]])]
    if problems:
        raise ModelSpecError(
            f"Hub model {repo_id} is not an SDXL pipeline beyond can load:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return wanted


def check_hub(repo_id: str) -> None:
    snapshot = cached_snapshot(repo_id)
    problems = folder_problems(snapshot) if snapshot else None
    if snapshot and not problems:
        return
    if offline():
        raise _unavailable(repo_id, "downloads are off (HF_HUB_OFFLINE=1)", offline=True, problems=problems)
    hub_download_list(repo_id, _hub_files(repo_id))


def load_hub(repo_id: str, *, progress: bool = True) -> Components:
    # A complete cached copy is used without asking the Hub: start-up then works on a flaky network.
    snapshot = cached_snapshot(repo_id)
    problems = folder_problems(snapshot) if snapshot else None
    if snapshot and not problems:
        return load_folder(snapshot, what=f"the cached copy of {repo_id} ({snapshot})")
    if offline():
        raise _unavailable(repo_id, "downloads are off (HF_HUB_OFFLINE=1)", offline=True, problems=problems)
    wanted = hub_download_list(repo_id, _hub_files(repo_id))
    log.info("downloading %s (%d files) into %s", repo_id, len(wanted), hub_cache_dir())
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=wanted))
    except Exception as exc:  # as in _hub_files
        reason = f"downloading it failed ({type(exc).__name__}: {exc})"
        raise _unavailable(repo_id, reason, offline=False) from exc
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return load_folder(folder, what=f"the downloaded copy of {repo_id} ({folder})")


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub id in diffusers layout."""

    repo_id: str

    def check(self) -> None:
        check_hub(self.repo_id)

    def load(self, *, progress: bool = True) -> Components:
        return load_hub(self.repo_id, progress=progress)

    def configs(self) -> dict[str, dict[str, Any]]:
        folder = cached_snapshot(self.repo_id)
        try:
            return folder_configs(folder) if folder is not None else sdxl_configs()
        except ModelSpecError:  # not all there yet: it is fetched when the engine loads
            return sdxl_configs()
