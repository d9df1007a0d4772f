"""Streamed sources -> fixed-size token shards on disk, encoded by worker processes, resumable.

`cakelm tokenizer` calls `tokenize_stream` for streamed sources (data/stream.py); pretraining reads the result
with `shards.open_tokens`. The output folder holds:

    tokenizer.json
    train-00000.bin, train-00001.bin, ...   the training documents' token ids, `shard_tokens` per file (the last
    val-00000.bin, ...                      one shorter), each a raw array as data/shards.py writes (uint16 when
                                            the vocabulary fits, else uint32): a split's shards, in order, are
                                            [<|bos|>, *encode(document)] of its documents in stream order
    manifest.json                           progress: the stream position done, the shards, counts, the options
    meta.json                               (the stage's) counts, bytes per token and the shard list

How it runs: the main process reads the stream (stream.segments) and hands chunks of about CHUNK_BYTES of text to
`workers` processes, which parse them (stream.parse) and encode them (the ids of the tokenizer's `encode_batch`,
a long document in parts: `_encode_texts`); at most 2 x workers + 1 chunks are in flight, so memory stays flat
whatever the corpus size. The main process writes
the results in stream order, so the shards are the same whatever the number of workers or the chunk size.

Resume: a shard gets its final name only when full (written as NAME.partial, fsynced, renamed). After a chunk is
written, once COMMIT_BYTES of text have gone by since the last time, the partial files are fsynced and
manifest.json records the stream position after that chunk, the shards and the tokens of each split's partial
file. A run with the same options (`key`) truncates the partial files to what the manifest records, removes any
shard written after it and reads on from the recorded position: the result is byte for byte what an uninterrupted
run writes. --max-tokens stops after the document at which the training tokens reach the cap (validation
documents after it are not taken either); a later run with a larger cap, or none, continues from there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cakelm.common import CakeError, print0, read_json, write_json_atomic
from cakelm.data import stream
from cakelm.data.shards import token_dtype
from cakelm.tokenizer import Tokenizer

CHUNK_BYTES = 1 << 20  # text per task handed to a worker
ENCODE_CHARS = 1 << 16  # text per call of the tokenizer, which needs ~150 bytes of memory per character it encodes
COMMIT_BYTES = 64 << 20  # text between two saved points (what an interruption can cost)
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHOWN_BAD = 5  # skipped bad rows printed one by one; the rest are counted


@dataclass(frozen=True)
class StreamOptions:
    text_field: str = "text"
    val_fraction: float = 0.05
    skip_bad_lines: bool = False
    workers: int = 2
    max_tokens: int = 0  # training tokens to stop at (0 = the whole stream)
    shard_tokens: int = 100_000_000


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def _index(path: Path) -> int:
    return int(path.name.split("-", 1)[1].split(".", 1)[0])


class ShardWriter:
    """Appends a split's tokens to its partial shard, which becomes NAME.bin when it holds shard_tokens. Opening
    reconciles the folder with the manifest's record: the partial file (or the same shard already renamed) is cut
    back to `tail` tokens and later shards, written after the record, are removed."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, shards: list[dict[str, Any]],
                 tail: int) -> None:
        self.out, self.split, self.dtype, self.size = out, split, dtype, shard_tokens
        self.shards, self.tail = [dict(s) for s in shards], tail
        k = len(self.shards)
        partial, final = self._partial(), out / shard_name(split, k)
        for p in out.glob(f"{split}-*.bin*"):
            if _index(p) > k:
                p.unlink()
        if not partial.exists() and final.exists():
            final.replace(partial)  # renamed after the record: made partial again
        if not partial.exists():
            partial.touch()
        self.fh = open(partial, "r+b")
        self.fh.truncate(tail * dtype.itemsize)
        self.fh.seek(0, os.SEEK_END)

    def _partial(self) -> Path:
        return self.out / (shard_name(self.split, len(self.shards)) + ".partial")

    def write(self, arr: np.ndarray) -> None:
        while len(arr):
            room = self.size - self.tail
            self.fh.write(arr[:room].tobytes())
            self.tail += min(room, len(arr))
            arr = arr[room:]
            if self.tail == self.size:
                self._seal()
                self.fh = open(self._partial(), "wb")

    def _seal(self) -> None:
        """The partial shard, fsynced, under its final name."""
        self.sync()
        self.fh.close()
        name = shard_name(self.split, len(self.shards))
        self._partial().replace(self.out / name)
        self.shards.append({"file": name, "tokens": self.tail})
        self.tail = 0

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def state(self) -> dict[str, Any]:
        return {"shards": [dict(s) for s in self.shards], "tail": self.tail}

    def finish(self) -> list[dict[str, Any]]:
        """The split's shard list, the last (shorter) one given its final name too, or removed when empty. The
        record stays the same (full shards + tail): a later run with a larger cap makes it partial again."""
        self.sync()
        self.fh.close()
        if not self.tail:
            self._partial().unlink(missing_ok=True)
            return [dict(s) for s in self.shards]
        name = shard_name(self.split, len(self.shards))
        self._partial().replace(self.out / name)
        return [*(dict(s) for s in self.shards), {"file": name, "tokens": self.tail}]

    def close(self) -> None:
        self.fh.close()


