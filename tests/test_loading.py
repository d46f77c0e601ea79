"""models.loading: every accepted spec form, offline, on tiny models; and the errors people will see."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models import architectures as arch
from models import loading
from models.components import Components
from models.loading import (
    DEFAULT_MODEL,
    InvalidTokenizerDir,
    ModelSpecError,
    TokenizersNotFound,
    check_spec,
    load_components,
)
from models.loading.checkpoint_shapes import PREFIXES
from models.loading.hub import hub_download_list
from models.loading.single_file import single_file_plan, to_diffusers
from models.random_models import RANDOM_SPECS, build_random
from tests.checkpoint_conversion import (
    clip_to_original,
    open_clip_to_original,
    save_original_checkpoint,
    save_tokenizers,
    unet_to_original,
    vae_to_original,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may reach the network or see the machine's own cache."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads its variables once, at import; models.loading uses what it read.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def tiny(in_channels: int = 9) -> Components:
    components = build_random("random:tiny")
    if in_channels != arch.TINY_UNET["in_channels"]:
        torch.manual_seed(7)
        components.unet = UNet2DConditionModel(**{**arch.TINY_UNET, "in_channels": in_channels}).eval()
    return components


def assert_same_weights(a: Components, b: Components) -> None:
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert sb[key].dtype == torch.float32, (part, key)
            assert torch.equal(sa[key], sb[key]), (part, key)


@torch.no_grad()
def assert_same_outputs(a: Components, b: Components) -> None:
    """Equal weights are not enough: head counts, group norms and activations leave no trace in them.

    Not bit-equal: the same weights at other addresses take other vectorised paths (about 1e-7 off,
    with diffusers' own from_pretrained too); a wrong config is off by far more.
    """
    ids = a.tokenizer(["a red boat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, b.tokenizer(["a red boat"], padding="max_length", return_tensors="pt").input_ids)
    close(a.text_encoder(ids).last_hidden_state, b.text_encoder(ids).last_hidden_state)
    close(a.text_encoder_2(ids).text_embeds, b.text_encoder_2(ids).text_embeds)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, a.unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 77, a.unet.config.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(1, a.text_encoder_2.config.projection_dim, generator=g),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    out_a = a.unet(sample, 500, context, added_cond_kwargs=added).sample
    close(out_a, b.unet(sample, 500, context, added_cond_kwargs=added).sample)
    latents = torch.randn(1, 4, 4, 4, generator=g)
    close(a.vae.decode(latents).sample, b.vae.decode(latents).sample)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def fake_hub_cache(home: Path, repo_id: str, fill: Callable[[Path], object]) -> Path:
    """A Hugging Face cache entry for `repo_id` (refs/main -> snapshot), filled by `fill`."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    fill(snapshot)
    return snapshot


def test_random_specs_agree_with_the_builder() -> None:
    assert loading.RANDOM_SPECS == RANDOM_SPECS
    check_spec("random:tiny")
    assert load_components("random:tiny").unet.config.in_channels == 9


# --- diffusers folders ------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(tmp_path: Path) -> None:
    original = tiny()
    original.save(tmp_path / "model")
    check_spec(str(tmp_path / "model"))
    loaded = load_components(str(tmp_path / "model"))
    assert_same_weights(original, loaded)
    assert loaded.unet.config.in_channels == 9
    assert loaded.tokenizer.model_max_length == loaded.tokenizer_2.model_max_length == 77
    assert loaded.tokenizer_2.pad_token == "!"
    public = {k: v for k, v in original.scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == public
    assert loaded.vae.config.force_upcast is True


def test_diffusers_folder_with_a_base_unet(tmp_path: Path) -> None:
    original = tiny(in_channels=4)
    original.save(tmp_path / "base")
    loaded = load_components(str(tmp_path / "base"))
    assert loaded.unet.config.in_channels == 4
    assert_same_weights(original, loaded)


def test_diffusers_folder_with_only_fp16_weights(tmp_path: Path) -> None:
    original = tiny()
    half = build_random("random:tiny")
    for part in PARTS:
        getattr(half, part).half()
    StableDiffusionXLInpaintPipeline(**half.as_pipeline_kwargs()).save_pretrained(
        str(tmp_path / "fp16"), variant="fp16"
    )
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_components(str(tmp_path / "fp16"))
    for part in PARTS:
        for key, value in getattr(original, part).state_dict().items():
            got = getattr(loaded, part).state_dict()[key]
            assert got.dtype == torch.float32
            assert torch.equal(got, value.half().float() if value.is_floating_point() else value), key


def test_diffusers_folder_without_tokenizers_says_where_to_get_them(tmp_path: Path) -> None:
    tiny().save(tmp_path / "model")
    for f in (tmp_path / "model" / "tokenizer_2").iterdir():
        f.unlink()
    for call in (check_spec, load_components):
        with pytest.raises(ModelSpecError) as err:
            call(str(tmp_path / "model"))
        message = str(err.value)
        assert "tokenizer_2/" in message and "tokenizer/ and" not in message
        assert f"hf download {loading.SDXL_BASE_REPO}" in message


# --- single original-layout checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [9, 4])
def test_single_file_checkpoint_loads_offline(tmp_path: Path, in_channels: int) -> None:
    original = tiny(in_channels)
    path = save_original_checkpoint(original, tmp_path / "tiny.safetensors")
    save_tokenizers(original, tmp_path)  # tokenizer/ and tokenizer_2/ beside the file
    check_spec(str(path))
    loaded = load_components(str(path))
    assert loaded.unet.config.in_channels == in_channels
    assert_same_weights(original, loaded)
    assert_same_outputs(original, loaded)
    assert loaded.vae.config.force_upcast is True
    assert loaded.scheduler.config.prediction_type == "epsilon"


def test_single_file_tokenizer_search_order(tmp_path: Path, offline: Path) -> None:
    original = tiny()
    path = save_original_checkpoint(original, tmp_path / "model.safetensors")

    with pytest.raises(TokenizersNotFound) as err:
        check_spec(str(path))
    message = str(err.value)
    for place in ("tokenizer_dir", "model.tokenizers", loading.SDXL_BASE_REPO, DEFAULT_MODEL):
        assert place in message
    assert err.value.checkpoint == path
    assert len(err.value.searched) == 4 and "tokenizer_dir" in err.value.searched[0]

    # 4. the Hugging Face cache of the default model
    fake_hub_cache(offline, DEFAULT_MODEL, lambda snap: save_tokenizers(original, snap))
    assert single_file_plan(path).tokenizer_source == f"the Hugging Face cache of {DEFAULT_MODEL}"
    # 3. beside the file, before the cache
    save_tokenizers(original, tmp_path)
    assert single_file_plan(path).tokenizer_source == "the checkpoint's folder"
    # 2. <stem>.tokenizers/, before the plain folders beside it
    save_tokenizers(original, tmp_path / "model.tokenizers")
    assert "model.tokenizers/" in single_file_plan(path).tokenizer_source
    # 1. the folder the caller gives wins, and a wrong one is an error rather than a silent fallback
    shared = tmp_path / "shared"
    save_tokenizers(original, shared)
    assert str(shared) in single_file_plan(path, shared).tokenizer_source
    assert_same_weights(original, load_components(str(path), tokenizer_dir=shared))
    with pytest.raises(InvalidTokenizerDir, match="nowhere") as bad:
        check_spec(str(path), tokenizer_dir=tmp_path / "nowhere")
    assert bad.value.tokenizer_dir == tmp_path / "nowhere"


def test_the_engine_passes_the_tokenizer_folder_on(tmp_path: Path) -> None:
    from models.engine import OutpaintEngine

    original = tiny()
    path = save_original_checkpoint(original, tmp_path / "model.safetensors")
    save_tokenizers(original, tmp_path / "shared")
    with pytest.raises(TokenizersNotFound):
        OutpaintEngine.load(str(path), "cpu", "fp32")
    engine = OutpaintEngine.load(str(path), "cpu", "fp32", tokenizer_dir=tmp_path / "shared")
    assert_same_weights(original, engine.pipeline.c)


def write_header_only_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    # check_spec reads only the header, so a file without tensor data stands in for 7 GB.
    header = {k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)


def test_full_size_checkpoint_is_recognised_from_its_shapes(tmp_path: Path) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**arch.SDXL_UNET, "in_channels": 4})
        vae = AutoencoderKL(**arch.SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.SDXL_TEXT_ENCODER_2))
    state = {
        **unet_to_original(unet.state_dict(), unet.config),
        **vae_to_original(vae.state_dict(), vae.config),
        **clip_to_original(te1.state_dict()),
        **open_clip_to_original(te2.state_dict(), te2.config.num_hidden_layers),
    }
    path = tmp_path / "sdxl.safetensors"
    write_header_only_safetensors(path, {k: tuple(v.shape) for k, v in state.items()})
    save_tokenizers(build_random("random:tiny"), tmp_path)
    check_spec(str(path))
    configs = single_file_plan(path).configs
    # The full-size key layout converts to exactly the keys and shapes of the configured models.
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        prefix = PREFIXES[part]
        converted = to_diffusers(part, {k: v for k, v in state.items() if k.startswith(prefix)}, model, path)
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert configs["unet"] == {**arch.SDXL_UNET, "in_channels": 4}
    assert configs["vae"] == arch.SDXL_VAE
    for part, known in (
        ("text_encoder", arch.SDXL_TEXT_ENCODER),
        ("text_encoder_2", arch.SDXL_TEXT_ENCODER_2),
    ):
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        assert {k: v for k, v in configs[part].items() if k not in ids} == {
            k: v for k, v in known.items() if k not in ids
        }


