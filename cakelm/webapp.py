"""What cakelm's HTTP apps (`cakelm serve`, `cakelm label`) share: the app with its error shape, the request body
limit, the access-token check, and running it.

    app = create_app("cakelm", token="s3cret", protected="/v1/", token_hint="send 'Authorization: Bearer KEY'")
    app.add_exception_handler(MyError, ...)       # the app's own errors, answered with `error_response`
    run(app, "127.0.0.1", 8000)

Errors are one JSON shape everywhere, OpenAI's: {"error": {"message", "type", "param", "code"}}, for bad
requests (400, with the field that was wrong), a missing or wrong token (401), unknown paths (404), bodies over
the limit (413) and each app's own errors. Both middlewares are plain ASGI (not `@app.middleware("http")`, which
hides a client's disconnect from the handler), and the token is compared in constant time.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BODY_BYTES = 1_000_000  # the default request body limit (413 above it)


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


class BodyLimit:
    """ASGI middleware: 413 for request bodies over the limit, whether declared (Content-Length) or sent chunked.
    The body is read here (bounded by the limit) and replayed to the app."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
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
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


def bearer_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """Whether the headers carry `Authorization: Bearer TOKEN` (compared in constant time)."""
    given = headers.get(b"authorization", b"")
    return secrets.compare_digest(given, f"Bearer {token}".encode())


class BearerAuth:
    """ASGI middleware: requests to paths under `protected` need `Authorization: Bearer TOKEN`, else 401 with
    `hint` as the message and `code` as the error code."""

    def __init__(self, app: Callable, token: str, protected: str, hint: str, code: str) -> None:
        self.app, self.token, self.protected, self.hint, self.code = app, token, protected, hint, code

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            if not bearer_ok(dict(scope.get("headers", [])), self.token):
                return await _send_json(send, 401, error_body(self.hint, code=self.code))
        await self.app(scope, receive, send)


def create_app(title: str, token: str | None = None, protected: str = "/", token_hint: str = "",
               token_code: str = "invalid_token", body_limit: int = MAX_BODY_BYTES,
               openapi_url: str | None = None) -> FastAPI:
    """A FastAPI app with no docs pages (the OpenAPI schema only at `openapi_url`, if given), the body limit, the
    error shape, and (with `token`) the token check on paths under `protected`. An empty token is refused: "no
    auth" must be asked for by passing None."""
    if token is not None and not token:
        raise ValueError("an empty access token is not a token; pass None for no authentication")
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=openapi_url)
    app.add_middleware(BodyLimit, limit=body_limit)
    if token:
        app.add_middleware(BearerAuth, token=token, protected=protected, code=token_code,
                           hint=token_hint or "missing or wrong access token (send 'Authorization: Bearer TOKEN')")

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
