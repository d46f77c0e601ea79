"""Numbers of any length, huge exponents and NaN/Infinity in every numeric field: a 400 naming the field, on
v1 and v2, and the kept-alive connection they came on answers the next request.

Python refuses to turn more than 4300 digits into an int (ValueError in json.loads): that was a 500, a
traceback in the log and a connection the client then found reset.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote

import pytest

from tests.helpers import ServerProcess, request_body

INT_FIELDS = ["steps", "samples", "seed", "left", "right", "top", "bottom", "output_quality"]
FLOAT_FIELDS = ["guidance_scale"]
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e99999999999999999999", "1E+" + "9" * 5000]
LITERALS = [
    "9" * 5000,
    "-" + "9" * 5000,
    "1" + "0" * 4300,  # 4301 digits: one past Python's limit
    "9" * 4300,  # at the limit
    "1" + "0" * 5000 + ".5",
    "0." + "0" * 5000 + "1",
    "1e-99999999999999999999",
    *NON_FINITE,
]


def raw_body(field: str, literal: str) -> bytes:
    """A valid request with `field` set to the JSON number text `literal`, exactly as written."""
    body = request_body()
    body.pop(field, None)
    return (json.dumps(body)[:-1] + f', "{field}": {literal}}}').encode()


def ask(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"} if body is not None else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("path", ["/v1/seg-beyond", "/v2/seg-beyond"])
def test_numbers_of_any_length_are_400_naming_the_field_on_one_connection(server: ServerProcess, path: str) -> None:
    log_start = server.log_path.stat().st_size
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.connect()
        socket = connection.sock
        for field in INT_FIELDS + FLOAT_FIELDS:
            for literal in LITERALS:
                status, answer = ask(connection, "POST", path, raw_body(field, literal))
                where = f"{field}={literal[:12]}... ({len(literal)} characters)"
                assert status == 400, (where, answer)
                assert set(answer) == {"error"} and answer["error"].startswith(f"{field}: "), (where, answer)
                if field in FLOAT_FIELDS and literal in NON_FINITE:
                    assert answer["error"] == f"{field}: Input should be a finite number", where
                # http.client drops a connection the server said it would close: it must still be this one.
                assert connection.sock is socket, f"the connection was closed after {where}"
        status, _ = ask(connection, "GET", "/health")
        assert status == 200 and connection.sock is socket
    finally:
        connection.close()
    with open(server.log_path, "rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read()


@pytest.mark.parametrize(
    ("literal", "words"),
    [
        ("9" * 5000, "seed: Input should be less than or equal to 999999999999999"),
        ("-" + "9" * 5000, "seed: Input should be greater than or equal to -1"),
        ("NaN", "guidance_scale: Input should be a finite number"),
        ("1e999", "guidance_scale: Input should be a finite number"),
        ("-Infinity", "guidance_scale: Input should be a finite number"),
    ],
)
def test_the_words_say_what_is_wrong(server: ServerProcess, literal: str, words: str) -> None:
    field = words.split(":")[0]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        assert ask(connection, "POST", "/v2/seg-beyond", raw_body(field, literal)) == (400, {"error": words})
    finally:
        connection.close()


@pytest.mark.parametrize("limit", ["9" * 5000, "\u00b2", "\u0663", " 7 "])
def test_the_list_limit_takes_ascii_digits_of_any_length(server: ServerProcess, limit: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        status, answer = ask(connection, "GET", f"/v2/requests?limit={quote(limit)}")
        if limit.strip() == "7":
            assert status == 200 and "requests" in answer
        else:
            assert (status, answer) == (400, {"error": "limit: must be an integer from 1 to 100"})
        assert ask(connection, "GET", "/health")[0] == 200
    finally:
        connection.close()