def clear(out: Path) -> None:
    """Remove a streamed tokenization's files (before another one starts, or the in-memory path writes)."""
    for p in [*out.glob("train-*.bin*"), *out.glob("val-*.bin*"), out / MANIFEST]:
        p.unlink(missing_ok=True)


def _digest(units: list[stream.Unit]) -> str:
    return hashlib.sha256(json.dumps([asdict(u) for u in units]).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _usable(out: Path, key: dict[str, Any], max_tokens: int) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "continue" | "done") when the tokenization in `out` can be continued, else (None, why)."""
    if not (out / MANIFEST).is_file():
        return None, ""
    try:
        state = read_json(out / MANIFEST, "manifest")
        if state.get("key") != key:
            return None, "it was made from other sources or options"
        tok = out / "tokenizer.json"
        if not tok.is_file() or _file_sha(tok) != state.get("tokenizer_sha256"):
            return None, "its tokenizer.json is missing or changed"
        return _check_files(out, state, max_tokens)
    except (CakeError, KeyError, TypeError, AttributeError, ValueError):
        return None, "its manifest is unreadable"


def _check_files(out: Path, state: dict[str, Any], max_tokens: int) -> tuple[dict[str, Any] | None, str]:
    """The manifest's shards are on disk as recorded, and what it holds is a start of what this run writes."""
    for split in SPLITS:
        rec = state["splits"][split]
        itemsize = np.dtype(state["dtype"]).itemsize
        for s in rec["shards"]:
            if not ((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["tokens"] * itemsize):
                return None, f"{s['file']} is missing or cut short"
        k = len(rec["shards"])
        tail = [p for p in (out / (shard_name(split, k) + ".partial"), out / shard_name(split, k)) if p.is_file()]
        if rec["tail"] and not (tail and tail[0].stat().st_size >= rec["tail"] * itemsize):
            return None, f"{shard_name(split, k)} is missing or cut short"
    done, stop_before = state["counts"]["train"]["tokens"], state.get("stop_before")
    if max_tokens and done >= max_tokens:
        # the cap is reached: only a run that stopped at the same document (by a cap up to the same) is this one
        if stop_before is not None and stop_before < max_tokens:
            return state, "done"
        return None, f"it holds {done:,} training tokens, more than --max-tokens {max_tokens:,}"
    return state, "done" if state["exhausted"] else "continue"


def tokenize_stream(units: list[stream.Unit], out: Path, key: dict[str, Any], opts: StreamOptions,
                    train: Callable[[], Tokenizer], progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer (`train`, unless continuing) and encode the stream into shards in `out`; returns the
    finished manifest (counts per split, each split's shard files in "files", bad rows skipped). `key` holds the
    options that decide the output (the tokenizer's); the units, the split and the shard size are added here."""
    out.mkdir(parents=True, exist_ok=True)
    key = {**key, "units": _digest(units), "text_field": opts.text_field, "val_fraction": opts.val_fraction,
           "shard_tokens": opts.shard_tokens, "piece_bytes": stream.PIECE_BYTES}
    state, how = _usable(out, key, opts.max_tokens)
    if state is None:
        if how:
            print0(f"tokenizer: not continuing the tokenization in {out} ({how}): starting afresh")
        clear(out)
        tok = train()
        tok.save(out / "tokenizer.json")
        state = {"key": key, "tokenizer_sha256": _file_sha(out / "tokenizer.json"),
                 "dtype": str(token_dtype(tok.vocab_size)), "position": [0, 0], "exhausted": False,
                 "stop_before": None, "finished": False, "skipped": 0, "skipped_examples": [], "files": {},
                 "splits": {s: {"shards": [], "tail": 0} for s in SPLITS},
                 "counts": {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}}
        write_json_atomic(out / MANIFEST, state)
    else:
        tok = Tokenizer.load(out / "tokenizer.json")
        u, r = state["position"]
        if how == "continue":
            where = units[u].path if u < len(units) else "the end"
            print0(f"tokenizer: continuing the tokenization in {out} at {where} (row {r + 1}), "
                   f"{state['counts']['train']['tokens']:,} training tokens done")
    if how != "done":
        state["finished"] = False
        _encode(units, out, tok, state, opts, progress)
    if not state["finished"]:
        dtype = np.dtype(state["dtype"])
        for split in SPLITS:
            rec = state["splits"][split]
            writer = ShardWriter(out, split, dtype, opts.shard_tokens, rec["shards"], rec["tail"])
            state["files"][split] = writer.finish()
        state["finished"] = True
        write_json_atomic(out / MANIFEST, state)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Workers

_TOK: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    global _TOK
    _TOK = Tokenizer.load(tokenizer_path)


def _encode_chunk(segs: list[stream.Segment], text_field: str, val_fraction: float) -> dict[str, Any]:
    """Parse and encode one chunk: each split's tokens, one row per document (unit, row, val, bos, bytes, tokens:
    what the cap and the counts need) and the bad rows."""
    assert _TOK is not None, "not a worker"
    items: list[stream.Item] = []
    bad: list[tuple[int, int, str]] = []
    for seg in segs:
        for it in stream.parse(seg, text_field, val_fraction):
            if isinstance(it, stream.Bad):
                bad.append((it.unit, it.row, it.message))
            else:
                items.append(it)
    out: dict[str, list[int]] = {"train": [], "val": []}
    docs = []
    for it, ids in zip(items, _encode_texts(_TOK, [it.text for it in items])):
        dst = out["val" if it.val else "train"]
        if it.bos:
            dst.append(_TOK.bos_id)
        dst.extend(ids)
        docs.append((it.unit, it.row, it.val, it.bos, it.nbytes, len(ids) + it.bos))
    dtype = token_dtype(_TOK.vocab_size)
    return {"train": np.array(out["train"], dtype), "val": np.array(out["val"], dtype), "bad": bad,
            "docs": np.array(docs, np.int64).reshape(-1, 6)}


def _encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids `tok.encode_batch` gives the texts, encoded about ENCODE_CHARS characters at a time (a long text in
    parts cut where the pre-tokenizer cuts anyway, stream.split_text: the ids are those of the whole), so that a
    worker's memory does not grow with the length of a document."""
    parts = [(i, p) for i, t in enumerate(texts) for p in stream.split_text(t, ENCODE_CHARS)]
    out: list[list[int]] = [[] for _ in texts]
    start = size = 0
    for j in range(len(parts) + 1):
        if j == len(parts) or (size + len(parts[j][1]) > ENCODE_CHARS and j > start):
            batch = [p for _, p in parts[start:j]]
            encoded = tok.encode_batch(batch)
            for (i, _), ids in zip(parts[start:j], encoded):
                out[i] += ids
            start, size = j, 0
        if j < len(parts):
            size += len(parts[j][1])
    return out


def _chunks(segs: Iterable[stream.Segment]) -> Iterator[tuple[list[stream.Segment], tuple[int, int], int]]:
    """(segments, the stream position after them, text bytes) of about CHUNK_BYTES each."""
    buf: list[stream.Segment] = []
    size = 0
    for seg in segs:
        buf.append(seg)
        size += seg.nbytes
        if size >= CHUNK_BYTES:
            yield buf, buf[-1].after(), size
            buf, size = [], 0
    if buf:
        yield buf, buf[-1].after(), size


def _encode(units: list[stream.Unit], out: Path, tok: Tokenizer, state: dict[str, Any], opts: StreamOptions,
            progress: bool) -> None:
    """Encode the stream from state["position"] on, updating `state` (the manifest) as chunks are written."""
    dtype = np.dtype(state["dtype"])
    writers = {s: ShardWriter(out, s, dtype, opts.shard_tokens, **state["splits"][s]) for s in SPLITS}
    counts, cap = state["counts"], opts.max_tokens
    state["stop_before"] = None
    bar = tqdm(unit="B", unit_scale=True, desc="tokenizer", disable=None if progress else True, mininterval=1.0,
               dynamic_ncols=True, leave=False)
    since = 0

    def commit() -> None:
        for w in writers.values():
            w.sync()
        state["splits"] = {s: w.state() for s, w in writers.items()}
        write_json_atomic(out / MANIFEST, state)

    def handle(fut: Future, end: tuple[int, int], nbytes: int) -> bool:
        """Write one chunk's result (in stream order); True when the cap is reached."""
        nonlocal since
        res = fut.result()
        docs, bad, train, val = res["docs"], res["bad"], res["train"], res["val"]
        stopped = False
        if cap:  # the first document at which the training tokens reach the cap is the last one taken
            tr = np.cumsum(np.where(docs[:, 2] == 0, docs[:, 5], 0))
            hit = int(np.searchsorted(tr, cap - counts["train"]["tokens"]))
            if hit < len(docs):
                docs = docs[:hit + 1]
                u, r = int(docs[-1, 0]), int(docs[-1, 1])
                bad = [b for b in bad if (b[0], b[1]) <= (u, r)]
                train, val = train[:int(tr[hit])], val[:int(docs[docs[:, 2] == 1, 5].sum())]
                state["stop_before"] = counts["train"]["tokens"] + int(tr[hit]) - int(docs[-1, 5])
                end, stopped = (u, r + 1), True
        if bad and not opts.skip_bad_lines:
            raise stream.refused(bad[0][2])
        for _, _, message in bad:
            if state["skipped"] < SHOWN_BAD:
                print0(f"tokenizer: skipped {message}")
            if len(state["skipped_examples"]) < 10:
                state["skipped_examples"].append(message)
            state["skipped"] += 1
        for split, arr in (("train", train), ("val", val)):
            writers[split].write(arr)
            mine = docs[docs[:, 2] == (split == "val")]
            c = counts[split]
            c["documents"], c["tokens"], c["bytes"] = (c["documents"] + int(mine[:, 3].sum()), c["tokens"] + len(arr),
                                                       c["bytes"] + int(mine[:, 4].sum()))
        state["position"] = list(end)
        since += nbytes
        bar.update(nbytes)
        if since >= COMMIT_BYTES or stopped:
            commit()
            since = 0
        return stopped

    workers = max(1, opts.workers)
    pending: deque[tuple[Future, tuple[int, int], int]] = deque()
    stopped, pool = False, None
    try:
        pool = _start_pool(workers, out / "tokenizer.json")
        for segs, end, nbytes in _chunks(stream.segments(units, tuple(state["position"]), opts.text_field)):
            pending.append((pool.submit(_encode_chunk, segs, opts.text_field, opts.val_fraction), end, nbytes))
            while len(pending) > 2 * workers and not stopped:  # a bounded number in flight: flat memory
                stopped = handle(*pending.popleft())
            if stopped:
                break
        while pending and not stopped:
            stopped = handle(*pending.popleft())
        state["exhausted"] = not stopped
        commit()
    except BrokenProcessPool:
        raise CakeError("a tokenizer worker process died (killed, or out of memory?); the work saved so far is kept: "
                        "run the same command again to continue") from None
    except KeyboardInterrupt:
        print0("tokenizer: interrupted; what was saved is kept: run the same command again to continue")
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.close()
        bar.close()


def _start_pool(workers: int, tokenizer_path: Path) -> ProcessPoolExecutor:
    # fork: a worker starts in milliseconds, with nothing to import. tokenizers prints a warning in a process forked
    # after its thread pool ran (training did) unless TOKENIZERS_PARALLELISM is set: set it while forking.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A forked worker shares this process's memory until it writes to it; Python's garbage collector would write to
    # every object's header (and so copy every page) unless the objects are frozen first (the `gc.freeze` recipe).
    gc.collect()
    _trim()
    gc.freeze()
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(str(tokenizer_path),))
        pool.submit(int).result()  # with fork, every worker starts at the first task
    finally:
        gc.unfreeze()
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return pool


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc), e.g. the BPE trainer's, before forking workers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
