"""Streamed corpora (issue 21): every file kind read lazily in the documented order, tokenized by worker processes
into fixed-size shards equal to the tokenizer's own encoding, bad input named by file and line (refused or skipped),
an interrupted tokenization continuing to the same bytes, --max-tokens, pretraining on the shards (1 and 2 ranks),
a Hugging Face dataset (datasets.load_dataset faked), missing extras, and flat memory."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data import encode, stream
from cakelm.data.shards import ShardedTokens, TokenBatches, open_tokens
from cakelm.stages import data as data_stage
from cakelm.stages import tokenizer as tokenizer_stage
from cakelm.tokenizer import Tokenizer
from tests.conftest import WORDS
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_loop import MICRO, losses, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
REAL_ENCODE = encode._encode_chunk
SMALL = {"PIECE_BYTES": 2048, "BLOCK_BYTES": 1500, "VALUE_ROWS": 4}  # stream.*: many pieces, blocks, segments
SMALL_ENCODE = {"CHUNK_BYTES": 6000, "COMMIT_BYTES": 6000, "ENCODE_CHARS": 700}  # encode.*: many chunks, a saved
# point after each, documents encoded in parts


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SMALL.items():
        monkeypatch.setattr(stream, k, v)
    for k, v in SMALL_ENCODE.items():
        monkeypatch.setattr(encode, k, v)


def prose(rng: random.Random, lines: int) -> str:
    return "".join(f"{rng.choice(['KING.', 'QUEEN.', 'FOOL.'])}\n"
                   f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()}.\n"
                   for _ in range(lines))


def mixed_folder(root: Path, seed: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """A folder with every file kind, and its documents as (split key, text) in the documented order: files sorted
    by their path in the folder, rows in order; the key is the name, or "\\0" + text for a row without one."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    docs: list[tuple[str, str]] = []
    big = prose(rng, 500) + "  an indented line\n\n\n  \nthe end\n"  # many pieces of PIECE_BYTES
    (root / "a.txt").write_bytes(big.replace("\n", "\r\n").encode())  # CRLF read as LF, as sources.py does
    docs.append(("a.txt", big))
    rows = [{"text": prose(rng, 6), **({"name": f"b{i}"} if i % 3 == 0 else {})} for i in range(24)]
    rows[7]["text"] += "Text that names <|end|> and <|bos|> is text, not control tokens.\n"
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "   ")  # a blank line: no document
    (root / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs += [(r.get("name", "\0" + r["text"]), r["text"]) for r in rows]
    rows = [{"text": prose(rng, 6), "name": f"c{i}"} for i in range(20)]
    blob = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (root / "c.jsonl.gz").write_bytes(gzip.compress(blob[:1000]) + gzip.compress(blob[1000:]))  # two members
    docs += [(r["name"], r["text"]) for r in rows]
    texts = [prose(rng, 6) for _ in range(20)]
    blob = "".join(json.dumps({"text": t}) + "\n" for t in texts[:-1]) + json.dumps({"text": texts[-1]})  # no last \n
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob.encode()))
    docs += [("\0" + t, t) for t in texts]
    texts = [prose(rng, 6) for _ in range(23)]
    names = [f"e{i}" if i % 2 else None for i in range(23)]
    pq.write_table(pa.table({"id": list(range(23)), "text": texts, "name": names}), root / "e.parquet",
                   row_group_size=5)
    docs += [(n if n else "\0" + t, t) for t, n in zip(texts, names)]
    rows = [{"text": prose(rng, 6)} for _ in range(250)]  # many chunks: room to interrupt
    (root / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    docs += [("\0" + r["text"], r["text"]) for r in rows]
    (root / "notes.md").write_text("not a corpus file: ignored")
    (root / "sub").mkdir()
    (root / "sub" / "blank.txt").write_text(" \n")  # whitespace only: no document
    (root / "sub" / "f.txt").write_text("日本語のテキスト。\n" + prose(rng, 30), encoding="utf-8")
    docs.append(("sub/f.txt", (root / "sub" / "f.txt").read_text(encoding="utf-8")))
    return root, docs


def is_val(key: str, fraction: float) -> bool:
    """The documented split: the first 64 bits of sha256(key) below the fraction."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) < fraction * 2**64


def expected_ids(docs: list[tuple[str, str]], tok: Tokenizer, fraction: float) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"train": [], "val": []}
    for key, text in docs:
        out["val" if is_val(key, fraction) else "train"] += [tok.bos_id, *tok.encode(text)]
    return out


def tokenize(data: Path | str | list, out: Path, **kw) -> Path:
    flat = {"data": [str(d) for d in (data if isinstance(data, list) else [data])], "out": str(out),
            "vocab_size": 320, "workers": 2, "shard_tokens": 3000, "val_fraction": 0.2, **kw}
    return tokenizer_stage.main(build_config(tokenizer_stage.TokenizerConfig, ("test", flat)))


def split_tokens(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], np.uint16) for s in meta[split]["shards"]])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*-*.bin"))}


def test_mixed_folder_two_workers_give_the_tokenizers_ids(tmp_path, small) -> None:
    folder, docs = mixed_folder(tmp_path / "corpus")
    assert stream.needs_stream(str(folder)) and not stream.needs_stream(str(folder / "sub"))
    data = data_stage.main(build_config(data_stage.DataConfig, ("t", {"data": [str(folder)], "out": str(tmp_path / "d"),
                                                                      "val_fraction": 0.2})))
    assert [u["name"] for u in json.loads((data / "sources.json").read_text())["units"]] == [
        "a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet", "g.jsonl", "sub/blank.txt", "sub/f.txt"]
    out = tokenize(data, tmp_path / "tok", val_fraction=0.9)  # the data folder's own options win
    tok = Tokenizer.load(out)
    want = expected_ids(docs, tok, 0.2)
    assert want["val"] and want["train"]
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        assert split_tokens(out, split).tolist() == want[split], split
        assert meta[split]["tokens"] == len(want[split])
        assert all(s["tokens"] == 3000 for s in meta[split]["shards"][:-1]) and meta[split]["shards"][-1]["tokens"]
    assert len(meta["train"]["shards"]) > 3
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs)
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == sum(len(t.encode()) for _, t in docs)
    assert not list(out.glob("*.partial"))
    # pretraining reads the shards as one array, windows across file boundaries included
    tokens = open_tokens(out, "train", tok.vocab_size)
    assert isinstance(tokens, ShardedTokens) and len(tokens) == len(want["train"])
    flat = np.array(want["train"], np.uint16)
    for a, b in ((2990, 3010), (0, len(flat)), (5999, 6000), (100, 100)):
        assert tokens[a:b].tolist() == flat[a:b].tolist()


def test_the_tokenizer_sample_is_spread_over_the_files(tmp_path, small) -> None:
    folder, _ = mixed_folder(tmp_path / "corpus")
    units = stream.resolve([str(folder)])
    texts = list(stream.sample_texts(units, 20_000, "text", 0.2, False))
    got = sum(len(t.encode()) for t in texts)
    assert 20_000 <= got < 20_000 + 2 * stream.PIECE_BYTES  # about the asked size: the last piece/row goes over
    unit_of = {it.text: it.unit for seg in stream.segments(units) for it in stream.parse(seg, "text", 0.2)
               if isinstance(it, stream.Item) and not it.val}
    assert set(texts) <= set(unit_of)  # training documents only
    per_unit = [sum(len(t.encode()) for t in texts if unit_of[t] == u) for u in range(len(units))]
    assert sum(b > 0 for b in per_unit) >= 4 and max(per_unit) == per_unit[5]  # spread; most from g.jsonl, the biggest
    assert sum(len(t.encode()) for t in stream.sample_texts(units, 0, "text", 0.2, False)) == sum(
        len(t.encode()) for t in unit_of)  # 0: every training document


def test_cut_texts_encode_to_the_ids_of_the_whole() -> None:
    """The .txt pieces and the parts a worker encodes are cut after a line break followed by printable ASCII: the
    pre-tokenizer never matches across such a break, so the parts' ids are the whole text's."""
    rng = random.Random(5)
    bits = ["\n", "\n\n", " \n", "\r\n", "\t", "  ", " ", "'s", "'ll", "...", "!\n", "42", "7", "é", "日本",
            "\u00a0", "<|end|>", *WORDS[:20], *(w.capitalize() for w in WORDS[:10])]
    texts = ["".join(rng.choice(bits) for _ in range(rng.randint(200, 600))) for _ in range(60)]
    tok = Tokenizer.train(iter(texts), vocab_size=400)
    for text in texts:
        for size in (5, 30, 120):
            parts = stream.split_text(text, size)
            assert "".join(parts) == text and len(parts) > 1
            assert [i for p in parts for i in tok.encode(p)] == tok.encode(text)
    assert stream.split_text("x" * 100, 10) == ["x" * 100]  # no break: one part


BAD = {  # file -> (content, message, documents the file still gives when skipping)
    "x.jsonl.gz": (gzip.compress(b'{"text": "ok one"}\n{"text": oops}\n{"text": "ok two"}\n'),
                   r"x.jsonl.gz:2: not valid JSON", 2),
    "x.jsonl": (b'{"text": "ok"}\n{"text": "\xff"}\n', r"x.jsonl:2: not UTF-8", 1),
    "x.jsonl.zst": (zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"body": "x"}\n'),
                    r'x.jsonl.zst:2: expected an object with a string "text" field', 1),
    "cut.jsonl.gz": (gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(3000)))[:-50],
                     r"cut.jsonl.gz:\d+: truncated or corrupt gzip data", None),
    "x.parquet": (None, r'x.parquet:3: no string "text" value', 2),
    "nocol.parquet": (None, r"nocol.parquet:1: no column 'text' \(columns: body\); choose one with --text-field", 0),
    "junk.parquet": (b"not a parquet file", r"junk.parquet:1: not a readable parquet file", 0),
    "x.txt": (b"fine\nalso fine\n\xfe\n", r"x.txt:3: not UTF-8 text", 0),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_named_by_file_and_line_then_refused_or_skipped(tmp_path, small, name) -> None:
    content, message, kept = BAD[name]
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = random.Random(1)
    good = [prose(rng, 3) for _ in range(30)]
    (folder / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    if name == "x.parquet":
        pq.write_table(pa.table({"text": ["ok", "ok too", None]}), folder / name)
    elif name == "nocol.parquet":
        pq.write_table(pa.table({"body": ["x"]}), folder / name)
    else:
        (folder / name).write_bytes(content)
    with pytest.raises(CakeError, match=message):
        tokenize(folder, tmp_path / "refused", stream=True)
    out = tokenize(folder, tmp_path / "skipped", stream=True, skip_bad_lines=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == 1 and name in meta["skipped_examples"][0]
    docs = meta["train"]["documents"] + meta["val"]["documents"]
    if kept is not None:
        assert docs == len(good) + kept
    else:  # the truncated file gives every line before the damage
        assert len(good) + 2000 < docs < len(good) + 3000


def test_a_bad_line_is_a_one_line_cli_error(tmp_path, capsys) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\nnot json\n'))
    assert cli(["tokenizer", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cakelm tokenizer: error: {tmp_path / 'c' / 'a.jsonl.gz'}:2: not valid JSON (Expecting value) "
                   "(--skip-bad-lines skips and counts such rows)")


def _dying_encode(segs, *args):
    """A worker that dies (as if killed) on the first chunk that reaches g.jsonl, once (late enough that chunks
    before it have been written: at most 2 x workers + 1 are in flight)."""
    flag = Path(os.environ["CAKELM_TEST_DIE"])
    if any(s.unit >= 5 for s in segs) and flag.exists():
        flag.unlink()
        os._exit(1)
    return REAL_ENCODE(segs, *args)


def test_an_interrupted_tokenization_continues_to_the_same_shards(tmp_path, small, monkeypatch, capsys) -> None:
    folder, _ = mixed_folder(tmp_path / "corpus")
    ref = shard_bytes(tokenize(folder, tmp_path / "ref"))
    out = tmp_path / "tok"
    # 1. a worker process dies half-way: a one-line error, and what was saved before it is kept
    (tmp_path / "die").touch()
    monkeypatch.setenv("CAKELM_TEST_DIE", str(tmp_path / "die"))
    monkeypatch.setattr(encode, "_encode_chunk", _dying_encode)
    with pytest.raises(CakeError, match="a tokenizer worker process died"):
        tokenize(folder, out)
    assert not (tmp_path / "die").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["position"][0] >= 1 and manifest["counts"]["train"]["tokens"] > 0
    assert not (out / "meta.json").exists()  # not complete: pretraining refuses it
    tok_sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()

    # 2. continued, then Ctrl-C in the main process after chunks written but not yet saved (3 chunks per saved point)
    monkeypatch.setattr(encode, "COMMIT_BYTES", 3 * encode.CHUNK_BYTES)
    monkeypatch.setattr(Tokenizer, "train", lambda *a, **k: pytest.fail("a continued run must not retrain"))
    calls = []
    real_write = encode.ShardWriter.write

    def write(self, arr):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        real_write(self, arr)

    monkeypatch.setattr(encode.ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        tokenize(folder, out)
    assert "continuing the tokenization" in capsys.readouterr().out
    later = json.loads((out / "manifest.json").read_text())
    assert later["position"] > manifest["position"]
    saved = later["splits"]["train"]
    on_disk = sum(p.stat().st_size for p in out.glob("train-*.bin*")) // 2
    assert on_disk > sum(s["tokens"] for s in saved["shards"]) + saved["tail"]  # chunks written after the saved point

    # 3. continued to the end: byte for byte the uninterrupted run, with the same tokenizer
    monkeypatch.setattr(encode.ShardWriter, "write", real_write)
    tokenize(folder, out, workers=1)  # the number of workers does not matter
    assert shard_bytes(out) == ref
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == tok_sha
    assert not list(out.glob("*.partial"))


def test_max_tokens_caps_and_a_larger_cap_continues(tmp_path, small, capsys) -> None:
    folder, _ = mixed_folder(tmp_path / "corpus")
    ref = tokenize(folder, tmp_path / "ref")
    full = {s: split_tokens(ref, s).tolist() for s in ("train", "val")}
    out = tmp_path / "tok"
    cap = len(full["train"]) // 3
    tokenize(folder, out, max_tokens=cap)
    meta = json.loads((out / "meta.json").read_text())
    train, val = split_tokens(out, "train").tolist(), split_tokens(out, "val").tolist()
    assert cap <= len(train) < cap + 1500 and not meta["exhausted"]
    assert train == full["train"][:len(train)] and full["train"][len(train)] == 0  # stops at a document's end
    assert val == full["val"][:len(val)] and len(val) < len(full["val"])
    before = shard_bytes(out)
    tokenize(folder, out, max_tokens=len(train))  # the same stopping document: nothing to do
    assert shard_bytes(out) == before
    assert "continuing" not in capsys.readouterr().out
    tokenize(folder, out, max_tokens=2 * cap)
    assert "continuing the tokenization" in capsys.readouterr().out
    tokenize(folder, out)  # no cap: to the end
    assert shard_bytes(out) == shard_bytes(ref)
    tokenize(folder, out, max_tokens=cap)  # fewer tokens than done: afresh, as a first capped run
    assert "starting afresh" in capsys.readouterr().out
    assert shard_bytes(out) == before


@pytest.fixture
def streamed(tmp_path, small) -> Path:
    folder, _ = mixed_folder(tmp_path / "corpus")
    return tokenize(folder, tmp_path / "tok", shard_tokens=1000)


def test_ranks_read_their_own_rows_of_the_shards(streamed, tmp_path) -> None:
    tok = Tokenizer.load(streamed)
    tokens = open_tokens(streamed, "train", tok.vocab_size)
    flat = split_tokens(streamed, "train")
    one = TokenBatches(tokens, 32, 4, grad_accum=2, seed=1)
    same = TokenBatches(flat, 32, 4, grad_accum=2, seed=1)
    ranks = [TokenBatches(tokens, 32, 4, grad_accum=1, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for step in (0, 3, 500):  # 500: past the first epoch
        for micro in (0, 1):
            assert torch.equal(one.get(step, micro)["input"], same.get(step, micro)["input"])
            assert torch.equal(one.get(step, micro)["input"], ranks[micro].get(step, 0)["input"])
        rows = [{r._window(step * r.rows_per_step + r.rank * 4 + i) for i in range(4)} for r in ranks]
        assert not rows[0] & rows[1]  # disjoint windows
    out = run_pretrain(streamed, tmp_path / "base", **{"loop.max_steps": 3, "loop.eval_every": 3})
    assert load_meta(out)["step"] == 3 and len(losses(out)) == 3
    (streamed / "meta.json").unlink()
    (streamed / "meta.json").write_text(json.dumps({"stage": "tokenizer", "stream": True, "complete": False}))
    with pytest.raises(CakeError, match="the tokenization is not finished"):
        open_tokens(streamed, "train", tok.vocab_size)


@pytest.mark.slow
def test_ddp_two_ranks_on_the_shards_match_one_process(streamed, tmp_path) -> None:
    common = {**MICRO, "loop.max_steps": 4, "loop.eval_every": 2, "optim.name": "adamw", "optim.eps": 1e-3}
    single = run_pretrain(streamed, tmp_path / "single", **common, **{"loop.batch_size": 4, "loop.grad_accum": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cakelm", "pretrain", "--data", str(streamed), "--out", str(tmp_path / "ddp"),
           *_flags({**common, "loop.batch_size": 4}), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_meta(tmp_path / "ddp")["world_size"] == 2
    for a, b in zip(losses(single), losses(tmp_path / "ddp"), strict=True):
        assert abs(a - b) < 1e-4


def test_a_hugging_face_dataset_streams(tmp_path, small, monkeypatch) -> None:
    calls = []
    rng = random.Random(2)
    rows = [{"text": prose(rng, 4)} for _ in range(40)] + [{"body": "no text"}]

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "org/offline":
            raise ConnectionError("Couldn't reach the Hub\n(long details)")
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tokenize("hf:org/web:en", tmp_path / "tok", skip_bad_lines=True)
    assert set(calls) == {("org/web", "en", "train", True)}  # streamed, never downloaded whole
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_examples"] == ['hf:org/web:en:41: no string "text" value']
    assert meta["train"]["documents"] + meta["val"]["documents"] == 40
    with pytest.raises(CakeError, match=r"^--data hf:org/offline: could not load the dataset \(ConnectionError: "
                                        r"Couldn't reach the Hub\)$"):
        tokenize("hf:org/offline", tmp_path / "off")


@pytest.mark.parametrize("module, file, match", [
    ("zstandard", "a.jsonl.zst", r"reading .jsonl.zst files needs zstandard: pip install 'cakelm\[zstd\]'"),
    ("pyarrow", "a.parquet", r"reading .parquet files needs pyarrow: pip install 'cakelm\[parquet\]'"),
    ("datasets", "hf:org/x", r"reading hf: datasets needs datasets: pip install datasets"),
])
def test_a_missing_extra_is_a_one_line_error(tmp_path, monkeypatch, module, file, match) -> None:
    if not file.startswith("hf:"):
        (tmp_path / file).write_bytes(b"")
        file = str(tmp_path / file)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(CakeError, match=match):
        data_stage.main(build_config(data_stage.DataConfig, ("t", {"data": [file], "out": str(tmp_path / "d")})))


def test_small_sources_keep_the_in_memory_path(tmp_path, corpus) -> None:
    assert not any(stream.needs_stream(s) for s in (str(corpus), "shakespeare", "arithmetic", "x.jsonl"))
    out = data_stage.main(build_config(data_stage.DataConfig, ("t", {"data": [str(corpus)], "out": str(tmp_path)})))
    assert (out / "train.jsonl").is_file() and not (out / "sources.json").exists()


# The peak resident memory of the encoding (imports and the tokenizer's training come before it and are the same for
# both corpora): this process's high-water mark, reset as encoding starts, and the largest worker's.
MEMORY = """
import json, re, resource, sys
from cakelm.config import build_config
from cakelm.data import encode
from cakelm.stages import tokenizer as t
real, peak = encode._encode, []
def measured(*args):
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
    real(*args)
    peak.append(int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)))
