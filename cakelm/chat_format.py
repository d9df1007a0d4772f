"""Conversations -> token ids: the one place that decides how a dialogue looks to a model.

Two formats, chosen by the checkpoint's meta.json ("chat_format"), overridable by a flag:

- chat (models fine-tuned on dialogues), laid out by the tokenizer's `ChatTemplate`. cakelm's own models use
  their special tokens:
      <|bos|><|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>
  An imported model uses the template it was trained with, e.g. SmolLM2's ChatML (with its default system
  message when a conversation has none):
      <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n
      <|im_start|>assistant\nHello.<|im_end|>\n
  A reply ends with the template's end token (<|end|>, <|im_end|>). The SFT loss mask covers each assistant
  reply and its end token. `template_from_jinja` reads a ChatTemplate off a Hugging Face Jinja chat template.
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

import json
from collections.abc import Callable, Sequence
from typing import Any

from cakelm.common import CakeError
from cakelm.tokenizer import ChatTemplate, Tokenizer

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


def _chat_template(tok: Tokenizer) -> ChatTemplate:
    if set(tok.template.headers) != set(ROLES):
        raise CakeError("this model's tokenizer has no chat template (a base model): use the playscript format")
    return tok.template


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
        t, tpl = _chat_template(tok), tok.encode_template
        opening = tpl(t.prefix)
        if t.default_system and messages[0]["role"] != "system":
            opening += tpl(t.headers["system"]) + enc(t.default_system) + [tok.end_id] + tpl(t.after_end)
        parts = [(opening, [0] * len(opening))]
        for m in messages:
            head, body, tail = tpl(t.headers[m["role"]]), enc(m["content"]) + [tok.end_id], tpl(t.after_end)
            learn = int(m["role"] == "assistant")
            parts.append((head + body + tail, [0] * len(head) + [learn] * len(body) + [0] * len(tail)))
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
        return ids + tok.encode_template(tok.template.headers["assistant"])
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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face chat templates (Jinja) <-> ChatTemplate. Jinja is only needed to import or export a template.

_MARK = {"system": "Qsystemmark7", "user": "Qusermark7", "assistant": "Qassistantmark7", "user2": "Qsecondmark7"}


def render_jinja(jinja: str, messages: Sequence[Message], generation: bool, bos: str, eos: str) -> str:
    """Render a Hugging Face chat template as `tokenizer.apply_chat_template(..., tokenize=False)` does (a
    sandboxed Jinja environment with the same options, filters and globals)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent,
                                                                                       ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(jinja).render(messages=list(messages), add_generation_prompt=generation, bos_token=bos,
                                         eos_token=eos)


def render_text(t: ChatTemplate, messages: Sequence[Message], generation: bool) -> str:
    """A conversation as text the way `render`/`render_prompt` lay it out (to compare with a Jinja template)."""
    text = t.prefix
    if t.default_system and messages[0]["role"] != "system":
        text += t.headers["system"] + t.default_system + t.end + t.after_end
    text += "".join(t.headers[m["role"]] + m["content"] + t.end + t.after_end for m in messages)
    return text + (t.headers["assistant"] if generation else "")


def template_from_jinja(jinja: str, bos: str, eos: str, pad: str, specials: Sequence[str]) -> ChatTemplate:
    """Read a ChatTemplate off a Hugging Face chat template: render probe conversations whose contents are
    markers, cut the text at the markers (what is left are the prefix, the role headers and the turn ending),
    then check that the ChatTemplate renders other conversations to exactly the template's text. A template
    that does not have this shape (one that rewrites contents, say) is refused. `specials` are the vocabulary's
    special tokens; the turn ending must start with one of them (the end token)."""
    m = _MARK
    probe = [{"role": "system", "content": m["system"]}, {"role": "user", "content": m["user"]},
             {"role": "assistant", "content": m["assistant"]}, {"role": "user", "content": m["user2"]}]
    try:
        full = render_jinja(jinja, probe, False, bos, eos)
        gen = render_jinja(jinja, probe, True, bos, eos)
        bare = render_jinja(jinja, probe[1:2], False, bos, eos)
    except Exception as e:  # jinja2 raises many types; the template is the problem either way
        detail = (str(e).splitlines() or [""])[0][:200]
        raise CakeError(f"unsupported chat template: cannot render it ({type(e).__name__}: {detail})") from None
    pieces = full
    for key in ("system", "user", "assistant", "user2"):
        pieces = pieces.replace(m[key], "\0")
    p = pieces.split("\0")  # prefix+system header | end+user header | end+assistant header | end+user | end
    if len(p) != 5 or p[1] != p[3] or not gen.startswith(full):
        raise CakeError("unsupported chat template: it does not lay out each message as header + content + end")
    footer = p[4]
    end = next((s for s in sorted(specials, key=lambda s: (s != eos, -len(s))) if s and footer.startswith(s)), None)
    if end is None:
        raise CakeError(f"unsupported chat template: a turn ends with {footer!r}, which is no special token")
    user_h, asst_h = p[1][len(footer):], p[2][len(footer):]
    system_h = user_h.replace("user", "system")
    if not (p[1].startswith(footer) and p[2].startswith(footer) and p[0].endswith(system_h)
            and gen[len(full):] == asst_h):
        raise CakeError("unsupported chat template: its role headers differ in more than the role's name")
    prefix = p[0][:len(p[0]) - len(system_h)]
    before = bare.split(m["user"])[0]  # prefix + (default system turn) + user header
    default = ""
    if before != prefix + user_h:
        head, tail = prefix + system_h, footer + user_h
        if not (before.startswith(head) and before.endswith(tail)):
            raise CakeError("unsupported chat template: what it puts before a conversation without a system "
                            "message is not a system turn")
        default = before[len(head):len(before) - len(tail)]
    t = ChatTemplate(bos=bos, pad=pad, end=end, prefix=prefix, after_end=footer[len(end):], default_system=default,
                     headers={"system": system_h, "user": user_h, "assistant": asst_h}, jinja=jinja)
    checks = [[{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How are you?"},
               {"role": "user", "content": "What is 2 + 3?"}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]]
    for msgs in checks:
        for generation in (False, True):
            if render_text(t, msgs, generation) != render_jinja(jinja, msgs, generation, bos, eos):
                raise CakeError("unsupported chat template: it renders conversations differently from a "
                                "header + content + end layout (checked on a test conversation)")
    return t


def jinja_template(t: ChatTemplate) -> str:
    """The Hugging Face chat template of `t`: the model's own when it was imported, else Jinja written from the
    ChatTemplate, so `tokenizer.apply_chat_template` of an export gives the ids `render_prompt` gives."""
    if t.jinja or set(t.headers) != set(ROLES):
        return t.jinja
    q = json.dumps
    headers = "{" + ", ".join(f"{q(role)}: {q(h)}" for role, h in t.headers.items()) + "}"
    default = (f"{{% if messages[0]['role'] != 'system' %}}"
               f"{{{{ {q(t.headers['system'] + t.default_system + t.end + t.after_end)} }}}}{{% endif %}}"
               if t.default_system else "")
    return (f"{{% set headers = {headers} %}}{{{{ {q(t.prefix)} }}}}{default}{{% for message in messages %}}"
            f"{{{{ headers[message['role']] + message['content'] + {q(t.end + t.after_end)} }}}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {q(t.headers['assistant'])} }}}}{{% endif %}}")
