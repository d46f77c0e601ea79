"""The documentation keeps up with the code: every setting is listed where operators look for it."""

from __future__ import annotations

from server.settings import Settings
from tests.helpers import ROOT


def variables() -> list[str]:
    return [f"BEYOND_{name.upper()}" for name in Settings.model_fields]


def test_the_readme_settings_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in variables() if f"`{name}`" not in table]
    assert not missing, f"README's settings table lacks {missing}"


def test_the_guard_doc_names_every_setting_it_needs_and_the_reverse_proxy_advice() -> None:
    guard = (ROOT / "docs" / "guard.md").read_text()
    missing = [name for name in variables() if f"`{name}`" not in guard]
    assert not missing, f"docs/guard.md lacks {missing}"
    assert "reverse proxy" in guard and "header" in guard
