"""Streamed pretraining text: corpora too big for memory, read lazily, in a fixed order, from any position.

`cakelm data` and `cakelm tokenizer` stream their sources (instead of reading them whole, see sources.py) when
--stream is given or any source is
- `hf:NAME` or `hf:NAME:CONFIG`: the "train" split of a Hugging Face dataset, read with
  `datasets.load_dataset(NAME, CONFIG, split="train", streaming=True)` (needs `pip install datasets` and internet);
- a glob, quoted so that the shell leaves it alone: `'corpus/**/*.jsonl.gz'`;
- a .jsonl.gz, .jsonl.zst or .parquet file, or a folder holding any .jsonl, .jsonl.gz, .jsonl.zst or .parquet file
  (then every .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet file below it is read; other files are ignored).
With --stream the small sources stream too: built-in names (`shakespeare`, `arithmetic`), .txt and .jsonl files,
folders of .txt files.

File kinds: .txt (one document per file, read in pieces of about PIECE_BYTES cut after a line break that is
followed by a printable ASCII character, where the tokenizer's pre-tokenizer splits anyway, so the pieces encode
to the ids of the whole file and only the first gets <|bos|>); .jsonl, .jsonl.gz, .jsonl.zst (one object per line
with a string "text" field and an optional string "name"); .parquet (a "text" column and an optional "name"
column). `--text-field NAME` reads another field or column instead of "text" (e.g. "content"). Reading .zst needs
zstandard (`pip install 'cakelm[zstd]'`), .parquet needs pyarrow (`pip install 'cakelm[parquet]'`).

The order is fixed: sources as given; a folder's or a glob's files sorted by their path relative to the folder
(a glob's folder is its part before the first wildcard); rows in file order. Documents are named as in sources.py
(a file by its path relative to that folder, a row by its "name", else by its text), and a document is held out for
validation when the first 64 bits of `sources._split_key` fall below val_fraction: the hash of the in-memory split,
used as a threshold instead of a rank so that one pass decides it without seeing every document first.

A position in the stream is (unit, row): a unit is one file, dataset or built-in source, a row one line of a JSONL
file, one row of a parquet file or dataset, one piece of a .txt file. `segments(units, start)` reads from any
position (the main process reads, cheaply: bytes of whole lines, pieces, column values) and `parse` turns a segment
into documents (in worker processes: decoding, JSON, validation, the split). Bad input (not UTF-8, not JSON, no
text field, a truncated .gz, an unreadable parquet file) comes out as `Bad` records naming the file and line (row,
counted from 1); the caller refuses them with a one-line error or skips and counts them (--skip-bad-lines).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cakelm.common import CakeError, read_json, write_json_atomic
from cakelm.data.sources import BUILTIN, Doc, _package_docs, _split_key, arithmetic_docs, fetch_package

PIECE_BYTES = 1 << 20  # .txt files are read in pieces of about this size (a row of a .txt file is a piece)
BLOCK_BYTES = 1 << 20  # JSONL files are read in blocks of whole lines of about this size
VALUE_ROWS = 1024  # rows of a parquet file, dataset or built-in source per segment
KINDS = {".txt": ("txt", ""), ".jsonl": ("jsonl", ""), ".jsonl.gz": ("jsonl", "gz"), ".jsonl.zst": ("jsonl", "zst"),
         ".parquet": ("parquet", "")}
STREAM_ONLY = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # a folder holding one of these streams
# unit kind or compression -> (module, how to install it, what needs it)
EXTRAS = {"parquet": ("pyarrow", "pip install 'cakelm[parquet]'", ".parquet files"),
          "zst": ("zstandard", "pip install 'cakelm[zstd]'", ".jsonl.zst files"),
          "hf": ("datasets", "pip install datasets (and internet)", "hf: datasets")}
SOURCES_FILE = "sources.json"  # what `cakelm data` writes for streamed sources (the file list, not the text)


@dataclass(frozen=True)
class Unit:
    """One file, dataset or built-in source of the stream."""

    kind: str  # "txt", "jsonl", "parquet", "hf", "package" (a built-in registry package), "arithmetic"
    path: str  # the file (absolute); hf: the dataset name; package: the built-in name
    name: str  # relative to its source's root: documents are named from it
    compression: str = ""  # jsonl: "", "gz" or "zst"
    config: str = ""  # hf: the dataset's config
    size: int = -1  # bytes on disk (-1: unknown)
    mtime_ns: int = 0


@dataclass
class Segment:
    """Consecutive rows of one unit as read, before parsing: kind "lines" (bytes of whole JSONL lines), "text" (a
    piece of a .txt file), "values" ((texts, names): column values of parquet/dataset/built-in rows) or "bad" (a
    message: the unit could not be read on from `row`)."""

    unit: int
    row: int  # the first row
    rows: int  # how many rows it covers
    kind: str
    data: Any
    where: str  # the file (or dataset) named in messages
    name: str  # the unit's name
    line: int = 1  # "text": the line number at which the piece starts
    last: bool = False  # the unit ends with this segment

    @property
    def nbytes(self) -> int:
        if self.kind in ("lines", "text"):
            return len(self.data)
        return sum(len(t) for t in self.data[0] if isinstance(t, str)) if self.kind == "values" else 0

    def after(self) -> tuple[int, int]:
        """The stream position after this segment."""
        return (self.unit + 1, 0) if self.last else (self.unit, self.row + self.rows)


@dataclass(frozen=True)
class Item:
    """A parsed document, or a piece of one (a .txt file's later pieces have bos=False)."""

    unit: int
    row: int
    text: str
    nbytes: int  # UTF-8 bytes of the text
    val: bool  # held out for validation
    bos: bool  # starts a document (gets <|bos|>)


@dataclass(frozen=True)
class Bad:
    unit: int
    row: int
    message: str  # "FILE:LINE: what is wrong"


def refused(message: str) -> CakeError:
    """The one-line error for bad input when it is not skipped."""
    return CakeError(f"{message} (--skip-bad-lines skips and counts such rows)")


def _kind(path: Path) -> tuple[str, str] | None:
    name = path.name
    return next((v for suffix, v in KINDS.items() if name.endswith(suffix)), None)


def needs_stream(source: str) -> bool:
    """Whether a source is read by streaming even without --stream (see the module docstring)."""
    p = Path(source)
    if source.startswith("hf:") or (any(c in source for c in "*?[") and not p.exists()):
        return True
    if p.is_file():
        return p.name.endswith((".jsonl.gz", ".jsonl.zst", ".parquet"))
    return p.is_dir() and any(f.name.endswith(STREAM_ONLY) for f in p.rglob("*") if f.is_file())


def _file_unit(f: Path, name: str, source: str) -> Unit:
    kind = _kind(f)
    if kind is None:
        raise CakeError(f"--data {source}: unsupported file type '{f.name}' (use {', '.join(KINDS)}, a folder, a "
                        "glob or hf:NAME)")
    st = f.stat()
    return Unit(kind[0], os.path.abspath(f), name, kind[1], size=st.st_size, mtime_ns=st.st_mtime_ns)


def resolve(sources: Iterable[str]) -> list[Unit]:
    """The units of streamed sources, in stream order. Fetches built-in packages into the cache."""
    units: list[Unit] = []
    for src in sources:
        p = Path(src)
        if src.startswith("hf:"):
            name, _, config = src.removeprefix("hf:").partition(":")
            if not name:
                raise CakeError(f"--data {src}: name a dataset (hf:NAME or hf:NAME:CONFIG)")
            units.append(Unit("hf", name, src, config=config))
        elif src in BUILTIN:
            archive = fetch_package(BUILTIN[src])
            units.append(Unit("package", src, src, size=archive.stat().st_size))
        elif src == "arithmetic":
            units.append(Unit("arithmetic", src, src))
        elif p.is_file():
            units.append(_file_unit(p, p.name, src))
        elif p.is_dir() or any(c in src for c in "*?["):
            if p.is_dir():
                root, files = p, [f for f in p.rglob("*") if f.is_file() and _kind(f)]
            else:  # a glob: names are relative to its part before the first wildcard
                parts = Path(src).parts
                fixed = list(itertools.takewhile(lambda s: not any(c in s for c in "*?["), parts))
                root = Path(*fixed) if fixed else Path(".")
                files = [Path(f) for f in glob.glob(src, recursive=True) if Path(f).is_file() and _kind(Path(f))]
            if not files:
                raise CakeError(f"--data {src}: no {', '.join(KINDS)} files " +
                                ("in the folder" if p.is_dir() else "match"))
            named = sorted((f.relative_to(root).as_posix(), f) for f in files)
            units += [_file_unit(f, name, src) for name, f in named]
        else:
            known = ", ".join([*BUILTIN, "arithmetic"])
            raise CakeError(f"--data {src}: no such file or folder (built-in sources: {known})")
    check_dependencies(units)
    return units


def _need(key: str) -> Any:
    module, install, what = EXTRAS[key]
    try:
        return __import__(module)
    except ImportError:
        raise CakeError(f"reading {what} needs {module}: {install}") from None


def check_dependencies(units: list[Unit]) -> None:
    """A one-line error naming what to install when a unit needs a package that is missing."""
    for key in EXTRAS:
        if any(u.kind == key or u.compression == key for u in units):
            _need(key)


def is_stream_dir(path: str | Path) -> bool:
    """Whether a folder is `cakelm data`'s listing of streamed sources."""
    return (Path(path) / SOURCES_FILE).is_file()


def write_sources(out: Path, units: list[Unit], **settings: Any) -> None:
    write_json_atomic(out / SOURCES_FILE, {**settings, "units": [asdict(u) for u in units]})


def read_sources(folder: str | Path) -> tuple[list[Unit], dict[str, Any]]:
    """(units, settings) of a `cakelm data` folder of streamed sources; a file changed since it was listed is an
    error (the listing is what an interrupted tokenization continues from)."""
    saved = read_json(Path(folder) / SOURCES_FILE, "list of sources")
    try:
        units = [Unit(**u) for u in saved.pop("units")]
        saved = {k: saved[k] for k in ("val_fraction", "text_field")}
    except (KeyError, TypeError, AttributeError):
        raise CakeError(f"{Path(folder) / SOURCES_FILE}: not a list of sources written by `cakelm data`") from None
    for u in units:
        if u.kind in ("txt", "jsonl", "parquet"):
            st = os.stat(u.path) if os.path.exists(u.path) else None
            if st is None or (st.st_size, st.st_mtime_ns) != (u.size, u.mtime_ns):
                raise CakeError(f"{u.path} changed (or went) since `cakelm data` listed it in {folder}; run "
                                "`cakelm data` again")
    return units, saved


# ----------------------------------------------------------------------------------------------------------------
# Reading (main process)


def segments(units: list[Unit], start: tuple[int, int] = (0, 0), text_field: str = "text") -> Iterator[Segment]:
    """The stream's segments from position `start` on (`text_field`: the parquet column, the dataset field)."""
    for u in range(start[0], len(units)):
        yield from _with_last(_unit_segments(u, units[u], start[1] if u == start[0] else 0, text_field))


def _with_last(segs: Iterable[Segment]) -> Iterator[Segment]:
    """The segments, the last one marked (one segment of lookahead)."""
    prev = None
    for seg in segs:
        if prev is not None:
            yield prev
        prev = seg
    if prev is not None:
        prev.last = True
        yield prev


def _unit_segments(u: int, unit: Unit, skip: int, text_field: str) -> Iterator[Segment]:
    if unit.kind == "txt":
        yield from _txt_segments(u, unit, skip)
    elif unit.kind == "jsonl":
        yield from _jsonl_segments(u, unit, skip)
    elif unit.kind == "parquet":
        yield from _parquet_segments(u, unit, skip, text_field)
    else:
        yield from _value_segments(u, unit, skip, _rows(unit, text_field))


def _cut(buf: bytes) -> int:
    """Where to end a .txt piece: after the last line break followed by printable ASCII (0 if none): the
    pre-tokenizer's matches never reach across such a break, so each side encodes as it would in the whole."""
    i = buf.rfind(b"\n", 0, len(buf) - 1)
    while i >= 0:
        if 0x21 <= buf[i + 1] <= 0x7E:
            return i + 1
        i = buf.rfind(b"\n", 0, i)
    return 0


def split_text(text: str, size: int) -> list[str]:
    """`text` in parts of about `size` characters, cut as `_cut` cuts .txt files (after a line break followed by
    printable ASCII), so the parts encode to the ids of the whole; a part runs on to the next such break."""
    parts, start, n = [], 0, len(text)

    def ok(i: int) -> bool:
        return "!" <= text[i + 1:i + 2] <= "~"

    while n - start > size:
        i = text.rfind("\n", start, start + size)
        while i >= start and not ok(i):
            i = text.rfind("\n", start, i)
        if i < start:  # no break in the window: the first one after it
            i = text.find("\n", start + size)
            while i != -1 and not ok(i):
                i = text.find("\n", i + 1)
            if i == -1:
                break
        parts.append(text[start:i + 1])
        start = i + 1
    parts.append(text[start:])
    return parts


def _txt_segments(u: int, unit: Unit, skip: int) -> Iterator[Segment]:
    piece, line, buf = 0, 1, b""
    try:
        with open(unit.path, "rb") as fh:
            while True:
                block = fh.read(PIECE_BYTES)
                buf += block
                end = len(block) < PIECE_BYTES  # a file reads short only at its end
                cut = len(buf) if end else _cut(buf)
                if cut == 0:
                    continue  # one very long line: read on
                data, buf = buf[:cut], buf[cut:]
                if piece >= skip:
                    yield Segment(u, piece, 1, "text", data, unit.path, unit.name, line=line)
                line += data.count(b"\n")
                piece += 1
                if end:
                    return
    except OSError as e:
        yield Segment(u, piece, 1, "bad", f"{unit.path}:{line}: cannot read ({e.strerror or e})", unit.path, unit.name)


def _blocks(unit: Unit) -> Iterator[bytes]:
    """The bytes of a JSONL file, decompressed as they come: everything before a damaged or truncated part comes
    out, then an EOFError (truncated) or zlib/zstd error (damaged) says what stopped it."""
    with open(unit.path, "rb") as fh:
        raw_blocks = iter(lambda: fh.read(BLOCK_BYTES), b"")
        if not unit.compression:
            yield from raw_blocks
            return
        if unit.compression == "gz":
            new: Any = lambda: zlib.decompressobj(wbits=31)  # noqa: E731 - gzip framing (and multi-member files)
        else:
            zstd = _need("zst")
            new = lambda: zstd.ZstdDecompressor().decompressobj()  # noqa: E731
        d, in_frame = new(), False
        for raw in raw_blocks:
            while True:
                if unit.compression == "gz":  # bounded output per call: a highly compressed block stays small
                    out, raw = d.decompress(raw, BLOCK_BYTES), d.unconsumed_tail
                    more = len(out) == BLOCK_BYTES  # zlib may hold more output back: ask again
                else:
                    out, raw, more = d.decompress(raw), b"", False
                in_frame = True
                if out:
                    yield out
                if d.eof:  # the end of one member/frame: another may follow (what is left is in unused_data)
                    raw, d, in_frame, more = d.unused_data, new(), False, False
                if not (raw or more):
                    break
        if in_frame:
            raise EOFError("the file ends before the end of its compressed data: truncated?")


def _jsonl_segments(u: int, unit: Unit, skip: int) -> Iterator[Segment]:
    row, rest = 0, b""
    try:
        for block in itertools.chain(_blocks(unit), [b""]):
            data = rest + block
            if not data:
                return
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            n = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            if row < skip:  # continuing: drop the lines already done, without parsing them
                drop = min(n, skip - row)
                at = -1
                for _ in range(drop if drop < n else 0):  # fewer than n: each dropped line ends in "\n"
                    at = data.index(b"\n", at + 1)
                data, row, n = (data[at + 1:] if drop < n else b""), row + drop, n - drop
            if n:
                yield Segment(u, row, n, "lines", data, unit.path, unit.name)
            row += n
            if not block:
                return
    except Exception as e:  # OSError, EOFError, zlib.error, zstandard.ZstdError (no OSError)
        if not isinstance(e, (OSError, EOFError, zlib.error)) and type(e).__name__ != "ZstdError":
            raise
        what = {"gz": "gzip ", "zst": "zstd "}.get(unit.compression, "")
        msg = f"truncated or corrupt {what}data ({e})" if what else f"cannot read ({e})"
        yield Segment(u, row, 1, "bad", f"{unit.path}:{row + 1}: {msg}; the rest of the file is unreadable",
                      unit.path, unit.name)


def _parquet_segments(u: int, unit: Unit, skip: int, field: str) -> Iterator[Segment]:
    _need("parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = skip

    def bad(msg: str) -> Segment:
        return Segment(u, row, 1, "bad", f"{unit.path}:{row + 1}: {msg}", unit.path, unit.name)

    try:
        pf = pq.ParquetFile(unit.path)
        schema = pf.schema_arrow
        if field not in schema.names:
            yield bad(f"no column '{field}' (columns: {', '.join(schema.names)}); choose one with --text-field")
            return
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            yield bad(f"column '{field}' holds {schema.field(field).type}, not text")
            return
        columns = [field] + (["name"] if "name" in schema.names and field != "name" else [])
        groups, first = [], 0  # skip whole row groups of a continued file without reading them
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > skip:
                groups.append(g)
            else:
                first += n
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=VALUE_ROWS, row_groups=groups, columns=columns):
            texts = batch.column(0).to_pylist()
            names = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            lo = max(0, skip - first)
            if lo < len(texts):
                yield Segment(u, first + lo, len(texts) - lo, "values", (texts[lo:], names[lo:]), unit.path,
                              unit.name)
            first += len(texts)
            row = max(skip, first)
    except (OSError, pa.ArrowException) as e:
        yield bad(f"not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _rows(unit: Unit, field: str) -> Iterator[tuple[Any, Any]]:
    """(text, name) of every row of a built-in source or a Hugging Face dataset."""
    if unit.kind == "package":
        yield from ((d.text, d.name) for d in _package_docs(unit.path))
    elif unit.kind == "arithmetic":
        yield from ((d.text, d.name) for d in arithmetic_docs())
    else:
        datasets = _need("hf")
        loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:  # their warnings (e.g. each failed request when offline) would come before our one line
            lg.setLevel(logging.ERROR)
        try:
            ds = datasets.load_dataset(unit.path, unit.config or None, split="train", streaming=True)
        except Exception as e:  # the hub raises many kinds; one line is what the user needs
            raise CakeError(f"--data {unit.name}: could not load the dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
        for row in ds:
            yield (row.get(field) if isinstance(row, dict) else None), None


def _value_segments(u: int, unit: Unit, skip: int, rows: Iterator[tuple[Any, Any]]) -> Iterator[Segment]:
    row, where = skip, (unit.path if unit.kind != "hf" else unit.name)
    rows = itertools.islice(rows, skip, None)
    while True:
        try:
            batch = list(itertools.islice(rows, VALUE_ROWS))
        except CakeError:
            raise
        except Exception as e:  # a dataset read over the network can fail at any row
            raise CakeError(f"--data {unit.name}: reading row {row + 1} failed ({type(e).__name__}: {e})") from None
        if not batch:
            return
        texts, names = (list(t) for t in zip(*batch))
        yield Segment(u, row, len(batch), "values", (texts, names), where, unit.name)
        row += len(batch)


# ----------------------------------------------------------------------------------------------------------------
# Parsing (worker processes)


def in_val(doc: Doc, val_fraction: float) -> bool:
    """Whether a document is held out: the first 64 bits of its split key (sources._split_key) below the fraction."""
    return int(_split_key(doc)[:16], 16) < val_fraction * 2.0**64


def parse(seg: Segment, text_field: str, val_fraction: float) -> Iterator[Item | Bad]:
    """The documents (and bad rows) of a segment, in order."""
    if seg.kind == "bad":
        yield Bad(seg.unit, seg.row, seg.data)
    elif seg.kind == "text":
        try:
            text = seg.data.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as e:
            line = seg.line + seg.data.count(b"\n", 0, e.start)
            yield Bad(seg.unit, seg.row, f"{seg.where}:{line}: not UTF-8 text (invalid byte at offset {e.start})")
            return
        if seg.row == 0 and seg.last and not text.strip():
            return  # a blank file, as sources.py skips it
        yield Item(seg.unit, seg.row, text, len(text.encode("utf-8")), in_val(Doc(seg.name, text), val_fraction),
                   seg.row == 0)
    elif seg.kind == "lines":
        lines = seg.data.split(b"\n")
        for i, raw in enumerate(lines[:seg.rows]):
            row = seg.row + i
            where = f"{seg.where}:{row + 1}"
            try:
                line = raw.decode("utf-8-sig" if row == 0 else "utf-8").strip()
            except UnicodeDecodeError as e:
                yield Bad(seg.unit, row, f"{where}: not UTF-8 (invalid byte at column {e.start + 1})")
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Bad(seg.unit, row, f"{where}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                obj = {}
            yield from _item(seg, row, obj.get(text_field), obj.get("name"), text_field,
                             f'{where}: expected an object with a string "{text_field}" field', val_fraction)
    else:
        for i, (text, name) in enumerate(zip(*seg.data)):
            row = seg.row + i
            yield from _item(seg, row, text, name, text_field,
                             f'{seg.where}:{row + 1}: no string "{text_field}" value', val_fraction)


def _item(seg: Segment, row: int, text: Any, name: Any, text_field: str, missing: str, val_fraction: float
          ) -> Iterator[Item | Bad]:
    if not isinstance(text, str):
        yield Bad(seg.unit, row, missing)
        return
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        yield Bad(seg.unit, row, f"{seg.where}:{row + 1}: the \"{text_field}\" holds a lone surrogate (not Unicode "
                                 "text)")
        return
    if not text.strip():
        return
    doc = Doc(name, text) if isinstance(name, str) and name else Doc(f"{seg.name}:{row + 1}", text, named=False)
    yield Item(seg.unit, row, text, nbytes, in_val(doc, val_fraction), True)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer's training sample


def sample_texts(units: list[Unit], nbytes: int, text_field: str, val_fraction: float, skip_bad_lines: bool
                 ) -> Iterator[str]:
    """Texts of training documents (and .txt pieces) to train the tokenizer on: about `nbytes` of UTF-8 text
    (0 = every training document), spread over the units by their size on disk (a unit of unknown size counts as
    the average known one): unit i is read from its start while the sample so far is below nbytes times the share
    of the corpus up to and including unit i. So a few big files each give their first documents, and of many
    small files an even selection gives theirs. Bad rows are refused or skipped as in the tokenization."""
    known = [u.size for u in units if u.size >= 0]
    sizes = [u.size if u.size >= 0 else (sum(known) / len(known) if known else 1) for u in units]
    total, got, seen = max(1.0, sum(sizes)), 0, 0.0
    for u, unit in enumerate(units):
        seen += sizes[u]
        target = nbytes * seen / total
        if nbytes and got >= target:
            continue
        for seg in _with_last(_unit_segments(u, unit, 0, text_field)):
            for it in parse(seg, text_field, val_fraction):
                if isinstance(it, Bad):
                    if not skip_bad_lines:
                        raise refused(it.message)
                elif not it.val:
                    yield it.text
                    got += it.nbytes
            if nbytes and got >= target:
                break
