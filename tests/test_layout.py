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


# -- server/: rooms by purpose, no import circles ----------------------------------------------------------------

SERVER = ROOT / "server"
# The folders of server/ and what each holds; server/__init__.py's docstring names each one.
ROOMS = {
    "http": "the HTTP layer",
    "guard": "what stands between a request and the work",
    "jobs": "the jobs: stores, supervisor, engine process",
    "commands": "the `beyond` commands",
    "webhooks": "signed, durable webhook delivery",
    "static": "the playground's files (package data)",
}
# Modules that belong to no room, at the top of server/: used by every room.
TOP_LEVEL = {"__init__", "settings", "logs", "metrics", "version"}
MAX_LINES = 450
# A longer module says why in its docstring: that it is one cohesive thing, and what.
LONG_MODULE_MARKER = re.compile(r"\bone cohesive\b", re.IGNORECASE)


def server_modules() -> dict[str, Path]:
    """Every module of server/ by its dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in SERVER.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert len(modules) > 40  # the scan really sees the package
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The server modules a file imports anywhere in it (top, functions, TYPE_CHECKING), resolved to the
    module itself where `from package import name` names a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = server_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_helpers_find_what_they_are_meant_to() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert reachable(graph, "d") == {"a", "b", "c"}
    known = {"server.jobs", "server.jobs.store", "server.settings"}
    source = "def f():\n    from server.jobs import store\n    import server.settings\n"
    path = ROOT / "tests" / "layout_sample.tmp"
    try:
        path.write_text(source)
        assert imported_modules(path, known) == {"server.jobs.store", "server.settings"}
    finally:
        path.unlink()


def test_server_has_no_import_circle() -> None:
    assert not cycles(import_graph())


def test_the_middleware_does_not_import_the_routes() -> None:
    # The routes register their fast paths (server/http/fast_routes.py); the middleware only reads them.
    graph = import_graph()
    assert "server.http.fast_routes" in graph["server.http.middleware"]
    assert not {m for m in reachable(graph, "server.http.middleware") if m.startswith("server.http.routes")}


def test_each_folder_of_server_is_a_documented_room() -> None:
    folders = {p.name for p in SERVER.iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.stem for p in SERVER.glob("*.py")}
    assert folders <= set(ROOMS) | TOP_LEVEL, folders - set(ROOMS) - TOP_LEVEL
    assert modules <= TOP_LEVEL, modules - TOP_LEVEL
    docstring = ast.get_docstring(ast.parse((SERVER / "__init__.py").read_text(encoding="utf-8"))) or ""
    assert not [room for room in folders if f"{room}/" not in docstring]


def test_long_server_modules_say_why() -> None:
    offenders = []
    for path in sorted(SERVER.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            if not LONG_MODULE_MARKER.search(docstring):
                offenders.append(f"{name}: {lines} lines")
    assert not offenders, "\n".join(offenders)
