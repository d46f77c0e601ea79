"""`beyond outpaint`, `beyond download` and `beyond --version`, run as a user runs them: a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.canvas import SEAM_BAND
from tests.helpers import ROOT, encode, free_port, noise_image, smooth_image

# Two cores shared with pytest: one torch thread each run; nothing may reach the Hub.
ENV = {**os.environ, "BEYOND_CPU_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def beyond(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # The Hub cache is where HF_HOME says, whatever this machine's settings.
    base = {k: v for k, v in ENV.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return subprocess.run(
        [sys.executable, "-m", "server.commands.cli", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def outpaint(source: Path, *args: str) -> subprocess.CompletedProcess:
    common = ["--prompt", "a quiet beach", "--steps", "20", "--model", "random:tiny"]
    return beyond("outpaint", str(source), *common, *args)


def written(result: subprocess.CompletedProcess) -> list[tuple[Path, int]]:
    """The (path, seed) lines the command prints."""
    assert result.returncode == 0, result.stderr
    rows = []
    for line in result.stdout.splitlines():
        path, seed = line.split("\tseed ")
        rows.append((Path(path), int(seed)))
    return rows


def test_png_output_keeps_the_original_bit_exact_outside_the_seam(tmp_path: Path) -> None:
    original = noise_image(96, 64, seed=3)
    source = tmp_path / "in.png"
    source.write_bytes(encode(original))
    out = tmp_path / "wide.png"
    result = outpaint(source, "--left", "40", "--top", "24", "--bottom", "8", "--seed", "7", "-o", str(out))
    assert written(result) == [(out, 7)]
    assert "outpainting" in result.stderr and "20/20" in result.stderr  # the progress bar, on stderr
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (96 + 40, 64 + 24 + 8)
        pixels = np.asarray(image.convert("RGB"))
    # Padded sides are left, top and bottom: SEAM_BAND pixels in from each of them the original is exact.
    kept = pixels[24 + SEAM_BAND : 24 + 64 - SEAM_BAND, 40 + SEAM_BAND : 40 + 96]
    assert np.array_equal(kept, np.asarray(original)[SEAM_BAND : 64 - SEAM_BAND, SEAM_BAND:])
    # ... and the new area was generated, not left blank or copied from the edge.
    new = pixels[:, :40].astype(np.float32)
    assert new.std() > 1.0
    assert not np.array_equal(pixels[24 : 24 + 64, :40], np.repeat(np.asarray(original)[:, :1], 40, axis=1))


def test_webp_samples_get_numbered_names_and_consecutive_seeds(tmp_path: Path) -> None:
    source = tmp_path / "in.jpg"
    source.write_bytes(encode(smooth_image(80, 64), "JPEG", quality=95))
    out = tmp_path / "tall.webp"
    rows = written(outpaint(source, "--top", "32", "--samples", "2", "--seed", "100", "-o", str(out)))
    assert rows == [(tmp_path / "tall-1.webp", 100), (tmp_path / "tall-2.webp", 101)]
    assert not out.exists()
    for path, _ in rows:
        with Image.open(path) as image:
            assert image.format == "WEBP"
            assert image.size == (80, 64 + 32)


def test_jpeg_output_and_the_default_name_and_a_random_seed(tmp_path: Path) -> None:
    source = tmp_path / "photo.webp"
    source.write_bytes(encode(smooth_image(64, 64), "WEBP", lossless=True))
    out = tmp_path / "right.JPEG"
    [(path, seed)] = written(outpaint(source, "--right", "48", "-o", str(out)))
    assert path == out and 0 <= seed <= 999_999_999_999_999
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (64 + 48, 64)
    # Without -o: <stem>-outpainted.png beside the input.
    [(default, _)] = written(outpaint(source, "--bottom", "16", "--seed", "1"))
    assert default == tmp_path / "photo-outpainted.png"
    with Image.open(default) as image:
        assert image.format == "PNG" and image.size == (64, 64 + 16)


def bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line after `outpaint`, what the one line must mention)."""
    good = tmp_path / "good.png"
    good.write_bytes(encode(smooth_image(64, 64)))
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n")
    base = ["--prompt", "p", "--model", "random:tiny", "--left", "16"]
    return {
        "missing file": ([str(tmp_path / "nope.png"), *base], "no such file"),
        "a folder": ([str(tmp_path), *base], "not a file"),
        "not an image": ([str(text), *base], "not a PNG, JPEG or WebP image"),
        "side out of range": ([str(good), *base, "--right", "1025"], "--right"),
        "steps out of range": ([str(good), *base, "--steps", "19"], "--steps"),
        "samples out of range": ([str(good), *base, "--samples", "5"], "--samples"),
        "guidance out of range": ([str(good), *base, "--guidance-scale", "25.5"], "--guidance-scale"),
        "not a number": ([str(good), *base, "--steps", "many"], "expected an integer"),
        "unknown sampler": ([str(good), *base, "--sampler", "warp_drive"], "unknown sampler 'warp_drive'"),
        "unknown scheduler": ([str(good), *base, "--scheduler", "lunar"], "unknown scheduler 'lunar'"),
        "unknown style": ([str(good), *base, "--styles", "V2,Nonexistent Style"], "--styles"),
        "missing model file": ([good.name, "--prompt", "p", "--model", "./no/such.safetensors"], "No such file"),
        "incomplete model folder": (
            [str(good), "--prompt", "p", "--model", str(tmp_path / "half-model")],
            "unet/config.json is missing",
        ),
        "pickle model": ([str(good), "--prompt", "p", "--model", str(tmp_path / "m.ckpt")], "pickle"),
        "uncached hub model": ([str(good), "--prompt", "p", "--model", "someone/some-sdxl"], "beyond download"),
        "bad output name": ([str(good), *base, "-o", str(tmp_path / "out.gif")], ".png"),
        "missing prompt": ([str(good), "--left", "16"], "--prompt"),
        "bad device": ([str(good), *base, "--device", "warp9"], "--device warp9"),
    }


