"""`cakelm serve CKPT`: an OpenAI-compatible HTTP API over the engine, and a web chat page.

    cakelm serve runs/default/base                  # http://127.0.0.1:8000/ (chat page) and /v1 (API)
    cakelm serve runs/default/sft --port 9000 --api-key s3cret

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                 "stream", "logprobs": true, "top_logprobs": 0..20, "ignore_eos" (vLLM's)}
                                -> chat.completion (or server-sent chat.completion.chunk events)
    POST /v1/completions        {"prompt": "..." | [...] | [ids] | [[ids], ...], same options, "logprobs": 0..20,
                                 "echo"}  -> text_completion
    GET  /v1/models, GET /health (running, queued, capacity), GET /metrics (Prometheus), GET / (the chat page)
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   (vLLM's; lm-evaluation-harness tokenizes with them)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-unless---api-key")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])  # model: the folder name

    lm_eval --model local-completions --tasks hellaswag \
        --model_args model=sft,base_url=http://127.0.0.1:8000/v1/completions,max_length=CONTEXT

Requests are batched continuously (`cakelm.batching`): up to --max-concurrency rows (a request takes one per prompt
and choice) generate together in every forward pass, a newcomer joins at the next token and a finished row leaves
at once; up to --max-queued more requests wait, and beyond that a request gets a 429 with Retry-After at once. A
client that disconnects cancels its request, streamed or not, queued or generating: its rows are free before the
next decode step.
Errors use OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with 400/401/403/404/413/415/429
statuses.

Log-probs (`cakelm.openai_api` has the shapes) are the model's own distribution, log_softmax(logits) at
temperature 1, whatever temperature and top_p the tokens were sampled with (as vLLM reports them by default).
/v1/completions with `echo` puts the prompt's tokens first (the first one's log-prob is null: nothing predicts
it), and with `max_tokens: 0` scores the prompt alone; lm-evaluation-harness's loglikelihood requests send `echo`
with max_tokens 1 and read the prompt's entries. `text_offset` counts characters into prompt + completion, as
OpenAI does. Chat log-probs leave out the stop tokens. Text prompts are read after <|bos|> (the model saw documents
that way); token-id prompts are taken exactly as sent.

Safety (`cakelm.webapp`): the server binds 127.0.0.1 and answers only requests whose Host names it (--allowed-hosts
adds names), refuses cross-site pages (Origin) and bodies that are not JSON, and refuses invalid Unicode with a
400. --api-key "" is an error, and binding beyond loopback without a key needs --allow-no-key; the key guards /v1
and the tokenizer routes (/health and /metrics stay open, as vLLM's do). Stop strings are at most MAX_STOP of
MAX_STOP_CHARS characters each, matched in time linear in the reply. A reward-model checkpoint is refused: its body
is not a model to chat with.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from cakelm import webapp
from cakelm.batching import DONE, Batcher, Busy, PromptScores, Request
from cakelm.chat_format import Reply, format_of, render_prompt, stop_rules, validate
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device, pick_inference_dtype
from cakelm.config import ConfigError, opt
from cakelm.engine import Engine, SamplingParams, StreamEvent
from cakelm.metrics_http import CONTENT_TYPE, CountResponses, ServerMetrics
from cakelm.openai_api import (
    MAX_N,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Options,
    TokenizeRequest,
    Tokens,
)
from cakelm.rlhf import refuse_reward_model

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 1000  # characters per stop string
RETRY_AFTER = "1"  # seconds, in a 429's Retry-After header


# ----------------------------------------------------------------------------------------------------------------
# Requests through the batcher


@dataclass
class Job:
    """A request on its way through the batcher, as the event loop sees it: the batcher's thread hands its items
    (PromptScores, StreamEvent, then DONE or an exception) to `events`."""

    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None
    gone: bool = False  # the client hung up


_GONE = object()  # the client hung up


def _submit(st: ServerState, prompts: list[list[int]], params: SamplingParams | None, n: int,
            echo_top: int | None) -> Job:
    """Queue a request in the batcher, counting its tokens and latencies for /metrics as they come; a full queue
    is a 429 with Retry-After."""
    job = Job(asyncio.get_running_loop())
    last: dict[int, float] = {}  # each row's previous token time
    started = False

    def emit(item: Any) -> None:  # on the batcher's thread
        nonlocal started
        if not started:  # the prompts went through the model
            started = True
            st.metrics.prompt(sum(len(p) for p in prompts))
        if isinstance(item, StreamEvent):
            now = time.monotonic()
            st.metrics.token(ttft=None if last else now - job.arrival,
                             gap=now - last[item.row] if item.row in last else None)
            last[item.row] = now
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            if job.request is not None:
                st.batcher.cancel(job.request)

    try:
        job.request = st.batcher.submit(prompts, params, n, emit, echo_top)
    except Busy as e:
        raise APIError(429, str(e), type="server_overloaded", code="rate_limit_exceeded",
                       headers={"Retry-After": RETRY_AFTER}) from None
    except CakeError as e:
        raise APIError(400, str(e), param="n") from None
    return job


async def _watch(batcher: Batcher, job: Job, request: HTTPRequest) -> None:
    """Wait for the client to hang up, then cancel its job. After the body, the server's `receive` returns only
    when the connection ends (an event, not polling), so a job is cancelled at once, queued or generating."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.gone = True
    if job.request is not None:
        batcher.cancel(job.request)
    job.events.put_nowait(_GONE)


