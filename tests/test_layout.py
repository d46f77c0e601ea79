"""The architecture's promises: models/ knows nothing of HTTP, and the API process stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_models_imports_nothing_from_server() -> None:
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("server", "fastapi", "starlette")]
    assert not offenders


def test_the_api_process_does_not_import_torch() -> None:
    # The engine lives in the worker process; the HTTP side starts fast and small without torch.
    code = (
        "import sys, server.http.app, server.commands.cli;"
        " print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The engine speaks in its own terms; the server's names for things (environment variables, command-line
# options, endpoints) are the server's to add to the engine's messages.
SERVER_WORDING = {
    "an environment variable of the server": re.compile(r"BEYOND_"),
    "a command-line option": re.compile(r"(?<![\w-])--[A-Za-z]"),
    "an API path": re.compile(r"/v1/"),
}
# The engine takes its settings as parameters; Hugging Face's own come from huggingface_hub.constants.
ENVIRONMENT_ACCESS = re.compile(r"\b(?:environ|getenv|putenv|unsetenv)\b")


def models_files() -> list[Path]:
    files = [
        p
        for p in (ROOT / "models").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json", ".txt", ".md")
    ]
    assert len([p for p in files if p.suffix == ".py"]) > 10  # the scan really sees the package
    return files


def test_the_patterns_catch_what_they_are_meant_to() -> None:
    assert all(
        pattern.search(text)
        for pattern, text in zip(
            SERVER_WORDING.values(), ("set BEYOND_DTYPE", "try `--dtype bf16`", "GET /v1/styles"), strict=True
        )
    )
    assert not SERVER_WORDING["a command-line option"].search('"models--" + repo.replace("/", "--")')
    assert ENVIRONMENT_ACCESS.search("os.environ.get(x)") and ENVIRONMENT_ACCESS.search("os.getenv(x)")
    assert not ENVIRONMENT_ACCESS.search("the environment variable")


def test_models_has_no_server_wording() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}"
        for path in models_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for what, pattern in SERVER_WORDING.items()
        if pattern.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_models_does_not_read_the_environment() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in models_files()
        if path.suffix == ".py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ENVIRONMENT_ACCESS.search(line)
    ]
    assert not offenders, "\n".join(offenders)
