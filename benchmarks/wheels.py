"""The wheels a bare CUDA machine with no internet needs, and the checks that they install and fit there.

    python -m benchmarks.wheels pins [--bare] [--exclude a,b]   # what fetch_wheels.sh downloads
    python -m benchmarks.wheels platforms                       # its --platform arguments
    python -m benchmarks.wheels image-requirements              # the GPU machine's packages, to copy it here
    python -m benchmarks.wheels check-wheels DIR [--max-mib N]  # a downloaded set: tags, versions, needs
    python -m benchmarks.wheels check-installed                 # the running interpreter (device_check.sh)

The machine is described by `device_image.txt`: Python 3.12 on x86_64 Linux with a CUDA torch, a few
ML packages at known versions and more at versions not read. What the project needs is its own
requirements (pyproject.toml) and theirs, followed through the metadata of this interpreter's
installed packages (the project's environment: what was tested). A package the machine has is not
carried, unless a carried package (or the project) asks for a version its pinned one is not; torch
and what a torch install brings are the machine's. Every requirement is read with the machine's
environment markers (Python 3.12, Linux, x86_64), extras included (`uvicorn[standard]`).
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = Path(__file__).with_name("device_image.txt")

# The machine's interpreter and platform.
DEVICE_PYTHON = (3, 12)
DEVICE_MARKERS = {
    **default_environment(),
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
# glibc manylinux tags a current Linux takes (the machine's glibc is newer than 2.35).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
DEVICE_TAGS = frozenset(
    [
        *cpython_tags(DEVICE_PYTHON, abis=["cp312"], platforms=PLATFORMS),
        *compatible_tags(DEVICE_PYTHON, "cp312", platforms=PLATFORMS),
    ]
)
# torch and what installing torch brings: the machine's CUDA torch stays, whatever else happens.
WITH_TORCH = frozenset(
    canonicalize_name(n)
    for n in ("torch", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe")
    + ("fsspec", "setuptools", "triton")
)
# Where this interpreter cannot install the machine's version, the copy of the machine here uses another:
# (requirement here, why). torch: the CPU build on this disk stands in for the machine's CUDA build.
STAND_INS = {
    "torch": ("torch==2.13.0", "the CPU build of torch 2.13.0 stands in for the machine's CUDA torch 2.11.0"),
}
STAND_INS_BELOW_312 = {
    "numpy": ("numpy>=2.4,<2.5", "numpy 2.5 needs Python >= 3.12: the newest 2.4 stands in for 2.5.2"),
}


@dataclass(frozen=True)
class Image:
    pins: dict[NormalizedName, Version]
    names: frozenset[NormalizedName]  # every package there, pinned or not


def read_image(path: Path = IMAGE_FILE) -> Image:
    pins: dict[NormalizedName, Version] = {}
    names: set[NormalizedName] = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# has:"):
            names.update(canonicalize_name(n) for n in line.removeprefix("# has:").split())
        elif line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return Image(pins, frozenset(names | set(pins)))


def project_requirements(root: Path = ROOT) -> list[Requirement]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


@dataclass(frozen=True)
class Provider:
    """Who supplies a package: its version (None: not known here) and requirements (None: not followed)."""

    version: Version | None
    requires: tuple[Requirement, ...] | None
    where: str  # carried, image, torch, installed, left out


@dataclass
class Problem:
    name: NormalizedName
    text: str


@dataclass
class Walk:
    providers: dict[NormalizedName, Provider] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def walk(
    roots: Iterable[Requirement], resolve: Callable[[NormalizedName], Provider | None], markers: dict[str, str]
) -> Walk:
    """Every package the roots need, through the requirements of each provider that has them, with
    every requirement checked against the version its provider has."""
    result = Walk()
    extras: dict[NormalizedName, set[str]] = {}
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[Requirement, str, frozenset[str]]] = [(req, "the project", frozenset({""})) for req in roots]
    while todo:
        req, wanted_by, active = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**markers, "extra": e}) for e in active):
            continue
        if (str(req), wanted_by) in seen:
            continue
        seen.add((str(req), wanted_by))
        name = canonicalize_name(req.name)
        provider = result.providers.get(name) or resolve(name)
        if provider is None:
            result.problems.append(Problem(name, f"{wanted_by} needs {req}: not there"))
            continue
        result.providers[name] = provider
        if provider.version is not None and not req.specifier.contains(provider.version, prereleases=True):
            result.problems.append(
                Problem(name, f"{wanted_by} needs {req}; {provider.where}: {name} {provider.version}")
            )
        if provider.requires is None:
            continue
        wanted = extras.setdefault(name, set())
        wanted.update(req.extras)
        todo += [(sub, f"{name} {provider.version}", frozenset({"", *wanted})) for sub in provider.requires]
    return result


def installed(name: NormalizedName, where: str = "installed") -> Provider | None:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    return Provider(Version(dist.version), tuple(Requirement(r) for r in dist.requires or ()), where)


def plan(image: Image, bare: bool = False, exclude: frozenset[str] = frozenset()) -> Walk:
    """What to carry (providers `carried`, at this environment's versions) and what the machine gives."""
    carry_anyway: frozenset[NormalizedName] = frozenset()
    while True:
        resolve = _plan_resolver(image, bare, exclude, carry_anyway)
        result = walk(project_requirements(), resolve, DEVICE_MARKERS)
        # The machine's version of a package is too old (or too new) for what asks for it: carry ours.
        on_image = {name for name, p in result.providers.items() if p.where == "image"}
        too_old = {p.name for p in result.problems if p.name in on_image}
        if not too_old - carry_anyway:
            return result
        carry_anyway |= too_old


def _plan_resolver(
    image: Image, bare: bool, exclude: frozenset[str], carry_anyway: frozenset[NormalizedName]
) -> Callable[[NormalizedName], Provider | None]:
    def resolve(name: NormalizedName) -> Provider | None:
        if name in WITH_TORCH:
            return Provider(image.pins.get(name), None, "torch")
        if name in exclude:
            return Provider(None, None, "left out")
        if not bare and name in image.names and name not in carry_anyway:
            return Provider(image.pins.get(name), None, "image")
        return installed(name, "carried")

    return resolve


def wheel_metadata(path: Path) -> tuple[NormalizedName, Version, frozenset[Tag], tuple[Requirement, ...]]:
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        (metadata,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        message = email.parser.BytesParser().parsebytes(archive.read(metadata), headersonly=True)
    return name, version, tags, tuple(Requirement(r) for r in message.get_all("Requires-Dist") or ())


def check_wheels(folder: Path, image: Image, max_mib: float) -> tuple[list[str], list[str]]:
    """(problems, report) of a downloaded set for the machine: each wheel installs on CPython 3.12
    manylinux x86_64 (compiled ones: cp312 or abi3 builds), one version per package, the size, and every
    requirement of the project and of each carried wheel met by the set plus the machine's packages."""
    problems, report = [], []
    wheels: dict[NormalizedName, Provider] = {}
    total = 0
    for path in sorted(folder.glob("*.whl")):
        name, version, tags, requires = wheel_metadata(path)
        size = path.stat().st_size
        total += size
        compiled = any(tag.abi != "none" for tag in tags)
        fits = bool(tags & DEVICE_TAGS)
        kind = "compiled" if compiled else "pure Python"
        report.append(f"{path.name}: {size / 2**20:.2f} MiB, {kind}, {'fits' if fits else 'DOES NOT FIT'}")
        if not fits:
            problems.append(f"{path.name} does not install on CPython 3.12 manylinux x86_64")
        if name in wheels:
            problems.append(f"two versions of {name}: pip would stop the whole install")
        wheels[name] = Provider(version, requires, "carried")
    report.append(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in all (at most {max_mib:g} MiB allowed)")
    if total > max_mib * 2**20:
        problems.append(f"the wheels take {total / 2**20:.1f} MiB, more than {max_mib:g} MiB")

    def resolve(name: NormalizedName) -> Provider | None:
        if name in wheels:
            return wheels[name]
        if name in WITH_TORCH:
            return Provider(image.pins.get(name), None, "torch")
        if name in image.names:
            return Provider(image.pins.get(name), None, "image")
        return None

    result = walk(project_requirements(), resolve, DEVICE_MARKERS)
    problems += [p.text for p in result.problems]
    unused = set(wheels) - {n for n, p in result.providers.items() if p.where == "carried"}
    problems += [f"{name} is carried but nothing needs it" for name in sorted(unused)]
    return problems, report


def check_installed() -> list[str]:
    """Every requirement of the project and of what it needs, against what this interpreter imports (the
    machine's packages and the carried ones before them on the path); torch's own are torch's business."""

    def resolve(name: NormalizedName) -> Provider | None:
        provider = installed(name)
        if provider is not None and name in WITH_TORCH:
            return Provider(provider.version, None, "torch")
        return provider

    return [p.text for p in walk(project_requirements(), resolve, default_environment()).problems]


def image_requirements(image: Image) -> tuple[list[str], list[str]]:
    """(requirements, notes): the machine's packages that the project takes from it, as pip requirements
    for this interpreter, torch and what cannot install here replaced by stand-ins (the notes say which)."""
    stand_ins = dict(STAND_INS)
    if sys.version_info < DEVICE_PYTHON:
        stand_ins.update(STAND_INS_BELOW_312)
    lines, notes = [], []
    for name, provider in sorted(plan(image).providers.items()):
        if provider.where not in ("image", "torch") or (provider.where == "torch" and name != "torch"):
            continue
        if name in stand_ins:
            line, note = stand_ins[name]
            lines.append(line)
            notes.append(note)
        else:
            pin = image.pins.get(name)
            lines.append(f"{name}=={pin}" if pin else name)
    return lines, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wheels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pins = sub.add_parser("pins", help="name==version of every wheel to carry, one a line")
    pins.add_argument("--bare", action="store_true", help="for a machine with torch alone: carry the rest")
    pins.add_argument("--exclude", default="", help="comma-separated packages to leave out")
    sub.add_parser("platforms", help="pip download's --platform arguments for the machine")
    sub.add_parser("image-requirements", help="pip requirements that copy the machine's packages here")
    check = sub.add_parser("check-wheels", help="check a folder of wheels for the machine")
    check.add_argument("folder", type=Path)
    check.add_argument("--max-mib", type=float, default=32.0)
    sub.add_parser("check-installed", help="check the requirements of what this interpreter imports")
    args = parser.parse_args(argv)
    image = read_image()
    if args.command == "pins":
        exclude = frozenset(canonicalize_name(n) for n in args.exclude.replace(",", " ").split())
        result = plan(image, bare=args.bare, exclude=exclude)
        missing = [p.text for p in result.problems if "not there" in p.text]
        if missing:
            print("\n".join(missing) + "\ninstall the project first (pip install -e .)", file=sys.stderr)
            return 1
        for name, provider in sorted(result.providers.items()):
            if provider.where == "carried":
                print(f"{name}=={provider.version}")
    elif args.command == "platforms":
        print(" ".join(f"--platform {p}" for p in PLATFORMS))
    elif args.command == "image-requirements":
        lines, notes = image_requirements(image)
        print("\n".join(lines))
        for note in notes:
            print(f"stand-in: {note}", file=sys.stderr)
    elif args.command == "check-wheels":
        problems, report = check_wheels(args.folder, image, args.max_mib)
        print("\n".join(report))
        for problem in problems:
            print(f"PROBLEM: {problem}")
        return 1 if problems else 0
    elif args.command == "check-installed":
        problems = check_installed()
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print(f"requirements of the project and its packages: {len(problems)} unmet")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
