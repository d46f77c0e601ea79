"""The architecture's promises: models/ knows nothing of HTTP, and the API process stays light."""

from __future__ import annotations

import ast
import subprocess
import sys

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
    code = "import sys, server.app, server.cli; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
