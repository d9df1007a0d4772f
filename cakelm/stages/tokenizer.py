"""`cakelm tokenizer`: train a byte-level BPE tokenizer and encode the corpus into token shards.

    cakelm tokenizer                                         # reads runs/default/data (from `cakelm data`)
    cakelm tokenizer --data my.txt docs/ --vocab-size 8192 --out runs/mine/tokenizer

--data takes `cakelm data` output directories (their split is kept) or raw sources (split here, the same way).
Writes OUT/tokenizer.json, OUT/train.bin and OUT/val.bin (token ids, see data/shards.py) and OUT/meta.json with
token counts and bytes per token (the compression the tokenizer achieves on each split).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import print0, write_json_atomic
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data.shards import token_dtype, write_shard
from cakelm.data.sources import Doc, is_split_dir, read_source, read_split, split_documents
from cakelm.tokenizer import Tokenizer


@dataclass
class TokenizerConfig:
    data: list[str] = opt(["runs/default/data"], "`cakelm data` output directories, or raw text sources")
    out: str = opt("runs/default/tokenizer", "output directory")
    vocab_size: int = opt(2048, "vocabulary size, including 256 byte tokens and the special tokens")
    min_frequency: int = opt(2, "a merge must occur at least this often")
    train_bytes: int = opt(100_000_000, "train the BPE merges on at most this many bytes of text (0 = all)")
    val_fraction: float = opt(0.05, "share of documents held out for validation (raw sources only)")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data needs at least one source")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size > 2**31 - 1 or self.train_bytes < 0:
            raise ConfigError("vocab-size or train-bytes out of range")


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


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a tokenizer directory."""
    return f"vocab {meta['vocab_size']}, {meta['val']['bytes_per_token']:.2f} bytes/token"