def test_unknown_architecture_takes_a_sidecar(tmp_path: Path) -> None:
    original = tiny()
    torch.manual_seed(3)
    # Two layers per level: no known architecture, and 32-channel blocks hide the head count.
    odd = {**arch.TINY_UNET, "layers_per_block": 2}
    original.unet = UNet2DConditionModel(**odd).eval()
    path = save_original_checkpoint(original, tmp_path / "odd.safetensors")
    save_tokenizers(original, tmp_path)
    with pytest.raises(ModelSpecError) as err:
        check_spec(str(path))
    assert "attention_head_dim" in str(err.value) and "odd.safetensors.json" in str(err.value)
    sidecar = {"unet": {"attention_head_dim": odd["attention_head_dim"], "norm_num_groups": 8}}
    (tmp_path / "odd.safetensors.json").write_text(json.dumps(sidecar))
    loaded = load_components(str(path))
    assert_same_weights(original, loaded)
    assert_same_outputs(original, loaded)


def test_v_prediction_marker(tmp_path: Path) -> None:
    original = tiny()
    path = tmp_path / "vpred.safetensors"
    from safetensors.torch import load_file, save_file

    save_original_checkpoint(original, path)
    save_file({**load_file(str(path)), "v_pred": torch.tensor([])}, str(path))
    save_tokenizers(original, tmp_path)
    assert load_components(str(path)).scheduler.config.prediction_type == "v_prediction"


