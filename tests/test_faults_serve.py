"""Hostile and clumsy requests against `cakelm serve` and `cakelm label` (issue 22): DNS rebinding (Host),
cross-site pages (Origin, text/plain POSTs), invalid Unicode, empty keys, a network-wide bind without a key,
stuffed votes, an abandoned non-streaming request, huge stop strings; and `label --prompts arithmetic`, and chat
or serve on a reward model."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from cakelm.common import CakeError
from cakelm.config import ConfigError
from cakelm.data.labels import LabelStore, export
from cakelm.engine import RowText
from cakelm.label import LabelConfig, create_label_app, read_labellers
from cakelm.label import main as label_main
from cakelm.serve import MAX_STOP_CHARS, ServeConfig, build_app
from cakelm.stages.chat import ChatConfig
from cakelm.stages.chat import main as chat_main
from cakelm.webapp import Hosts
from tests.conftest import tiny_checkpoint, tiny_reward_model
from tests.serving import CHROMIUM, launch_chromium, make_chat_checkpoint, running

pytestmark = pytest.mark.faults

HOST = "http://127.0.0.1:8000"  # what the test clients send as Host: the apps are bound to 127.0.0.1


@pytest.fixture(scope="module")
def chat_ckpt(tok_dir, tmp_path_factory) -> Path:
    return make_chat_checkpoint(tmp_path_factory.mktemp("faults_serve") / "sft", tok_dir)


@pytest.fixture(scope="module")
def serve_client(chat_ckpt):
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), model_name="tiny", max_tokens=16, device="cpu",
                                allowed_hosts="proxy.example"))
    with TestClient(app, base_url=HOST) as client:
        yield client


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "a": f"A{i}.", "b": f"B{i}.",
             "ended_a": True, "ended_b": True, "model_a": "m", "model_b": "m"} for i in range(n)]


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "label.db") as s:
        s.add_pairs(pair_rows(3))
        yield s


def chat_body(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hail!"}], "max_tokens": 4, "temperature": 0,
            **kw}


# ----------------------------------------------------------------------------------------------------------------
# Host and Origin (DNS rebinding, cross-site pages)


def test_host_and_origin_are_checked_on_both_servers(serve_client, store) -> None:
    label = TestClient(create_label_app(store, allowed_hosts=["proxy.example"]), base_url=HOST)
    pid = store.pairs()[0]["id"]
    vote = {"pair_id": pid, "labeller": "eve", "choice": "a"}
    for client, get, post in ((serve_client, "/v1/models", ("/v1/chat/completions", chat_body())),
                              (label, "/api/next?labeller=alice", ("/api/judgements", vote))):
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost@evil.example", ""):
            for r in (client.get(get, headers={"Host": host}),
                      client.post(post[0], json=post[1], headers={"Host": host})):
                assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1234", "[::1]:8000", "proxy.example"):
            assert client.get(get, headers={"Host": host}).status_code == 200, host
        for origin in ("http://evil.example", "https://evil.example:8000", "null", "file://", "ftp://127.0.0.1",
                       "http://localhost:3000", "http://127.0.0.1:9999", "http://10.0.0.7:8000"):
            r = client.post(post[0], json=post[1], headers={"Origin": origin})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin
        assert client.get(get, headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    assert store.judgements() == []  # nothing the refused requests sent was recorded


def test_allowed_host_names_by_bind_address() -> None:
    loop = Hosts.for_bind("127.0.0.1")
    assert all(loop.allows(h) for h in ("127.0.0.1", "localhost", "::1"))
    assert not any(loop.allows(h) for h in ("evil.example", "192.168.1.5", None))
    lan = Hosts.for_bind("0.0.0.0")  # any IP address (a rebinding attack needs a DNS name), loopback names
    assert lan.allows("192.168.1.5") and lan.allows("fe80::1") and lan.allows("localhost")
    assert not lan.allows("evil.example")
    one = Hosts.for_bind("192.168.1.5", ["Proxy.Example:443", "[fd00::2]"])
    assert one.allows("192.168.1.5") and one.allows("proxy.example") and one.allows("fd00::2")
    assert not one.allows("127.0.0.1") and not one.allows("192.168.1.6")
    assert Hosts.for_bind("127.0.0.1", ["*"]).allows("evil.example")


def test_cross_site_simple_posts_are_refused(serve_client, store) -> None:
    """A page on another site may POST text/plain, a form or no Content-Type without asking the browser first."""
    label = TestClient(create_label_app(store), base_url=HOST)
    pid = store.pairs()[0]["id"]
    for client, path, body in ((serve_client, "/v1/chat/completions", chat_body()),
                               (label, "/api/judgements", {"pair_id": pid, "labeller": "eve", "choice": "a"})):
        data = json.dumps(body).encode()
        for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = client.post(path, content=data, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error", (ctype, r.text)
        assert client.post(path, content=data, headers={"Content-Type": "application/json; charset=utf-8"}
                           ).status_code in (200, 201)
    assert [j["labeller"] for j in store.judgements()] == ["eve"]  # only the JSON one


# ----------------------------------------------------------------------------------------------------------------
# Invalid Unicode


def raw(client: TestClient, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def test_lone_surrogates_are_400_json(serve_client, store) -> None:
    bad = [('{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "messages.0.content"),
           ('{"model": "tiny", "max_tokens": 2, "prompt": "KING \\udfff."}', "prompt"),
           ('{"model": "tiny", "max_tokens": 2, "prompt": ["ok", "\\ud83d"]}', "prompt.1"),
           ('{"model": "\\ud800", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}', "model"),
           ('{"max_tokens": 2, "messages": [{"role": "user", "content": "hi", "\\udc00": 1}]}', "messages.0")]
    for text, where in bad:
        path = "/v1/completions" if '"prompt"' in text else "/v1/chat/completions"
        r = raw(serve_client, path, text)
        assert r.status_code == 400 and r.json()["error"]["param"] == where, (text, r.text)
        assert r.json()["error"]["code"] == "invalid_text"
    r = serve_client.post("/v1/chat/completions",  # the surrogate as raw (invalid) UTF-8
                          content=b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    # a surrogate pair is a character like any other
    r = raw(serve_client, "/v1/chat/completions", '{"max_tokens": 2, "messages": [{"role": "user", "content": '
                                                  '"\\ud83d\\ude00"}]}')
    assert r.status_code == 200
    label = TestClient(create_label_app(store), base_url=HOST)
    pid = store.pairs()[0]["id"]
    r = raw(label, "/api/judgements", f'{{"pair_id": "{pid}", "labeller": "ann", "choice": "a", "reason": "x\\ud800"}}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "reason"
    r = raw(label, "/api/judgements", f'{{"pair_id": "{pid}", "labeller": "\\udbff", "choice": "a"}}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "labeller"
    assert store.judgements() == []
    assert serve_client.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------------------------
# Keys and tokens


def test_empty_key_or_token_is_an_error(chat_ckpt, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAKELM_API_KEY", "from-the-environment")
    with pytest.raises(ConfigError, match="--api-key is empty"):  # no silent fall back to the environment
        build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), api_key="", device="cpu"))
    with pytest.raises(ConfigError, match="--api-key is empty"):
        build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), api_key="  ", device="cpu"))
    monkeypatch.setenv("CAKELM_API_KEY", "")
    with pytest.raises(ConfigError, match=r"\$CAKELM_API_KEY is empty"):
        build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), device="cpu"))
    with pytest.raises(ConfigError, match="--token is empty"):
        LabelConfig(ckpt=str(chat_ckpt), token="")
    monkeypatch.setenv("CAKELM_LABEL_TOKEN", "")
    with pytest.raises(ConfigError, match=r"\$CAKELM_LABEL_TOKEN is empty"):
        label_main(LabelConfig(ckpt=str(chat_ckpt), prompts=["arithmetic"], db=str(tmp_path / "l.db")))
    assert not (tmp_path / "l.db").exists()  # refused before anything was made


def test_empty_key_on_the_command_line(chat_ckpt) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CAKELM_API_KEY"}
    p = subprocess.run([sys.executable, "-m", "cakelm", "serve", str(chat_ckpt), "--api-key", ""], env=env,
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert p.returncode != 0 and "--api-key is empty" in p.stderr and "Traceback" not in p.stderr


def test_network_bind_without_a_key_is_refused(chat_ckpt, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CAKELM_API_KEY", raising=False)
    monkeypatch.delenv("CAKELM_LABEL_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        with pytest.raises(ConfigError, match="--allow-no-key"):
            build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), host=host, device="cpu"))
        with pytest.raises(ConfigError, match="--allow-no-key"):
            label_main(LabelConfig(ckpt=str(chat_ckpt), prompts=["arithmetic"], host=host,
                                   db=str(tmp_path / "l.db")))
    assert not (tmp_path / "l.db").exists()
    # with a key, or asked for, or on loopback: served
    for cfg in (dict(host="0.0.0.0", api_key="k"), dict(host="0.0.0.0", allow_no_key=True), dict(host="::1")):
        app = build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), device="cpu", **cfg))
        assert app.state.server.api_key == cfg.get("api_key")


# ----------------------------------------------------------------------------------------------------------------
# Stuffed votes


def test_per_labeller_tokens_refuse_stuffed_votes(store, tmp_path) -> None:
    pids = [p["id"] for p in store.pairs()]
    app = create_label_app(store, users={"tok-a": "Alice", "tok-b": "bob"})
    client = TestClient(app, base_url=HOST)
    alice = {"Authorization": "Bearer tok-a"}

    def vote(pid: str, headers: dict, **kw) -> httpx.Response:
        return client.post("/api/judgements", json={"pair_id": pid, "choice": "a", **kw}, headers=headers)

    assert client.get("/api/me", headers=alice).json() == {"labeller": "alice"}
    for name in ("mallory", "bob", "alice2", "Ali ce"):  # alice's token under any other name: refused
        r = vote(pids[0], alice, labeller=name)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_name", name
    assert client.get("/api/next?labeller=bob", headers=alice).status_code == 403
    assert vote(pids[0], {}).status_code == 401 and vote(pids[0], {"Authorization": "Bearer tok-c"}).status_code == 401
    assert store.judgements() == []
    r = vote(pids[0], alice)  # the name comes from the token
    assert r.status_code == 201 and r.json()["stats"]["mine"] == 1
    assert vote(pids[1], alice, labeller="ALICE").status_code == 201  # her own name, however written
    for name in (None, "Ａｌｉｃｅ", "al\u200bice"):  # a second vote on the same pair: one person, one vote
        assert vote(pids[0], alice, **({"labeller": name} if name else {})).status_code == 409
    assert client.get("/api/next", headers=alice).json()["pair"]["id"] == pids[2]
    assert vote(pids[0], {"Authorization": "Bearer tok-b"}, choice="b").status_code == 201
    assert [(j["labeller"], j["choice"]) for j in store.judgements()] == [("alice", "a"), ("alice", "a"),
                                                                            ("bob", "b")]
    counts = export(store.path, tmp_path / "out.jsonl")
    assert counts["split"] == 1 and counts["exported"] == 1  # pair 0: one vote each, not alice's three


def test_shared_token_names_count_once_however_written(store) -> None:
    """With one shared token the name is the client's word (documented); names that only look different are
    one labeller, so they cannot vote twice on a pair."""
    client = TestClient(create_label_app(store, token="shared"), base_url=HOST)
    auth = {"Authorization": "Bearer shared"}
    pid = store.pairs()[0]["id"]
    codes = [client.post("/api/judgements", json={"pair_id": pid, "labeller": name, "choice": "b"},
                         headers=auth).status_code
             for name in ("Alice", "alice", "ALICE ", "al\u200bice", "Ａｌｉｃｅ", "a\u00adlice", "Alice\ufe0f")]
    assert codes == [201] + [409] * 6
    assert [j["labeller"] for j in store.judgements()] == ["alice"]
    assert client.get("/api/me", headers=auth).json() == {"labeller": None}
    assert client.get("/api/stats?labeller=ALICE", headers=auth).json()["mine"] == 1


def test_labellers_file(tmp_path) -> None:
    f = tmp_path / "names.txt"
    f.write_text("# the team\nAlice\n\nBob Smith\n", encoding="utf-8")
    assert read_labellers(f) == ["Alice", "Bob Smith"]
    f.write_text("Alice\nbob\nALICE\n", encoding="utf-8")
    with pytest.raises(CakeError, match="line 3: 'ALICE' is the same labeller as line 1"):
        read_labellers(f)
    f.write_text("# nobody\n", encoding="utf-8")
    with pytest.raises(CakeError, match="no names"):
        read_labellers(f)
    with pytest.raises(ConfigError, match="not both"):
        LabelConfig(ckpt="x", token="t", labellers=str(f))


@pytest.mark.skipif(not CHROMIUM, reason="Debian chromium is not installed")
def test_label_page_with_a_token_of_ones_own(store) -> None:
    from playwright.sync_api import expect, sync_playwright

    app = create_label_app(store, users={"tok-a": "Alice"})
    with running(app) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.goto(url + "/")  # no token: refused, and said so
            expect(page.locator("#error")).to_contain_text("access token")
            page.goto(url + "/?token=tok-a")
            expect(page.locator("#who")).to_have_text("alice")  # no name asked: the token's
            expect(page.locator("#change-name")).to_be_hidden()
            expect(page.locator("#choice-a")).to_be_enabled()
            page.click("#choice-a")
            expect(page.locator("#mine")).to_have_text("you: 1")
        finally:
            browser.close()
    assert [j["labeller"] for j in store.judgements()] == ["alice"]


# ----------------------------------------------------------------------------------------------------------------
# An abandoned non-streaming request


def test_abandoned_request_is_cancelled(chat_ckpt, monkeypatch) -> None:
    """A client that hangs up on a non-streaming request frees its row in the batch at once: the generation stops
    long before its max_tokens (a slowed model would take seconds more), and the next request is served."""
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(chat_ckpt), model_name="tiny", max_tokens=16, device="cpu"))
    st = app.state.server
    model = st.engine.model
    forward, started, passes = model.forward, threading.Event(), []

    def slow_forward(idx, *args, **kw):  # 0.3 s a pass: the 16 tokens asked for would take ~5 s
        passes.append(time.monotonic())
        started.set()
        time.sleep(0.3)
        return forward(idx, *args, **kw)

    monkeypatch.setattr(model, "forward", slow_forward)
    with running(app) as url:
        port = urllib.parse.urlsplit(url).port
        body = json.dumps(chat_body(max_tokens=16)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert started.wait(30)
        left = time.monotonic()  # the socket is closed
        for _ in range(200):
            if st.batcher.counts() == (0, 0) and not st.batcher.decoding:
                break
            time.sleep(0.01)
        assert st.batcher.counts() == (0, 0) and not st.batcher.decoding
        time.sleep(0.7)
        # at most the pass under way and one more began after the client left, not the 16 it asked for
        assert len([t for t in passes if t > left]) <= 1 and len(passes) < 1 + 16
        monkeypatch.undo()  # the real model again: the next request is served at once
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(max_tokens=16), timeout=30)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert r.json()["usage"]["completion_tokens"] == 16  # uncut, the request runs its 16 tokens (17 passes)
        assert st.batcher.counts() == (0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Stop strings


def test_stop_strings_are_capped(serve_client) -> None:
    def post(stop) -> httpx.Response:
        return serve_client.post("/v1/chat/completions", json=chat_body(stop=stop))

    assert post("x" * MAX_STOP_CHARS).status_code == 200
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["a", "x" * 200_000], ["a", "b", "c", "d", "e"], [""]):
        r = post(stop)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


class _Chunks:
    """A tokenizer whose token i is the i-th text chunk (UTF-8)."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    def token_bytes(self, i: int) -> bytes:
        return self.chunks[i].encode()


