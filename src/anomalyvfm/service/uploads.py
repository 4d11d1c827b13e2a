"""Multipart uploads received within limits: size, time and the server-wide byte budget, checked as bytes arrive.

A declared `content-length` over the limit is refused before reading; otherwise every chunk is counted
against the request's limit and taken from the shared byte budget as it arrives (a half-received body
cannot pause, so a full budget is 503 at once), and the whole body must arrive within `body_timeout`.
The parser never spools to disk: the body stops at the limit.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from anomalyvfm.service.admission import Budget
from anomalyvfm.service.limits import ServiceLimits

PART_OVERHEAD = 16 * 1024  # multipart headers and boundaries allowed per file on top of its bytes


@asynccontextmanager
async def receive_uploads(request: Request, field: str, max_files: int, limits: ServiceLimits, body_bytes: Budget,
                          busy: Callable[[str, str], HTTPException]) -> AsyncIterator[list[UploadFile]]:
    """The files posted in multipart `field`, parsed in memory; their bytes are held in `body_bytes` until the
    block ends (a full budget is `busy`: 503). The body must arrive within `body_timeout` and stay under the
    size limit, checked as it arrives, so a slow or oversized upload never holds more than the limit."""
    content_type = request.headers.get("content-type")
    if not content_type:
        raise HTTPException(400, f"no image sent: post it as multipart/form-data in field '{field}'")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(415, f"content type {content_type} is not multipart/form-data "
                                 f"(post the image in field '{field}')")
    limit = min(max_files * (limits.max_bytes + PART_OVERHEAD), limits.max_inflight_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit}")
    held = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout

    async def body() -> AsyncIterator[bytes]:
        nonlocal held
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(deadline - loop.time(), 0.001))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {limits.body_timeout:g} s") from None
            if held + len(chunk) > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            if not body_bytes.try_take(len(chunk)):
                raise busy("body_bytes", f"server busy: request bodies in memory at the limit of "
                                         f"{limits.max_inflight_bytes} bytes; retry shortly")
            held += len(chunk)
            yield chunk

    try:
        parser = MultiPartParser(request.headers, body(), max_files=max_files, max_fields=16)
        parser.spool_max_size = limit  # never roll over to a temporary file: the body stops at `limit`
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"multipart body refused: {exc.message}") from None
        values = form.getlist(field)
        if not values:
            raise HTTPException(400, f"no file in multipart field '{field}'")
        if not all(isinstance(value, UploadFile) for value in values):
            raise HTTPException(400, f"multipart field '{field}' must be a file upload, not text")
        yield values
    finally:
        body_bytes.give(held)