encode._encode = measured
encode.CHUNK_BYTES = 1 << 16  # both corpora fill the window of chunks in flight: a steady state to compare
t.main(build_config(t.TokenizerConfig, ("m", {"data": [sys.argv[1]], "out": sys.argv[2], "vocab_size": 320,
                                              "workers": 2, "train_bytes": 300_000})))
print(json.dumps([peak[0], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def _corpus(folder: Path, megabytes: int) -> Path:
    rng = random.Random(3)
    folder.mkdir()
    for i in range(megabytes):
        rows = [json.dumps({"text": prose(rng, 12)}) for _ in range((1 << 20) // 600)]
        (folder / f"{i:03d}.jsonl.gz").write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), 1))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_memory_stays_flat_on_a_ten_times_larger_corpus(tmp_path) -> None:
    peaks = []
    for mb in (3, 30):
        folder = _corpus(tmp_path / f"c{mb}", mb)
        proc = subprocess.run([sys.executable, "-c", MEMORY, str(folder), str(tmp_path / f"t{mb}")], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks.append(json.loads(proc.stdout.strip().splitlines()[-1]))  # KB: [main process, largest worker]
    (small_self, small_child), (big_self, big_child) = peaks
    # KB. Keeping the corpus's tokens would add about 27 MB; a warm-up of caches and allocator adds a few MB at first
    assert big_self < small_self + 12_000 and big_child < small_child + 12_000, peaks
