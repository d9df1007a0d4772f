"""`cakelm label`: the SQLite label store, the HTTP API (errors, tokens, limits), the export policy, the rule-based
rater as a labeller, 8 concurrent labellers losing nothing, a killed server losing no acknowledged judgement, and
the command line end to end on a tiny checkpoint. The page itself is driven by Chromium in test_label_web.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from cakelm.__main__ import main as cli
from cakelm.common import CakeError
from cakelm.data.labels import CHOICES, LabelError, LabelStore, export
from cakelm.data.prefs import read_prefs
from cakelm.label import create_label_app
from cakelm.rewards import rater
from cakelm.rlhf import rule_label
from tests.conftest import tiny_checkpoint
from tests.serving import free_port, running
from tests.test_sft import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def rows(n: int, **fields) -> list[dict]:
    return [{"prompt": user(f"Question {i}?"), "a": f"Answer A{i}.", "b": f"Answer B{i}.", "ended_a": True,
             "ended_b": i % 2 == 0, "model_a": "ckpt/sft", "model_b": "ckpt/sft", "fields": dict(fields)}
            for i in range(n)]


@pytest.fixture
def store(tmp_path) -> LabelStore:
    with LabelStore(tmp_path / "label.db") as s:
        yield s


# ---------------------------------------------------------------------------------------------------------------
# the store


def test_store_round_trip(tmp_path) -> None:
    path = tmp_path / "sub" / "label.db"
    with LabelStore(path) as s:
        given = rows(3, answer="7", source="arithmetic")
        ids = s.add_pairs(given, round=1)
        ids2 = s.add_pairs(rows(2), round=2)
        assert len(set(ids + ids2)) == 5 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
        assert s.rounds() == [1, 2]
        assert [p["id"] for p in s.pairs(1)] == ids and len(s.pairs()) == 5 and s.pairs(3) == []
        assert s.pair("nope") is None
    with LabelStore(path) as s:  # reopened: everything is there
        p = s.pair(ids[1])
        assert {k: p[k] for k in given[1]} == given[1]
        assert p["round"] == 1 and p["ended_b"] is False and p["fields"] == {"answer": "7", "source": "arithmetic"}
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(CakeError, match="pair 0: prompt"):
        LabelStore(path).add_pairs([{**given[0], "prompt": []}])
    with pytest.raises(CakeError, match='pair 0: "b" must be a non-empty string'):
        LabelStore(path).add_pairs([{**given[0], "b": "  "}])
    with pytest.raises(CakeError, match="round must be an integer >= 1"):
        LabelStore(path).add_pairs(given, round=0)


def test_record_commits_and_coverage_first(store) -> None:
    ids = store.add_pairs(rows(3))
    jid = store.record(ids[0], "alice", "a", reason="  short and right  ", shown_at=1000.5)
    # another connection (another process, in real life) sees it at once: it was committed before returning
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT id, pair_id, labeller, choice, reason, shown_at FROM judgements").fetchall() == [
        (jid, ids[0], "alice", "a", "short and right", 1000.5)]
    other.close()
    # coverage before overlap: bob never gets the judged pair while unjudged ones remain
    assert {store.next_pair("bob")["id"] for _ in range(20)} == set(ids[1:])
    for i in ids[1:]:
        store.record(i, "alice", "b")
    assert store.next_pair("alice") is None
    assert store.next_pair("alice", round=2) is None and store.next_pair("bob", round=2) is None
    store.record(ids[0], "bob", "a")
    store.record(ids[1], "bob", "tie")
    s = store.stats("alice")
    assert s == {"pairs": 3, "judgements": 5, "labelled": 3, "target": 3, "mine": 3, "agreement": 0.5,
                 "overlap": 2, "choices": {"a": 2, "b": 2, "tie": 1, "both_bad": 0}}
    assert store.stats(target=10)["target"] == 10 and store.stats()["mine"] is None
    assert store.stats(round=2)["pairs"] == 0 and store.stats(round=2)["agreement"] is None
    assert [j["labeller"] for j in store.judgements()] == ["alice"] * 3 + ["bob"] * 2


def test_record_refusals(store) -> None:
    (pid,) = store.add_pairs(rows(1))
    store.record(pid, "alice", "a")
    cases = [((pid, "alice", "b"), 409), (("0123456789abcdef", "alice", "a"), 404), ((pid, "bob", "A"), 400),
             ((pid, "bob", "better"), 400), ((pid, "", "a"), 400), ((pid, "x" * 65, "a"), 400),
             ((pid, "bo\nb", "a"), 400)]
    for args, status in cases:
        with pytest.raises(LabelError) as e:
            store.record(*args)
        assert e.value.status == status, (args, str(e.value))
    with pytest.raises(LabelError, match="reason: at most 2000") as e:
        store.record(pid, "bob", "a", reason="x" * 2001)
    assert e.value.status == 400
    store.record(pid, "bob", "a", reason="x" * 2000)
    assert len(store.judgements()) == 2


def test_not_a_label_database(tmp_path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello, this is not SQLite at all " * 10)
    with pytest.raises(CakeError, match=f"{text}: not a cakelm label database"):
        LabelStore(text)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE songs (name TEXT)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(CakeError, match=f"{other}: a SQLite database, but not a cakelm label database "
                                        r"\(tables: songs\)"):
        LabelStore(other)
    assert other.read_bytes() == before  # not switched to WAL, not touched
    with pytest.raises(CakeError, match="no such label database"):
        LabelStore(tmp_path / "missing.db", create=False)
    with pytest.raises(CakeError, match="is a directory"):
        LabelStore(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def test_http_api_and_errors(store) -> None:
    ids = store.add_pairs(rows(2), round=1)
    store.add_pairs(rows(1), round=2)
    client = TestClient(create_label_app(store, token="s3cret", target=5, round=1, body_limit=2000),
                        base_url="http://127.0.0.1")  # a name the server answers to (the default is "testserver")
    auth = {"Authorization": "Bearer s3cret"}
    assert client.get("/health").json() == {"status": "ok", "pairs": 2}
    assert "cakelm label" in client.get("/").text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.get("/api/next?labeller=alice", headers=headers)
        assert r.status_code == 401 and "access token" in r.json()["error"]["message"]
        assert client.post("/api/judgements", json={"pair_id": ids[0], "labeller": "alice", "choice": "a"},
                           headers=headers).status_code == 401
    r = client.get("/api/next?labeller=alice", headers=auth)
    assert r.status_code == 200
    pair, stats = r.json()["pair"], r.json()["stats"]
    assert set(pair) == {"id", "prompt", "a", "b"} and pair["id"] in ids  # no model names, no scores; round 1 only
    assert stats["target"] == 5 and stats["pairs"] == 2 and stats["mine"] == 0

    def post(body: dict) -> httpx.Response:
        return client.post("/api/judgements", json=body, headers=auth)

    ok = {"pair_id": ids[0], "labeller": "alice", "choice": "b", "reason": "shorter", "shown_at": time.time()}
    r = post(ok)
    assert r.status_code == 201 and r.json()["stats"]["mine"] == 1 and r.json()["stats"]["labelled"] == 1
    assert store.judgements()[0]["id"] == r.json()["id"]
    r = post(ok)  # the same judgement twice (a double click that got through): one row
    assert r.status_code == 409 and "already judged" in r.json()["error"]["message"]
    assert len(store.judgements()) == 1
    bad = [({**ok, "pair_id": "feedfacefeedface"}, 404, "no pair with id"),
           ({**ok, "labeller": "bob", "choice": "c"}, 400, "choice: must be one of a, b, tie, both_bad"),
           ({"pair_id": ids[1], "labeller": "bob"}, 400, "choice: Field required"),
           ({**ok, "labeller": "bob", "colour": "red"}, 400, "colour: Extra inputs"),
           ({**ok, "labeller": "b" * 65}, 400, "labeller: give a name of 1 to 64"),
           # (well over: with 1,900 the body was 2,000 or 2,002 bytes as time.time()'s repr had 16 or 18 characters)
           ({**ok, "labeller": "bob", "reason": "x" * 1990}, 413, "larger than 2000 bytes")]
    for body, status, message in bad:
        r = post(body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    r = client.post("/api/judgements", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert client.get("/api/next", headers=auth).status_code == 400  # no labeller
    assert client.get("/api/next?labeller=", headers=auth).status_code == 400
    assert client.get("/api/stats?labeller=alice", headers=auth).json()["mine"] == 1
    assert client.get("/api/nothing", headers=auth).status_code == 404
    assert len(store.judgements()) == 1
    # the last pair of the round, then none
    post({**ok, "pair_id": ids[1]})
    assert client.get("/api/next?labeller=alice", headers=auth).json()["pair"] is None


def test_eight_concurrent_labellers_lose_nothing(store) -> None:
    ids = store.add_pairs(rows(50))
    app = create_label_app(store)

    def labeller(name: str) -> list[int]:
        acked = []
        with httpx.Client(base_url=url, timeout=30) as c:
            while (pair := c.get("/api/next", params={"labeller": name}).json()["pair"]) is not None:
                r = c.post("/api/judgements", json={"pair_id": pair["id"], "labeller": name,
                                                    "choice": CHOICES[len(acked) % 4]})
                assert r.status_code == 201, r.text
                acked.append(r.json()["id"])
        return acked

    with running(app) as url, ThreadPoolExecutor(8) as pool:
        acked = list(pool.map(labeller, [f"labeller{i}" for i in range(8)]))
        # and 8 clients posting the same judgement at once: exactly one is recorded
        same = {"pair_id": ids[0], "labeller": "carol", "choice": "a"}
        codes = list(pool.map(lambda _: httpx.post(url + "/api/judgements", json=same, timeout=30).status_code,
                              range(8)))
    assert [len(a) for a in acked] == [50] * 8
    assert sorted(codes) == [201] + [409] * 7
    rows_ = sqlite3.connect(store.path).execute("SELECT id, pair_id, labeller FROM judgements").fetchall()
    assert len(rows_) == 401 and len({(p, who) for _, p, who in rows_}) == 401
    assert {i for i, _, who in rows_ if who != "carol"} == {i for a in acked for i in a}
    s = store.stats()
    assert s["judgements"] == 401 and s["labelled"] == 50 and s["overlap"] == 50


def test_killed_server_loses_no_acknowledged_judgement(tmp_path) -> None:
    db = tmp_path / "label.db"
    with LabelStore(db) as s:
        s.add_pairs(rows(200))
    port = free_port()
    # a restart reuses the round's pairs: no checkpoint or prompts needed
    proc = subprocess.Popen([sys.executable, "-m", "cakelm", "label", str(tmp_path / "unused_ckpt"), "--db", str(db),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        acked: dict[int, tuple[str, str, str]] = {}
        lock = threading.Lock()

        def labeller(name: str) -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                try:
                    while (pair := c.get("/api/next", params={"labeller": name}).json()["pair"]) is not None:
                        choice = CHOICES[len(pair["a"]) % 4]
                        r = c.post("/api/judgements", json={"pair_id": pair["id"], "labeller": name,
                                                            "choice": choice})
                        if r.status_code == 201:
                            with lock:
                                acked[r.json()["id"]] = (pair["id"], name, choice)
                except httpx.TransportError:  # the server is gone
                    return

        threads = [threading.Thread(target=labeller, args=(f"l{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 60 and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        proc.wait(timeout=10)
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 60 <= len(acked) < 800, len(acked)
    with LabelStore(db) as s:
        saved = {j["id"]: (j["pair_id"], j["labeller"], j["choice"]) for j in s.judgements()}
    assert {i: saved.get(i) for i in acked} == acked


# ---------------------------------------------------------------------------------------------------------------
# export and the rule-based rater


def test_export_policy(store, tmp_path) -> None:
    ids = store.add_pairs(rows(6, answer="7"), round=1)
    (late,) = store.add_pairs(rows(1), round=2)
    votes = {ids[0]: "aab", ids[1]: "b", ids[2]: ["tie", "tie", "a"], ids[3]: ["both_bad"], ids[4]: "ab", late: "a"}
    for pid, choices in votes.items():
        for i, c in enumerate(choices):
            store.record(pid, f"person{i}", c)
    out_rows, counts = store.export_rows()
    assert counts == {"pairs": 7, "unlabelled": 1, "exported": 3, "ties": 1, "both_bad": 1, "split": 1,
                      "judgements": 11}
    assert out_rows == [
        {"prompt": user("Question 0?"), "chosen": [{"role": "assistant", "content": "Answer A0."}],
         "rejected": [{"role": "assistant", "content": "Answer B0."}], "answer": "7", "round": 1, "pair_id": ids[0],
         "labellers": ["person0", "person1", "person2"]},
        {"prompt": user("Question 1?"), "chosen": [{"role": "assistant", "content": "Answer B1."}],
         "rejected": [{"role": "assistant", "content": "Answer A1."}], "answer": "7", "round": 1, "pair_id": ids[1],
         "labellers": ["person0"]},
        {"prompt": user("Question 0?"), "chosen": [{"role": "assistant", "content": "Answer A0."}],
         "rejected": [{"role": "assistant", "content": "Answer B0."}], "round": 2, "pair_id": late,
         "labellers": ["person0"]}]
    out = tmp_path / "prefs.jsonl"
    assert export(store.path, out) == counts
    pairs, _ = read_prefs(out)
    assert [(p.chosen, p.rejected, p.fields["pair_id"]) for p in pairs] == [
        ("Answer A0.", "Answer B0.", ids[0]), ("Answer B1.", "Answer A1.", ids[1]), ("Answer A0.", "Answer B0.", late)]
    assert export(store.path, out, rounds=[2])["exported"] == 1 and len(read_prefs(out)[0]) == 1
    with pytest.raises(CakeError, match="no pairs of round 3 "):
        export(store.path, out, rounds=[3])
    (lone,) = store.add_pairs(rows(1), round=4)
    store.record(lone, "x", "tie")
    with pytest.raises(CakeError, match="no pair has a preference to export .1 pairs: 0 unlabelled, 1 ties"):
        export(store.path, out, rounds=[4])


def test_rule_label_applies_the_rater(store) -> None:
    polite = "I am well, thank you, and glad to hear from you on this fine day."
    cases = [  # (prompt, a, ended_a, b, ended_b, answer, expected)
        ("How are you today?", polite, True, "well", False, None, "a"),
        ("How are you today?", "well", False, polite, True, None, "b"),
        ("How are you today?", "Fine, thanks for asking me that, my good friend.", True,
         "Good, thanks for asking me that today, my friend.", True, None, "tie"),
        ("What is 5 + 7?", "dog", False, "cat hat", False, "12", "both_bad"),
        ("What is 5 + 7?", "5 + 7 = 12. The answer is 12.", True, "The answer is 13.", True, "12", "a"),
    ]
    ids = store.add_pairs([{"prompt": user(q), "a": a, "b": b, "ended_a": ea, "ended_b": eb, "model_a": "m",
                            "model_b": "m", "fields": {"answer": ans} if ans else {}}
                           for q, a, ea, b, eb, ans, _ in cases])
    counts = rule_label(store)
    assert counts == {"a": 2, "b": 1, "tie": 1, "both_bad": 1, "judged": 5, "skipped": 0}
    got = {j["pair_id"]: j for j in store.judgements()}
    assert [got[i]["choice"] for i in ids] == [c[-1] for c in cases]
    q, a, ea, b, eb, ans, _ = cases[4]
    sa, sb = (rater(q, t, answer=ans, finish_reason="stop" if e else "length") for t, e in ((a, ea), (b, eb)))
    assert (sa, sb) == (5.0, 1.8) and got[ids[4]]["reason"] == "rater: A 5.00, B 1.80"
    assert {j["labeller"] for j in got.values()} == {"rule"}
    assert rule_label(store)["skipped"] == 5 and len(store.judgements()) == 5  # judged once
    assert rule_label(store, min_gap=10, labeller="strict")["tie"] == 4


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_rule_rater_end_to_end(tok_dir, tmp_path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "run" / "sft", tok_dir, "sft", "chat", max_seq_len=96)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me of the {w}, friend {i}."}
                                                       for i, w in enumerate(["king", "queen", "night", "day"] * 6)])
    argv = ["label", str(ckpt), "--prompts", prompts, "--rater", "rule", "--pairs", "16", "--max-new-tokens", "8",
            "--min-gap", "0", "--device", "cpu"]
    assert cli(argv) == 0
    db = tmp_path / "run" / "label.db"  # default: next to the checkpoint
    with LabelStore(db) as s:
        pairs, judged = s.pairs(1), s.judgements(1)
    assert 8 <= len(pairs) <= 16 and len(judged) == len(pairs)
    assert all(p["model_a"] == p["model_b"] == str(ckpt) and p["a"] != p["b"] for p in pairs)
    assert all(p["fields"]["source"] == "prompts.jsonl" for p in pairs)
    wins = sum(j["choice"] in ("a", "b") for j in judged)
    assert wins > 0
    out = capsys.readouterr().out
    assert f"pairs for round 1 from {ckpt}" in out and f"judged {len(pairs)} pairs of round 1" in out
    # a restart reuses the pairs (no new replies) and judges nothing twice
    assert cli(argv) == 0
    assert f"round 1 has {len(pairs)} pairs" in capsys.readouterr().out
    with LabelStore(db) as s:
        assert [p["id"] for p in s.pairs()] == [p["id"] for p in pairs] and len(s.judgements()) == len(judged)
    assert cli(["label", "export", str(db), "--out", str(tmp_path / "labelled.jsonl")]) == 0
    exported, _ = read_prefs(tmp_path / "labelled.jsonl")
    assert len(exported) == wins and f"{wins} preference pairs" in capsys.readouterr().out
    assert {p.fields["labellers"][0] for p in exported} == {"rule"}
    # round 2 gets new pairs in the same database
    assert cli([*argv, "--round", "2", "--pairs", "4"]) == 0
    with LabelStore(db) as s:
        assert s.rounds() == [1, 2] and len(s.pairs(1)) == len(pairs)


@pytest.mark.parametrize("argv, match", [
    (["label", "CKPT", "--db", "NEW"], "--prompts is required: NEW does not exist yet"),
    (["label", "CKPT", "--round", "0"], "--round must be >= 1, got 0"),
    (["label", "CKPT", "--prompts", "nothing.jsonl"], "nothing.jsonl: no such file"),
    (["label", "CKPT", "--prompts", "EMPTY"], "no conversations"),
    (["label", "export", "TEXT", "--out", "o.jsonl"], "not a cakelm label database"),
    (["label", "export", "NEW", "--out", "o.jsonl"], "NEW: no such label database"),
    (["label", "export", "NEW"], "--out is required"),
    (["label", "export", "NEW", "--out", "o.jsonl", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_cli_errors_are_one_line(argv, match, tok_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database\n" * 20)
    (tmp_path / "empty.jsonl").write_text("")
    ckpt = tmp_path / "run" / "sft"
    subs = {"CKPT": str(ckpt), "NEW": str(tmp_path / "new.db"), "TEXT": str(tmp_path / "notes.txt"),
            "EMPTY": str(tmp_path / "empty.jsonl")}
    if "CKPT" in argv and "--prompts" in argv:
        tiny_checkpoint(ckpt, tok_dir, "sft", "chat", max_seq_len=96)
    assert cli([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    for k, v in subs.items():
        match = match.replace(k, v)
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new.db").exists()  # a failed command leaves no empty database behind
