"""Downloading an `input_image` URL: every hop checked, pinned to the checked address, capped in bytes and
bounded by one deadline for the whole download."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx

from server.guard.input_limits import ImageLimits, InputImageError
from server.guard.urlguard import check_url_async, pinned_request

MAX_REDIRECTS = 5
log = logging.getLogger("beyond.images")


async def fetch_async(url: str, limits: ImageLimits) -> bytes:
    """The body of `url`; InputImageError for any URL that may not or cannot be fetched.

    `limits.timeout` bounds the whole: every DNS lookup, connect, header and body byte of every hop. Per-read
    timeouts alone let a server that sends a byte a second hold a fetch for as long as it likes.
    """
    try:
        with anyio.fail_after(limits.timeout):
            return await download(url, limits)
    except TimeoutError:
        log.info("fetch of an input_image URL passed its %g s deadline", limits.timeout)
        raise InputImageError(f"fetching the URL took longer than {limits.timeout:g} s") from None


def fetch(url: str, limits: ImageLimits) -> bytes:
    """fetch_async for synchronous callers (the worker); from inside an event loop it runs on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetch_async(url, limits))
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, fetch_async(url, limits)).result()


async def download(url: str, limits: ImageLimits) -> bytes:
    too_large = f"image is larger than the limit of {limits.max_bytes} bytes"
    # No per-operation timeouts: the caller's deadline bounds every wait.
    async with httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = await check_url_async(url, limits)
            target, headers, extensions = pinned_request(url, addresses[0])
            try:
                async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = str(httpx.URL(url).join(response.headers.get("location", "")))
                        continue
                    if response.status_code != 200:
                        raise InputImageError(f"fetching the URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limits.max_bytes:
                        raise InputImageError(too_large)
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limits.max_bytes:
                            raise InputImageError(too_large)
                        chunks.append(chunk)
                    return b"".join(chunks)
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:  # UnicodeError: httpx's IDNA
                # The detail is for the operator; an invalid URL's message would quote the URL (which may
                # carry a signed query), so only its type is logged.
                detail = "" if isinstance(exc, httpx.InvalidURL) else f": {exc}"
                log.info("fetch of an input_image URL from %s failed: %s%s", target.host, type(exc).__name__, detail)
                raise InputImageError(f"could not fetch the URL ({type(exc).__name__})") from None
    raise InputImageError(f"more than {MAX_REDIRECTS} redirects")