def _naive(stops: tuple[str, ...], chunks: list[str]) -> tuple[list[str], str, str | None]:
    """The reference: search every stop string in the text not yet emitted after each token, and hold back the
    longest tail that begins a stop string (quadratic, obviously right)."""
    text, emitted, pieces, finish = "", 0, [], None
    for i, chunk in enumerate(chunks):
        text += chunk
        hits = [at for s in stops if (at := text.find(s, emitted)) >= 0]
        if hits:
            text, finish = text[:min(hits)], "stop"
        elif i == len(chunks) - 1:
            finish = "length"
        held = 0 if finish else next((n for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1)
                                      if any(s.startswith(text[-n:]) for s in stops)), 0)
        pieces.append(text[emitted:len(text) - held])
        emitted = max(emitted, len(text) - held)
        if finish:
            break
    return pieces, text, finish


def _matched(stops: tuple[str, ...], chunks: list[str]) -> tuple[list[str], str, str | None, int]:
    row, tok, pieces = RowText(0, stops), _Chunks(chunks), []
    for i in range(len(chunks)):
        pieces.append(row.push(i, 0.0, tok, (), last=i == len(chunks) - 1))
        if row.finish:
            break
    return pieces, row.text, row.finish, row.stop_steps


text_ab = st.text(alphabet="abc", min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(stops=st.lists(text_ab, min_size=1, max_size=4).map(tuple),
       chunks=st.lists(st.text(alphabet="abc", max_size=5), min_size=1, max_size=25))
def test_stop_matching_equals_the_naive_search(stops, chunks) -> None:
    pieces, text, finish, steps = _matched(stops, chunks)
    assert (pieces, text, finish) == _naive(stops, chunks)
    assert steps <= 2 * sum(map(len, chunks))


def test_stop_matching_is_linear_in_the_reply() -> None:
    """The worst case for the old check (every tail against every stop string): a long reply that keeps almost
    matching long stop strings. The automaton makes at most 2 transitions per character."""
    stops = ("a" * (MAX_STOP_CHARS - 1) + "b", "ab" * (MAX_STOP_CHARS // 2), "ba" * 499 + "c", "a" * 999 + "c")
    rng = random.Random(0)
    chunks = ["".join(rng.choice("aab") for _ in range(rng.randint(1, 6))) for _ in range(1500)]
    pieces, text, finish, steps = _matched(stops, chunks)
    assert finish == "length" and "".join(pieces) == text == "".join(chunks)  # nothing matched, all emitted
    assert steps <= 2 * len(text)
    for n in (4000, 20_000):  # the tail of a* held back each token: still linear
        pieces, text, finish, steps = _matched(stops, ["a"] * n)
        assert steps <= 2 * n and len("".join(pieces[:-1])) == n - 1 - 999  # 999 a's held back until the end


# ----------------------------------------------------------------------------------------------------------------
# label --prompts TASK, and a reward model in chat or serve


def test_label_prompts_from_a_task(tok_dir, tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "sft", tok_dir, "sft", "chat", max_seq_len=128)
    db = label_main(LabelConfig(ckpt=str(ckpt), prompts=["arithmetic"], pairs=6, rater="rule", max_new_tokens=6,
                                device="cpu", db=str(tmp_path / "label.db")))
    with LabelStore(db) as s:
        pairs = s.pairs()
        assert len(pairs) >= 1 and all(p["fields"]["task"] == "arithmetic" and "answer" in p["fields"]
                                       for p in pairs)
        assert len(s.judgements()) == len(pairs)  # the rule-based rater judged every one


def test_chat_and_serve_refuse_a_reward_model(chat_ckpt, tmp_path) -> None:
    rm = tiny_reward_model(tmp_path / "rm", chat_ckpt)
    with pytest.raises(CakeError, match="a reward model"):
        chat_main(ChatConfig(ckpt=str(rm), prompt="hi", device="cpu"))
    with pytest.raises(CakeError, match="a reward model"):
        build_app(ServeConfig(dtype="fp32", ckpt=str(rm), device="cpu"))
    # a scalar head under another stage name is a reward model too
    meta = json.loads((rm / "meta.json").read_text())
    (rm / "meta.json").write_text(json.dumps({**meta, "stage": "custom"}))
    with pytest.raises(CakeError, match="a reward model"):
        build_app(ServeConfig(dtype="fp32", ckpt=str(rm), device="cpu"))
