"""Pretraining token shards: documents -> one flat array of token ids on disk -> (input, target) batches.

On disk a shard is a raw numpy array (`train.bin`, `val.bin`; uint16 when the vocabulary fits, else uint32)
read back with `np.memmap`, so a corpus larger than memory costs nothing to open. Each document is encoded as
`<|bos|> text`, and documents are concatenated. A streamed corpus (data/encode.py) is the same format cut into
fixed-size files (`train-00000.bin`, ...); `open_tokens` reads either as one array of a split's tokens
(`ShardedTokens`: the files memory-mapped, a window read across a file boundary where it falls on one).

Batches come from `TokenBatches`: the shard is cut into non-overlapping windows of seq_len+1 tokens, and every
epoch visits the windows in a fresh seeded permutation. Which window lands in which row is a pure function of
(seed, step, micro-step, rank), so a resumed run sees exactly the batches the uninterrupted run would have, and
with world_size ranks each rank takes its own rows of the same global batch: 2 ranks x batch 4 reads the same
8 rows as 1 rank x batch 4 x 2 accumulation steps.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from cakelm.common import CakeError, atomic_path, read_json
from cakelm.data.sources import Doc
from cakelm.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, docs: Iterable[Doc], tok: Tokenizer, chunk: int = 64) -> dict[str, int]:
    """Encode documents (each prefixed with <|bos|>) into a flat token file. Returns counts: documents, tokens,
    bytes (UTF-8 bytes of the text, the denominator of bytes-per-token)."""
    dtype = token_dtype(tok.vocab_size)
    n_docs = n_tokens = n_bytes = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        batch: list[Doc] = []

        def flush() -> None:
            nonlocal n_tokens
            for ids in tok.encode_batch([d.text for d in batch]):
                arr = np.asarray([tok.bos_id, *ids], dtype=dtype)
                fh.write(arr.tobytes())
                n_tokens += len(arr)
            batch.clear()

        for d in docs:
            batch.append(d)
            n_docs += 1
            n_bytes += len(d.text.encode("utf-8"))
            if len(batch) >= chunk:
                flush()
        flush()
        fh.flush()
    return {"documents": n_docs, "tokens": n_tokens, "bytes": n_bytes}


def open_shard(path: str | Path, vocab_size: int, tokens: int | None = None) -> np.ndarray:
    """Memory-map a shard written by write_shard, checked first against its element size and its recorded token
    count: `tokens`, or by default the count `cakelm tokenizer` recorded in the meta.json beside it (a shard
    without one is checked for whole elements only). A cut or swapped file is a one-line error, never a numpy
    traceback or a silently shorter corpus."""
    p = Path(path)
    if not p.is_file():
        raise CakeError(f"token shard not found: {p} (run `cakelm tokenizer` to create it)")
    size = p.stat().st_size
    if size == 0:
        raise CakeError(f"token shard is empty: {p}")
    dtype = token_dtype(vocab_size)
    meta_file = p.parent / "meta.json"
    if tokens is None and meta_file.is_file():
        meta = read_json(meta_file, "shard metadata")
        if isinstance(meta, dict) and meta.get("stage") == "tokenizer":
            recorded = meta.get(p.stem)
            if not (isinstance(recorded, dict) and isinstance(recorded.get("tokens"), int)):
                raise CakeError(f"{meta_file}: no token count for {p.name}")
            tokens = recorded["tokens"]
            if meta.get("dtype", str(dtype)) != str(dtype):
                raise CakeError(f"{p}: recorded as {meta['dtype']} tokens but a vocabulary of {vocab_size} "
                                f"needs {dtype}")
    if size % dtype.itemsize:
        raise CakeError(f"{p}: {size} bytes is not a whole number of {dtype} tokens (the file was cut short?); "
                        "run `cakelm tokenizer` again")
    if tokens is not None and size != tokens * dtype.itemsize:
        raise CakeError(f"{p}: {size // dtype.itemsize:,} tokens on disk but {tokens:,} recorded (the file was "
                        "cut short or replaced); run `cakelm tokenizer` again")
    return np.memmap(p, dtype=dtype, mode="r")


class ShardedTokens:
    """Several memory-mapped shards read as one array of tokens: len() and slices (step 1), which is all that
    TokenBatches and eval_batches take of it. Only the pages of the windows read are ever loaded."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, step = s.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens takes slices with step 1")
        pieces = []
        while start < stop:
            i = bisect_right(self.starts, start) - 1
            end = min(stop, self.starts[i + 1])
            pieces.append(self.parts[i][start - self.starts[i]:end - self.starts[i]])
            start = end
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, self.dtype)


