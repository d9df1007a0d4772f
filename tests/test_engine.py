"""The engine: cached decoding equals recomputation, batching equals one-by-one, streaming equals the final
text (Japanese and emoji included), seeds reproduce, stop tokens/strings and limits hold."""

from __future__ import annotations

import pytest
import torch

from cakelm.common import CakeError
from cakelm.engine import Engine, RowText, SamplingParams, sample_next
from cakelm.model import Transformer
from cakelm.tokenizer import Tokenizer

GREEDY = SamplingParams(max_new_tokens=30, temperature=0)


def full_recompute_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1], dim=-1)
            seq.append(int(logp.argmax()))
            lps.append(float(logp.max()))
    return seq[len(prompt):], lps


def test_cached_decoding_equals_full_recompute(engine: Engine) -> None:
    prompt = engine.tok.encode("KING.\nThe crown", bos=True)
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0, logprobs=True))
    ids, lps = full_recompute_greedy(engine.model, prompt, 30)
    assert c.ids == ids and c.finish_reason == "length" and c.prompt_tokens == len(prompt)
    assert c.logprobs == pytest.approx(lps, abs=1e-5)


def test_batch_of_different_lengths_equals_each_alone(engine: Engine) -> None:
    texts = ["KING.", "QUEEN.\nWhat says the fool of the house", "A", "LORD.\nMy heart and my honour, sweet"]
    prompts = [engine.tok.encode(t, bos=True) for t in texts]
    assert len({len(p) for p in prompts}) == 4
    params = SamplingParams(max_new_tokens=20, temperature=0, logprobs=True)
    batched = engine.generate(prompts, params)
    for p, c in zip(prompts, batched):
        (alone,) = engine.generate([p], params)
        assert c.ids == alone.ids and c.text == alone.text
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_n_samples_share_the_prefill(engine: Engine) -> None:
    prompt = engine.tok.encode("FOOL.\n", bos=True)
    greedy = engine.generate([prompt], GREEDY, n=3)
    assert [c.prompt_index for c in greedy] == [0, 0, 0] and len({tuple(c.ids) for c in greedy}) == 1
    sampled = engine.generate([prompt, prompt[:2]], SamplingParams(max_new_tokens=12, seed=1), n=3)
    assert [c.prompt_index for c in sampled] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.ids) for c in sampled[:3]}) > 1  # different samples of one prompt


def test_seed_reproducible_and_top_k_one_is_greedy(engine: Engine) -> None:
    prompt = engine.tok.encode("KING.", bos=True)

    def run(**kw):
        return engine.generate([prompt], SamplingParams(max_new_tokens=15, **kw))[0].ids
    assert run(seed=7) == run(seed=7) != run(seed=8)
    assert run(top_k=1, seed=3) == run(temperature=0)


def test_streaming_equals_generate(engine: Engine) -> None:
    prompts = [engine.tok.encode(t, bos=True) for t in ("日本語の", "emoji 🐈‍⬛ and", "KING.")]
    params = SamplingParams(max_new_tokens=40, temperature=1.5, seed=11)  # hot: random bytes, broken UTF-8
    done = engine.generate(prompts, params)
    pieces: dict[int, str] = {}
    finishes = {}
    for ev in engine.stream(prompts, params):
        pieces[ev.row] = pieces.get(ev.row, "") + ev.text
        if ev.finish_reason:
            finishes[ev.row] = ev.finish_reason
    assert [pieces[i] for i in range(3)] == [c.text for c in done]
    assert finishes == {i: c.finish_reason for i, c in enumerate(done)}


