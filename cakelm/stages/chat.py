"""`cakelm chat CKPT`: talk to a model in the terminal, replies streamed as they are generated.

    cakelm chat runs/default/sft                      # interactive; /reset clears the history, /quit exits
    cakelm chat runs/default/sft -p "What is 2 + 3?"  # answer once and exit (for scripts)
    cakelm chat runs/default/base --playscript        # a base model, prompted with a plain-text dialogue

The conversation is rendered by `chat_format` in the checkpoint's format (meta.json "chat_format"; base
models speak "playscript"); --playscript / --no-playscript override it. When the history no longer fits the
context (leaving room for --max-new-tokens), the oldest turns are dropped, with a notice. A reward-model
checkpoint is refused (its body scores replies; it was not trained to write them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from cakelm.chat_format import Reply, fit_history, format_of, render_prompt, stop_rules
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device
from cakelm.config import ConfigError, opt
from cakelm.engine import Engine, SamplingParams
from cakelm.rlhf import refuse_reward_model

HELP = "/reset clears the conversation, /quit (or Ctrl-D) exits"


@dataclass
class ChatConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    prompt: str | None = opt(None, "answer this one message and exit", alias="-p")
    system: str | None = opt(None, "system prompt (the first message of the conversation)")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_k: int = opt(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = opt(0.95, "nucleus sampling threshold")
    max_new_tokens: int = opt(256, "longest reply in tokens")
    seed: int | None = opt(None, "random seed")
    playscript: bool | None = opt(None, "prompt as a plain-text playscript (default: from the checkpoint)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        self.system = self.system.strip() if self.system and self.system.strip() else None
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--max-new-tokens must be >= 1, --temperature and --top-k >= 0, --top-p in (0, 1]")


class Chat:
    """A conversation with a model: history, context fitting, streamed replies."""

    def __init__(self, engine: Engine, fmt: str, cfg: ChatConfig) -> None:
        self.engine, self.fmt, self.cfg = engine, fmt, cfg
        self.system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        self.history: list[dict[str, str]] = []
        stop_ids, stop_strings = stop_rules(engine.tok, fmt)
        self.params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed,
                                     stop_ids, stop_strings)
        if engine.context <= cfg.max_new_tokens:
            self.params.max_new_tokens = engine.context // 2  # leave room for the conversation itself

    def reply(self, message: str, out=sys.stdout) -> str:
        """Stream the reply to `message` to `out`; return it (and keep both in the history)."""
        messages = self.system + self.history + [{"role": "user", "content": message}]
        messages, dropped = fit_history(messages, self.engine.tok, self.fmt,
                                        self.engine.context - self.params.max_new_tokens)
        if dropped:
            print(f"[dropped the {dropped} oldest message(s) to fit the {self.engine.context}-token context]",
                  file=sys.stderr, flush=True)
        self.history = messages[len(self.system):]
        streamed = Reply()
        for ev in self.engine.stream([render_prompt(messages, self.engine.tok, self.fmt)], self.params):
            print(streamed.add(ev.text), end="", file=out, flush=True)
        print(file=out, flush=True)
        reply = streamed.final or "..."
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def reset(self) -> None:
        self.history = []


def main(cfg: ChatConfig) -> None:
    refuse_reward_model(cfg.ckpt, "chat")
    model, tok, meta = load_model(cfg.ckpt, pick_device(cfg.device))
    chat = Chat(Engine(model, tok), format_of(meta, cfg.playscript), cfg)
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise CakeError("-p: the message is empty")
        chat.reply(cfg.prompt)
        return
    print(f"cakelm chat: {cfg.ckpt} ({meta.get('stage', '?')} model, {chat.fmt} format). {HELP}", flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/quit", "/exit"):
            return
        if msg == "/reset":
            chat.reset()
            print("[conversation cleared]", flush=True)
            continue
        if msg.startswith("/"):
            print(f"[unknown command {msg.split()[0]}; {HELP}]", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            chat.reply(msg)
        except CakeError as e:  # e.g. one message longer than the context: say so, keep the session
            print(f"\n[error: {e}]", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session; the unanswered message is dropped
            if chat.history and chat.history[-1]["role"] == "user":
                chat.history.pop()
            print("\n[reply interrupted]", flush=True)
