"""What cakelm's HTTP apps (`cakelm serve`, `cakelm label`) share: the app with its error shape, the request
checks every request passes (Host, Origin, Content-Type, body size, text), the access-token check, the start-up
checks of the options (an empty token, a network-wide bind without one), and running it.

    app = create_app("cakelm", token="s3cret", protected="/v1/", token_hint="send 'Authorization: Bearer KEY'")
    app.add_exception_handler(MyError, ...)       # the app's own errors, answered with `error_response`
    run(app, "127.0.0.1", 8000)

Errors are one JSON shape everywhere, OpenAI's: {"error": {"message", "type", "param", "code"}}, for bad
requests (400, with the field that was wrong), a missing or wrong token (401), a refused Origin (403), unknown
paths (404), bodies over the limit (413), bodies that are not JSON (415) and each app's own errors.

What every request passes, outermost first (all plain ASGI middleware, not `@app.middleware("http")`, which hides
a client's disconnect from the handler):
- `RequestGuard`: the Host header must name this server (DNS rebinding: a page on evil.example whose name is made
  to point at 127.0.0.1 sends `Host: evil.example`), else 400; an Origin header, when sent, must be this server's
  own page (the scheme aside, exactly the Host the request came to) or a name given with --allowed-hosts, else 403
  (a page of another site, or of another app on this machine, posting here); a POST must say `Content-Type:
  application/json`, else 415 (the "simple" cross-site POSTs a browser sends without asking, text/plain or a form,
  never do).
- `BearerAuth` (with a token): paths under `protected` need `Authorization: Bearer TOKEN`, else 401; compared in
  constant time. With one token per person, the request carries whose token it was (`USER` in the ASGI scope).
- `BodyLimit`: a body over the limit is 413, whether declared (Content-Length) or sent chunked; a JSON body must
  be UTF-8 text without lone surrogates (JSON's "\\ud800" escapes decode to them, and every later step, the
  tokenizer, SQLite, fails on them), else 400, checked here once for every field of every app.

Which Host names are "this server" (`Hosts.for_bind`): for a loopback bind, 127.0.0.1, localhost and ::1; for a
bind to one address or name, that one; for 0.0.0.0 or ::, those of loopback, the machine's host name, and any IP
address (a rebinding attack needs a DNS name; a browser sends an address only when the user typed it). Any port.
`--allowed-hosts a.example,b.example` adds names (a reverse proxy's); `*` allows any.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cakelm.config import ConfigError

MAX_BODY_BYTES = 1_000_000  # the default request body limit (413 above it)
USER = "cakelm.user"  # the ASGI scope key naming whose token a request carried (per-person tokens only)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
BODY_METHODS = ("POST", "PUT", "PATCH")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------------------------------------------------
# Host and Origin


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """The name in a Host header value ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"), lower case;
    None when it is not a name with an optional numeric port."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1:]) if end > 0 else ("", "")
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
        return None
    return name


@dataclass(frozen=True)
class Hosts:
    """The Host names (and Origin hosts) a server answers to (see the module docstring)."""

    names: frozenset[str]
    any_ip: bool = False  # a wildcard bind: any IP address
    any: bool = False  # --allowed-hosts '*'
    extra: frozenset[str] = frozenset()  # the names given with --allowed-hosts

    @classmethod
    def for_bind(cls, host: str, allowed: Sequence[str] = ()) -> Hosts:
        extra = set()
        for a in (a.strip().lower() for a in allowed):
            if a == "*":
                return cls(frozenset(), any=True)
            if a:
                extra.add(host_name(a) or a.strip("[]"))  # "name:port" -> "name", "[::1]" -> "::1"
        bind = host.strip().lower().strip("[]")
        if bind in WILDCARD:
            return cls(frozenset({*LOOPBACK, socket.gethostname().lower(), *extra}), any_ip=True,
                       extra=frozenset(extra))
        return cls(frozenset({*(LOOPBACK if _is_loopback(bind) else ()), bind, *extra}), extra=frozenset(extra))

    def allows(self, name: str | None) -> bool:
        return name is not None and (self.any or name in self.names or (self.any_ip and _is_ip(name)))


def parse_hosts(text: str | Sequence[str] | None) -> list[str]:
    """--allowed-hosts: "a.example,b.example" (or a list) -> ["a.example", "b.example"]."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    return [h.strip() for item in items for h in item.split(",") if h.strip()]


class RequestGuard:
    """ASGI middleware: Host (400), Origin (403) and a POST's Content-Type (415), see the module docstring."""

    def __init__(self, app: Callable, hosts: Hosts) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host_name(host)):
            return await _send_json(send, 400, error_body(
                f"Host {host[:100]!r} is not a name of this server; start it with --allowed-hosts NAME to allow "
                "one (a DNS name pointing here that this server was not told of is how DNS rebinding attacks "
                "look)", param="Host", code="host_not_allowed"))
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_ok(origin.decode("latin-1"), host):
            return await _send_json(send, 403, error_body(
                f"requests from the page at {origin.decode('latin-1')[:100]!r} are refused: this server answers "
                "its own pages (--allowed-hosts adds names)", param="Origin", code="origin_not_allowed"))
        if scope.get("method") in BODY_METHODS:
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return await _send_json(send, 415, error_body(
                    "send the body as JSON with 'Content-Type: application/json'", param="Content-Type",
                    code="unsupported_media_type"))
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        """A page of this server itself (the Origin's host and port are the Host the request came to), or of a
        name given with --allowed-hosts. Not "any allowed Host name": another local app (localhost:3000) or a
        page served from a bare IP must not drive this one."""
        try:
            url = urllib.parse.urlsplit(origin.strip())
            if url.scheme not in ("http", "https"):
                return False
            return self.hosts.any or url.netloc.lower() == host.strip().lower() or url.hostname in self.hosts.extra
        except ValueError:  # a malformed port or address
            return False


