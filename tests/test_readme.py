"""The README works as written: its SDK and curl examples run against a real server, and its two
set-up commands are what the Makefile provides."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import ROOT, ServerProcess

README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"
# The examples' padding: left 300, right 100 (v1) and right 256 with two samples (v2).
PHOTO_SIZE = (960, 720)


def snippets() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of each fenced block whose first line is `# readme-test: <name>`."""
    found = {}
    for lang, code in re.findall(r"^```(\w+)\n(.*?)^```", README.read_text(), flags=re.M | re.S):
        marker = re.fullmatch(r"# readme-test: (\S+)", code.splitlines()[0].strip())
        if marker:
            found[marker[1]] = (lang, code)
    return found


def pointed_at(code: str, server: ServerProcess) -> str:
    """The snippet with only its base URL changed, to the test server's port."""
    assert code.count(README_URL) == 1
    return code.replace(README_URL, server.url)


def write_photo(folder: Path) -> Path:
    """A photo-sized JPEG (noise over gradients, 400 KB+), which no command line can carry as base64."""
    w, h = PHOTO_SIZE
    x, y = np.linspace(0, 255, w)[None, :, None], np.linspace(0, 255, h)[:, None, None]
    base = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.broadcast_to((x + y) / 2, (h, w, 1))],
        axis=2,
    )
    noisy = base + np.random.default_rng(0).normal(0, 40, (h, w, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    assert len(buffer.getvalue()) > 400_000
    path = folder / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    return path


def test_the_readme_marks_its_examples() -> None:
    assert {name: lang for name, (lang, _) in snippets().items()} == {"sdk": "python", "curl": "bash"}


def test_curl_example_returns_the_outpainted_jpeg(server: ServerProcess, tmp_path: Path) -> None:
    _, code = snippets()["curl"]
    assert "base64 -w0 photo.jpg)" not in code  # the body must not travel on the command line
    write_photo(tmp_path)
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", pointed_at(code, server)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200"), result.stdout
    with Image.open(tmp_path / "wider.jpg") as image:
        assert image.format == "JPEG"
        assert image.size == (PHOTO_SIZE[0] + 300 + 100, PHOTO_SIZE[1])


def test_sdk_example_runs_both_ways(server: ServerProcess, tmp_path: Path) -> None:
    _, code = snippets()["sdk"]
    assert re.search(r"SegmindClient\(.*timeout=\d+", code)  # the 30 s default is too short for a CPU job
    write_photo(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", pointed_at(code, server)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "wider.jpg") as image:
        assert image.format == "JPEG"
        assert image.size == (PHOTO_SIZE[0] + 300 + 100, PHOTO_SIZE[1])
    # print(result["outputs"], result["seeds"], result["metrics"]): two output URLs on this server, two seeds.
    outputs, seeds = re.fullmatch(r"(\[.*?\]) (\[.*?\]) \{.*\}\n", result.stdout).groups()
    assert len(re.findall(re.escape(server.url) + r"/v2/requests/[^']+", outputs)) == 2
    first, second = (int(s) for s in seeds.strip("[]").split(","))
    assert second == first + 1


def test_quick_start_is_the_two_make_commands() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    first_block = re.search(r"```bash\n(.*?)```", quick, flags=re.S)[1]
    assert first_block.split("\n")[:2] == ["make serve", "make test"]
    assert text.index("make serve") < text.index("pip install -e")  # the manual install comes below


def dry_run(folder: Path) -> list[str]:
    # Under `make test` itself (CI), the outer make's variables would make this one print its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_test_installs_once_and_again_when_pyproject_changes(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    install = [
        "test -x .venv/bin/python || python3 -m venv .venv",
        ".venv/bin/python -m pip install -q torch==2.13.0",
        ".venv/bin/python -m pip install -q -e '.[test]'",
    ]
    run_tests = [".venv/bin/ruff check .", ".venv/bin/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile"]
    # A fresh clone: the venv is made and filled, torch before the project, then the tests run.
    fresh = dry_run(tmp_path)
    assert [line for line in fresh if line in install] == install
    assert fresh[-2:] == run_tests
    # Installed (the stamp newer than pyproject.toml): straight to the tests.
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    assert dry_run(tmp_path) == run_tests
    # A changed pyproject.toml installs again.
    stat = stamp.stat()
    os.utime(tmp_path / "pyproject.toml", (stat.st_atime + 10, stat.st_mtime + 10))
    assert dry_run(tmp_path)[:3] == [install[0], ".venv/bin/python -m pip install -q --upgrade pip", install[1]]
