"""Chat examples -> token batches for SFT and evaluation: rendering, long conversations, the mixture, packing.

- `encode_examples` renders each conversation with its loss mask (`chat_format.render_parts`). A conversation
  longer than the context is cut at user turns into pieces that fit (each keeps the system message); a single
  exchange that is still too long is truncated at the end, and counted.
- `Mixture` decides which example fills every slot of every batch: a source is drawn with probability
  proportional to its weight, and each source is walked through in a fresh seeded permutation per epoch. Slot g
  of the run is a pure function of (seed, g), so `--resume` and DDP see exactly the batches a single
  uninterrupted run would.
- `encode_sources` encodes a mixture of `data.chat.load_sources` (training and held-out sequences per source).
- `collate` turns a list of sequences into one batch. Unpacked: one sequence per row, right-padded to the
  longest. Packed: sequences are placed into rows of the context length (first-fit decreasing) with segment
  ids, so attention never crosses from one conversation into another and positions restart (see
  `model.segment_mask`); the loss is exactly the unpacked loss, on fewer padding tokens.

A batch is {"input": (R, T), "target": (R, T) with IGNORE_INDEX off the assistant tokens, "segments": (R, T)
when packed, "n": number of target tokens} -- the loss units the shared loop normalises by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from cakelm.chat_format import render_parts
from cakelm.common import CakeError, DistInfo
from cakelm.data.chat import Example, Source, load_sources, saved_task_sizes
from cakelm.losses import IGNORE_INDEX
from cakelm.tokenizer import Tokenizer

Seq = tuple[list[int], list[int]]  # (ids, loss mask), mask[i] = 1 where ids[i] is a token to learn


def encode_sources(sources: Sequence[Source], tok: Tokenizer, max_len: int
                   ) -> tuple[list[list[Seq]], dict[str, list[Seq]], dict[str, dict]]:
    """Encode each source of a mixture in the chat format: (training sequences per source, held-out sequences by
    source, counts by source: weight, sequences, target tokens, truncated, held-out sequences, task size).
    A source none of whose conversations has an assistant reply that fits is an error naming it."""
    train_seqs, val_seqs, counts = [], {}, {}
    for src, weight, train_ex, val_ex, task_size in sources:
        seqs, c = encode_examples(train_ex, tok, "chat", max_len)
        if not seqs:
            raise CakeError(f"--data {src}: no conversation has an assistant reply that fits the context")
        val_seqs[src] = encode_examples(val_ex, tok, "chat", max_len)[0]
        train_seqs.append(seqs)
        counts[src] = {"weight": weight, **c, "val_sequences": len(val_seqs[src]), "task_size": task_size}
    return train_seqs, val_seqs, counts


def _pieces(messages: list[dict], tok: Tokenizer, fmt: str, max_len: int,
            encode: Callable[[str], list[int]]) -> tuple[list[Seq], int]:
    """A conversation as sequences of at most max_len tokens; (sequences, how many were truncated)."""
    parts = render_parts(messages, tok, fmt, encode)
    if sum(len(ids) for ids, _ in parts) <= max_len:
        return [_join(parts)], 0
    # every piece starts with the opening and the system message; exchanges (a user turn and the assistant
    # turns after it; a leading assistant turn forms its own) are grouped greedily into pieces that fit
    n_head = 2 if messages[0]["role"] == "system" else 1
    head, turns = parts[:n_head], parts[n_head:]
    roles = [m["role"] for m in messages[n_head - 1:]]
    starts = [i for i, r in enumerate(roles) if r == "user" or i == 0]
    exchanges = [turns[a:b] for a, b in zip(starts, [*starts[1:], len(turns)])]
    budget = max_len - sum(len(ids) for ids, _ in head)
    groups: list[list] = [[]]
    for ex in exchanges:
        size = sum(len(ids) for ids, _ in ex)
        if groups[-1] and sum(len(ids) for ids, _ in groups[-1]) + size > budget:
            groups.append([])
        groups[-1] += ex
    out, truncated = [], 0
    for group in groups:
        ids, mask = _join(head + group)
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        out.append((ids, mask))
    return out, truncated


def _join(parts: list[tuple[list[int], list[int]]]) -> Seq:
    return [i for ids, _ in parts for i in ids], [m for _, mask in parts for m in mask]


def encode_examples(examples: Sequence[Example], tok: Tokenizer, fmt: str, max_len: int
                    ) -> tuple[list[Seq], dict[str, int]]:
    """Render every example into sequences of at most max_len tokens (the model's context + 1, since the last
    token is only a target). Sequences with nothing to learn are dropped. Returns (sequences, counts)."""
    # tokenizing text by text is slow; collect every text the format encodes, and encode them in one batch
    texts: list[str] = []
    for ex in examples:
        render_parts(ex.messages, tok, fmt, lambda text: texts.append(text) or [])
    unique = list(dict.fromkeys(texts))
    table = dict(zip(unique, tok.encode_batch(unique)))
    seqs: list[Seq] = []
    truncated = dropped = 0
    for ex in examples:
        pieces, t = _pieces(ex.messages, tok, fmt, max_len, table.__getitem__)
        truncated += t
        for ids, mask in pieces:
            if sum(mask[1:]) == 0:
                dropped += 1
                continue
            seqs.append((ids, mask))
    return seqs, {"conversations": len(examples), "sequences": len(seqs), "truncated": truncated,
                  "dropped": dropped, "tokens": sum(len(s[0]) for s in seqs),
                  "target_tokens": sum(sum(s[1][1:]) for s in seqs)}


class Mixture:
    """Which (source, example) fills global slot g: sources drawn with probability proportional to their
    weights, examples of a source in a seeded permutation per epoch. Prefix-stable: growing the run does not
    change earlier slots."""

    BLOCK = 4096

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if len(sizes) != len(weights) or not sizes or min(sizes) < 1:
            raise ValueError("need one size >= 1 per weight")
        self.sizes, self.seed = list(sizes), seed
        self.p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.source = np.empty(0, dtype=np.int64)
        self.item = np.empty(0, dtype=np.int64)
        self.used = [0] * len(sizes)  # examples drawn from each source so far

    @lru_cache(maxsize=64)  # noqa: B019 -- one Mixture per run; the cache dies with it
    def _perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])

    def _extend(self) -> None:
        block = len(self.source) // self.BLOCK
        src = np.random.default_rng([self.seed, 1_000_003, block]).choice(len(self.sizes), self.BLOCK, p=self.p)
        items = np.empty(self.BLOCK, dtype=np.int64)
        for j, s in enumerate(src.tolist()):
            epoch, pos = divmod(self.used[s], self.sizes[s])
            items[j] = self._perm(s, epoch)[pos]
            self.used[s] += 1
        self.source, self.item = np.concatenate([self.source, src]), np.concatenate([self.item, items])

    def slots(self, start: int, count: int) -> list[tuple[int, int]]:
        while len(self.source) < start + count:
            self._extend()
        return list(zip(self.source[start:start + count].tolist(), self.item[start:start + count].tolist()))


def collate(seqs: Sequence[Seq], pad_id: int, pack: bool, row_len: int) -> dict:
    """One batch from sequences (see the module docstring). row_len: input tokens per packed row (the
    context); a sequence has len(ids) - 1 inputs."""
    if pack:
        rows: list[list[int]] = []  # indices of the sequences in each row
        room: list[int] = []
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
            need = len(seqs[i][0]) - 1
            r = next((r for r in range(len(rows)) if room[r] >= need), None)
            if r is None:
                rows.append([]), room.append(row_len)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= need
    else:
        rows = [[i] for i in range(len(seqs))]
    T = max(sum(len(seqs[i][0]) - 1 for i in row) for row in rows)
    inp = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)  # padding is a segment of its own
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ids, mask = seqs[i]
            n = len(ids) - 1
            x = torch.tensor(ids)
            inp[r, t:t + n] = x[:-1]
            tgt[r, t:t + n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), x[1:], IGNORE_INDEX)
            seg[r, t:t + n] = i
            t += n
    batch = {"input": inp, "target": tgt, "n": int((tgt != IGNORE_INDEX).sum())}
    if pack:
        batch["segments"] = seg
    return batch


class ChatBatches:
    """batches(step, micro) for the shared loop: this rank's micro-batch of `batch_size` sequences. Global slot
    of row j = step * global_batch + (micro * world_size + rank) * batch_size + j, so 2 ranks x batch 4 read the
    same sequences as 1 rank x batch 4 x 2 accumulation steps."""

    def __init__(self, sources: Sequence[Sequence[Seq]], weights: Sequence[float], batch_size: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, pack: bool, row_len: int,
                 pad_id: int) -> None:
        self.sources, self.batch_size, self.grad_accum = sources, batch_size, grad_accum
        self.rank, self.world_size, self.pack, self.row_len, self.pad_id = rank, world_size, pack, row_len, pad_id
        self.mixture = Mixture([len(s) for s in sources], weights, seed)
        self.global_batch = batch_size * grad_accum * world_size

    def get(self, step: int, micro: int) -> dict:
        start = step * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size
        seqs = [self.sources[s][i] for s, i in self.mixture.slots(start, self.batch_size)]
        return collate(seqs, self.pad_id, self.pack, self.row_len)


def fixed_batches(seqs: Sequence[Seq], batch_size: int, pad_id: int, pack: bool, row_len: int, rank: int = 0,
                  world_size: int = 1) -> list[dict]:
    """Every sequence once, in order, this rank's share (for evaluation)."""
    mine = list(seqs[rank::world_size])
    return [collate(mine[i:i + batch_size], pad_id, pack, row_len) for i in range(0, len(mine), batch_size)]


