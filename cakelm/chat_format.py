"""Conversations -> token ids: the one place that decides how a dialogue looks to a model.

Two formats, chosen by the checkpoint's meta.json ("chat_format"), overridable by a flag:

- chat (models fine-tuned on dialogues), with the tokenizer's special tokens:
      <|bos|><|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>
  A reply ends with <|end|>. The SFT loss mask covers each assistant reply and its <|end|>.
- playscript (base models, which have never seen those tokens), as plain text they can continue:
      <|bos|>The following is a dialogue between a USER and a helpful, knowledgeable ASSISTANT.
      Be brief.

      USER: Hi!
      ASSISTANT: Hello.
  Generation stops at the next "USER:" line.

A message is {"role": "system" | "user" | "assistant", "content": str}; a system message may only come first.

    ids, mask = render(messages, tok, "chat")            # for training
    prompt = render_prompt(messages, tok, "playscript")   # for generation: ends where the assistant speaks
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cakelm.common import CakeError
from cakelm.tokenizer import Tokenizer

FORMATS = ("chat", "playscript")
ROLES = ("system", "user", "assistant")
PLAYSCRIPT_HEADER = "The following is a dialogue between a USER and a helpful, knowledgeable ASSISTANT."
_SPEAKER = {"user": "USER:", "assistant": "ASSISTANT:"}

Message = dict[str, str]


def validate(messages: Sequence[Any], where: str = "conversation") -> list[Message]:
    """Check roles and contents; return the messages as plain dicts. Errors name the message index."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise CakeError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CakeError(f'{where}: message {i} must be {{"role": ..., "content": "..."}}')
        if m["role"] not in ROLES:
            raise CakeError(f"{where}: message {i} has unknown role {m['role']!r} (use system, user or assistant)")
        if m["role"] == "system" and i != 0:
            raise CakeError(f"{where}: message {i} is a system message; only the first message may be one")
        if not m["content"].strip():
            raise CakeError(f"{where}: message {i} ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CakeError(f"unknown chat format {fmt!r} (use {' or '.join(FORMATS)})")


def render_parts(messages: Sequence[Message], tok: Tokenizer, fmt: str,
                 encode: Callable[[str], list[int]] | None = None) -> list[tuple[list[int], list[int]]]:
    """A conversation as (ids, loss_mask) pieces: the opening (<|bos|>, and in a playscript the header with the
    system message), then one piece per message (empty for a playscript's system message). `render` is their
    concatenation; a conversation can be cut between messages without tokenizing it again. `encode` replaces
    tok.encode (e.g. a lookup of texts encoded in one batch)."""
    _check_format(fmt)
    messages = validate(messages)
    enc = encode or tok.encode
    if fmt == "chat":
        role_id = {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
        parts = [([tok.bos_id], [0])]
        for m in messages:
            body = enc(m["content"]) + [tok.end_id]
            learn = int(m["role"] == "assistant")
            parts.append(([role_id[m["role"]], *body], [0] + [learn] * len(body)))
        return parts
    header = PLAYSCRIPT_HEADER + (f"\n{messages[0]['content']}" if messages[0]["role"] == "system" else "") + "\n"
    opening = [tok.bos_id, *enc(header)]
    parts = [(opening, [0] * len(opening))]
    for m in messages:
        if m["role"] == "system":
            parts.append(([], []))
            continue
        # "\nUSER:" is its own piece so the prompt at generation time tokenizes exactly like training text
        speaker, body = enc("\n" + _SPEAKER[m["role"]]), enc(" " + m["content"].strip())
        parts.append((speaker + body, [0] * len(speaker) + [int(m["role"] == "assistant")] * len(body)))
    return parts


def render(messages: Sequence[Message], tok: Tokenizer, fmt: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole conversation; mask 1 marks what the model should learn to say: each
    assistant reply, with its <|end|> in chat format (a playscript reply has no end marker: it ends where the
    next "USER:" line begins)."""
    ids, mask = [], []
    for piece_ids, piece_mask in render_parts(messages, tok, fmt):
        ids += piece_ids
        mask += piece_mask
    return ids, mask


def render_prompt(messages: Sequence[Message], tok: Tokenizer, fmt: str) -> list[int]:
    """Ids of a conversation that ends with a user message, followed by the opening of the assistant's turn."""
    messages = validate(messages)
    if messages[-1]["role"] != "user":
        raise CakeError("the conversation must end with a user message to ask for a reply")
    ids, _ = render(messages, tok, fmt)
    if fmt == "chat":
        return ids + [tok.assistant_id]
    return ids + tok.encode("\n" + _SPEAKER["assistant"])


def stop_rules(tok: Tokenizer, fmt: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop token ids, stop strings) that end an assistant reply."""
    _check_format(fmt)
    if fmt == "chat":
        return (tok.end_id, tok.bos_id), ()
    return (tok.bos_id,), ("\nUSER:", "\nASSISTANT:")


class Reply:
    """An assistant reply as it streams in. Leading whitespace is dropped (a playscript reply starts right after
    "ASSISTANT:"), and `final` is the finished reply without trailing whitespace."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> str:
        """Append a streamed piece; return the part of it to show."""
        if not self.text:
            piece = piece.lstrip()
        self.text += piece
        return piece

    @property
    def final(self) -> str:
        return self.text.rstrip()


def fit_history(messages: Sequence[Message], tok: Tokenizer, fmt: str, budget: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (never the system message or the last user message) until the prompt has at most
    `budget` tokens. Returns (kept messages, number dropped); a last message that cannot fit is a CakeError."""
    messages = validate(messages)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(render_prompt(system + turns, tok, fmt)) > budget:
        if len(turns) == 1:
            n = len(render_prompt(system + turns, tok, fmt))
            raise CakeError(f"the message needs {n} prompt tokens but only {budget} fit in the context "
                            "(with room for the reply); shorten it or lower --max-new-tokens")
        # drop the oldest user turn and the assistant reply that answered it
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut
    return system + turns, dropped


def format_of(meta: dict[str, Any], playscript: bool | None = None) -> str:
    """The format a checkpoint speaks: playscript/chat when the --playscript flag says so, else meta.json's
    "chat_format", else playscript (a model without that key has not been taught the chat tokens)."""
    if playscript is not None:
        return "playscript" if playscript else "chat"
    fmt = meta.get("chat_format") or "playscript"
    _check_format(fmt)
    return fmt
