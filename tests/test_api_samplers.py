"""Every sampler with every schedule produces an image through the API (the full 108-pair matrix)."""

from __future__ import annotations

import itertools

import httpx

from models.names import SAMPLERS, SCHEDULERS
from tests.helpers import ServerProcess, jpeg, smooth_image
from tests.test_queue import finished, result, submit, wait_for


def test_all_108_pairs_produce_an_image(server: ServerProcess) -> None:
    pairs = list(itertools.product(SAMPLERS, SCHEDULERS))
    assert len(pairs) == 108
    failures = []
    # In waves, so the queue stays well under its bound (BEYOND_MAX_QUEUE, 100 by default) and
    # the tests after this one find room.
    for wave in range(0, len(pairs), 27):
        jobs = {
            pair: submit(
                server,
                image=smooth_image(48, 48),
                left=16,
                seed=1,
                guidance_scale=1.0,
                sampler=pair[0],
                scheduler=pair[1],
            )["request_id"]
            for pair in pairs[wave : wave + 27]
        }
        for pair, request_id in jobs.items():
            body = wait_for(server, request_id, finished, timeout=600)
            if body["status"] != "COMPLETED":
                failures.append((pair, body.get("error")))
                continue
            output = result(server, request_id).json()["output"]
            image = jpeg(httpx.get(output, timeout=30).content)
            if image.size != (64, 48) or image.getextrema() == ((0, 0), (0, 0), (0, 0)):
                failures.append((pair, f"bad image {image.size}"))
    assert not failures, failures
