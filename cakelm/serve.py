"""`cakelm serve CKPT`: an OpenAI-compatible HTTP API over the engine, and a web chat page.

    cakelm serve runs/default/base                  # http://127.0.0.1:8000/ (chat page) and /v1 (API)
    cakelm serve runs/default/sft --port 9000 --api-key s3cret

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                 "stream"}  -> chat.completion (or server-sent chat.completion.chunk events)
    POST /v1/completions        {"prompt": "..." | [...], same options}       -> text_completion
    GET  /v1/models, GET /health, GET / (the chat page)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-unless---api-key")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])  # model: the folder name

One worker thread generates, one request at a time in arrival order, so concurrent requests queue and never
mix their tokens; a client that disconnects cancels its request, streamed or not, queued or generating. Errors
use OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with 400/401/403/404/413/415
statuses.

Safety (`cakelm.webapp`): the server binds 127.0.0.1 and answers only requests whose Host names it (--allowed-hosts
adds names), refuses cross-site pages (Origin) and bodies that are not JSON, and refuses invalid Unicode with a
400. --api-key "" is an error, and binding beyond loopback without a key needs --allow-no-key. Stop strings are
at most MAX_STOP of MAX_STOP_CHARS characters each, matched in time linear in the reply. A reward-model checkpoint
is refused: its body is not a model to chat with.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cakelm import webapp
from cakelm.chat_format import Reply, format_of, render_prompt, stop_rules, validate
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device
from cakelm.config import ConfigError, opt
from cakelm.engine import Engine, SamplingParams, StreamEvent
from cakelm.rlhf import refuse_reward_model

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 1000  # characters per stop string


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, webapp.error_body(message, type, param, code)["error"]


# ----------------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI clients send many)


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Options):
    messages: list[dict[str, Any]]


class CompletionRequest(_Options):
    prompt: str | list[str]


# ----------------------------------------------------------------------------------------------------------------
# The generation worker


@dataclass
class Job:
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False


_DONE = object()
_GONE = object()  # the client hung up


class Worker:
    """Runs jobs on one background thread, first come first served, pushing events to each job's queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run, name="cakelm-generate", daemon=True).start()

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int) -> Job:
        job = Job(prompts, params, n, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            result: Any = _DONE
            try:
                if not job.cancelled:
                    for ev in self.engine.stream(job.prompts, job.params, job.n):
                        if job.cancelled:
                            break
                        _deliver(job, ev)
            except Exception as e:  # reported to the request as a 500; the worker carries on
                result = e
            _deliver(job, result)


def _deliver(job: Job, item: Any) -> None:
    """Hand an event to the job's event loop (if its request is still there)."""
    if job.cancelled:
        return
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        job.cancelled = True


async def _watch(job: Job, request: Request) -> None:
    """Wait for the client to hang up, then cancel its job. After the body, the server's `receive` returns only
    when the connection ends (an event, not polling), so a job is cancelled at once, queued or generating."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.events.put_nowait(_GONE)


async def _events(job: Job, request: Request | None = None) -> AsyncIterator[StreamEvent]:
    """The job's events as they come. With `request`, a client that hangs up cancels the job (streaming
    responses are cancelled by the server itself when the client goes, and pass None)."""
    watch = asyncio.create_task(_watch(job, request)) if request is not None else None
    try:
        while True:
            item = await job.events.get()
            if item is _DONE or item is _GONE:
                return
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error") from None
            yield item
    finally:
        job.cancelled = True  # done, failed, or the client went away: stop generating for it
        if watch is not None:
            watch.cancel()  # before the response is sent: the server's receive is not ours to read after it


# ----------------------------------------------------------------------------------------------------------------
# The app


@dataclass
class ServerState:
    engine: Engine
    worker: Worker
    fmt: str
    model_name: str
    api_key: str | None
    max_tokens_limit: int
    ckpt: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, fmt: str, model_name: str = "cakelm", api_key: str | None = None,
               max_tokens_limit: int = 1024, body_limit: int = webapp.MAX_BODY_BYTES, ckpt: str | None = None,
               host: str = "127.0.0.1", allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` (conversations rendered in chat format `fmt`), answering requests to
    `host` (the address it is bound to) and `allowed_hosts`."""
    st = ServerState(engine, Worker(engine), fmt, model_name, api_key, max_tokens_limit, ckpt)
    app = webapp.create_app("cakelm", api_key, "/v1/", "Incorrect or missing API key (send 'Authorization: Bearer "
                            "KEY')", token_code="invalid_api_key", body_limit=body_limit,
                            openapi_url="/openapi.json", host=host, allowed_hosts=allowed_hosts)
    app.state.server = st

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse({"error": e.body}, status_code=e.status)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": st.model_name, "queued": st.worker.jobs.qsize()}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                            "owned_by": "cakelm"}]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("cakelm.web").joinpath("chat.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        _check_model(st, req.model)
        try:
            messages = validate(req.messages, "messages")
            prompt = render_prompt(messages, engine.tok, st.fmt)
        except CakeError as e:
            raise APIError(400, str(e), param="messages") from None
        stop_ids, stop_strings = stop_rules(engine.tok, st.fmt)
        params = _params(st, req, [prompt], stop_ids, stop_strings, "messages")
        return await _respond(st, req, request, [prompt], params, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        _check_model(st, req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or len(texts) * req.n > MAX_N:
            raise APIError(400, f"give 1 to {MAX_N} prompts x n completions", param="prompt")
        prompts = [engine.tok.encode(t, bos=True) for t in texts]
        params = _params(st, req, prompts, (engine.tok.bos_id,), (), "prompt")
        return await _respond(st, req, request, prompts, params, chat=False)

    return app


def _check_model(st: ServerState, model: str | None) -> None:
    if model not in (None, "", st.model_name):
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{st.model_name}'",
                       param="model", code="model_not_found")


def _params(st: ServerState, req: _Options, prompts: list[list[int]], stop_ids: tuple[int, ...],
            stop_strings: tuple[str, ...], prompt_param: str) -> SamplingParams:
    longest = max(len(p) for p in prompts)
    room = st.engine.context - longest
    if room < 1:
        raise APIError(400, f"the prompt is {longest} tokens but the model's context is {st.engine.context} "
                            "(at least one token must fit after it)", param=prompt_param,
                       code="context_length_exceeded")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > st.max_tokens_limit:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {st.max_tokens_limit}",
                       param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: give up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    # each prompt is cut to the room it has after it, by the engine
    return SamplingParams(asked or st.max_tokens_limit, req.temperature, 0, req.top_p, req.seed, stop_ids,
                          stop_strings + tuple(stops))


async def _respond(st: ServerState, req: _Options, request: Request, prompts: list[list[int]],
                   params: SamplingParams, chat: bool) -> Any:
    job = st.worker.submit(prompts, params, req.n)
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": st.model_name}
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(job, base, chat, prompt_tokens, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    replies = [Reply() for _ in range(len(prompts) * req.n)]
    texts = [""] * len(replies)
    finish: dict[int, str] = {}
    completion_tokens = 0
    async for ev in _events(job, request):
        completion_tokens += 1
        replies[ev.row].add(ev.text)
        texts[ev.row] += ev.text
        if ev.finish_reason:
            finish[ev.row] = ev.finish_reason
    choices = []
    for i in range(len(replies)):
        text = replies[i].final if chat else texts[i]
        choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish.get(i, "length")} if chat else
                       {"index": i, "text": text, "logprobs": None, "finish_reason": finish.get(i, "length")})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {**base, "choices": choices, "usage": usage}


