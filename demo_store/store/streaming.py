"""Streams a (possibly large, spooled-to-disk) file as the response body, under WSGI and ASGI."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import IO

from django.core.handlers.asgi import ASGIRequest
from django.http import FileResponse, HttpRequest, StreamingHttpResponse
from django.utils.http import content_disposition_header

CHUNK_SIZE = 256 * 1024


def file_response(
    request: HttpRequest, file: IO[bytes], *, filename: str, content_type: str
) -> FileResponse | StreamingHttpResponse:
    """Send `file` from its start to the client, then close it.

    Under ASGI a FileResponse's sync iterator would be read into one list before sending
    (Django's fallback for sync iterators), so there the file is read chunk by chunk off the
    event loop instead; under WSGI FileResponse already streams (and may use sendfile).
    """
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if not isinstance(request, ASGIRequest):
        return FileResponse(file, filename=filename, content_type=content_type)
    response = StreamingHttpResponse(_read_chunks(file), content_type=content_type)
    response["Content-Length"] = str(size)
    response["Content-Disposition"] = content_disposition_header(False, filename) or ""
    return response


async def _read_chunks(file: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
            yield chunk
    finally:
        file.close()
