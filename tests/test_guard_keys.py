"""The key ring: where keys come from, how they are checked, and that errors never quote them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from server.guard.auth import KeyRing
from server.http.errors import Unauthorized

KEY, OTHER = "SG_0123456789abcdef", "SG_fedcba9876543210"


def test_keys_from_the_environment() -> None:
    ring = KeyRing.load(f" {KEY} ,, {OTHER}", None)
    caller = ring.identify(KEY)
    assert caller is not None and caller.owner == hashlib.sha256(KEY.encode()).hexdigest()
    assert caller.name == f"key-{caller.owner[:8]}" and KEY not in repr(caller)
    assert ring.identify(OTHER).owner != caller.owner
    with pytest.raises(Unauthorized, match="invalid API key"):
        ring.identify(KEY + "x")
    with pytest.raises(Unauthorized, match="not in Authorization"):
        ring.identify(None, f"Bearer {KEY}")
    with pytest.raises(Unauthorized, match="missing API key"):
        ring.identify("")


def test_no_keys_is_open_access() -> None:
    ring = KeyRing.load(None, None)
    assert ring.open and ring.identify(None) is None


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_keys_file_in_json_or_toml(tmp_path: Path, suffix: str) -> None:
    digest = hashlib.sha256(OTHER.encode()).hexdigest()
    entries = [
        {"key": KEY, "name": "team-a", "endpoints": ["v2"], "rate_limit": "10/minute;2/second", "credits": 50},
        {"sha256": digest.upper(), "name": "by-digest"},
    ]
    file = tmp_path / f"keys{suffix}"
    if suffix == ".json":
        file.write_text(json.dumps({"keys": entries}))
    else:
        file.write_text(
            f'[[keys]]\nkey = "{KEY}"\nname = "team-a"\nendpoints = ["v2"]\n'
            f'rate_limit = "10/minute;2/second"\ncredits = 50\n\n'
            f'[[keys]]\nsha256 = "{digest.upper()}"\nname = "by-digest"\n'
        )
    # The file's entry for a key wins over the same key in BEYOND_API_KEYS.
    ring = KeyRing.load(KEY, file)
    team = ring.identify(KEY)
    assert (team.name, team.endpoints, team.rate_limit, team.credits) == (
        "team-a",
        frozenset({"v2"}),
        "10/minute;2/second",
        50.0,
    )
    assert ring.identify(OTHER).name == "by-digest"
    assert [c.name for c in ring.metered()] == ["team-a"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "neither"}, "give exactly one of key and sha256"),
        ({"key": KEY, "sha256": "0" * 64}, "give exactly one of key and sha256"),
        ({"sha256": "not-hex"}, "keys.0.sha256"),
        ({"key": KEY, "endpoints": ["v3"]}, "keys.0.endpoints.0"),
        ({"key": KEY, "rate_limit": "lots"}, "keys.0"),
        ({"key": KEY, "credits": -1}, "keys.0.credits"),
        ({"key": KEY, "credits": KEY}, "keys.0.credits"),
        ({"key": KEY, KEY: 1}, "keys.0.?: Extra inputs are not permitted"),
    ],
)
def test_a_bad_keys_file_names_the_problem_never_the_key(tmp_path: Path, entry: dict, problem: str) -> None:
    file = tmp_path / "keys.json"
    file.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(ValueError) as caught:
        KeyRing.load(None, file)
    assert problem in str(caught.value) and str(file) in str(caught.value)
    assert KEY not in str(caught.value)


def test_unreadable_and_unparsable_keys_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FileNotFoundError"):
        KeyRing.load(None, tmp_path / "absent.json")
    broken = tmp_path / "keys.toml"
    broken.write_text(f'[[keys]]\nkey = "{KEY}\n')  # an unterminated string: parsers quote the line
    with pytest.raises(ValueError, match="TOMLDecodeError") as caught:
        KeyRing.load(None, broken)
    assert KEY not in str(caught.value)