async def _sse(job: Job, base: dict, chat: bool, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish_reason."""
    chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    replies: dict[int, Reply] = {}
    completion_tokens = 0

    def data(choice: dict) -> str:
        return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"

    try:
        async for ev in _events(job):
            completion_tokens += 1
            text = ev.text
            if chat:
                reply = replies.setdefault(ev.row, Reply())
                first = not reply.text
                text = reply.add(text)
                if first and (text or ev.finish_reason):  # the reply begins: announce the role, as OpenAI does
                    yield data({"index": ev.row, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None})
            if text:
                yield data({"index": ev.row, "delta": {"content": text}, "finish_reason": None} if chat else
                           {"index": ev.row, "text": text, "logprobs": None, "finish_reason": None})
            if ev.finish_reason:
                yield data({"index": ev.row, "delta": {}, "finish_reason": ev.finish_reason} if chat else
                           {"index": ev.row, "text": "", "logprobs": None, "finish_reason": ev.finish_reason})
    except APIError as e:  # the status line is long gone: report the failure in the stream, as OpenAI does
        yield f"data: {json.dumps({'error': e.body})}\n\n"
    else:
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------------------
# `cakelm serve`


@dataclass
class ServeConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network: give --api-key)")
    port: int = opt(8000, "port")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 (default: $CAKELM_API_KEY; empty "
                                    "is an error)")
    allowed_hosts: str = opt("", "more names clients may reach the server by (Host header), comma-separated, e.g. "
                                 "a reverse proxy's; '*' allows any (default: the bound address; loopback names)")
    allow_no_key: bool = opt(False, "serve a --host beyond loopback without --api-key (anyone on the network can "
                                    "use it)")
    model_name: str | None = opt(None, "model id reported by /v1/models (default: the checkpoint's folder name)")
    max_tokens: int = opt(1024, "largest max_tokens a request may ask for")
    playscript: bool | None = opt(None, "render chats as a plain-text playscript (default: from the checkpoint)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 or self.max_tokens < 1:
            raise ConfigError(f"--port must be in 1..65535 and --max-tokens >= 1 (got {self.port}, {self.max_tokens})")


def build_app(cfg: ServeConfig) -> FastAPI:
    """The app for a checkpoint, as `cakelm serve` runs it (the options are checked before the model loads)."""
    key = webapp.access_token(cfg.api_key, "CAKELM_API_KEY", "--api-key")
    webapp.check_exposure(cfg.host, key is not None, cfg.allow_no_key, "--api-key KEY (or $CAKELM_API_KEY)")
    refuse_reward_model(cfg.ckpt, "serve")
    model, tok, meta = load_model(cfg.ckpt, pick_device(cfg.device))
    name = cfg.model_name or Path(cfg.ckpt).resolve().name
    return create_app(Engine(model, tok), format_of(meta, cfg.playscript), name, key, cfg.max_tokens,
                      ckpt=cfg.ckpt, host=cfg.host, allowed_hosts=webapp.parse_hosts(cfg.allowed_hosts))


def main(cfg: ServeConfig) -> None:
    app = build_app(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"cakelm serve: {cfg.ckpt} at {url}  (chat page: {url}/ ; OpenAI API: {url}/v1)", flush=True)
    webapp.run(app, cfg.host, cfg.port)
