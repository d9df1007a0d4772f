"""The OpenAI API's shapes that `cakelm serve` speaks: the request bodies, the error, and log-probs.

Log-probs for /v1/completions (OpenAI's legacy shape, what lm-evaluation-harness reads):
    choices[i].logprobs = {"tokens": [...], "token_logprobs": [null, -2.1, ...],
                           "top_logprobs": [null, {" there": -2.1, " you": -1.3}, ...], "text_offset": [0, 2, ...]}
each `top_logprobs` dict holding the k most likely tokens and the chosen one; and for chat:
    choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
                                        "bytes"}, ...]}], "refusal": null}
Tokens are named by their text, a special token by its name, and bytes that are not whole UTF-8 characters as
"bytes:\\xe2\\x80" (as OpenAI and vLLM write them); -inf is sent as -9999.0 (JSON has no infinity; vLLM's choice).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cakelm import webapp
from cakelm.engine import TokenLogprob
from cakelm.tokenizer import Tokenizer

MAX_N = 8  # choices per request
MAX_LOGPROBS = 20  # most likely tokens reported per position, as OpenAI's top_logprobs
NO_LOGPROB = -9999.0  # what -inf is reported as (vLLM's choice; JSON has no infinity)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, webapp.error_body(message, type, param, code)["error"]
        self.headers = headers


# ----------------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI clients send many)


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (checked in _params)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: stop tokens do not end the reply (benchmarks use it)


class ChatRequest(Options):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(Options):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


# ----------------------------------------------------------------------------------------------------------------
# Log-probs in OpenAI's shapes


def _token_text(tok: Tokenizer, token: int) -> str:
    """A token as log-probs name it: its text, a special token's name, or "bytes:\\xe2\\x80" for bytes that are
    not whole UTF-8 characters (as OpenAI and vLLM write them)."""
    b = tok.token_bytes(token)
    if not b:
        return tok.decode([token])
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _lp(x: float) -> float:
    return max(x, NO_LOGPROB)


class Tokens:
    """The tokens one choice reports log-probs for: ids, entries (None for a prompt's first token), text offsets
    (characters into prompt + completion, as OpenAI's legacy completions count them), and how many a stream has
    sent already."""

    def __init__(self, tok: Tokenizer, offset: int = 0) -> None:
        self.tok, self.pos, self.sent = tok, offset, 0
        self.ids: list[int] = []
        self.entries: list[TokenLogprob | None] = []
        self.offsets: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int, entry: TokenLogprob | None) -> None:
        self.ids.append(token)
        self.entries.append(entry)
        self.offsets.append(self.pos)
        self.pos += len(self.decoder.decode(self.tok.token_bytes(token)))

    def restart(self, offset: int) -> None:
        """The generated tokens' offsets start after the echoed prompt text."""
        self.pos = offset
        self.decoder.reset()

    def unsent(self) -> slice:
        part, self.sent = slice(self.sent, len(self.ids)), len(self.ids)
        return part

    def completion(self, part: slice = slice(None)) -> dict:
        names = [_token_text(self.tok, t) for t in self.ids[part]]
        entries = self.entries[part]
        return {"tokens": names,
                "token_logprobs": [None if e is None else _lp(e.logprob) for e in entries],
                "top_logprobs": [None if e is None else {**{_token_text(self.tok, t): _lp(v) for t, v in e.top},
                                                         name: _lp(e.logprob)}  # the chosen token is always there
                                 for name, e in zip(names, entries)],
                "text_offset": self.offsets[part]}

    def chat(self, part: slice, hidden: Sequence[int]) -> dict:
        def item(token: int, logprob: float) -> dict:
            name = _token_text(self.tok, token)
            return {"token": name, "logprob": _lp(logprob), "bytes": list(self.tok.token_bytes(token) or name.encode())}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in self.entries[part] if e is not None and e.token not in hidden], "refusal": None}
