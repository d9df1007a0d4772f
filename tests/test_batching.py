"""Continuous batching (issue 19): rows that join and leave a running batch get exactly what they get alone (greedy,
seeded, log-probs, stop strings, limits, a prompt prefilled in chunks, a KV cache that grows), cancellation frees
a row before the next step, the queue is bounded, a failed forward pass fails only its requests, and over HTTP
concurrent streams from the official openai client equal the same requests sent one by one."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from cakelm.batching import DONE, Batcher, Busy, PromptScores
from cakelm.common import CakeError
from cakelm.engine import Engine, SamplingParams, StreamEvent
from cakelm.model import SlotKVCache
from cakelm.serve import ServeConfig, build_app
from tests.conftest import tiny_model_config
from tests.serving import make_chat_checkpoint, running

TEXTS = ["KING.", "QUEEN.\nWhat says the fool of the house", "A", "LORD.\nMy heart and my honour, sweet",
         "FOOL.\nNuncle, give me an egg", "KENT.\nSir"]


def prompts_of(engine: Engine) -> list[list[int]]:
    return [engine.tok.encode(t, bos=True) for t in TEXTS]


def collect(batcher: Batcher, prompts, params, n: int = 1, **kw) -> list:
    """Submit a request whose items land in the returned list."""
    items: list = []
    batcher.submit(prompts, params, n, items.append, **kw)
    return items


def tokens(items: list, row: int = 0) -> list[int]:
    return [e.token_id for e in items if isinstance(e, StreamEvent) and e.row == row]


def run(batcher: Batcher) -> int:
    steps = 0
    while batcher.step():
        steps += 1
    return steps


def test_rows_joining_a_running_batch_get_what_they_get_alone(engine: Engine) -> None:
    """Requests arrive while others generate (one every 3 steps), with different lengths, limits, temperatures
    and seeds; each gets the tokens, text and log-probs Engine.generate gives it alone."""
    prompts = prompts_of(engine)
    params = [SamplingParams(max_new_tokens=12 + 3 * i, temperature=0.0 if i % 2 else 0.9, top_p=0.95, seed=i,
                             logprobs=True) for i in range(len(prompts))]
    batcher = Batcher(engine, slots=4)
    streams = []
    for p, sp in zip(prompts, params):
        streams.append(collect(batcher, [p], sp))
        for _ in range(3):
            batcher.step()
    run(batcher)
    for p, sp, items in zip(prompts, params, streams):
        (alone,) = engine.generate([p], sp)
        assert tokens(items) == alone.ids and items[-1] is DONE
        assert "".join(e.text for e in items[:-1]) == alone.text
        assert items[-2].finish_reason == alone.finish_reason
        texts = Batcher(engine, slots=1).generate([p], sp)
        assert texts[0].logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_bulk_generate_equals_the_engine_and_refills_rows(engine: Engine) -> None:
    """Batcher.generate (2 slots for 6 prompts x 2 samples) returns what Engine.generate does, with seeds per
    prompt, and its decode steps never run more rows than there are slots."""
    prompts = prompts_of(engine)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, logprobs=True)
    seeds = [11, 12, 13, 14, 15, 16]
    batcher = Batcher(engine, slots=4)
    widths: list[int] = []
    forward = engine.model.forward

    def spy(idx, *a, **kw):
        widths.append(idx.size(0))
        return forward(idx, *a, **kw)

    engine.model.forward = spy
    try:
        got = batcher.generate(prompts, params, n=2, seeds=seeds)
    finally:
        del engine.model.forward
    want = engine.generate(prompts, params, n=2, seeds=seeds)
    assert [(c.prompt_index, c.ids, c.text, c.finish_reason) for c in got] == \
        [(c.prompt_index, c.ids, c.text, c.finish_reason) for c in want]
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert max(widths) <= 4 and batcher.counts() == (0, 0) and sorted(batcher.free) == [0, 1, 2, 3]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(engine: Engine) -> None:
    """chunk=4: a 30-token prompt takes 8 prefill steps, in each of which the running row still gets a token;
    both outputs equal generation alone. A KV cache that starts at 8 positions grows as the rows need."""
    long = engine.tok.encode("LORD.\nMy heart and my honour, sweet madam, the king is gone", bos=True)[:30]
    assert len(long) == 30
    short = prompts_of(engine)[0]
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    batcher = Batcher(engine, slots=2, chunk=4)
    batcher.cache = SlotKVCache(engine.model.cfg, 2, "cpu", length=8)
    first = collect(batcher, [short], greedy)
    batcher.step()
    second = collect(batcher, [long], greedy)
    for _ in range(8):
        assert not tokens(second)  # still coming in
        before = len(tokens(first))
        batcher.step()
        assert len(tokens(first)) == before + 1  # the running stream kept flowing
    # the last chunk's step sampled its first token from the prefill and decoded a second with the other row
    assert len(tokens(second)) == 2
    run(batcher)
    assert tokens(first) == engine.generate([short], greedy)[0].ids
    assert tokens(second) == engine.generate([long], greedy)[0].ids
    assert batcher.cache.length == 50  # grew from 8 to the 30 + 20 positions the long row needs, contents kept


def test_slot_cache_growth_keeps_the_contents() -> None:
    cache = SlotKVCache(tiny_model_config(max_seq_len=64), 3, "cpu", length=4)
    cache.k.normal_()
    before = cache.k.clone()
    cache.reserve(5)
    assert cache.length == 8 and torch.equal(cache.k[..., :4, :], before) and not cache.k[..., 4:, :].any()
    with pytest.raises(ValueError, match="more than the context"):
        cache.reserve(65)


def test_stop_strings_n_samples_and_echo(engine: Engine) -> None:
    prompt = prompts_of(engine)[1]
    (alone,) = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))
    stop = alone.text[5:8]
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_strings=(stop,), top_logprobs=2)
    batcher = Batcher(engine, slots=3)
    items = collect(batcher, [prompt], params, n=3, echo_top=1)
    run(batcher)
    scores = [e for e in items if isinstance(e, PromptScores)]
    assert len(scores) == 1 and items.index(scores[0]) == 0  # the prompt's scores come first
    ref = engine.prompt_logprobs(prompt, 1)
    assert [(e.token, e.logprob, e.top) for e in scores[0].entries[1:]] == \
        [(e.token, e.logprob, e.top) for e in ref[1:]]
    for row in range(3):
        evs = [e for e in items if isinstance(e, StreamEvent) and e.row == row]
        assert "".join(e.text for e in evs) == alone.text[:5] and evs[-1].finish_reason == "stop"
        assert all(len(e.logprobs.top) == 2 for e in evs)


def test_cancel_frees_the_rows_before_the_next_step(engine: Engine) -> None:
    batcher = Batcher(engine, slots=2, max_queued=1)
    prompts = prompts_of(engine)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    a = collect(batcher, [prompts[0]], params, n=2)
    req_b = batcher.submit([prompts[1]], params, 1, lambda item: None)  # waits: both slots are a's
    assert batcher.counts() == (1, 1)
    with pytest.raises(Busy, match="--max-queued 1"):
        batcher.submit([prompts[2]], params, 1, lambda item: None)
    for _ in range(3):
        batcher.step()
    req_a = batcher.decoding[0].prompt.req
    batcher.cancel(req_a)
    made = len(a)
    batcher.step()  # a's rows leave, b is admitted into a slot and prefilled
    assert len(a) == made and not any(r.prompt.req is req_a for r in batcher.decoding.values())
    assert batcher.counts() == (1, 0) and req_a.state == "done"
    batcher.cancel(req_b)
    batcher.step()
    assert batcher.counts() == (0, 0) and not batcher.decoding and sorted(batcher.free) == [0, 1]
    assert DONE not in a  # a cancelled request is not told it finished


def test_bad_requests_are_refused(engine: Engine) -> None:
    batcher = Batcher(engine, slots=2)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(CakeError, match="--max-concurrency"):
        batcher.submit([[1, 2]], ok, 3, lambda item: None)
    with pytest.raises(CakeError, match="empty"):
        batcher.submit([[]], ok, 1, lambda item: None)
    with pytest.raises(CakeError, match="context"):
        batcher.submit([[1] * 64], ok, 1, lambda item: None)
    assert batcher.counts() == (0, 0) and not batcher.waiting


def test_a_failed_forward_fails_its_requests_and_the_scheduler_goes_on(engine: Engine, monkeypatch) -> None:
    batcher = Batcher(engine, slots=2)
    params = SamplingParams(max_new_tokens=5, temperature=0)
    prompt = prompts_of(engine)[0]
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = collect(batcher, [prompt], params)
    run(batcher)
    assert len(failed) == 1 and isinstance(failed[0], RuntimeError) and batcher.counts() == (0, 0)
    monkeypatch.setattr(engine.model, "forward", forward)
    fine = collect(batcher, [prompt], params)
    run(batcher)
    assert tokens(fine) == engine.generate([prompt], params)[0].ids and fine[-1] is DONE


def test_concurrent_streams_over_http_equal_solo_requests(tok_dir, tmp_path) -> None:
    """Six clients at once (official openai client, streaming, greedy and seeded, different lengths, n=2 and a
    stop string among them) get exactly what each gets alone."""
    ckpt = make_chat_checkpoint(tmp_path / "ckpt", tok_dir)
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=32, device="cpu",
                                max_concurrency=4))
    asks = [dict(prompt=t, max_tokens=8 + 3 * i, temperature=0.0 if i % 2 else 1.0, seed=i, n=2 if i == 2 else 1,
                 stop=["e,"] if i == 3 else None) for i, t in enumerate(TEXTS)]
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(kw: dict) -> list[tuple[int, str, str]]:
            texts: dict[int, str] = {}
            finish: dict[int, str] = {}
            for chunk in client.completions.create(model="tiny", stream=True, **kw):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    finish[c.index] = c.finish_reason or finish.get(c.index)
            return [(i, texts[i], finish[i]) for i in sorted(texts)]

        alone = [ask(kw) for kw in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(ask, asks))
        assert app.state.server.batcher.counts() == (0, 0)
    assert together == alone
    assert len(alone[2]) == 2 and all(text for answer in alone for _, text, _ in answer)


def test_auto_dtype_follows_the_probe(monkeypatch) -> None:
    """--dtype auto takes bf16 on a CPU only when the probe measures bf16 matmuls faster (stated in the reason)."""
    import cakelm.common as common

    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "bf16_speedup", lambda shapes, device: 2.4)
    dtype, why = common.pick_inference_dtype("auto", cpu, 576, 1536)
    assert dtype == torch.bfloat16 and "2.4x faster" in why
    monkeypatch.setattr(common, "bf16_speedup", lambda shapes, device: 0.04)
    dtype, why = common.pick_inference_dtype("auto", cpu, 576, 1536)
    assert dtype == torch.float32 and "0.04x" in why
    assert common.pick_inference_dtype("bf16", cpu, 8, 8)[0] == torch.bfloat16
    assert common.pick_inference_dtype("fp32", cpu, 8, 8)[0] == torch.float32


def test_bf16_serving_stays_close_to_fp32(tok_dir, tmp_path) -> None:
    """With bf16 weights the server's log-probs of a reply are those of the fp32 model within 0.15 (bf16 keeps 8
    bits of mantissa: a logit of magnitude ~20 moves by up to ~0.1 per rounding), and its greedy reply equals fp32's
    on this decisive model."""
    ckpt = make_chat_checkpoint(tmp_path / "ckpt", tok_dir)
    body = {"model": "tiny", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0, "logprobs": 0}
    answers = {}
    for dtype in ("fp32", "bf16"):
        app = build_app(ServeConfig(dtype=dtype, ckpt=str(ckpt), model_name="tiny", device="cpu"))
        with running(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            answers[dtype] = client.completions.create(**body).choices[0]
            assert httpx.get(url + "/health").json()["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    a, b = answers["fp32"], answers["bf16"]
    assert a.text == b.text and len(a.logprobs.tokens) == 12
    assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=0.15)
    assert b.logprobs.token_logprobs != a.logprobs.token_logprobs  # bf16 really served


def test_soak_with_disconnects_leaks_no_rows(tok_dir, tmp_path) -> None:
    """120 requests from 12 threads, streamed or not, a third of them abandoned midway: every kept request is
    answered in full, and afterwards no row, slot or count is left behind."""
    import random
    import threading

    ckpt = make_chat_checkpoint(tmp_path / "ckpt", tok_dir)
    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=24, device="cpu",
                                max_concurrency=4, max_queued=256))
    batcher = app.state.server.batcher
    rng = random.Random(0)
    plan = [(rng.choice(["whole", "stream", "drop"]), rng.randint(1, 5)) for _ in range(120)]
    answered, lock = [], threading.Lock()
    with running(app) as url:

        def one(i: int) -> None:
            kind, cut = plan[i]
            body = {"model": "tiny", "prompt": TEXTS[i % len(TEXTS)], "max_tokens": 24, "temperature": 0.8,
                    "seed": i, "stream": kind != "whole"}
            if kind == "whole":
                r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            else:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                    lines = _take(r.iter_lines(), cut if kind == "drop" else None)
                ok = kind == "drop" or lines[-1] == "data: [DONE]"
            with lock:
                answered.append(ok)

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(one, range(len(plan))))
        for _ in range(200):
            if batcher.counts() == (0, 0) and not batcher.decoding and not batcher.prefilling:
                break
            time.sleep(0.02)
        assert batcher.counts() == (0, 0) and not batcher.decoding and not batcher.prefilling
        assert sorted(batcher.free) == [0, 1, 2, 3] and not batcher.waiting and not batcher.admitted
    assert len(answered) == 120 and all(answered)
    assert {kind for kind, _ in plan} == {"whole", "stream", "drop"}


def _take(lines, n: int | None) -> list[str]:
    """The data lines of a stream: all of them, or the first n (then the connection is dropped)."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            out.append(line)
            if n is not None and len(out) >= n:
                break
    return out
