"""Preference pairs: a prompt, a better reply and a worse one, for the reward model and DPO (and prompts for PPO).

A preference file is JSONL in the TRL conventions, one pair per line, plain text or message lists:

    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
    {"prompt": [{"role": "user", "content": "Hi!"}], "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "hdfk dkf"}]}

The prompt is a user message or a conversation ending on a user turn; chosen and rejected are one assistant reply
each. Other keys (an "answer", the rater's scores) are kept in `Pair.fields`. Every error names the file and line.
`cakelm prefs` writes such files (train.jsonl and val.jsonl in one directory); `cakelm label` (people) will too.

    pairs, skipped = read_prefs("runs/default/prefs/train.jsonl")
    train, val, skipped = load_prefs("runs/default/prefs")          # a directory: its train.jsonl and val.jsonl
    rows, dropped = encode_pairs(train, tok, "chat", max_len=256)    # token ids, reply masks
    batch = pad_pairs(rows[:8], tok.pad_id)      # input/reply/real (2P, L): chosen rows, then rejected
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cakelm.chat_format import Message, render, validate
from cakelm.common import CakeError, write_text_atomic
from cakelm.data.chat_batches import Mixture
from cakelm.data.sources import jsonl_rows
from cakelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Pair:
    name: str  # "prefs.jsonl:12"
    prompt: list[Message] = field(hash=False)  # ends on a user turn
    chosen: str
    rejected: str
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # the row's other keys


def _reply(value: Any, key: str, where: str) -> str:
    """A reply given as text or as a one-message list [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list):
        if len(value) != 1:
            raise CakeError(f'{where}: "{key}" must be one assistant message, got {len(value)} messages')
        msg = validate(value, f'{where}: "{key}"')[0]
        if msg["role"] != "assistant":
            raise CakeError(f'{where}: "{key}" must be an assistant message, got a {msg["role"]} message')
        return msg["content"]
    if not isinstance(value, str):
        raise CakeError(f'{where}: "{key}" must be a string or a list of messages')
    if not value.strip():
        raise CakeError(f'{where}: "{key}" is empty')
    return value


def parse_pair(obj: Any, where: str) -> Pair:
    """One JSONL object -> Pair; a one-line CakeError naming `where` if it is not a valid preference pair."""
    if not isinstance(obj, dict):
        raise CakeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise CakeError(f'{where}: a preference pair needs "prompt", "chosen" and "rejected" (missing: '
                        f'{", ".join(missing)})')
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CakeError(f'{where}: "prompt" is empty')
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise CakeError(f'{where}: "prompt" must be a string or a list of messages')
    prompt = validate(prompt, f'{where}: "prompt"')
    if prompt[-1]["role"] != "user":
        raise CakeError(f'{where}: "prompt" must end on a user message, not a {prompt[-1]["role"]} one')
    chosen, rejected = _reply(obj["chosen"], "chosen", where), _reply(obj["rejected"], "rejected", where)
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    return Pair(where, prompt, chosen, rejected, extra)


