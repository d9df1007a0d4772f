"""`cakelm serve`'s OpenAI API beyond plain text (issue 19): log-probs and echo as OpenAI defines them (checked
against the model's own forward pass), the tokenizer routes lm-evaluation-harness uses, and backpressure: a 429
with Retry-After beyond the queue, /health's counts, and /metrics read back with prometheus_client's parser."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cakelm.checkpoint import load_model
from cakelm.common import CakeError
from cakelm.engine import Engine, SamplingParams
from cakelm.serve import ServeConfig, build_app
from tests.serving import make_chat_checkpoint, running

PROMPT = "KING.\nGood lord, what news"


@pytest.fixture(scope="module")
def ckpt(tok_dir, tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("serve_api") / "ckpt", tok_dir)


@pytest.fixture(scope="module")
def server(ckpt):
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=32, device="cpu"))
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def model(ckpt):
    model, tok, _ = load_model(ckpt)
    return model, tok


def raw_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of the model's logits over ids, from one plain forward pass (row t predicts t + 1)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def test_prompt_logprobs_in_chunks_equal_one_forward_pass(model) -> None:
    model, tok = model
    ids = tok.encode(PROMPT + " tonight, my liege?", bos=True)
    engine = Engine(model, tok)
    whole, chunked = engine.prompt_logprobs(ids, top_k=2), engine.prompt_logprobs(ids, top_k=2, chunk=3)
    ref = raw_logprobs(model, ids)
    assert whole[0] is None and chunked[0] is None and len(whole) == len(chunked) == len(ids)
    for t in range(1, len(ids)):
        assert whole[t].token == chunked[t].token == ids[t]
        assert whole[t].logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        assert chunked[t].logprob == pytest.approx(whole[t].logprob, abs=1e-5)
        assert [i for i, _ in whole[t].top] == ref[t - 1].topk(2).indices.tolist()
    with pytest.raises(CakeError, match="1 to 128 tokens"):
        engine.prompt_logprobs([1] * 129)


def test_completion_logprobs_with_echo(client, model) -> None:
    model, tok = model
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    (c,) = r.choices
    lp = c.logprobs
    prompt_ids = tok.encode(PROMPT, bos=True)
    n_prompt, n_gen = len(prompt_ids), r.usage.completion_tokens
    assert r.usage.prompt_tokens == n_prompt and n_gen > 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + n_gen
    assert c.text.startswith(PROMPT)
    assert lp.tokens[0] == "<|bos|>" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the prompt's tokens: their text at their offsets, their log-probs those of a plain forward pass
    for i in range(1, n_prompt):
        assert c.text[lp.text_offset[i]:lp.text_offset[i] + len(lp.tokens[i])] == lp.tokens[i]
    ref = raw_logprobs(model, prompt_ids)
    want = [ref[t - 1, prompt_ids[t]].item() for t in range(1, n_prompt)]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(want, abs=1e-4)
    top3 = ref[:-1].topk(3, dim=-1).values
    for t in range(1, n_prompt):  # the 3 most likely tokens, and the chosen one
        top = lp.top_logprobs[t]
        assert lp.tokens[t] in top and 3 <= len(top) <= 4
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(top3[t - 1].tolist(), abs=1e-4)
    # greedy: each generated token is its position's most likely one, exactly (lm-eval's is_greedy uses ==)
    for t in range(n_prompt, n_prompt + n_gen):
        assert lp.token_logprobs[t] == max(lp.top_logprobs[t].values())


def test_logprobs_are_the_raw_distribution_whatever_the_temperature(client, model) -> None:
    """At temperature 1.7 the reported log-probs are still log_softmax(logits), not of logits / 1.7 (the
    documented choice, as OpenAI and vLLM report them)."""
    model, tok = model
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.7, seed=3, logprobs=0)
    prompt_ids = tok.encode(PROMPT, bos=True)
    (alone,) = Engine(model, tok).generate([prompt_ids], SamplingParams(5, 1.7, seed=3, stop_ids=(tok.bos_id,)))
    lp = r.choices[0].logprobs
    assert r.choices[0].text == alone.text and len(lp.tokens) == len(alone.ids)
    assert lp.text_offset[0] == len(PROMPT)  # without echo, offsets still count the prompt (as OpenAI's do)
    ids = prompt_ids + alone.ids
    ref = raw_logprobs(model, ids)
    n = len(prompt_ids)
    raw = [ref[n - 1 + i, t].item() for i, t in enumerate(alone.ids)]
    scaled = [torch.log_softmax(model(torch.tensor([ids]))[0, n - 1 + i].float() / 1.7, -1)[t].item()
              for i, t in enumerate(alone.ids)]
    assert lp.token_logprobs == pytest.approx(raw, abs=1e-4)
    assert lp.token_logprobs != pytest.approx(scaled, abs=1e-3)
    assert all(len(top) == 1 for top in lp.top_logprobs)  # logprobs 0: the chosen token alone


def test_echo_with_max_tokens_0_scores_token_prompts(server, model) -> None:
    """What lm-evaluation-harness sends: token-id prompts (taken as they are, no BOS added), echo, max_tokens 0
    or 1; the reply has one entry per prompt token (plus the generated one)."""
    model, tok = model
    prompts = [tok.encode("Who wears the crown? the king"), tok.encode("FOOL.\nWhat")]
    for max_tokens in (0, 1):
        r = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": max_tokens,
                                                         "temperature": 0, "logprobs": 1, "echo": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == max_tokens * len(prompts)
        for choice, ids in zip(sorted(body["choices"], key=lambda c: c["index"]), prompts):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
            assert choice["text"].startswith(tok.decode(ids))
            ref = raw_logprobs(model, ids)
            want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
            assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
            assert choice["finish_reason"] == "length"
    r = httpx.post(server + "/v1/completions", json={"prompt": "KING.", "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "KING." and r["choices"][0]["logprobs"] is None  # echo alone: no model run


def test_streamed_logprobs_equal_plain(client) -> None:
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(**kw).choices[0]
    text, tokens, lps = "", [], []
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
    assert text == plain.text and tokens == plain.logprobs.tokens and lps == plain.logprobs.token_logprobs


def test_chat_logprobs(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hail!"}], max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    (c,) = r.choices
    content = c.logprobs.content
    ended = c.finish_reason == "stop"  # a stop token is generated but not reported
    assert len(content) == r.usage.completion_tokens - ended > 0
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob  # greedy
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.bytes and (e.token.startswith("bytes:") or bytes(e.bytes) == e.token.encode())
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hail!"}],
                                           max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.message.content


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ("/v1/completions", {"prompt": [[1, 2, 100_000]]}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprob_requests_get_400(server, path, body, param) -> None:
    r = httpx.post(server + path, json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_tokenizer_routes(server, model, ckpt) -> None:
    _, tok = model
    text = "KING.\nGood night, sweet lord"
    r = httpx.post(server + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert httpx.post(server + "/tokenize", json={"prompt": text}).json()["tokens"] == tok.encode(text, bos=True)
    info = httpx.get(server + "/tokenizer_info").json()
    assert info["eos_token"] == "<|end|>" and info["model_max_length"] == 128
    eos = httpx.post(server + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [tok.end_id]  # a special token's name is that token (how clients find its id)
    assert httpx.post(server + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), api_key="s3cret", device="cpu"))
    with running(app) as url:  # with a key, the tokenizer routes need it as /v1 does
        assert httpx.get(url + "/tokenizer_info").status_code == 401
        assert httpx.get(url + "/tokenizer_info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Backpressure and metrics


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def gate_model(monkeypatch, model) -> tuple[threading.Event, threading.Event, list[int]]:
    """Hold the model's first forward pass until `release` is set (`started` says it began); `widths` records the
    batch width of every forward pass."""
    started, release, widths = threading.Event(), threading.Event(), []
    forward = model.forward

    def gated(idx, *args, **kw):
        started.set()
        assert release.wait(60)
        widths.append(idx.size(0))
        return forward(idx, *args, **kw)

    monkeypatch.setattr(model, "forward", gated)
    return started, release, widths


def test_429_beyond_the_queue_health_and_metrics(ckpt, monkeypatch) -> None:
    """With 1 generating and 1 queued, a third request gets a 429 with Retry-After at once; /health and /metrics
    count them; a queued request whose client leaves frees its place at once. A gate, not time, holds the first
    request in the model."""
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=8, device="cpu",
                                max_concurrency=1, max_queued=1))
    st = app.state.server
    started, release, _ = gate_model(monkeypatch, st.engine.model)
    submitted, cancelled = threading.Semaphore(0), threading.Semaphore(0)
    submit, cancel = st.batcher.submit, st.batcher.cancel

    def counted_submit(*args):
        req = submit(*args)
        submitted.release()
        return req

    def counted_cancel(req):
        waiting = req.state == "queued"
        cancel(req)
        if waiting:
            cancelled.release()

    monkeypatch.setattr(st.batcher, "submit", counted_submit)
    monkeypatch.setattr(st.batcher, "cancel", counted_cancel)
    body = {"model": "tiny", "prompt": "KING.", "max_tokens": 3, "temperature": 0}
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        assert started.wait(30) and submitted.acquire(timeout=30)
        # a queued request whose client hangs up stops counting at once
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(url).port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(data) + data)
            assert submitted.acquire(timeout=30)
            assert httpx.get(url + "/health").json()["queued"] == 1
        assert cancelled.acquire(timeout=30)
        second = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        assert submitted.acquire(timeout=30)
        health = httpx.get(url + "/health").json()
        assert (health["running"], health["queued"], health["max_concurrency"], health["max_queued"]) == (1, 1, 1, 1)
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "--max-queued 1" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(**body)
        m = metrics(url)
        assert m[("cakelm_num_requests_running", ())] == 1 and m[("cakelm_num_requests_waiting", ())] == 1
        release.set()
        answers = [first.result(), second.result()]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["choices"] == answers[1].json()["choices"]  # greedy: the same text
        assert httpx.get(url + "/health").json()["running"] == 0
        # n = 2 needs 2 rows of a batch of 1: refused, not queued for ever
        r = httpx.post(url + "/v1/completions", json={**body, "n": 2})
        assert r.status_code == 400 and "--max-concurrency" in r.json()["error"]["message"]
        m = metrics(url)
    requests = {dict(labels)["status"]: v for (name, labels), v in m.items() if name == "cakelm_requests_total"
                and dict(labels)["endpoint"] == "/v1/completions"}
    # the request whose client hung up is counted as nginx logs it, 499
    assert requests == {"200": 2, "400": 1, "429": 2, "499": 1}
    generated = sum(a.json()["usage"]["completion_tokens"] for a in answers)
    assert m[("cakelm_generation_tokens_total", ())] == generated >= 2
    assert m[("cakelm_prompt_tokens_total", ())] == 2 * 3  # "KING." is <|bos|> + 2 tokens
    assert m[("cakelm_time_to_first_token_seconds_count", ())] == 2
    assert m[("cakelm_inter_token_latency_seconds_count", ())] == generated - 2
    assert m[("cakelm_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 2
    assert (m[("cakelm_num_requests_running", ())], m[("cakelm_num_requests_waiting", ())]) == (0, 0)


def test_metrics_count_tokens_of_real_requests(ckpt) -> None:
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=8, device="cpu"))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        a = client.completions.create(model="tiny", prompt=["KING.", "FOOL. What"], max_tokens=5, temperature=0)
        b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           n=2, temperature=1.0, seed=1)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])
        m = metrics(url)
    assert m[("cakelm_prompt_tokens_total", ())] == a.usage.prompt_tokens + b.usage.prompt_tokens
    generated = a.usage.completion_tokens + b.usage.completion_tokens
    assert m[("cakelm_generation_tokens_total", ())] == generated
    assert m[("cakelm_inter_token_latency_seconds_count", ())] == generated - 4  # 4 choices' first tokens
    assert m[("cakelm_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert m[("cakelm_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert m[("cakelm_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "404")))] == 1
    assert json.loads(json.dumps(m[("cakelm_time_to_first_token_seconds_sum", ())])) > 0


def test_max_concurrency_runs_requests_in_one_batch(ckpt, monkeypatch) -> None:
    """--max-concurrency 2: two requests decode in the same forward passes (batch width 2), and their answers are
    those each gets alone; with --max-queued 0 a third request gets a 429 while both run."""
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=8, device="cpu",
                                max_concurrency=2, max_queued=0))
    st = app.state.server
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0} for p in ("KING.", "FOOL. What")]
    with running(app) as url:
        alone = [httpx.post(url + "/v1/completions", json=b, timeout=60).json()["choices"] for b in bodies]
        started, release, widths = gate_model(monkeypatch, st.engine.model)
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(httpx.post, url + "/v1/completions", json=b, timeout=60) for b in bodies]
            assert started.wait(30)
            for _ in range(300):  # both admitted: the second waits behind the gate with the first
                if st.batcher.counts() == (2, 0):
                    break
                time.sleep(0.01)
            assert st.batcher.counts() == (2, 0)
            assert httpx.post(url + "/v1/completions", json=bodies[0]).status_code == 429
            release.set()
            assert [a.result().json()["choices"] for a in answers] == alone
    assert 2 in widths  # a decode step ran both rows at once


def test_one_log_line_per_request(ckpt, capsys) -> None:
    """`cakelm serve` prints a line per API request when it ends: method, path, status, prompt + completion
    tokens (streamed or not) and seconds; refusals get a line too."""
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=8, device="cpu"))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        a = client.completions.create(model="tiny", prompt="KING.", max_tokens=5, temperature=0)
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cakelm serve: ")]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"cakelm serve: POST /v1/completions 200 3+{a.usage.completion_tokens} tokens ")
    assert re.match(r"cakelm serve: POST /v1/chat/completions 200 \d+\+[1-4] tokens \d+\.\d\ds$", lines[1])
    assert lines[2].startswith("cakelm serve: POST /v1/completions 404 ") and "tokens" not in lines[2]
    assert all(line.endswith("s") and float(line.rsplit(" ", 1)[1][:-1]) >= 0 for line in lines)
