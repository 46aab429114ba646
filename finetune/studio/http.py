"""HTTP plumbing shared by the API modules: JSON bodies with a size and depth cap, numbers read strictly, and
every failure a JSON answer with a status: a 4xx with one line for anything the request got wrong, never an
absolute path (the root's own path is taken out of every message; OS errors say what failed, not where)."""

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
from finetune.studio.paths import PathError, short
from finetune.studio.runs import Conflict, RecipeInvalid

MAX_JSON_BYTES = 2 * 1024 * 1024
MAX_JSON_DEPTH = 64  # a recipe is 5-6 levels deep; deeper is a mistake or an attack on recursive code
MAX_MESSAGE_CHARS = 1000
INTERNAL = "internal error: the studio's console has the details"


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
    except RecursionError:
        raise UserError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise UserError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise UserError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def number(value: Any, key: str, lo: int, hi: int) -> int:
    """A whole number from JSON or a query string, refused (400, naming the key) unless lo <= it <= hi."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 12:
        value = int(value)
    if type(value) is not int or not lo <= value <= hi:
        raise UserError(f"{key}: must be a whole number from {lo} to {hi}")
    return value


def status_of(e: Exception) -> int:
    for cls, code in ((PathError, 403), (Conflict, 409), (RecipeInvalid, 422), (TooLarge, 413),
                      (UserError, 400), (KeyError, 404), (FileNotFoundError, 404), (PermissionError, 403),
                      (OSError, 400)):
        if isinstance(e, cls):
            return code
    return 500


def message_of(e: Exception, root=None) -> str:
    """The one line a failure answers with: ours as written, an OS error without its file name, anything else
    (a bug) a fixed line; the root's path is taken out, and the line is capped."""
    if isinstance(e, KeyError):
        text = f"not found: {e}"
    elif isinstance(e, UserError):
        text = str(e)
    elif isinstance(e, OSError):
        text = f"a file could not be read or written: {e.strerror or type(e).__name__}"
    else:
        text = INTERNAL
    text = " ".join(text.split("\n"))
    if root is not None:
        text = short(root, text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


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
            studio = getattr(request.app.state, "studio", None)
            body = {"error": message_of(e, getattr(studio, "root", None)), "errors": getattr(e, "errors", [])}
            return JSONResponse(body, status_code=code)
        return JSONResponse(result) if isinstance(result, dict | list) else result

    return handler


async def threaded(fn, *args, **kwargs):
    return await run_in_threadpool(fn, *args, **kwargs)
