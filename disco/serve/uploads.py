"""The image a client sends to a predict route: the body within --max-body-mb (413 as soon as it passes, whatever
Content-Length says), then the body itself or the first file of a multipart form."""
from __future__ import annotations

from fastapi import Request
from starlette.requests import ClientDisconnect

from disco.serve.batching import Refused


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "too_large", f"the body is {int(declared):,} bytes; at most {limit:,} are accepted "
                      "(--max-body-mb)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, "too_large", f"the body passed {limit:,} bytes (--max-body-mb)")
            chunks.append(chunk)
    except ClientDisconnect:  # closed by the client, or by --body-timeout: counted, and answered to no one
        raise Refused(400, "disconnected", f"the connection closed after {size:,} bytes of the body") from None
    return b"".join(chunks)


async def image_bytes(request: Request, body: bytes, limit: int) -> bytes:
    """The image: the body itself, or the first file of a multipart form (field name free)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay():  # the body was read (within the limit) already: the form parser reads it again from here
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=limit)
    files = [value for value in form.values() if hasattr(value, "read")]
    if not files:
        raise Refused(400, "no_file", "the multipart form holds no file: send the image as a file field")
    return await files[0].read()
