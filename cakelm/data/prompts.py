"""Prompts: the questions RL stages roll out, `cakelm prefs` and `cakelm label` ask, and evaluations measure.

A `PromptRow` is a conversation that ends on a user turn plus the fields rewards read (a task's `answer`,
reasoning-gym's `task` and `entry`, a JSONL row's other keys). Every way of choosing prompts lives here:

    rows = prompts_of(examples)                        # examples (any chat source) -> questions
    train, val = choose_prompts(["chitchat=3", "arithmetic=1"], 600, 200, tok, 64, seed=1337)   # prefs, label
    src = rl_prompts(["arithmetic"], draws=960, ..., tok=tok, budget=255)                       # grpo, rloo

Single-turn prompts (`single_turn`) keep the first user message (and a leading system message): what a person
compares in a preference pair. A prompt that does not fit the token budget in chat format is left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.chat_format import Message, render_prompt
from cakelm.common import CakeError
from cakelm.data.chat import Example, load_sources
from cakelm.data.chat_batches import Mixture
from cakelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptRow:
    """A question to answer: the conversation so far (ending on a user turn) and the fields rewards get."""

    name: str
    messages: list[Message]
    fields: dict[str, Any]

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def source(self) -> str:
        """The source this prompt came from, by its name: chitchat/123 -> chitchat, arithmetic/train/3 ->
        arithmetic, /data/my.jsonl:12 -> my.jsonl, hf:org/set:train[3] -> hf:org/set:train."""
        if self.name.startswith("hf:"):
            return self.name.rsplit("[", 1)[0]
        path, sep, line = self.name.rpartition(":")
        if sep and line.isdigit():
            return Path(path).name
        return self.name.split("/")[0]


def prompts_of(examples: Sequence[Example]) -> list[PromptRow]:
    """Examples as questions: the messages up to the last user turn (a reply after it is dropped)."""
    rows = []
    for ex in examples:
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        fields = {**ex.fields, **({"answer": ex.answer} if ex.answer is not None else {})}
        rows.append(PromptRow(ex.name, ex.messages[:last_user + 1], fields))
    return rows


def single_turn(rows: Sequence[PromptRow]) -> list[PromptRow]:
    """Each row's first user message (with a leading system message, if any) as the whole prompt."""
    out = []
    for r in rows:
        first = next(i for i, m in enumerate(r.messages) if m["role"] == "user")
        out.append(PromptRow(r.name, r.messages[:first + 1], r.fields))
    return out


def fitting(rows: Sequence[PromptRow], tok: Tokenizer, budget: int) -> list[PromptRow]:
    """The rows whose prompt, rendered in chat format, is at most `budget` tokens."""
    return [r for r in rows if len(render_prompt(r.messages, tok, "chat")) <= budget]


def choose_prompts(data: list[str], n_train: int, n_val: int, tok: Tokenizer, max_prompt_tokens: int, seed: int
                   ) -> tuple[list[PromptRow], list[PromptRow]]:
    """Single-turn prompts of at most `max_prompt_tokens` (chat format): up to `n_train` distinct ones drawn from
    the sources' training side by the mixture's weights, and up to `n_val` from their held-out side (split over
    the sources by weight). The same arguments give the same prompts (a task's generated problems depend on
    n_train too)."""
    sources, _ = load_sources(data, n_train, 0, val_size=n_val, seed=seed, reply_required=False)
    total = sum(w for _, w, *_ in sources)
    train_rows, val_rows = [], []
    for src, weight, train_ex, val_ex, _ in sources:
        fits = fitting(single_turn(prompts_of(train_ex)), tok, max_prompt_tokens)
        if not fits:
            raise CakeError(f"--data {src}: no prompt of at most {max_prompt_tokens} tokens")
        train_rows.append(fits)
        val_rows += fitting(single_turn(prompts_of(val_ex)), tok, max_prompt_tokens)[:round(n_val * weight / total)]
    mixture = Mixture([len(r) for r in train_rows], [w for _, w, *_ in sources], seed)
    chosen = [train_rows[s][i] for s, i in mixture.slots(0, n_train)]
    # each prompt once: a repeated draw would give the same question two pairs
    seen: set[str] = set()
    return [r for r in chosen if not (r.name in seen or seen.add(r.name))], val_rows


@dataclass
class PromptSources:
    """The prompt mixture of an RL stage: per source its fitting training prompts and weight, the held-out
    prompts of every source, and counts for meta.json (prompts, too long, held out, problems generated)."""

    train: list[list[PromptRow]]
    weights: list[float]
    val: list[PromptRow]
    counts: dict[str, dict[str, Any]]
    skipped: int  # malformed JSONL lines skipped (--skip-bad-lines)

    def mixture(self, seed: int) -> Mixture:
        return Mixture([len(p) for p in self.train], self.weights, seed)


def rl_prompts(data: Sequence[str], draws: int, task_size: int, val_fraction: float, val_size: int, seed: int,
               skip_bad_lines: bool, tok: Tokenizer, budget: int, task_sizes: dict[str, int] | None = None
               ) -> PromptSources:
    """The prompts of `--data` sources (each SRC or SRC=WEIGHT, see `data.chat.load_sources`) for RL: every
    conversation up to its last user turn, those of at most `budget` tokens (a prompt must leave room for the
    reply). `task_sizes` (from a resumed checkpoint's meta.json) pins the generated problems."""
    sources, skipped = load_sources(list(data), draws, task_size, val_fraction, val_size, seed, skip_bad_lines,
                                    reply_required=False, task_sizes=task_sizes)
    train, weights, val, counts = [], [], [], {}
    for src, weight, train_ex, val_ex, n_generated in sources:
        rows = prompts_of(train_ex)
        fits = fitting(rows, tok, budget)
        if not fits:
            raise CakeError(f"--data {src}: no prompt of at most {budget} tokens fits the model's context with room "
                            "for a reply")
        train.append(fits)
        weights.append(weight)
        held = fitting(prompts_of(val_ex), tok, budget)
        val += held
        counts[src] = {"weight": weight, "prompts": len(fits), "too_long": len(rows) - len(fits),
                       "val_prompts": len(held), "task_size": n_generated}
    return PromptSources(train, weights, val, counts, skipped)