def test_stream_never_splits_a_character(tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    text = "日本語🐈‍⬛ ok"
    row = RowText(0, ())
    ids = tok.encode(text)
    pieces = [row.push(t, 0.0, tok, (), last=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text)  # characters really were split over several tokens


def test_stop_strings_are_cut_and_never_emitted(tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    row = RowText(0, ("\nUSER:",))
    ids = tok.encode("I am well.\nUSER: and you?")
    pieces = []
    for t in ids:
        pieces.append(row.push(t, 0.0, tok, (), last=False))
        if row.finish:
            break
    assert "".join(pieces) == row.text == "I am well." and row.finish == "stop"
    assert all("USER" not in p and not p.endswith("\n") for p in pieces)
    row2 = RowText(0, ("\nUSER:",))  # a prefix of a stop string that does not complete it is released later
    out = "".join(row2.push(t, 0.0, tok, (), last=i == 3) for i, t in enumerate(tok.encode("a\nUS!")))
    assert out == "a\nUS!" and row2.finish == "length"


def test_stop_token_ends_the_row(engine: Engine) -> None:
    prompt = engine.tok.encode("KING.", bos=True)
    first = engine.generate([prompt], GREEDY)[0].ids[0]
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(first,)))
    assert c.ids == [first] and c.text == "" and c.finish_reason == "stop"


def test_limits(engine: Engine) -> None:
    (c,) = engine.generate([[0] * 60], SamplingParams(max_new_tokens=100, temperature=0))
    assert len(c.ids) == 4 and c.finish_reason == "length"  # cut to the 64-token context
    with pytest.raises(CakeError, match="prompt 0 is 64 tokens but the model's context is 64"):
        engine.generate([[0] * 64], GREEDY)
    with pytest.raises(CakeError, match="prompt 1 is empty"):
        engine.generate([[0], []], GREEDY)


def test_decode_uses_the_cache_not_the_prefix(engine: Engine, monkeypatch) -> None:
    """After the prefill, every forward call sees exactly one new token per row."""
    seen = []
    original = engine.model.forward

    def spy(idx, kv_cache=None, **kw):
        seen.append(idx.shape[1])
        return original(idx, kv_cache, **kw)

    monkeypatch.setattr(engine.model, "forward", spy)
    engine.generate([[0, 1, 2, 3, 4]], SamplingParams(max_new_tokens=10, temperature=0))
    assert seen == [5] + [1] * 9


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = {int(sample_next(logits, 1.0, top_p=0.4, generator=g)) for _ in range(50)}
    assert draws == {0}


def test_short_prompt_keeps_its_room_in_a_batch(engine: Engine) -> None:
    short, long = [0, 5, 6], [0] + [7] * 58  # context 64: room for 61 and 5 new tokens
    params = SamplingParams(max_new_tokens=20, temperature=0)
    a, b = engine.generate([short, long], params)
    assert len(a.ids) == 20 and len(b.ids) == 5 and b.finish_reason == "length"
    assert a.ids == engine.generate([short], params)[0].ids and b.ids == engine.generate([long], params)[0].ids


def test_earliest_stop_string_wins_and_no_stray_replacement_char(tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    row = RowText(0, ("ab", "b"))
    text = "".join(row.push(t, 0.0, tok, (), last=False) for t in tok.encode("xab"))
    assert row.text == text == "x" and row.finish == "stop"


    class Pieces:  # a token that completes the stop string and starts a 2-byte character in one
        def token_bytes(self, i: int) -> bytes:
            return {1: b"hi", 2: b"\nUSER:\xc3"}[i]

    row = RowText(0, ("\nUSER:",))
    out = row.push(1, 0.0, Pieces(), (), last=False) + row.push(2, 0.0, Pieces(), (), last=False)
    assert out == row.text == "hi" and row.finish == "stop"
    row = RowText(0, ())
    assert row.push(2, 0.0, Pieces(), (), last=True) == "\nUSER:\ufffd"  # cut short by the length limit


def test_sampling_params_are_checked() -> None:
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=float("nan")), dict(stop_strings=("",))):
        with pytest.raises(CakeError):
            SamplingParams(**bad)


def test_generation_builds_no_autograd_graph(engine: Engine) -> None:
    # callers (the RL stages) generate with grad mode on: the engine must not record a graph for its cache
    seen = []
    hook = engine.model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
    try:
        with torch.enable_grad():
            engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, seed=0, logprobs=True))
    finally:
        hook.remove()
    assert seen and not any(g or r for g, r in seen)


def test_sampling_follows_the_distribution() -> None:
    # 40,000 draws at once: each token's frequency matches softmax(logits / T) (std of a frequency < 0.0025)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = sample_next(logits.repeat(40_000, 1), temperature, generator=g)
        freq = torch.bincount(draws, minlength=5).float() / 40_000
        torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.01, rtol=0)