def test_each_kind_of_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04not really")
    (tmp_path / "half-model").mkdir()
    (tmp_path / "half-model" / "model_index.json").write_text("{}")
    outcomes = {}
    for name, (args, needle) in bad_input_cases(tmp_path).items():
        result = beyond("outpaint", *args, cwd=tmp_path)
        outcomes[name] = (result.returncode, result.stderr.strip().splitlines(), needle)
    for name, (code, lines, needle) in outcomes.items():
        assert code == 2, (name, lines)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("beyond outpaint: "), (name, lines)
        assert needle in lines[0], (name, lines)
        assert "Traceback" not in lines[0] and 'File "' not in lines[0], (name, lines)
    assert not list(tmp_path.glob("*-outpainted.png"))


def test_version_is_the_installed_packages() -> None:
    result = beyond("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"beyond {version('beyond')}"


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_download_offline_says_what_to_do(tmp_path: Path, how: str) -> None:
    env = {"HF_HOME": str(tmp_path / "hf")}
    if how == "no network":
        # A closed loopback port stands in for a machine without network.
        env |= {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    result = beyond("download", "someone/some-sdxl", env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr
    assert "someone/some-sdxl" in message
    assert ("HF_HUB_OFFLINE=1" if how == "HF_HUB_OFFLINE" else "Cannot reach the Hugging Face Hub") in message
    # The remedies: download elsewhere and copy the cache, or use a local model.
    assert "on a machine with internet, run `beyond download someone/some-sdxl`" in message
    assert "models--someone--some-sdxl" in message and str(tmp_path / "hf" / "hub") in message
    assert ".safetensors" in message
    assert not (tmp_path / "hf" / "hub" / "models--someone--some-sdxl").exists()


def test_download_of_a_local_or_random_model_has_nothing_to_do(tmp_path: Path) -> None:
    result = beyond("download", "random:tiny")
    assert result.returncode == 0 and "nothing to download" in result.stdout
    missing = beyond("download", str(tmp_path / "absent.safetensors"))
    assert missing.returncode == 2 and "No such file" in missing.stderr and "Traceback" not in missing.stderr


TOKENIZER_FILES = ("merges.txt", "vocab.json", "tokenizer_config.json")
WEIGHT_STEMS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))


def sdxl_listing(fp16: bool = True) -> list[str]:
    """The file list of an SDXL inpainting repo on the Hub, in the shape the diffusers ones have."""
    files = ["model_index.json", "README.md", ".gitattributes", "scheduler/scheduler_config.json"]
    for tokenizer in ("tokenizer", "tokenizer_2"):
        files += [f"{tokenizer}/{n}" for n in TOKENIZER_FILES]
    for part, stem in WEIGHT_STEMS:
        files += [f"{part}/config.json", f"{part}/{stem}.safetensors", f"{part}/{stem}.bin"]
        files += [f"{part}/{stem}.fp16.safetensors", f"{part}/{stem}.fp16.bin"] if fp16 else []
    files += ["text_encoder_2/config.json", "text_encoder_2/model.safetensors"]
    files += ["unet/diffusion_pytorch_model.non_ema.bin", "vae_1_0/diffusion_pytorch_model.safetensors"]
    if fp16:
        files += [
            "text_encoder_2/model.safetensors.index.fp16.json",
            "text_encoder_2/model.fp16-00001-of-00002.safetensors",
            "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        ]
    return files


def test_download_fetches_only_what_the_engine_loads() -> None:
    from server.commands.download import DownloadError, wanted_files

    wanted = set(wanted_files("owner/sdxl", sdxl_listing()))
    shared = {"model_index.json", "scheduler/scheduler_config.json"}
    shared |= {f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in TOKENIZER_FILES}
    configs = {f"{p}/config.json" for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    fp16 = {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.safetensors.index.fp16.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
    }
    # One weight set per part, fp16 where there is one: no full-precision copy, no pickles, no README.
    assert wanted == shared | configs | fp16
    full = set(wanted_files("owner/sdxl", sdxl_listing(fp16=False)))
    assert full - shared - configs == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    }
    with pytest.raises(DownloadError, match="publishes no .safetensors weights for vae"):
        listing = sdxl_listing(fp16=False)
        wanted_files("owner/old", [f for f in listing if f != "vae/diffusion_pytorch_model.safetensors"])
    with pytest.raises(DownloadError, match="no model_index.json"):
        wanted_files("owner/flat", ["model.safetensors", "config.json"])