# --- Hub ids ----------------------------------------------------------------------------------------


def test_hub_id_not_in_cache_while_offline(offline: Path) -> None:
    for call in (check_spec, load_components):
        with pytest.raises(ModelSpecError) as err:
            call(DEFAULT_MODEL)
        message = str(err.value)
        assert f"{DEFAULT_MODEL} is not in the local Hugging Face cache ({offline / 'hub'})" in message
        assert "HF_HUB_OFFLINE=1" in message
        assert f"hf download {DEFAULT_MODEL}" in message
        assert f"huggingface-cli download {DEFAULT_MODEL}" in message
        assert "models--diffusers--stable-diffusion-xl-1.0-inpainting-0.1" in message
        assert "local diffusers folder or a single SDXL .safetensors file" in message


def test_hub_id_from_the_cache_while_offline(offline: Path) -> None:
    original = tiny()
    snapshot = fake_hub_cache(offline, "someone/tiny-sdxl", lambda snap: original.save(snap))
    check_spec("someone/tiny-sdxl")
    assert_same_weights(original, load_components("someone/tiny-sdxl"))
    # A download cut short is reported as such, not as a missing model.
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelSpecError) as err:
        load_components("someone/tiny-sdxl")
    assert "incomplete" in str(err.value) and "unet/" in str(err.value)


