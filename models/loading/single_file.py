"""A single SDXL checkpoint `.safetensors` in the original (SGM / ComfyUI / A1111) key layout.

No hub call: the component configurations come from the tensor shapes (`checkpoint_shapes`), and
the tokenizers, which such files do not hold, from a local folder (`find_tokenizers`). The VAE gets
`force_upcast=True` unless the sidecar says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import InvalidTokenizerDir, ModelSpecError, TokenizersNotFound
from models.loading.checkpoint_shapes import PREFIXES, TE2, infer_configs, sidecar_path
from models.loading.hub import cached_snapshot, hub_cache_dir
from models.loading.source import SDXL_BASE_REPO, fit_tokenizer, has_tokenizer_files, tokenizer_download_hint
from models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from models.components import Components

log = logging.getLogger(__name__)

# Single files have no tokenizers; these repos' cached copies have the right ones, in this order.
TOKENIZER_REPOS = (SDXL_BASE_REPO, DEFAULT_MODEL)


@dataclass
class SingleFilePlan:
    path: Path
    configs: dict[str, dict[str, Any]]  # unet, vae, text_encoder, text_encoder_2, scheduler
    tokenizer_dirs: tuple[Path, Path]
    tokenizer_source: str


def single_file_plan(path: Path, tokenizer_dir: Path | None = None) -> SingleFilePlan:
    """Everything needed to load `path`, found without reading a weight: configs and tokenizers."""
    configs = infer_configs(path)
    dirs, source = find_tokenizers(path, tokenizer_dir)
    return SingleFilePlan(path=path, configs=configs, tokenizer_dirs=dirs, tokenizer_source=source)


def find_tokenizers(path: Path, tokenizer_dir: Path | None = None) -> tuple[tuple[Path, Path], str]:
    """Where the tokenizers for single file `path` are: (tokenizer dir, tokenizer_2 dir), source.

    A `tokenizer_dir` given by the caller wins, and a wrong one is an error rather than a silent fallback.
    """
    if tokenizer_dir is not None:
        root = Path(os.path.expanduser(tokenizer_dir))
        dirs = (root / "tokenizer", root / "tokenizer_2")
        if not all(has_tokenizer_files(d) for d in dirs):
            raise InvalidTokenizerDir(
                f"The tokenizer folder {root} must hold tokenizer/ and tokenizer_2/ sub-folders, each with"
                " vocab.json + merges.txt (or tokenizer.json).",
                root,
            )
        return dirs, f"the tokenizer folder given ({root})"
    beside = path.parent / f"{path.stem}.tokenizers"
    candidates = [
        (beside, f"{path.stem}.tokenizers/ beside the checkpoint"),
        (path.parent, "the checkpoint's folder"),
    ]
    for root, source in candidates:
        dirs = (root / "tokenizer", root / "tokenizer_2")
        if all(has_tokenizer_files(d) for d in dirs):
            return dirs, source
    for repo in TOKENIZER_REPOS:
        snapshot = cached_snapshot(repo)
        if snapshot:
            dirs = (snapshot / "tokenizer", snapshot / "tokenizer_2")
            if all(has_tokenizer_files(d) for d in dirs):
                return dirs, f"the Hugging Face cache of {repo}"
    searched = [
        "a folder passed in as tokenizer_dir (none was)",
        f"{beside}/ (i.e. <checkpoint name>.tokenizers/)",
        f"{path.parent}/ itself (tokenizer/ and tokenizer_2/ next to the file)",
        f"the Hugging Face cache ({hub_cache_dir()}) of {' or '.join(TOKENIZER_REPOS)}",
    ]
    raise TokenizersNotFound(
        f"{path} holds no tokenizers (single-file checkpoints never do), and none were found.\n"
        "Put SDXL's two CLIP tokenizers (tokenizer/ and tokenizer_2/ folders, each with vocab.json +"
        " merges.txt or tokenizer.json) in one of these places, searched in this order:\n"
        + "".join(f"  {i}. {place};\n" for i, place in enumerate(searched, 1))
        + tokenizer_download_hint(beside),
        checkpoint=path,
        searched=searched,
    )


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    # Parameters start on the meta device (no random init of billions of values, no second copy of
    # the weights); buffers such as CLIP's position ids are still made for real, as the state dict
    # does not carry them.
    try:
        from accelerate import init_empty_weights
    except ImportError:  # slower and twice the memory, but correct
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], part: str, path: Path) -> None:
    """Load `state` (from `to_diffusers`) into `model` in fp32. Converts `state` in place, so that
    each checkpoint tensor is freed once its fp32 copy exists (SDXL's UNet: 5 GB fp16 -> 10 GB fp32)."""
    import torch

    for key in list(state):
        state[key] = state.pop(key).to(torch.float32).contiguous()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelSpecError(
            f"The {part} weights in {path} do not fit the architecture read from them: {exc}\n"
            f"Give its config in {sidecar_path(path)}."
        ) from exc
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"{part}: some tensors were left unloaded")
    model.eval()


