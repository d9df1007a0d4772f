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
  reply and its end token. `template_from_jinja` reads a ChatTemplate off a Hugging Face Jinja chat template
  and checks that cakelm renders test conversations exactly as `apply_chat_template` does (text, and token by
  token: a header's text and the content after it are encoded together, as transformers does). It covers
  Qwen2.5 (default system message), Qwen3 (an empty <think> block opens the last reply), Llama 3 (trimmed
  contents) and Llama 3.1/3.2 (a system turn with the knowledge cutoff and date, always there); Llama 3.2
  writes today's date, which is read once, at import, so a model's prompts do not change from day to day.
  Templates of another shape (Mistral's, which moves the system message into a user turn) are refused.
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
from functools import lru_cache
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


def _layout(t: ChatTemplate, messages: list[Message]) -> tuple[str, list[tuple[str, str, bool]]]:
    """The chat layout that `render_parts` and `render_text` share: (the opening text, and per message (head,
    content, learned)); a message's turn is head + content + t.end + t.after_end."""
    opening = t.prefix
    if messages[0]["role"] != "system" and (t.always_system or t.default_system):
        opening += t.headers["system"] + t.default_system + t.end + t.after_end
    last = len(messages) - 1
    # Qwen3's template opens the last message with an empty reasoning block when it answers a user
    final = messages[last]["role"] == "assistant" and any(m["role"] == "user" for m in messages[:last])
    turns = []
    for i, m in enumerate(messages):
        head, content = t.headers[m["role"]], m["content"].strip() if t.trim else m["content"]
        if i == last and final:
            head, content = head + t.final_reply, content.lstrip(t.final_lstrip)
        turns.append((head, content, m["role"] == "assistant"))
    return opening, turns


def _encode_turn(tok: Tokenizer, head: str, content: str,
                 enc: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """(ids of head, ids of content) as transformers tokenizes head + content. It splits text only at special
    tokens, so the header's text after its last special token ("user\\n" in ChatML) and the content are one piece:
    a content that starts with a newline merges with the header's newline there, and must here too. A token that
    straddles the two counts as the head's (it is never a whole reply token a model could learn to start with)."""
    ids = tok.encode_template(head)
    last = max((i for i, x in enumerate(ids) if tok.hf.id_to_token(x) in tok.special_tokens), default=-1)
    name = tok.hf.id_to_token(ids[last]) if last >= 0 else ""
    tail = head[head.rfind(name) + len(name):] if name else head
    if not tail:
        return ids, enc(content)
    own, joint = ids[last + 1:], enc(tail + content)
    if joint[:len(own)] == own:
        return ids, joint[len(own):]
    n, at, size = 0, 0, len(tail.encode("utf-8"))
    while n < len(joint) and at < size:  # the tokens that start inside the header's text
        at, n = at + len(tok.token_bytes(joint[n])), n + 1
    return ids[:last + 1] + joint[:n], joint[n:]


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
        opening, turns = _layout(t, messages)
        first = tpl(opening)
        parts = [(first, [0] * len(first))]
        for head, content, learn in turns:
            head_ids, content_ids = _encode_turn(tok, head, content, enc)
            body, tail = content_ids + [tok.end_id], tpl(t.after_end)
            parts.append((head_ids + body + tail, [0] * len(head_ids) + [int(learn)] * len(body) + [0] * len(tail)))
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
    return _compiled(jinja).render(messages=list(messages), add_generation_prompt=generation, bos_token=bos,
                                   eos_token=eos)


@lru_cache(maxsize=8)
def _compiled(jinja: str) -> Any:
    """A chat template compiled once (reading one renders it a few dozen times)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # transformers' own: no HTML escaping, as json.dumps writes it
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(jinja)


def render_text(t: ChatTemplate, messages: Sequence[Message], generation: bool) -> str:
    """A conversation as text the way `render`/`render_prompt` lay it out (to compare with a Jinja template)."""
    opening, turns = _layout(t, list(messages))
    text = opening + "".join(head + content + t.end + t.after_end for head, content, _ in turns)
    return text + (t.headers["assistant"] if generation else "")


def _checks() -> list[list[Message]]:
    """Conversations that a ChatTemplate read off a Jinja template must render exactly as the template does."""
    u, a, s = ({"role": r, "content": c} for r, c in (("user", "Hi there!"), ("assistant", "Hello. How are you?"),
                                                       ("system", "Be brief.")))
    ask = {"role": "user", "content": "What is 2 + 3?"}
    return [[u, a, ask], [s, u], [s, u, a, ask, {"role": "assistant", "content": "5."}], [u, a],
            # whitespace around contents: kept, trimmed or partly stripped, as the template does
            [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\n  Hi  \n"},
             {"role": "assistant", "content": "\n\n Hello \t\n"}, {"role": "user", "content": " again "},
             {"role": "assistant", "content": "\n \tBye\n"}],
            [{"role": "user", "content": "Grüße aus Köln — 日本語で答えて 🎉"},
             {"role": "assistant", "content": "はい。✓"}]]


def _between(text: str, head: str, tail: str) -> str | None:
    """What lies between `head` and `tail` when `text` is head + ... + tail, else None."""
    ok = text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)
    return text[len(head):len(text) - len(tail)] if ok else None


def template_from_jinja(jinja: str, bos: str, eos: str, pad: str, specials: Sequence[str]) -> ChatTemplate:
    """Read a ChatTemplate off a Hugging Face chat template: render probe conversations whose contents are
    markers and cut the text at the markers (what is left are the prefix, the role headers, the turn ending,
    what opens a last reply and a conversation without a system message); render them with whitespace around
    the contents (trimmed or not); then check that the ChatTemplate renders other conversations (`_checks`) to
    exactly the template's text. A template that does not have this shape (one that rewrites contents, say) is
    refused in one line. `specials` are the vocabulary's special tokens; the turn ending must start with one.
    (Token ids are then exact where turns meet at a special token, as in every Qwen and Llama template: cakelm
    tokenizes turn by turn, transformers the whole text. Where they meet in plain text, as Zephyr's "</s>\n" +
    "<|user|>\n" in a vocabulary without those tokens, the text is exact and the ids may differ at the seam.)
    A template that writes today's date (Llama 3.2) is read as it renders today: the date is then fixed, so that
    training data and prompts never change with the day."""
    m = _MARK
    probe = [{"role": "system", "content": m["system"]}, {"role": "user", "content": m["user"]},
             {"role": "assistant", "content": m["assistant"]}, {"role": "user", "content": m["user2"]}]

    def reply(content: str) -> str:  # a user message and a reply to it
        return render_jinja(jinja, [probe[1], {"role": "assistant", "content": content}], False, bos, eos)

    try:
        full, gen = render_jinja(jinja, probe, False, bos, eos), render_jinja(jinja, probe, True, bos, eos)
        bare, last = render_jinja(jinja, probe[1:2], False, bos, eos), reply(m["assistant"])
        padded = render_jinja(jinja, [{**x, "content": f" \n{x['content']}\n "} for x in probe], False, bos, eos)
        lstripped = "".join(c for c in " \t\n" if reply(c * 2 + m["assistant"]) == last)
        expected = [(msgs, g, render_jinja(jinja, msgs, g, bos, eos)) for msgs in _checks() for g in (False, True)]
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
    at = p[0].find(user_h.replace("user", "system"))  # the system header may go on with fixed text (Llama 3.1)
    if not (p[1].startswith(footer) and p[2].startswith(footer) and at >= 0 and gen[len(full):] == asst_h):
        raise CakeError("unsupported chat template: its role headers differ in more than the role's name")
    prefix, system_h = p[0][:at], p[0][at:]
    before = bare.split(m["user"])[0]  # prefix + (default system turn) + user header
    default = "" if before == prefix + user_h else _between(before, prefix + system_h, footer + user_h)
    final = _between(last, before + m["user"] + footer + asst_h, m["assistant"] + footer)
    if default is None or final is None:
        raise CakeError("unsupported chat template: what it puts before a conversation without a system message, "
                        "or before a last reply, is not a system turn or a fixed text")
    trim = padded == full
    t = ChatTemplate(bos=bos, pad=pad, end=end, prefix=prefix, after_end=footer[len(end):], default_system=default,
                     always_system=before != prefix + user_h, trim=trim, final_reply=final,
                     final_lstrip="" if trim else lstripped,
                     headers={"system": system_h, "user": user_h, "assistant": asst_h}, jinja=jinja)
    for i, (msgs, generation, want) in enumerate(expected):
        got = render_text(t, msgs, generation)
        if got != want:
            k = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            raise CakeError(f"unsupported chat template: it renders check conversation {i // 2} as "
                            f"...{want[max(0, k - 30):k + 30]!r}..., not ...{got[max(0, k - 30):k + 30]!r}...")
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
               if t.default_system or t.always_system else "")
    content, close = ("message['content'] | trim" if t.trim else "message['content']"), q(t.end + t.after_end)
    turn = f"{{{{ headers[message['role']] + {content} + {close} }}}}"
    if t.final_reply or t.final_lstrip:  # the last message, when it answers a user, as `_layout` opens it
        turn = (f"{{% if loop.last and message['role'] == 'assistant' and ns.user %}}{{{{ headers['assistant'] + "
                f"{q(t.final_reply)} + ({content}).lstrip({q(t.final_lstrip)}) + {close} }}}}{{% else %}}{turn}"
                f"{{% endif %}}{{% if message['role'] == 'user' %}}{{% set ns.user = true %}}{{% endif %}}")
        default += "{% set ns = namespace(user=false) %}"
    return (f"{{% set headers = {headers} %}}{{{{ {q(t.prefix)} }}}}{default}{{% for message in messages %}}"
            f"{turn}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ {q(t.headers['assistant'])} }}}}{{% endif %}}")