# ----------------------------------------------------------------------------------------------------------------
# The body


def invalid_text(value: Any) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (not UTF-8 encodable): "messages.0.content",
    "" for the value itself; None when there is none. Keys are checked too."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:  # not recursive: json.loads already bounds the depth, this must not add its own limit
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                stack += [(k, where), (x, f"{where}.{k}" if where else str(k))]
        elif isinstance(v, list):
            stack += [(x, f"{where}.{i}" if where else str(i)) for i, x in enumerate(v)]
    return None


def _check_text(body: bytes) -> dict | None:
    """The error body for a JSON body that is not UTF-8 or holds a lone surrogate; None when it is fine (or is
    not JSON at all: the app says what is wrong with it)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_body(f"the body is not UTF-8 text (byte {e.start})", code="invalid_text")
    try:
        where = invalid_text(json.loads(text))
    except RecursionError:
        return error_body("the JSON body is nested too deeply", code="invalid_json")
    except ValueError:
        return None
    if where is None:
        return None
    return error_body(f"{where or 'body'}: invalid Unicode text (a lone surrogate such as \\ud800)",
                      param=where or None, code="invalid_text")


class BodyLimit:
    """ASGI middleware: 413 for request bodies over the limit, whether declared (Content-Length) or sent chunked,
    and 400 for JSON bodies with invalid text. The body is read here (bounded by the limit) and replayed to the
    app; after it, the app's `receive` is the server's, so a client's disconnect reaches the handler."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        too_large = error_body(f"request body is larger than {self.limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_json(send, 413, too_large)
        bad = _check_text(bytes(body))
        if bad is not None:
            return await _send_json(send, 400, bad)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------------------------
# Tokens


def bearer_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """Whether the headers carry `Authorization: Bearer TOKEN` (compared in constant time)."""
    given = headers.get(b"authorization", b"")
    return secrets.compare_digest(given, f"Bearer {token}".encode())


class BearerAuth:
    """ASGI middleware: requests to paths under `protected` need `Authorization: Bearer TOKEN` for one of the
    tokens, else 401 with `hint` as the message and `code` as the error code. `tokens` maps each token to whose
    it is (None: a shared token); the request's scope then holds that name under `USER`."""

    def __init__(self, app: Callable, tokens: Mapping[str, str | None], protected: str | tuple[str, ...], hint: str,
                 code: str) -> None:
        self.app, self.tokens, self.protected, self.hint, self.code = app, dict(tokens), protected, hint, code

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            headers = dict(scope.get("headers", []))
            found = [who for token, who in self.tokens.items() if bearer_ok(headers, token)]  # every one compared
            if not found:
                return await _send_json(send, 401, error_body(self.hint, code=self.code))
            scope[USER] = found[0]
        await self.app(scope, receive, send)


def access_token(given: str | None, env: str, option: str) -> str | None:
    """The token a server requires: the option's value, else $`env`; None when neither is set. An empty or blank
    one is an error (it would otherwise mean "no authentication" without a word), and an empty option never
    falls back to the environment."""
    if given is None:
        given = os.environ.get(env)
        option = f"${env}"
    if given is not None and not given.strip():
        raise ConfigError(f"{option} is empty: give a token (or leave it out for no authentication on loopback)")
    return given


def check_exposure(host: str, authenticated: bool, allow_no_key: bool, how: str) -> None:
    """Refuse to serve beyond this machine without a token unless asked to (--allow-no-key)."""
    bind = host.strip().lower().strip("[]")
    if not authenticated and not allow_no_key and not _is_loopback(bind):
        raise ConfigError(f"--host {host} lets other machines reach this server, and it has no access token: "
                          f"anyone on the network could use it. Give {how}, or --allow-no-key if the network is "
                          "trusted")


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(title: str, token: str | None = None, protected: str | tuple[str, ...] = "/", token_hint: str = "",
               token_code: str = "invalid_token", body_limit: int = MAX_BODY_BYTES,
               openapi_url: str | None = None, host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (),
               users: Mapping[str, str] | None = None) -> FastAPI:
    """A FastAPI app with no docs pages (the OpenAPI schema only at `openapi_url`, if given), the request checks
    for a server bound to `host` (plus `allowed_hosts`), the body limit, the error shape, and (with `token`, or
    `users`: {token: name}, one per person) the token check on paths under `protected` (a prefix, or several). An
    empty token is refused: "no auth" must be asked for by passing None."""
    if (token is not None and not token) or (users is not None and (not users or not all(users))):
        raise ValueError("an empty access token is not a token; pass None for no authentication")
    if token is not None and users:
        raise ValueError("give one shared token or one token per user, not both")
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=openapi_url)
    app.add_middleware(BodyLimit, limit=body_limit)
    tokens: dict[str, str | None] = dict(users) if users else ({token: None} if token else {})
    if tokens:
        app.add_middleware(BearerAuth, tokens=tokens, protected=protected, code=token_code,
                           hint=token_hint or "missing or wrong access token (send 'Authorization: Bearer TOKEN')")
    app.add_middleware(RequestGuard, hosts=Hosts.for_bind(host, allowed_hosts))  # added last: runs first

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
        return error_response(400, f"{where}: {err.get('msg')}" if where else str(err.get("msg")), param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    return app


def run(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` until Ctrl-C (uvicorn prints a bind error such as a taken port and exits by itself)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
