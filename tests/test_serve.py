"""`cakelm serve` against the official `openai` client: completions, streaming, errors, concurrency, limits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cakelm.chat_format import render_prompt, stop_rules
from cakelm.checkpoint import load_model
from cakelm.engine import Engine, SamplingParams
from cakelm.serve import ServeConfig, build_app
from tests.serving import make_chat_checkpoint, running


@pytest.fixture(scope="module")
def server(tok_dir, tmp_path_factory):
    ckpt = make_chat_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", tok_dir)
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=64, device="cpu"))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(server):
    """An engine of its own on the same checkpoint: what the model alone answers (greedy)."""
    st = server[1].state.server
    engine = Engine(*load_model(st.ckpt)[:2])

    def reply(messages, max_tokens: int) -> str:
        stop_ids, stop_strings = stop_rules(engine.tok, st.fmt)
        (c,) = engine.generate([render_prompt(messages, engine.tok, st.fmt)],
                               SamplingParams(max_tokens, 0, 0, 1.0, None, stop_ids, stop_strings))
        return c.text.strip()
    return reply


def msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_completion(client, reference) -> None:
    r = client.chat.completions.create(model="tiny", messages=msg("Hail, good king!"), max_tokens=20, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and choice.message.role == "assistant"
    assert choice.message.content == reference(msg("Hail, good king!"), 20)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 20 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_streamed_chat_equals_plain(client, reference) -> None:
    stream = client.chat.completions.create(model="tiny", messages=msg("What news?"), max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text.strip() == reference(msg("What news?"), 24) and finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 24


def test_n_seed_and_completions_endpoint(client) -> None:
    kw = dict(model="tiny", messages=msg("Sing."), max_tokens=12, temperature=1.0, n=3, seed=5)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    r = client.completions.create(model="tiny", prompt=["KING.\n", "FOOL.\n"], max_tokens=8, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.text, str) for c in r.choices)


@pytest.mark.parametrize("kw, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=65), "at most 64"),
    (dict(n=9), "n"),
    (dict(temperature=3.0), "temperature"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "unknown role 'wizard'"),
    (dict(messages=msg("word " * 200)), "context"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(seed=2**64), "seed"),
])
def test_bad_requests_get_400(client, kw, match) -> None:
    args = {"model": "tiny", "messages": msg("hi"), **kw}
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"


def test_unknown_model_and_route(client, server) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=msg("hi"))
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_body_limit_and_malformed_json(server) -> None:
    url = server[0] + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [' + b" " * 1_100_000 + b"]}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    def chunks():  # no Content-Length: the limit must hold for the bytes actually sent
        yield b'{"messages": ['
        for _ in range(12):
            yield b" " * 100_000
        yield b"]}"

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_sixteen_concurrent_streams(client, reference) -> None:
    words = "king queen lord lady crown sword night day heart blood house grace heaven earth fool friend".split()
    prompts = [f"Tell me of the {w}." for w in words]
    expected = [reference(msg(p), 16) for p in prompts]

    def stream(p: str) -> str:
        out = ""
        for chunk in client.chat.completions.create(model="tiny", messages=msg(p), max_tokens=16, temperature=0,
                                                    stream=True):
            for c in chunk.choices:
                out += c.delta.content or ""
        return out.strip()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, prompts))
    assert got == expected  # every request got its own, complete answer


def test_api_key(tok_dir, tmp_path) -> None:
    ckpt = make_chat_checkpoint(tmp_path / "c", tok_dir)
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), api_key="s3cret", device="cpu"))
    with running(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.models.list().data) == 1
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open