def read_prefs(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[Pair], int]:
    """The pairs of a JSONL file and the number of bad lines skipped (always 0 unless skip_bad_lines)."""
    p = Path(path)
    if not p.is_file():
        raise CakeError(f"{p}: no such file")
    pairs, skipped = [], 0
    for where, obj in jsonl_rows(p):
        try:
            if isinstance(obj, CakeError):
                raise obj
            pairs.append(parse_pair(obj, where))
        except CakeError:
            if not skip_bad_lines:
                raise
            skipped += 1
    if not pairs:
        raise CakeError(f"{p}: no preference pairs" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    return pairs, skipped


def _prompt_hash(p: Pair) -> str:
    return hashlib.sha256(json.dumps(p.prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_prefs(src: str | Path, val_fraction: float = 0.1, skip_bad_lines: bool = False
               ) -> tuple[list[Pair], list[Pair], int]:
    """(train, held-out, bad lines skipped). A directory holds train.jsonl and val.jsonl (as `cakelm prefs`
    writes); a single file is split by a hash of each prompt, so every pair of one prompt lands on one side."""
    p = Path(src)
    if p.is_dir():
        train, bad = read_prefs(p / "train.jsonl", skip_bad_lines)
        val, bad_val = read_prefs(p / "val.jsonl", skip_bad_lines)
        return train, val, bad + bad_val
    pairs, bad = read_prefs(p, skip_bad_lines)
    keys = sorted({_prompt_hash(x) for x in pairs})
    if len(keys) < 2:
        raise CakeError(f"{p}: need pairs for at least 2 different prompts to hold some out")
    held = set(keys[:max(1, round(val_fraction * len(keys)))])
    return ([x for x in pairs if _prompt_hash(x) not in held], [x for x in pairs if _prompt_hash(x) in held], bad)


def write_prefs(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Preference rows (dicts with prompt/chosen/rejected) as JSONL, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@dataclass
class EncodedPair:
    """A pair as token ids: prompt + reply (its <|end|> included) for each side, and 1s on the reply tokens."""

    pair: Pair
    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    ref: tuple[float, float] | None = None  # the reference's log-probs of (chosen, rejected), set by `cakelm dpo`


def encode_pairs(pairs: list[Pair], tok: Tokenizer, fmt: str, max_len: int) -> tuple[list[EncodedPair], int]:
    """Render each side as a whole conversation in the model's format (`chat_format.render`: the reply mask is
    the SFT loss mask, so DPO scores exactly the tokens SFT trained on). Pairs longer than max_len tokens are
    dropped; returns (encoded, dropped)."""
    out, dropped = [], 0
    for p in pairs:
        c, cm = render([*p.prompt, {"role": "assistant", "content": p.chosen}], tok, fmt)
        r, rm = render([*p.prompt, {"role": "assistant", "content": p.rejected}], tok, fmt)
        if max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        out.append(EncodedPair(p, c, cm, r, rm))
    return out, dropped


def pad_pairs(rows: list[EncodedPair], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """P pairs as one batch of 2P sequences, chosen rows first, then rejected:
    input (2P, L) token ids padded with pad_id on `side`; reply (2P, L) 1 on reply tokens; real (2P, L) 1 on
    non-padding."""
    seqs = [r.chosen for r in rows] + [r.rejected for r in rows]
    masks = [r.chosen_mask for r in rows] + [r.rejected_mask for r in rows]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    reply = torch.zeros(len(seqs), L)
    real = torch.zeros(len(seqs), L)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        sl = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
        ids[i, sl] = torch.tensor(s)
        reply[i, sl] = torch.tensor(m, dtype=torch.float)
        real[i, sl] = 1.0
    return {"input": ids, "reply": reply, "real": real}


class PairBatches:
    """get(step, micro) for the shared loop over encoded pairs: `batch_size` pairs per micro-batch, a seeded
    permutation per epoch (a pure function of step and micro, so --resume is exact); ranks take disjoint slots.
    n = pairs (the loss units). `extra(pairs)` adds a stage's own per-pair tensors to each batch (DPO's reference
    log-probs, the reward model's margins)."""

    def __init__(self, rows: list[EncodedPair], batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, pad_id: int, extra: Callable[[list[EncodedPair]], dict[str, Any]] | None = None) -> None:
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.rank, self.world_size, self.pad_id, self.extra = rank, world_size, pad_id, extra
        self.mixture = Mixture([len(rows)], [1.0], seed)
        self.global_batch = batch_size * grad_accum * world_size

    def part(self, step: int, micro: int) -> list[EncodedPair]:
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        return [self.rows[i] for _, i in self.mixture.slots(start, self.batch_size)]

    def get(self, step: int, micro: int) -> dict[str, Any]:
        part = self.part(step, micro)
        return {**pad_pairs(part, self.pad_id), **(self.extra(part) if self.extra else {}), "n": len(part)}