class WithChat:
    """Another stage's batches, each with this rank's micro-batch of `chat` for the same (step, micro), its keys
    prefixed "chat_" (`chat_input`, `chat_target`, `chat_segments`, `chat_n`): how DPO, PPO and GRPO replay SFT
    data next to their own loss. `chat` slots its rows as ranks and micro-batches interleave, so 2 ranks read the
    conversations 1 rank with 2 accumulation steps reads; a pure function of (step, micro), so `--resume` stays
    exact whenever `inner` does. Everything else (PPO's rollout state, `reads_model`, `loop`) is `inner`'s."""

    def __init__(self, inner: Any, chat: ChatBatches) -> None:  # inner: any batch provider of the loop
        self.inner, self.chat = inner, chat

    def get(self, step: int, micro: int) -> dict:
        batch = self.inner.get(step, micro)
        batch.update({f"chat_{k}": v for k, v in self.chat.get(step, micro).items()})
        return batch

    def __getattr__(self, name: str) -> Any:  # only reached for what WithChat itself lacks
        if name in ("inner", "chat"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def chat_part(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The replayed chat micro-batch of a `WithChat` batch (its "chat_" keys, unprefixed), or None."""
    return {k.removeprefix("chat_"): v for k, v in batch.items() if k.startswith("chat_")} or None


def replay_batches(specs: Sequence[str], tok: Tokenizer, row_len: int, steps: int, batch_size: int,
                   grad_accum: int, info: DistInfo, seed: int, meta: dict[str, Any] | None, where: str
                   ) -> tuple[ChatBatches, dict[str, dict]]:
    """The SFT conversations an RL or RLHF stage replays (`--replay SRC[=W] ...`, `--replay-batch` per micro-batch):
    packed chat micro-batches for `steps` optimizer steps, and the resolved sources for meta.json. On --resume
    (`meta`: the checkpoint's) the task sources are regenerated at the sizes it recorded, so the same problems
    come back. A bad source fails here, before the stage's slow start-up, named as --replay."""
    saved = saved_task_sizes(meta, "replay", where) if meta is not None else None
    try:
        sources, _ = load_sources(specs, steps * batch_size * grad_accum * info.world_size, val_size=1, seed=seed,
                                  task_sizes=saved)
        seqs, _, counts = encode_sources(sources, tok, row_len + 1)
    except CakeError as e:  # the sources' errors name SFT's option
        raise CakeError(str(e).replace("--data", "--replay", 1)) from None
    chat = ChatBatches(seqs, [c["weight"] for c in counts.values()], batch_size, grad_accum, info.rank,
                       info.world_size, seed, True, row_len, tok.pad_id)
    return chat, counts
