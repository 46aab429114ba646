"""Safe by default: who may talk to the studio.

- Bound to a loopback address (the default, 127.0.0.1), the studio answers only requests whose Host header
  names a loopback host, so a web page elsewhere cannot reach it through DNS rebinding.
- Bound to any other interface, every request needs the token printed at start: `?token=` once (the page
  then keeps it in a same-site cookie), the cookie, or an `Authorization: Bearer` header.
- Requests that change anything (every method but GET and HEAD) must carry the `X-Studio: 1` header. A page
  on another site cannot add a custom header without a CORS preflight, which the studio never grants, so it
  cannot make the browser start runs or write captions behind the user's back.
"""

from __future__ import annotations

import ipaddress
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
COOKIE = "finetune_studio_token"
WRITE_HEADER = b"x-studio"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware applying the rules of the module doc before any route runs."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if not is_loopback(host):
                return await _deny(send, 403, f"host '{host}' refused: this studio serves loopback names only")
        else:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [None])[0]
            if given is not None and self._ok(given) and scope["method"] == "GET":
                return await _enter(scope, send, given, query)
            if not self._ok(self._presented(headers)):
                return await _deny(send, 401, "a token is required: open the URL the studio printed at start")
        if scope["method"] not in ("GET", "HEAD") and headers.get(WRITE_HEADER) != b"1":
            return await _deny(send, 403, "write requests need the X-Studio: 1 header (the studio page sends it)")
        return await self.app(scope, receive, send)

    def _ok(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _presented(headers: dict[bytes, bytes]) -> str | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        return cookie[COOKIE].value if COOKIE in cookie else None


async def _deny(send, status: int, message: str) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _enter(scope, send, token: str, query: dict) -> None:
    """A valid ?token=: keep it in a cookie and drop it from the address bar."""
    rest = {k: v for k, v in query.items() if k != "token"}
    location = scope["path"] + (("?" + urlencode(rest, doseq=True)) if rest else "")
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