async def _events(batcher: Batcher, job: Job | None, request: HTTPRequest | None = None
                  ) -> AsyncIterator[StreamEvent | PromptScores]:
    """The job's events as they come (none without a job). With `request`, a client that hangs up cancels the
    job (streaming responses are cancelled by the server itself when the client goes, and pass None)."""
    if job is None:
        return
    watch = asyncio.create_task(_watch(batcher, job, request)) if request is not None else None
    try:
        while True:
            item = await job.events.get()
            if item is DONE or item is _GONE:
                return
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error") from None
            yield item
    finally:
        if job.request is not None:
            batcher.cancel(job.request)  # done, failed, or the client went away: stop generating for it
        if watch is not None:
            watch.cancel()  # before the response is sent: the server's receive is not ours to read after it


# ----------------------------------------------------------------------------------------------------------------
# The app


@dataclass
class ServerState:
    engine: Engine
    batcher: Batcher
    metrics: ServerMetrics
    fmt: str
    model_name: str
    api_key: str | None
    max_tokens_limit: int
    ckpt: str | None = None
    dtype_note: str = ""  # which dtype the weights are in, and why
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Ask:
    """What a request wants back besides the text: per prompt its text, echo, and log-probs (None: none)."""

    texts: list[str]
    echo: bool = False
    logprobs: int | None = None
    hidden: tuple[int, ...] = ()  # tokens a chat reply's log-probs leave out (its stop tokens)


