"""The label database: pairs of replies to one prompt, and the judgements people (or the rule-based rater) give
them, in one SQLite file. `cakelm label` serves it on a web page; `cakelm label export` turns it into the
preference JSONL that `cakelm reward` and `cakelm dpo` read.

    store = LabelStore("runs/default/label.db")               # created if new (WAL mode, durable commits)
    ids = store.add_pairs([{"prompt": [{"role": "user", "content": "Hi!"}], "a": "Hello.", "b": "hdfk",
                            "ended_a": True, "ended_b": False, "model_a": "sft", "model_b": "sft"}], round=1)
    pair = store.next_pair("alice")                          # one alice has not judged, least-judged first
    store.record(pair["id"], "alice", "a", reason="on topic")  # committed before it returns
    rows, counts = store.export_rows()                       # TRL preference rows, by majority vote

Durability: every judgement is its own transaction, committed (WAL, synchronous=FULL) before `record` returns,
so whatever a labeller was told is saved survives a killed server or a power cut. One connection is shared by
all threads behind a lock (SQLite serialises writers anyway); other processes may open the file at the same
time (busy_timeout makes them wait their turn rather than fail).

Labellers are counted by their normalised names (`normalise_name`: case, Unicode NFKC, invisible characters), so
names that only look different are one labeller with one vote per pair; the store keeps the normalised name.

Export policy, per pair: the choice more of its labellers made than any other (the majority; a draw between
two choices is "split"). "a" or "b" gives a preference row (chosen = the winner); "tie", "both_bad" and split
votes give none (a pair of equals or of two bad replies teaches a Bradley-Terry reward model nothing), and are
counted in the export's counts as "ties", "both_bad" and "split".
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cakelm.chat_format import validate
from cakelm.common import CakeError
from cakelm.data.prefs import write_prefs

CHOICES = ("a", "b", "tie", "both_bad")
MAX_REASON = 2000  # characters of a judgement's free-text reason
MAX_LABELLER = 64  # characters of a labeller's name
FORMAT = "cakelm-labels"  # meta.format of a label database
VERSION = 1

# IF NOT EXISTS / OR IGNORE: two processes creating one database at once both succeed
SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('format', '{FORMAT}'), ('version', '{VERSION}');
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY,
    round INTEGER NOT NULL CHECK (round >= 1),
    prompt TEXT NOT NULL,          -- JSON list of messages, ending on a user turn
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    ended_a INTEGER NOT NULL,      -- 1 when the reply ended its turn itself (not cut at the token limit)
    ended_b INTEGER NOT NULL,
    model_a TEXT NOT NULL,         -- the checkpoint that wrote the reply
    model_b TEXT NOT NULL,
    fields TEXT NOT NULL,          -- JSON object: the prompt's "answer", "source", ...
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_round ON pairs (round);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY,
    pair_id TEXT NOT NULL REFERENCES pairs (id),
    labeller TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ({", ".join(f"'{c}'" for c in CHOICES)})),
    reason TEXT NOT NULL,
    shown_at REAL,                 -- when the page showed the pair (seconds since the epoch), if it says
    created REAL NOT NULL,
    UNIQUE (pair_id, labeller)
);
COMMIT;
"""


