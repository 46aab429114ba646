"""HTTP plumbing shared by the API modules: JSON bodies with a size cap, errors as JSON with a status."""

from __future__ import annotations

import json
import traceback
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from finetune.errors import UserError
from finetune.studio.paths import PathError
from finetune.studio.runs import Conflict, RecipeInvalid

MAX_JSON_BYTES = 2 * 1024 * 1024


class TooLarge(UserError):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    raw = await read_body(request, MAX_JSON_BYTES)
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise UserError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("request body must be a JSON object")
    return data


def status_of(e: Exception) -> int:
    for cls, code in ((PathError, 403), (Conflict, 409), (RecipeInvalid, 422), (TooLarge, 413),
                      (UserError, 400), (KeyError, 404), (FileNotFoundError, 404)):
        if isinstance(e, cls):
            return code
    return 500


def endpoint(fn: Callable[..., Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """Wrap a handler: dict results become JSON; our errors become {'error', 'errors'} with their status."""

    @wraps(fn)
    async def handler(request: Request):
        try:
            result = await fn(request)
        except Exception as e:  # noqa: BLE001 - every failure becomes a response, never a dropped connection
            code = status_of(e)
            if code == 500:
                traceback.print_exc()
            message = f"not found: {e}" if isinstance(e, KeyError) else str(e)
            body = {"error": message, "errors": getattr(e, "errors", [])}
            return JSONResponse(body, status_code=code)
        return JSONResponse(result) if isinstance(result, dict | list) else result

    return handler


async def threaded(fn, *args, **kwargs):
    return await run_in_threadpool(fn, *args, **kwargs)