def test_hub_id_download_with_the_hub_faked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path, with the two Hub calls replaced: nothing here may touch the network."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    original = tiny()
    original.save(tmp_path / "published")
    files = sorted(str(f.relative_to(tmp_path / "published")) for f in (tmp_path / "published").rglob("*"))
    files = [f for f in files if (tmp_path / "published" / f).is_file()]
    asked: dict[str, object] = {}

    def model_info(self: object, repo_id: str, *args: object, **kwargs: object) -> object:
        asked["info"] = repo_id
        return type("Info", (), {"siblings": [type("S", (), {"rfilename": f})() for f in files]})()

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        asked["patterns"] = kwargs["allow_patterns"]
        asked["bars off"] = are_progress_bars_disabled()
        return str(tmp_path / "published")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    check_spec("someone/tiny-sdxl")
    assert_same_weights(original, load_components("someone/tiny-sdxl", progress=False))
    assert asked["info"] == "someone/tiny-sdxl" and asked["bars off"] is True
    assert "unet/diffusion_pytorch_model.safetensors" in asked["patterns"]  # type: ignore[operator]
    assert not are_progress_bars_disabled()


def test_hub_download_picks_fp16_weights_and_skips_the_rest() -> None:
    files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors.index.fp16.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "sd_xl_base_1.0.safetensors",
    ]
    wanted = hub_download_list("o/n", files)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in wanted
    assert "vae/diffusion_pytorch_model.safetensors" in wanted
    assert "text_encoder/model.fp16.safetensors" in wanted
    assert {f for f in wanted if f.startswith("text_encoder_2/")} == {
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors.index.fp16.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
    }
    assert not any(f.endswith(".bin") or f.startswith("sd_xl") for f in wanted)
    assert "unet/diffusion_pytorch_model.safetensors" not in wanted
    with pytest.raises(ModelSpecError, match="no .safetensors weights for unet"):
        hub_download_list("o/n", [f for f in files if not f.startswith("unet/diffusion")])


# --- specs that cannot load -------------------------------------------------------------------------


def bad_specs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (spec, text the message must hold)."""
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    write_header_only_safetensors(tmp_path / "sd15.safetensors", {"cond_stage_model.transformer.x": (1,)})
    write_header_only_safetensors(tmp_path / "unet_only.safetensors", {"model.diffusion_model.x": (1,)})
    return {
        "missing folder": (str(tmp_path / "no" / "such" / "folder"), "No such file or folder"),
        "missing file": (str(tmp_path / "missing.safetensors"), "No such file or folder"),
        "wrong extension": (str(tmp_path / "notes.txt"), "not a .safetensors checkpoint"),
        "pickle": (str(tmp_path / "old.ckpt"), "pickle checkpoint"),
        "not a diffusers folder": (str(tmp_path / "empty_folder"), "no model_index.json"),
        "corrupt file": (str(tmp_path / "garbage.safetensors"), "not a readable .safetensors file"),
        "sd 1.5": (str(tmp_path / "sd15.safetensors"), "SDXL models only"),
        "unet only": (str(tmp_path / "unet_only.safetensors"), "no a VAE"),
        "unknown random": ("random:huge", "Unknown random model"),
        "empty": ("", "No model given"),
        "nonsense": ("just words", "neither a local file or folder nor a Hugging Face Hub id"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing folder",
        "missing file",
        "wrong extension",
        "pickle",
        "not a diffusers folder",
        "corrupt file",
        "sd 1.5",
        "unet only",
        "unknown random",
        "empty",
        "nonsense",
    ],
)
def test_bad_specs_raise_model_spec_error(tmp_path: Path, name: str) -> None:
    spec, expected = bad_specs(tmp_path)[name]
    for call in (check_spec, load_components):
        with pytest.raises(ModelSpecError) as err:
            call(spec)
        assert expected in str(err.value)
    if name in ("missing folder", "missing file", "wrong extension", "nonsense", "empty"):
        assert "Accepted model specs" in str(err.value)