def test_sampling_never_picks_a_token_cut_by_top_k_at_either_end_of_the_uniform(monkeypatch) -> None:
    # inverse transform sampling: a token of probability 0 has the cumulative sum of the one before it, so it is
    # never the first to exceed u x total; u = 1 (which torch.rand never returns: the guard against u x total
    # reaching the total) gives the last token with probability, here the last kept one in vocabulary order, 3
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.repeat(20_000, 1), 1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, dtype=kw["dtype"]))  # u = 1: the edge
    assert sample_next(logits, 1.0, top_k=2).tolist() == [3]
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.zeros(n, dtype=kw["dtype"]))  # u = 0: first kept token
    assert sample_next(logits, 1.0, top_k=2).tolist() == [1]
    assert sample_next(torch.tensor([[5.0, 0.0]]), 1.0, top_k=1).tolist() == [0]


def test_a_row_of_nan_logits_still_gets_a_token_of_the_vocabulary() -> None:
    # a broken model's NaN logits (or a temperature so small that logits / T overflow) leave no distribution: the
    # next forward still needs an id inside the vocabulary, and the other rows sample as usual
    logits = torch.tensor([[float("nan")] * 5, [0.0, 0.0, 9.0, 0.0, 0.0]])
    draws = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert 0 <= int(draws[0]) < 5 and int(draws[1]) == 2
    assert 0 <= int(sample_next(torch.tensor([[1.0, 2.0, 3.0]]), 1e-40)[0]) < 3


def test_per_row_and_shared_generators_sample_the_same_distribution() -> None:
    # one generator per row (seeded prompts) and one shared generator whose draws are taken for some rows only
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    expected = logits.softmax(-1)
    gens = [torch.Generator().manual_seed(i) for i in range(2_000)]
    per_row = torch.cat([sample_next(logits.repeat(2_000, 1), 1.0, generator=gens) for _ in range(10)])
    shared = torch.Generator().manual_seed(1)
    rows = torch.arange(0, 4_000, 2)  # half the rows of a batch of 4,000
    some = torch.cat([sample_next(logits.repeat(2_000, 1), 1.0, generator=shared, noise_rows=(4_000, rows))
                      for _ in range(10)])
    for draws in (per_row, some):  # 20,000 draws: a frequency's std < 0.0036
        torch.testing.assert_close(torch.bincount(draws, minlength=4).float() / 20_000, expected, atol=0.015,
                                   rtol=0)


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"seed": 5}, {"seeds": True}], ids=["greedy", "seed", "seeds"])
def test_finished_rows_leave_the_batch_without_changing_the_others(engine: Engine, monkeypatch, kw) -> None:
    """Rows that end early (a long prompt's smaller room, a stop token) are dropped from the batch; every row's
    tokens and log-probs are those of the batch that computes them all to the end."""
    prompts = [engine.tok.encode(t, bos=True) for t in ("KING.", "QUEEN.\nWhat says", "A", "LORD.\nMy")]
    prompts[2] = prompts[2] + [5] * 48  # 50 tokens of the 64 context: room for 14 new tokens, the others 24
    seeds = [11, 12, 13, 14] if kw.pop("seeds", False) else None
    params = SamplingParams(max_new_tokens=24, logprobs=True, **kw)
    full = Engine(engine.model, engine.tok, drop_finished=False).generate(prompts, params, n=2, seeds=seeds)
    stop = full[3].ids[5]  # a token row 3 draws at its 6th step: a stop id ends it (and any row drawing it) early
    params = SamplingParams(max_new_tokens=24, logprobs=True, stop_ids=(stop,), **kw)
    full = Engine(engine.model, engine.tok, drop_finished=False).generate(prompts, params, n=2, seeds=seeds)
    widths, original = [], engine.model.forward

    def spy(idx, kv_cache=None, **kwargs):
        widths.append(idx.shape[0])
        return original(idx, kv_cache, **kwargs)

    monkeypatch.setattr(engine.model, "forward", spy)
    dropped = engine.generate(prompts, params, n=2, seeds=seeds)
    assert widths[0] == 4 and widths[1] == 8 and min(widths) < 8  # prefill, then 8 rows, then fewer
    assert sum(widths[1:]) < 8 * (len(widths) - 1)
    assert len({len(c.ids) for c in full}) > 1  # the rows did end at different steps
    for a, b in zip(full, dropped):
        assert (a.ids, a.text, a.finish_reason) == (b.ids, b.text, b.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