def open_tokens(folder: str | Path, split: str, vocab_size: int) -> np.ndarray | ShardedTokens:
    """A split's tokens ("train" or "val") in a `cakelm tokenizer` folder: `split.bin`, or the shards its
    meta.json lists for a streamed corpus (each checked against its recorded token count)."""
    folder = Path(folder)
    meta_file = folder / "meta.json"
    meta = read_json(meta_file, "shard metadata") if meta_file.is_file() else None
    if not (isinstance(meta, dict) and meta.get("stream")):
        return open_shard(folder / f"{split}.bin", vocab_size)
    if not meta.get("complete"):
        raise CakeError(f"{folder}: the tokenization is not finished (run `cakelm tokenizer` again: it continues)")
    shards = meta.get(split, {}).get("shards") if isinstance(meta.get(split), dict) else None
    if not shards:
        raise CakeError(f"{meta_file}: no {split} shards listed")
    if meta.get("dtype", str(token_dtype(vocab_size))) != str(token_dtype(vocab_size)):
        raise CakeError(f"{meta_file}: recorded as {meta['dtype']} tokens but a vocabulary of {vocab_size} needs "
                        f"{token_dtype(vocab_size)}")
    parts = [open_shard(folder / s["file"], vocab_size, tokens=s["tokens"]) for s in shards]
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)


class TokenBatches:
    """Deterministic (input, target) batches of shape (batch_size, seq_len) from a token array (or the shards of
    a streamed corpus, read lazily: each rank reads only its own rows)."""

    def __init__(self, tokens: np.ndarray | ShardedTokens, seq_len: int, batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None) -> None:
        """`transform(row, rng)`, if given, rewrites each window (T+1 ids) before it is cut into input and target
        (fill-in-the-middle: cakelm.data.fim.fim_row), with a generator seeded by (seed, global row): the same
        row gets the same rewrite on any rank layout and on resume."""
        self.tokens, self.seq_len, self.batch_size, self.transform = tokens, seq_len, batch_size, transform
        self.grad_accum, self.rank, self.world_size, self.seed = grad_accum, rank, world_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise CakeError(f"only {len(tokens)} tokens of data, fewer than one sequence of {seq_len + 1}; "
                            "use more text or a shorter --model.max-seq-len")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _window(self, g: int) -> int:
        """Window index of global row g: epoch g // n, position g % n in that epoch's permutation."""
        epoch, pos = divmod(g, self.n_windows)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return int(self._perms[epoch][pos])

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor | int]:
        """Rows of micro-step `micro` of optimizer step `step` for this rank: {"input", "target", "n"}."""
        first = step * self.rows_per_step + (micro * self.world_size + self.rank) * self.batch_size
        T = self.seq_len
        rows = [self.tokens[w * T: w * T + T + 1] for w in (self._window(first + i) for i in range(self.batch_size))]
        if self.transform is not None:
            rows = [self.transform(np.asarray(r), np.random.default_rng([self.seed, 1, first + i]))
                    for i, r in enumerate(rows)]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return {"input": xy[:, :-1], "target": xy[:, 1:], "n": self.batch_size * T}

    def epoch_of(self, step: int) -> float:
        """How many passes over the data the run has made by `step` (for logging)."""
        return step * self.rows_per_step / self.n_windows


def eval_batches(tokens: np.ndarray | ShardedTokens, seq_len: int, batch_size: int, max_tokens: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor | int]]:
    """The validation set as consecutive windows (the first `max_tokens` tokens; 0 = all), split across ranks by
    window index, batched. Every window is scored exactly once over all ranks."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise CakeError(f"validation shard has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    mine = list(range(rank, n, world_size))
    out = []
    for i in range(0, len(mine), batch_size):
        rows = [tokens[w * seq_len: w * seq_len + seq_len + 1] for w in mine[i:i + batch_size]]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        out.append({"input": xy[:, :-1], "target": xy[:, 1:], "n": xy.size(0) * seq_len})
    return out
