"""Pure ASGI middleware that runs before any route reads a byte of the body.

The Host check (DNS-rebinding protection when there is no API key), the API key, and the
body limit. Each answers with OpenAI's error body.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamalab.serve.errors import APIError

# Host names a browser uses for this machine itself; any other name, when the server has
# no API key, may be a DNS-rebinding attack (a page whose name now points here).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
# What a Host header may be (RFC 9112 3.2; RFC 3986 3.2.2): a name or IPv4 address, or an
# IPv6 address in brackets, and an optional port. RFC 3986 lets a name hold a few more
# characters (a comma among them), which no browser sends and which only serve to smuggle
# a second name past a check that reads the first: they are refused.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?")


class HostCheck:
    """Pure ASGI middleware: refuse a ``Host`` header that does not name this server.

    A web page can point its own domain at 127.0.0.1 (DNS rebinding) and then talk to a
    local server as if it were same-origin; checking the Host header defeats that. Used
    only without an API key: with one, the key is the protection.
    """

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = [value for name, value in scope["headers"] if name == b"host"]
            error = None
            if len(hosts) > 1:
                # RFC 9112 3.2: a request with more than one Host header gets 400.
                error = APIError(
                    400, "the request has more than one Host header", code="invalid_host"
                )
            elif hosts:  # HTTP/1.0 may leave Host out; browsers, which rebinding uses, never do
                name = _host_name(hosts[0].decode("latin-1"))
                if name is None:
                    error = APIError(400, "the Host header is malformed", code="invalid_host")
                elif name not in self.allowed:
                    message = (
                        "the Host header does not name this server (start it with --allow-host)"
                    )
                    error = APIError(403, message, code="invalid_host")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(header: str) -> str | None:
    """The host of a Host header, without the port (``[::1]:8000`` → ``[::1]``), or None
    when the header is not one host and port (a list, a space, anything else)."""
    match = _HOST.fullmatch(header.strip(" \t").lower())
    return match.group(1) if match else None


# Besides /v1/*: the tokenizer routes use the model, so they need the key as generation does.
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/llamalab/generate", "/llamalab/tokenize"})


class BearerAuth:
    """Pure ASGI middleware: ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
    ``Authorization: Bearer KEY``.

    It runs before the body is read, so a request without the key gets 401 whatever else
    is wrong with it. The chat page, ``/health``, ``/metrics`` and ``/openapi.json`` stay
    open: they reveal no text, and the page asks for the key itself.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path.startswith("/v1") or path.rstrip("/") in KEYED_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
                error = APIError(401, message, code="invalid_api_key").response()
                error.headers["WWW-Authenticate"] = "Bearer"
                await error(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Pure ASGI middleware: a request body larger than ``max_bytes`` gets 413.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a
    body without one (chunked) is read up to the limit and refused as soon as it passes
    it. Either way nothing larger than the limit is ever held or parsed. The body read
    here is handed to the app in one message; later messages (the client leaving) come
    from the connection as usual.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        error = APIError(413, message, code="request_too_large")
        # The rest of the body is not read: the connection cannot be reused.
        error.headers = {"Connection": "close"}
        await error.response()(scope, receive, send)