def to_diffusers(part: str, tensors: dict[str, torch.Tensor], model: Any, path: Path) -> dict[str, torch.Tensor]:
    """`part`'s original-layout tensors (keys with their checkpoint prefix) keyed as `model`'s state."""
    from diffusers.loaders import single_file_utils as conv

    if part == "unet":
        state = conv.convert_ldm_unet_checkpoint(tensors, dict(model.config))
    elif part == "vae":
        state = conv.convert_ldm_vae_checkpoint(tensors, dict(model.config))
    elif part == "text_encoder":
        state = conv.convert_ldm_clip_checkpoint(tensors)
    else:
        # OpenCLIP fuses q/k/v into in_proj and stores the projection transposed; this splits and flips.
        state = conv.convert_open_clip_checkpoint(model, tensors, prefix=TE2)
    expected = model.state_dict().keys()
    # Older transformers nest CLIPTextModel under `text_model.`, newer ones do not.
    if not any(k.startswith("text_model.") for k in expected):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # Some checkpoints carry CLIP's position ids, which transformers no longer saves.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelSpecError(
            f"The {part} weights in {path} do not fit the {part} architecture read from their shapes"
            f" ({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g."
            f" {unexpected[:3]}). If it is not a standard SDXL layout, give its config in"
            f" {sidecar_path(path)}."
        )
    return state


def load_single_file(plan: SingleFilePlan) -> Components:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.components import Components

    cfg, path = plan.configs, plan.path
    log.info("loading %s with tokenizers from %s", path, plan.tokenizer_source)
    tokenizers = [CLIPTokenizer.from_pretrained(str(d), local_files_only=True) for d in plan.tokenizer_dirs]
    for tok, part in zip(tokenizers, ("text_encoder", "text_encoder_2"), strict=True):
        fit_tokenizer(tok, cfg[part]["max_position_embeddings"])
        if len(tok) > cfg[part]["vocab_size"]:
            raise ModelSpecError(
                f"The tokenizer for {part} (from {plan.tokenizer_source}) has {len(tok)} tokens, but the"
                f" checkpoint's {part} knows only {cfg[part]['vocab_size']}: these are not its tokenizers."
            )

    def text_config(part: str, tok: CLIPTokenizer) -> CLIPTextConfig:
        ids = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
        return CLIPTextConfig(**{**cfg[part], **ids})

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())

        # One component at a time, so the file's tensors are never all in memory at once.
        def part_of(prefix: str) -> dict[str, torch.Tensor]:
            return {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}

        with parameters_on_meta():
            unet = UNet2DConditionModel(**cfg["unet"])
            vae = AutoencoderKL(**cfg["vae"])
            te1 = CLIPTextModel(text_config("text_encoder", tokenizers[0]))
            te2 = CLIPTextModelWithProjection(text_config("text_encoder_2", tokenizers[1]))
        for part, model in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
            state = to_diffusers(part, part_of(PREFIXES[part]), model, path)
            load_weights(model, state, part, path)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
    )


@dataclass(frozen=True)
class SingleFileSource:
    """A single original-layout `.safetensors` checkpoint, with its tokenizers found as above."""

    path: Path
    tokenizer_dir: Path | None = None

    def check(self) -> None:
        single_file_plan(self.path, self.tokenizer_dir)

    def load(self, *, progress: bool = True) -> Components:
        return load_single_file(single_file_plan(self.path, self.tokenizer_dir))

    def configs(self) -> dict[str, dict[str, Any]]:
        return infer_configs(self.path)