def create_app(engine: Engine, fmt: str, model_name: str = "cakelm", api_key: str | None = None,
               max_tokens_limit: int = 1024, body_limit: int = webapp.MAX_BODY_BYTES, ckpt: str | None = None,
               host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (), max_concurrency: int = 8,
               max_queued: int = 64, prefill_chunk: int = 256, log_requests: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` (conversations rendered in chat format `fmt`), answering requests to
    `host` (the address it is bound to) and `allowed_hosts`."""
    metrics = ServerMetrics()
    batcher = Batcher(engine, max_concurrency, max_queued, prefill_chunk).start()
    st = ServerState(engine, batcher, metrics, fmt, model_name, api_key, max_tokens_limit, ckpt)
    # the tokenizer routes sit beside /v1 (where clients look for them) but need the key as /v1 does
    app = webapp.create_app("cakelm", api_key, ("/v1/", "/tokenize", "/detokenize"),
                            "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                            token_code="invalid_api_key", body_limit=body_limit,
                            openapi_url="/openapi.json", host=host, allowed_hosts=allowed_hosts)
    log = (lambda line: print(f"cakelm serve: {line}", flush=True)) if log_requests else None
    app.add_middleware(CountResponses, metrics=metrics, log=log)  # outermost: counts the checks' refusals too
    app.state.server = st
    tok = engine.tok

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse({"error": e.body}, status_code=e.status, headers=e.headers)

    @app.get("/health")
    def health() -> dict:
        running, queued = st.batcher.counts()
        return {"status": "ok", "model": st.model_name, "running": running, "queued": queued,
                "max_concurrency": st.batcher.slots, "max_queued": st.batcher.max_queued,
                "dtype": str(st.engine.dtype).removeprefix("torch.")}

    @app.get("/metrics")
    def metrics_page() -> Response:
        return Response(st.metrics.render(*st.batcher.counts()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                            "owned_by": "cakelm"}]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("cakelm.web").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict:
        t = tok.template
        return {"bos_token": t.bos, "eos_token": t.end, "pad_token": t.pad, "model_max_length": engine.context}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict:
        """Plain text, as /v1/completions reads it; a text that is exactly a special token's name is that token
        (how clients look up the ids of tokenizer_info's bos_token and eos_token)."""
        ids = tok.encode_template(req.prompt) if req.prompt in tok.special_tokens else tok.encode(req.prompt)
        ids = [tok.bos_id, *ids] if req.add_special_tokens else ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> dict:
        return {"prompt": tok.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: HTTPRequest) -> Any:
        _check_model(st, req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            messages = validate(req.messages, "messages")
            prompt = render_prompt(messages, tok, st.fmt)
        except CakeError as e:
            raise APIError(400, str(e), param="messages") from None
        stop_ids, stop_strings = stop_rules(tok, st.fmt)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(st, req, [prompt], stop_ids, stop_strings, "messages", k)
        return await _respond(st, req, request, [prompt], params, _Ask([""], False, k, tuple(stop_ids)), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: HTTPRequest) -> Any:
        _check_model(st, req.model)
        prompts, texts = _completion_prompts(engine, req.prompt)
        if len(prompts) * req.n > MAX_N:
            raise APIError(400, f"give 1 to {MAX_N} prompts x n completions", param="prompt")
        params = _params(st, req, prompts, (tok.bos_id,), (), "prompt", req.logprobs, echo=req.echo)
        return await _respond(st, req, request, prompts, params, _Ask(texts, req.echo, req.logprobs), chat=False)

    return app


def _check_model(st: ServerState, model: str | None) -> None:
    if model not in (None, "", st.model_name):
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{st.model_name}'",
                       param="model", code="model_not_found")


def _completion_prompts(engine: Engine, prompt: str | list) -> tuple[list[list[int]], list[str]]:
    """The prompts as token ids and as text. Text is read after <|bos|>, as the model saw documents; token ids
    are taken as sent (lm-evaluation-harness aligns its scores with the ids it sends: a BOS in front would shift
    them) and shown as their text without special tokens (what `echo` returns, as vLLM does)."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise APIError(400, f"give 1 to {MAX_N} prompts", param="prompt")
    ids, texts = [], []
    vocab = engine.model.cfg.vocab_size
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids.append(engine.tok.encode(item, bos=True))
            texts.append(item)
        elif not item or not all(0 <= t < vocab for t in item):
            raise APIError(400, f"prompt {i}: give 1 or more token ids in 0..{vocab - 1}", param="prompt")
        else:
            ids.append(list(item))
            texts.append(engine.tok.decode(item, skip_special=True))
    return ids, texts


def _params(st: ServerState, req: Options, prompts: list[list[int]], stop_ids: tuple[int, ...],
            stop_strings: tuple[str, ...], prompt_param: str, top_logprobs: int | None, echo: bool = False
            ) -> SamplingParams | None:
    """The sampling parameters of a request; None for max_tokens 0 (with echo: the prompt is scored, not
    continued)."""
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked == 0 and not echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo on /v1/completions, which scores the "
                            "prompt alone)", param="max_tokens")
    longest = max(len(p) for p in prompts)
    room = st.engine.context - longest
    if room < (0 if asked == 0 else 1):
        raise APIError(400, f"the prompt is {longest} tokens but the model's context is {st.engine.context} "
                            f"({'the prompt must fit' if asked == 0 else 'at least one token must fit after it'})",
                       param=prompt_param, code="context_length_exceeded")
    if asked is not None and asked > st.max_tokens_limit:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {st.max_tokens_limit}",
                       param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: give up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    if asked == 0:
        return None
    # each prompt is cut to the room it has after it, by the engine
    return SamplingParams(asked or st.max_tokens_limit, req.temperature, 0, req.top_p, req.seed,
                          () if req.ignore_eos else stop_ids, stop_strings + tuple(stops), top_logprobs=top_logprobs)


@dataclass
class _Choice:
    tokens: Tokens
    reply: Reply = field(default_factory=Reply)
    text: str = ""
    finish: str | None = None


async def _respond(st: ServerState, req: Options, request: HTTPRequest, prompts: list[list[int]],
                   params: SamplingParams | None, ask: _Ask, chat: bool) -> Any:
    scored = ask.echo and ask.logprobs is not None
    job = _submit(st, prompts, params, req.n, ask.logprobs if scored else None) \
        if params is not None or scored else None  # echo alone of max_tokens 0 needs no model
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": st.model_name}
    prompt_tokens = sum(len(p) for p in prompts)
    usage_log = request.state.usage = {"prompt": prompt_tokens, "completion": 0}  # the request log's tokens
    choices = [_Choice(Tokens(st.engine.tok, 0 if ask.echo else len(ask.texts[r // req.n])))
               for r in range(len(prompts) * req.n)]
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(st.batcher, job, base, chat, prompt_tokens, include_usage, choices, prompts,
                                      req.n, ask, usage_log),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completion_tokens = 0
    async for ev in _events(st.batcher, job, request):
        if isinstance(ev, PromptScores):
            _add_prompt(choices, prompts, req.n, ask, ev)
            continue
        completion_tokens += 1
        usage_log["completion"] = completion_tokens
        c = choices[ev.row]
        c.reply.add(ev.text)
        c.text += ev.text
        c.finish = ev.finish_reason or c.finish
        if ask.logprobs is not None:
            c.tokens.add(ev.token_id, ev.logprobs)
    if job is not None and job.gone:  # nobody reads it; 499 (nginx's "client closed request") is for /metrics
        return Response(status_code=499)
    out = []
    for i, c in enumerate(choices):
        finish = c.finish or "length"
        if chat:
            out.append({"index": i, "message": {"role": "assistant", "content": c.reply.final},
                        "logprobs": c.tokens.chat(slice(None), ask.hidden) if ask.logprobs is not None else None,
                        "finish_reason": finish})
        else:
            out.append({"index": i, "text": (ask.texts[i // req.n] if ask.echo else "") + c.text,
                        "logprobs": c.tokens.completion() if ask.logprobs is not None else None,
                        "finish_reason": finish})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {**base, "choices": out, "usage": usage}


def _add_prompt(choices: list[_Choice], prompts: list[list[int]], n: int, ask: _Ask, ev: PromptScores) -> None:
    """A prompt's scores go first in each of its choices' log-probs; the generated tokens' offsets follow the
    echoed text."""
    for c in choices[ev.prompt_index * n:(ev.prompt_index + 1) * n]:
        for token, entry in zip(prompts[ev.prompt_index], ev.entries):
            c.tokens.add(token, entry)
        c.tokens.restart(len(ask.texts[ev.prompt_index]))


async def _sse(batcher: Batcher, job: Job | None, base: dict, chat: bool, prompt_tokens: int, include_usage: bool,
               choices: list[_Choice], prompts: list[list[int]], n: int, ask: _Ask, usage_log: dict
               ) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text (with the log-probs of the tokens since the last chunk), a
    last chunk per choice with its finish_reason; with echo, first a chunk per choice with the prompt."""
    chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    completion_tokens = 0
    want = ask.logprobs is not None

    def data(choice: dict) -> str:
        return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n"

    def piece(row: int, text: str, finish: str | None) -> str:
        c = choices[row]
        if chat:
            delta = {"content": text} if text or not finish else {}
            lp = {"logprobs": c.tokens.chat(c.tokens.unsent(), ask.hidden)} if want else {}
            return data({"index": row, "delta": delta, **lp, "finish_reason": finish})
        return data({"index": row, "text": text, "logprobs": c.tokens.completion(c.tokens.unsent()) if want else None,
                     "finish_reason": finish})

    try:
        if ask.echo and not want:
            for r in range(len(choices)):
                yield piece(r, ask.texts[r // n], None)
        async for ev in _events(batcher, job):
            if isinstance(ev, PromptScores):
                _add_prompt(choices, prompts, n, ask, ev)
                for r in range(ev.prompt_index * n, (ev.prompt_index + 1) * n):
                    yield piece(r, ask.texts[ev.prompt_index], None)
                continue
            completion_tokens += 1
            usage_log["completion"] = completion_tokens
            c = choices[ev.row]
            if want:
                c.tokens.add(ev.token_id, ev.logprobs)
            text = ev.text
            if chat:
                first = not c.reply.text
                text = c.reply.add(text)
                if first and (text or ev.finish_reason):  # the reply begins: announce the role, as OpenAI does
                    yield data({"index": ev.row, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None})
            if text:
                yield piece(ev.row, text, None)
            if ev.finish_reason:
                c.finish = ev.finish_reason
                yield piece(ev.row, "", ev.finish_reason)
        for r, c in enumerate(choices):  # max_tokens 0: no token ended them
            if c.finish is None:
                yield piece(r, "", "length")
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
    max_concurrency: int = opt(8, "rows generating at once in one continuous batch (each prompt x choice of a "
                                  "request takes one; each costs a KV cache of up to the context)")
    max_queued: int = opt(64, "requests that may wait for room in the batch; beyond them a 429 with Retry-After")
    log_requests: bool = opt(True, "print one line per API request when it ends: method, path, status, prompt + "
                                   "completion tokens, seconds")
    prefill_chunk: int = opt(256, "prompt tokens a newcomer feeds per step while others generate (smaller: running "
                                  "streams stall less; larger: its first token comes sooner)")
    playscript: bool | None = opt(None, "render chats as a plain-text playscript (default: from the checkpoint)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = opt("auto", "weights' dtype while serving: auto = bf16 on GPUs and on CPUs where a start-up probe "
                             "shows bf16 matmuls faster (half the bytes a decode step reads), else fp32",
                     choices=("auto", "fp32", "bf16"))

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 or self.max_tokens < 1:
            raise ConfigError(f"--port must be in 1..65535 and --max-tokens >= 1 (got {self.port}, {self.max_tokens})")
        if self.max_concurrency < 1 or self.max_queued < 0 or self.prefill_chunk < 1:
            raise ConfigError(f"--max-concurrency and --prefill-chunk must be >= 1 and --max-queued >= 0 (got "
                              f"{self.max_concurrency}, {self.prefill_chunk}, {self.max_queued})")


def build_app(cfg: ServeConfig) -> FastAPI:
    """The app for a checkpoint, as `cakelm serve` runs it (the options are checked before the model loads)."""
    key = webapp.access_token(cfg.api_key, "CAKELM_API_KEY", "--api-key")
    webapp.check_exposure(cfg.host, key is not None, cfg.allow_no_key, "--api-key KEY (or $CAKELM_API_KEY)")
    refuse_reward_model(cfg.ckpt, "serve")
    device = pick_device(cfg.device)
    model, tok, meta = load_model(cfg.ckpt, device)
    dtype, why = pick_inference_dtype(cfg.dtype, device, model.cfg.dim, model.cfg.ffn_dim)
    name = cfg.model_name or Path(cfg.ckpt).resolve().name
    app = create_app(Engine(model.to(dtype), tok), format_of(meta, cfg.playscript), name, key, cfg.max_tokens,
                     ckpt=cfg.ckpt, host=cfg.host, allowed_hosts=webapp.parse_hosts(cfg.allowed_hosts),
                     max_concurrency=cfg.max_concurrency, max_queued=cfg.max_queued,
                     prefill_chunk=cfg.prefill_chunk, log_requests=cfg.log_requests)
    app.state.server.dtype_note = f"weights in {str(dtype).removeprefix('torch.')} ({why})"
    return app


def main(cfg: ServeConfig) -> None:
    app = build_app(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"cakelm serve: {cfg.ckpt} at {url}  (chat page: {url}/ ; OpenAI API: {url}/v1); "
          f"{app.state.server.dtype_note}", flush=True)
    webapp.run(app, cfg.host, cfg.port)
