"""What travels to a bare CUDA machine with no internet (benchmarks/wheels.py), decided and checked here.

The full proof (downloads, a copy of the machine's packages, `device_check.sh --cpu` on it) is
benchmarks/device_env_check.sh, which CI runs after the tests; these are its decisions on small inputs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from benchmarks import wheels
from benchmarks.wheels import DEVICE_MARKERS, Provider, check_wheels, plan, read_image, walk


def carried(result: wheels.Walk) -> set[str]:
    return {name for name, provider in result.providers.items() if provider.where == "carried"}


def test_the_machine_keeps_its_own_packages_and_gets_the_rest() -> None:
    image = read_image()
    assert image.pins[canonicalize_name("huggingface_hub")] == Version("1.33.0")
    assert image.pins[canonicalize_name("transformers")] == Version("5.17.0")
    assert {"pillow", "scipy", "httpx"} <= image.names and not {"diffusers", "fastapi", "pydantic"} & image.names
    result = plan(image)
    assert not result.problems
    names = carried(result)
    # What the machine lacks: the engine's diffusers and the server's web stack...
    assert {"diffusers", "torchsde", "fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn"} <= names
    assert {"websockets", "httptools"} <= names  # uvicorn[standard]'s extra
    # ...and nothing it has in a version that works: transformers 5.17 stays (a newer one needed a
    # huggingface_hub the machine does not have), and torch is never carried.
    assert not names & image.names
    assert not names & {"torch", "triton", "transformers", "huggingface-hub", "numpy", "tokenizers"}
    assert "tomli" not in result.providers  # Python 3.11 and later have tomllib


def test_a_package_the_machine_has_too_old_is_carried(tmp_path: Path) -> None:
    path = tmp_path / "image.txt"
    text = wheels.IMAGE_FILE.read_text().replace("huggingface-hub==1.33.0", "huggingface-hub==0.20.0")
    path.write_text(text)
    result = plan(read_image(path))
    assert "huggingface-hub" in carried(result)  # diffusers asks for a newer one
    assert not [p for p in result.problems if p.name == "huggingface-hub"]  # ours fits what asks for it
    assert read_image(path).pins["huggingface-hub"] == Version("0.20.0")


def fake_wheel(folder: Path, filename: str, *requires: str) -> None:
    name, version = filename.split("-")[:2]
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    with zipfile.ZipFile(folder / filename, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_the_check_of_a_wheel_set_finds_what_would_break_on_the_machine(tmp_path: Path) -> None:
    # The set that once failed at its first import there: transformers 5.25 needs a huggingface_hub the
    # machine's 1.33 is not.
    fake_wheel(tmp_path, "transformers-5.25.0-py3-none-any.whl", "huggingface-hub<3.0,>=2.4.0")
    fake_wheel(tmp_path, "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl")  # Python 3.11's build
    fake_wheel(tmp_path, "pydantic_core-2.50.4-cp312-cp312-win_amd64.whl")  # a second version, for Windows
    fake_wheel(tmp_path, "watchfiles-1.3.0-cp310-abi3-manylinux_2_17_x86_64.whl")  # abi3: fits 3.12
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(b"")
    fake_wheel(tmp_path, "big-1.0-py3-none-any.whl")
    problems, report = check_wheels(tmp_path, read_image(), max_mib=1e-6)
    text = "\n".join(problems)
    assert "transformers 5.25.0 needs huggingface-hub<3.0,>=2.4.0; image: huggingface-hub 1.33.0" in text
    assert "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl does not install" in text
    assert "pydantic_core-2.50.4-cp312-cp312-win_amd64.whl does not install" in text
    assert "two versions of pydantic-core" in text
    assert "watchfiles" not in text.replace("watchfiles is carried but nothing needs it", "")
    assert "more than 1e-06 MiB" in text
    assert "the project needs diffusers" in text  # not in the set, not on the machine
    assert any(line.startswith("watchfiles-1.3.0-cp310-abi3") and "fits" in line for line in report)


def test_requirements_are_read_with_the_machines_markers_and_extras() -> None:
    requires = {
        "app": ("server[standard]>=1", "tomli>=2; python_version < '3.11'", "colour; sys_platform == 'win32'"),
        "server": ("h11", "websockets>=10; extra == 'standard'", "httptools; extra == 'fast'"),
    }

    def resolve(name: str) -> Provider | None:
        if name in requires:
            return Provider(Version("1.0"), tuple(Requirement(r) for r in requires[name]), "carried")
        return Provider(Version("9.0") if name == "websockets" else None, None, "image") if name != "h11" else None

    result = walk([Requirement("app")], resolve, DEVICE_MARKERS)
    assert set(result.providers) == {"app", "server", "websockets"}
    assert sorted(p.text for p in result.problems) == [
        "server 1.0 needs h11: not there",
        'server 1.0 needs websockets>=10; extra == "standard"; image: websockets 9.0',
    ]
