"""`cakelm tokenizer`: train a byte-level BPE tokenizer and encode the corpus into token shards.

    cakelm tokenizer                                         # reads runs/default/data (from `cakelm data`)
    cakelm tokenizer --data my.txt docs/ --vocab-size 8192 --out runs/mine/tokenizer
    cakelm tokenizer --data 'web/*.jsonl.zst' books/ hf:HuggingFaceFW/fineweb-edu:sample-10BT \\
        --vocab-size 32768 --workers 8 --max-tokens 10_000_000_000 --skip-bad-lines --out runs/big/tokenizer

--data takes `cakelm data` output directories (their split is kept) or raw sources (split here, the same way).
Writes OUT/tokenizer.json, OUT/train.bin and OUT/val.bin (token ids, see data/shards.py) and OUT/meta.json with
token counts and bytes per token (the compression the tokenizer achieves on each split).

Streamed sources (folders of JSONL/parquet files, globs, .gz/.zst/.parquet files, hf:NAME, anything with --stream;
see data/stream.py), or a `cakelm data` folder that lists them, are never held in memory: the tokenizer is trained
on a sample of --train-bytes drawn from the stream, then --workers processes encode the corpus into fixed-size
shards (OUT/train-00000.bin, ..., OUT/val-00000.bin, ...; see data/encode.py). Run the same command again after an
interruption and it continues where it stopped; --max-tokens caps the training tokens (a larger cap later goes on).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import CakeError, print0, write_json_atomic
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data import encode, stream
from cakelm.data.shards import token_dtype, write_shard
from cakelm.data.sources import Doc, is_split_dir, read_source, read_split, split_documents
from cakelm.tokenizer import Tokenizer


@dataclass
class TokenizerConfig:
    data: list[str] = opt(["runs/default/data"], "`cakelm data` output directories, or raw text sources")
    out: str = opt("runs/default/tokenizer", "output directory")
    vocab_size: int = opt(2048, "vocabulary size, including 256 byte tokens and the special tokens")
    min_frequency: int = opt(2, "a merge must occur at least this often")
    # 32 MB: plenty for the merges of a 32k vocabulary, and the BPE trainer's memory stays well under 1 GB
    train_bytes: int = opt(32_000_000, "train the BPE merges on at most this many bytes of text (0 = all); for "
                           "streamed sources a sample spread over the files (see data/stream.py)")
    val_fraction: float = opt(0.05, "share of documents held out for validation (raw sources only)")
    text_field: str = opt("text", "the JSONL field / parquet column / dataset field holding the text (raw sources "
                          "only)")
    stream: bool = opt(False, "stream raw sources even when they are small (built-in, .txt, .jsonl, folders of .txt)"
                       "; folders of JSONL/parquet files, globs, .gz/.zst/.parquet files and hf:NAME always stream")
    workers: int = opt(0, "processes that encode a streamed corpus (0 = min(2, CPU count))")
    max_tokens: int = opt(0, "stop a streamed corpus after this many training tokens (0 = all of it)")
    shard_tokens: int = opt(100_000_000, "tokens per shard file of a streamed corpus")
    skip_bad_lines: bool = opt(False, "skip and count malformed lines, rows and files of a streamed corpus instead of "
                               "stopping at the first")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data needs at least one source")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size > 2**31 - 1 or self.train_bytes < 0:
            raise ConfigError("vocab-size or train-bytes out of range")
        if self.workers < 0 or self.max_tokens < 0 or self.shard_tokens < 1:
            raise ConfigError("workers and max-tokens must be >= 0, shard-tokens >= 1")


# Vocabulary sizes by the pipeline's presets (a larger model, on more text, affords more tokens).
PRESETS = {"cpu": {}, "micro": {"vocab_size": 512}, "10m": {"vocab_size": 4096}, "gpu": {"vocab_size": 32768}}


def _texts_up_to(docs: list[Doc], limit: int):
    """Document texts until `limit` bytes (0 = no limit)."""
    total = 0
    for d in docs:
        yield d.text
        total += len(d.text.encode("utf-8"))
        if limit and total >= limit:
            return


def main(cfg: TokenizerConfig) -> Path:
    t0 = time.time()
    streamed = [s for s in cfg.data if stream.is_stream_dir(s)]
    if streamed or any(stream.needs_stream(s) for s in cfg.data if not is_split_dir(s)) or (
            cfg.stream and not all(is_split_dir(s) for s in cfg.data)):
        return _main_stream(cfg, t0)
    train: list[Doc] = []
    val: list[Doc] = []
    raw: list[Doc] = []
    for src in cfg.data:
        if is_split_dir(src):
            t, v = read_split(src)
            train, val = train + t, val + v
        else:
            raw.extend(read_source(src))
    if raw:
        t, v = split_documents(raw, cfg.val_fraction)
        train, val = train + t, val + v
    tok = Tokenizer.train(_texts_up_to(train, cfg.train_bytes), cfg.vocab_size, cfg.min_frequency)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    encode.clear(out)  # a streamed tokenization's files, were one here
    tok.save(out / "tokenizer.json")
    counts = {"train": write_shard(out / "train.bin", train, tok), "val": write_shard(out / "val.bin", val, tok)}
    for c in counts.values():
        # bytes of text per token of text: the <|bos|> added per document carries no text
        c["bytes_per_token"] = c["bytes"] / max(1, c["tokens"] - c["documents"])
    sample = next(itertools.islice((d.text for d in val), 1), "")[:80]
    write_json_atomic(out / "meta.json", {
        "stage": "tokenizer", "complete": True, "config": to_dict(cfg), "vocab_size": tok.vocab_size,
        "dtype": str(token_dtype(tok.vocab_size)), **counts,
    })
    print0(f"tokenizer: vocab {tok.vocab_size}, {counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val "
           f"tokens, {counts['val']['bytes_per_token']:.2f} bytes/token on val -> {out} ({time.time() - t0:.1f}s)")
    if sample:
        print0(f"  e.g. {sample!r} -> {len(tok.encode(sample))} tokens")
    return out


def _main_stream(cfg: TokenizerConfig, t0: float) -> Path:
    """Streamed sources -> tokenizer (trained on a sample) + fixed-size shards, resumable (data/encode.py)."""
    units: list[stream.Unit] = []
    settings = {"val_fraction": cfg.val_fraction, "text_field": cfg.text_field}
    listed = [s for s in cfg.data if stream.is_stream_dir(s)]
    for src in cfg.data:
        if src in listed:
            more, saved = stream.read_sources(src)
            units += more
            mine = {k: saved[k] for k in settings}
            if listed.index(src) and mine != settings:
                raise CakeError(f"--data {src}: listed with other options ({mine}) than {listed[0]}")
            settings = mine
        elif is_split_dir(src):
            raise CakeError(f"--data {src}: a folder of documents from `cakelm data` cannot be mixed with streamed "
                            "sources; pass its sources instead")
        else:
            units += stream.resolve([src])
    opts = encode.StreamOptions(settings["text_field"], settings["val_fraction"], cfg.skip_bad_lines,
                                cfg.workers or min(2, os.cpu_count() or 1), cfg.max_tokens, cfg.shard_tokens)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # not complete until the end (the pipeline and pretrain check)
    for stale in ("train.bin", "val.bin"):
        (out / stale).unlink(missing_ok=True)

    def train() -> Tokenizer:
        texts = stream.sample_texts(units, cfg.train_bytes, opts.text_field, opts.val_fraction, opts.skip_bad_lines)
        return Tokenizer.train(texts, cfg.vocab_size, cfg.min_frequency)

    key = {"vocab_size": cfg.vocab_size, "min_frequency": cfg.min_frequency, "train_bytes": cfg.train_bytes}
    state = encode.tokenize_stream(units, out, key, opts, train)
    counts = {s: {**state["counts"][s], "shards": state["files"][s]} for s in encode.SPLITS}
    for split, c in counts.items():
        if not c["tokens"]:
            raise CakeError(f"no {split} documents in the stream (val-fraction {opts.val_fraction} of "
                            f"{counts['train']['documents'] + counts['val']['documents']} documents)")
        c["bytes_per_token"] = c["bytes"] / max(1, c["tokens"] - c["documents"])
    tok = Tokenizer.load(out / "tokenizer.json")
    write_json_atomic(out / "meta.json", {
        "stage": "tokenizer", "complete": True, "config": to_dict(cfg), "vocab_size": tok.vocab_size,
        "dtype": state["dtype"], "stream": True, "exhausted": state["exhausted"], "skipped": state["skipped"],
        "skipped_examples": state["skipped_examples"], **counts})
    if state["skipped"]:
        print0(f"tokenizer: skipped {state['skipped']} bad lines or files (--skip-bad-lines)")
    print0(f"tokenizer: vocab {tok.vocab_size}, {counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val "
           f"tokens in {len(counts['train']['shards'])} + {len(counts['val']['shards'])} shards"
           f"{'' if state['exhausted'] else ' (--max-tokens reached)'}, {counts['val']['bytes_per_token']:.2f} "
           f"bytes/token on val -> {out} ({time.time() - t0:.1f}s)")
    return out


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a tokenizer directory."""
    return f"vocab {meta['vocab_size']}, {meta['val']['bytes_per_token']:.2f} bytes/token"