class LabelError(Exception):
    """A request the label store refuses; `status` is the HTTP status the web app answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Characters that show nothing but are not format characters (Unicode category Cf, also removed): the combining
# grapheme joiner, Hangul fillers and the variation selectors.
INVISIBLE = frozenset("\u034f\u115f\u1160\u3164\uffa0" + "".join(map(chr, range(0xFE00, 0xFE10))))


def normalise_name(name: str) -> str:
    """A labeller's name as the store counts it: Unicode NFKC, invisible characters (zero-width spaces and joiners,
    soft hyphens, ...) removed, white space collapsed, case folded. "Alice", "ALICE", "Ａｌｉｃｅ" and "Ali\u200bce"
    are one labeller, so one person cannot vote twice on a pair under a name that only looks different."""
    name = unicodedata.normalize("NFKC", name)
    name = "".join(c for c in name if unicodedata.category(c) != "Cf" and c not in INVISIBLE
                   and not 0xE0100 <= ord(c) <= 0xE01EF)
    return unicodedata.normalize("NFKC", " ".join(name.split()).casefold())


def check_labeller(name: Any) -> str:
    """A labeller's name, normalised (`normalise_name`): 1 to 64 characters, no control characters (LabelError 400
    otherwise)."""
    if not isinstance(name, str):
        raise LabelError(400, f"labeller: give a name of 1 to {MAX_LABELLER} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise LabelError(400, "labeller: the name must not contain control characters or invalid Unicode")
    norm = normalise_name(name)
    if not 1 <= len(norm) <= MAX_LABELLER:
        raise LabelError(400, f"labeller: give a name of 1 to {MAX_LABELLER} characters")
    return norm


class LabelStore:
    """Pairs and judgements in a SQLite file (see the module docstring). Safe to share between threads."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CakeError(f"{self.path}: is a directory, not a label database")
        if not self.path.exists():
            if not create:
                raise CakeError(f"{self.path}: no such label database")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise CakeError(f"{self.path}: cannot open the label database ({e})") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as e:  # "file is not a database", a locked or read-only file...
            self._db.close()
            raise CakeError(f"{self.path}: not a cakelm label database ({e})") from None
        except CakeError:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if tables and meta.get("format") != FORMAT:  # checked before the pragmas below change the file
            raise CakeError(f"{self.path}: a SQLite database, but not a cakelm label database (tables: "
                            f"{', '.join(sorted(tables))})")
        if int(meta.get("version", 0)) > VERSION:
            raise CakeError(f"{self.path}: label database version {meta['version']} is newer than this cakelm "
                            f"reads ({VERSION}); upgrade cakelm")
        db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; a commit appends to the log
        db.execute("PRAGMA synchronous = FULL")  # the log is on disk before a commit returns
        db.execute("PRAGMA busy_timeout = 30000")
        db.execute("PRAGMA foreign_keys = ON")
        if not tables:
            db.executescript(SCHEMA)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success (durably, before this returns), rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:  # disk full, I/O error: end the transaction, or every later write would fail
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------------
    # pairs

    def add_pairs(self, rows: list[dict], round: int = 1) -> list[str]:
        """Store pairs of replies for `round`; returns their new ids (random, so their order says nothing).
        A row: {"prompt": messages, "a", "b", "ended_a", "ended_b", "model_a", "model_b", "fields" (optional)}."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 1:
            raise CakeError(f"round must be an integer >= 1, got {round!r}")
        now, values = time.time(), []
        for i, r in enumerate(rows):
            where = f"pair {i}"
            prompt = validate(r.get("prompt"), f"{where}: prompt")
            if prompt[-1]["role"] != "user":
                raise CakeError(f"{where}: the prompt must end on a user message")
            for key in ("a", "b", "model_a", "model_b"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise CakeError(f'{where}: "{key}" must be a non-empty string')
            fields = r.get("fields") or {}
            if not isinstance(fields, dict):
                raise CakeError(f'{where}: "fields" must be an object')
            values.append((secrets.token_hex(8), round, json.dumps(prompt, ensure_ascii=False), r["a"], r["b"],
                           int(bool(r.get("ended_a"))), int(bool(r.get("ended_b"))), r["model_a"], r["model_b"],
                           json.dumps(fields, ensure_ascii=False, default=str), now))
        with self._write() as db:
            db.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        return [v[0] for v in values]

    @staticmethod
    def _pair(r: sqlite3.Row) -> dict:
        return {"id": r["id"], "round": r["round"], "prompt": json.loads(r["prompt"]), "a": r["a"], "b": r["b"],
                "ended_a": bool(r["ended_a"]), "ended_b": bool(r["ended_b"]), "model_a": r["model_a"],
                "model_b": r["model_b"], "fields": json.loads(r["fields"]), "created": r["created"]}

    def pair(self, pair_id: str) -> dict | None:
        rows = self._read("SELECT * FROM pairs WHERE id = ?", (pair_id,))
        return self._pair(rows[0]) if rows else None

    def pairs(self, round: int | None = None) -> list[dict]:
        """The pairs of `round` (every round: None), in the order they were added."""
        return [self._pair(r) for r in self._read("SELECT * FROM pairs WHERE ?1 IS NULL OR round = ?1 ORDER BY "
                                                  "rowid", (round,))]

    def rounds(self) -> list[int]:
        return [r[0] for r in self._read("SELECT DISTINCT round FROM pairs ORDER BY round")]

    def next_pair(self, labeller: str, round: int | None = None) -> dict | None:
        """A pair of `round` that `labeller` has not judged, None when none is left. Pairs with the fewest
        judgements come first (every pair gets one label before any gets a second), at random among equals (so
        people labelling at once mostly see different pairs)."""
        rows = self._read(
            "SELECT p.*, (SELECT COUNT(*) FROM judgements j WHERE j.pair_id = p.id) AS n FROM pairs p "
            "WHERE (?1 IS NULL OR p.round = ?1) AND NOT EXISTS "
            "(SELECT 1 FROM judgements j WHERE j.pair_id = p.id AND j.labeller = ?2) ORDER BY n, RANDOM() LIMIT 1",
            (round, normalise_name(labeller)))
        return self._pair(rows[0]) if rows else None

    # ------------------------------------------------------------------------------------------------------------
    # judgements

    def record(self, pair_id: str, labeller: str, choice: str, reason: str = "", shown_at: float | None = None
               ) -> int:
        """Save one judgement and commit it; returns its id. LabelError 404: no such pair; 409: this labeller
        has judged this pair already (a double submission); 400: a bad choice, name or reason."""
        labeller = check_labeller(labeller)
        if choice not in CHOICES:
            raise LabelError(400, f"choice: must be one of {', '.join(CHOICES)}, got {choice!r}")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise LabelError(400, f"reason: at most {MAX_REASON} characters of text")
        if shown_at is not None and not (isinstance(shown_at, (int, float)) and shown_at == shown_at
                                         and abs(shown_at) != float("inf")):
            raise LabelError(400, "shown_at: must be a time in seconds since the epoch")
        try:
            with self._write() as db:
                if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                    raise LabelError(404, f"no pair with id {str(pair_id)[:80]!r}")
                cur = db.execute("INSERT INTO judgements (pair_id, labeller, choice, reason, shown_at, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (pair_id, labeller, choice, reason.strip(), shown_at, time.time()))
                return int(cur.lastrowid)
        except sqlite3.IntegrityError:  # UNIQUE (pair_id, labeller): the first submission stands
            raise LabelError(409, f"{labeller} has already judged pair {pair_id}") from None

    def judgements(self, round: int | None = None) -> list[dict]:
        """Every judgement (of the pairs of `round`), oldest first."""
        rows = self._read("SELECT j.*, p.round FROM judgements j JOIN pairs p ON p.id = j.pair_id "
                          "WHERE ?1 IS NULL OR p.round = ?1 ORDER BY j.id", (round,))
        return [{k: r[k] for k in ("id", "pair_id", "round", "labeller", "choice", "reason", "shown_at", "created")}
                for r in rows]

    def _votes(self, round: int | None = None) -> tuple[int, dict[str, list[tuple[str, str]]]]:
        """(number of pairs of `round`, {pair id: [(labeller, choice), ...]} for the pairs with judgements)."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM pairs WHERE ?1 IS NULL OR round = ?1", (round,)).fetchone()[0]
            rows = self._db.execute("SELECT j.pair_id, j.labeller, j.choice FROM judgements j JOIN pairs p ON "
                                    "p.id = j.pair_id WHERE ?1 IS NULL OR p.round = ?1 ORDER BY j.id",
                                    (round,)).fetchall()
        votes: dict[str, list[tuple[str, str]]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for pair_id, labeller, choice in rows:
            # names are normalised when recorded; a database written before that may hold "Alice" and "alice":
            # one labeller, whose first judgement stands
            who = normalise_name(labeller)
            if (pair_id, who) not in seen:
                seen.add((pair_id, who))
                votes[pair_id].append((who, choice))
        return n, votes

    def stats(self, labeller: str | None = None, round: int | None = None, target: int | None = None) -> dict:
        """Progress of `round` (every round: None): {"pairs", "judgements", "labelled" (pairs with a judgement),
        "target" (`target`, default every pair), "mine" (judgements by `labeller`; None without one),
        "agreement" (over the pairs judged by two or more labellers, the share of labeller pairs that chose
        alike; None when no pair has two), "overlap" (such pairs), "choices" ({choice: count})}."""
        n, votes = self._votes(round)
        agree = both = 0
        choices: Counter[str] = Counter()
        for vs in votes.values():
            counts = Counter(c for _, c in vs)
            choices.update(counts)
            if len(vs) >= 2:
                agree += sum(k * (k - 1) // 2 for k in counts.values())
                both += len(vs) * (len(vs) - 1) // 2
        name = None if labeller is None else normalise_name(labeller)
        return {"pairs": n, "judgements": sum(len(vs) for vs in votes.values()), "labelled": len(votes),
                "target": n if target is None else target,
                "mine": None if name is None else sum(who == name for vs in votes.values() for who, _ in vs),
                "agreement": agree / both if both else None, "overlap": sum(len(vs) >= 2 for vs in votes.values()),
                "choices": {c: choices.get(c, 0) for c in CHOICES}}

    def export_rows(self, rounds: list[int] | None = None) -> tuple[list[dict], dict]:
        """Preference rows of the pairs of `rounds` (every round: None) decided by their judgements (see the
        module docstring), in the TRL format with "round", "pair_id", "labellers" and the pair's fields; and
        counts: {"pairs", "unlabelled", "exported", "ties", "both_bad", "split", "judgements"}."""
        wanted = None if rounds is None else set(rounds)
        _, votes = self._votes(None)
        rows: list[dict] = []
        counts = dict.fromkeys(("pairs", "unlabelled", "exported", "ties", "both_bad", "split", "judgements"), 0)
        for p in self.pairs():
            if wanted is not None and p["round"] not in wanted:
                continue
            counts["pairs"] += 1
            vs = votes.get(p["id"], [])
            counts["judgements"] += len(vs)
            if not vs:
                counts["unlabelled"] += 1
                continue
            ranked = Counter(c for _, c in vs).most_common()
            if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
                counts["split"] += 1
                continue
            winner = ranked[0][0]
            if winner in ("tie", "both_bad"):
                counts["ties" if winner == "tie" else "both_bad"] += 1
                continue
            chosen, rejected = (p["a"], p["b"]) if winner == "a" else (p["b"], p["a"])
            row = {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
            row.update({k: v for k, v in p["fields"].items() if k not in row})
            row.update({"round": p["round"], "pair_id": p["id"], "labellers": sorted(who for who, _ in vs)})
            rows.append(row)
            counts["exported"] += 1
        return rows, counts


def export(db: str | Path, out: str | Path, rounds: list[int] | None = None) -> dict:
    """Write the preference rows of `db` (rounds `rounds`, default all) to `out` (JSONL); returns the counts."""
    with LabelStore(db, create=False) as store:
        have = store.rounds()
        missing = sorted(set(rounds or []) - set(have))
        if missing:
            raise CakeError(f"{db}: no pairs of round {', '.join(map(str, missing))} (rounds: "
                            f"{', '.join(map(str, have)) or 'none'})")
        rows, counts = store.export_rows(rounds or None)
    if not rows:
        raise CakeError(f"{db}: no pair has a preference to export ({counts['pairs']} pairs: {counts['unlabelled']} "
                        f"unlabelled, {counts['ties']} ties, {counts['both_bad']} both bad, {counts['split']} split)")
    write_prefs(out, rows)
    return counts
