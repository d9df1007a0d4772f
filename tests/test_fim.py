"""Fill-in-the-middle pretraining: the transform (hand-computed orders, invertible, never splitting a character),
rows that are the same on any rank layout, `cakelm pretrain --fim-rate`, `cakelm sample --prefix/--suffix` and the
infill evaluation."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from cakelm.checkpoint import load_model
from cakelm.common import CakeError
from cakelm.config import ConfigError, build_config
from cakelm.data.fim import FIM_TOKENS, FimIds, cut_points, fim_permute, fim_row, fim_unpermute, infill_prompt
from cakelm.data.shards import TokenBatches
from cakelm.heldout import infill_exact_match, infill_spans
from cakelm.model import ModelConfig, Transformer
from cakelm.stages import eval as eval_stage
from cakelm.stages import pretrain, sample
from cakelm.tokenizer import Tokenizer
from tests.test_loop import MICRO

TEXTS = ["KING. O, the night is fair!", "日本語のテキスト、絵文字 🎭🍰 and ASCII", "café naïve — “quotes” ½ e\u0301",
         "🍰" * 9, "a", "line one\nline two\n\n  spaced   out\t tabs"]


@pytest.fixture(scope="module")
def fim_tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir / "tokenizer.json").with_special_tokens(FIM_TOKENS)


def test_permute_orders_by_hand() -> None:
    fim = FimIds(prefix=-1, suffix=-2, middle=-3, bos=0, starts_char=np.ones(10, bool))
    doc = np.array([1, 2, 3, 4, 5])
    assert fim_permute(doc, 1, 3, False, fim).tolist() == [-1, 1, -2, 4, 5, -3, 2, 3]  # PSM
    assert fim_permute(doc, 1, 3, True, fim).tolist() == [-1, -2, 4, 5, -3, 1, 2, 3]  # SPM: prefix + middle last
    assert fim_permute(doc, 0, 5, False, fim).tolist() == [-1, -2, -3, 1, 2, 3, 4, 5]  # all middle
    for a, b, spm in ((1, 3, False), (1, 3, True), (0, 0, True), (5, 5, False), (2, 2, False)):
        assert fim_unpermute(fim_permute(doc, a, b, spm, fim), fim).tolist() == doc.tolist()
    with pytest.raises(ValueError):
        fim_permute(doc, 3, 1, False, fim)
    # sentinel ids past the data's uint16 (a vocabulary of 65,534+ tokens) come out whole, as int64
    big = FimIds(prefix=70000, suffix=70001, middle=70002, bos=0, starts_char=np.ones(100, bool))
    row = fim_row(np.arange(12, dtype=np.uint16), np.random.default_rng(0), 1.0, 0.0, big)
    assert row.dtype == np.int64 and row[1] == 70000 and len(row) == 12 and row[-1] == 0


def test_added_tokens_keep_every_id(tok_dir, fim_tok) -> None:
    tok = Tokenizer.load(tok_dir / "tokenizer.json")
    assert fim_tok.vocab_size == tok.vocab_size + 3
    assert [fim_tok.hf.token_to_id(t) for t in FIM_TOKENS] == [tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2]
    for text in TEXTS:
        assert fim_tok.encode(text, bos=True) == tok.encode(text, bos=True)  # old data reads the same
    assert fim_tok.encode("<|fim_prefix|>") == tok.encode("<|fim_prefix|>")  # typed text stays text
    assert fim_tok.with_special_tokens(FIM_TOKENS).vocab_size == fim_tok.vocab_size  # adding twice adds nothing


def test_random_cuts_are_invertible_and_never_split_a_character(fim_tok) -> None:
    fim = FimIds.of(fim_tok)
    rng = random.Random(0)
    for text in TEXTS:
        doc = np.array(fim_tok.encode(text))
        cuts = cut_points(doc, fim)
        for _ in range(30):
            a, b = sorted(rng.choice(cuts.tolist()) for _ in range(2))
            pieces = [fim_tok.decode(doc[i:j].tolist()) for i, j in ((0, a), (a, b), (b, len(doc)))]
            assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces), (text, a, b)
            for spm in (False, True):
                assert fim_unpermute(fim_permute(doc, a, b, spm, fim), fim).tolist() == doc.tolist()
    # the multi-byte text has token boundaries inside characters, and none of them is a cut point
    doc = np.array(fim_tok.encode("🍰" * 9))
    assert len(cut_points(doc, fim)) < len(doc) + 1


def test_fim_row_keeps_length_and_documents(fim_tok) -> None:
    fim = FimIds.of(fim_tok)
    docs = [[fim_tok.bos_id, *fim_tok.encode(t)] for t in TEXTS]
    row = np.array([t for d in docs for t in d][3:], dtype=np.uint16)  # starts inside a document, as windows do
    same = fim_row(row, np.random.default_rng(1), 0.0, 0.5, fim)
    assert same.tolist() == row.tolist()
    out = fim_row(row, np.random.default_rng(1), 1.0, 0.5, fim)
    assert len(out) == len(row) and out.tolist() == fim_row(row, np.random.default_rng(1), 1.0, 0.5, fim).tolist()
    # every document comes back from its FIM form; the last one, shortened to end with a <|bos|> in the row, as a
    # prefix of itself at a character start
    assert out[-1] == fim_tok.bos_id
    pieces = np.split(out[:-1], np.flatnonzero(out[:-1] == fim_tok.bos_id))
    originals = np.split(row, np.flatnonzero(row == fim_tok.bos_id))
    assert len(pieces) == len(originals)
    restored = 0
    for got, want in zip(pieces, originals, strict=True):
        body, want_body = (got[1:], want[1:]) if want[0] == fim_tok.bos_id else (got, want)
        if len(want_body) >= 2:
            assert body[0] == fim.prefix
            back = fim_unpermute(body, fim).tolist()
            assert back == want_body.tolist()[:len(back)] and len(back) >= 2
            restored += 1
    assert restored >= 4
    # a long document alone in its window (the usual case) ends its middle with <|bos|> too
    long = np.array(fim_tok.encode(" ".join(TEXTS) * 5)[:65], dtype=np.uint16)
    for seed in range(20):
        got = fim_row(long, np.random.default_rng(seed), 1.0, 0.5, fim)
        assert len(got) == 65 and got[-1] == fim_tok.bos_id and got[0] == fim.prefix
        assert fim_unpermute(got[:-1], fim).tolist() == long.tolist()[:len(got) - 4]


def test_fim_batches_are_the_same_on_any_rank_layout(tok_dir, fim_tok) -> None:
    fim = FimIds.of(fim_tok)
    tokens = np.fromfile(tok_dir / "train.bin", dtype=np.uint16)

    def rows(**kw) -> list[list[int]]:
        b = TokenBatches(tokens, 32, seed=3, transform=lambda r, g: fim_row(r, g, 0.5, 0.5, fim), **kw)
        return [r for m in range(b.grad_accum) for r in b.get(2, m)["input"].tolist()]

    one = rows(batch_size=8)
    assert rows(batch_size=4, grad_accum=2) == one
    two = [rows(batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert two[0] + two[1] == one
    assert any(fim.prefix in r for r in one)  # it transformed something


def test_pretrain_with_fim_and_fill_the_middle(tok_dir, tmp_path) -> None:
    out = pretrain.main(build_config(pretrain.PretrainConfig, ("test", {
        **MICRO, "data": str(tok_dir), "out": str(tmp_path / "fim"), "loop.max_steps": 3, "fim_rate": 0.5})))
    model, tok, _ = load_model(out)
    assert model.cfg.vocab_size == tok.vocab_size == Tokenizer.load(tok_dir / "tokenizer.json").vocab_size + 3
    assert all(tok.hf.token_to_id(t) is not None for t in FIM_TOKENS)
    prefix, suffix = "KING.\nO the ", " of the night."
    got = sample.main(build_config(sample.SampleConfig, ("test", {"ckpt": str(out), "prefix": prefix,
                                                                 "suffix": suffix, "max_new_tokens": 6,
                                                                 "temperature": 0.0, "num_samples": 2})), echo=False)
    assert len(got) == 2 and all(t.startswith(prefix) and t.endswith(suffix) for t in got)
    assert all(s not in t for t in got for s in FIM_TOKENS)
    assert infill_prompt(tok, prefix, suffix)[:2] == [tok.bos_id, tok.hf.token_to_id("<|fim_prefix|>")]
    # a model never trained on the FIM tokens cannot fill a gap: one line, not a KeyError
    plain = pretrain.main(build_config(pretrain.PretrainConfig, ("test", {
        **MICRO, "data": str(tok_dir), "out": str(tmp_path / "plain"), "loop.max_steps": 1})))
    with pytest.raises(CakeError, match="no fill-in-the-middle tokens"):
        sample.main(build_config(sample.SampleConfig, ("test", {"ckpt": str(plain), "prefix": "a"})), echo=False)
    with pytest.raises(CakeError, match="has none: pretrain from scratch"):
        pretrain.main(build_config(pretrain.PretrainConfig, ("test", {
            **MICRO, "data": str(tok_dir), "out": str(tmp_path / "cont"), "init": str(plain), "fim_rate": 0.5})))
    # gaps cut from data another tokenizer encoded would be other text: refused before anything runs
    other = tmp_path / "other"
    other.mkdir()
    Tokenizer.train(["a b c d e f"] * 50, vocab_size=300).save(other / "tokenizer.json")
    with pytest.raises(CakeError, match="encoded with another tokenizer"):
        eval_stage.evaluate_checkpoint(build_config(eval_stage.EvalConfig, ("test", {
            "ckpt": str(out), "tasks": ["infill"], "infill_data": str(other), "progress": False})))
    with pytest.raises(ConfigError, match="fim-rate must be in"):
        build_config(pretrain.PretrainConfig, ("test", {"fim_rate": 1.5}))
    with pytest.raises(ConfigError, match="one or the other"):
        build_config(sample.SampleConfig, ("test", {"ckpt": "x", "prompt": "a", "suffix": "b"}))


def test_infill_spans_and_exact_match(tok_dir, fim_tok) -> None:
    fim = FimIds.of(fim_tok)
    tokens = np.fromfile(tok_dir / "val.bin", dtype=np.uint16)
    spans = infill_spans(tokens, fim, 40, seed=0)
    assert len(spans) == 40
    for p, m, s in spans:
        assert 1 <= len(m) <= 3 and 0 < len(p) <= 48 and 0 < len(s) <= 24
        assert fim_tok.bos_id not in np.concatenate([p, m, s])  # inside one document
        assert all(fim.starts_char[x[0]] for x in (p, m, s))
    assert infill_spans(tokens, fim, 40, seed=0)[7][1].tolist() == spans[7][1].tolist()  # seeded
    short = infill_spans(tokens[:100], fim, 40, seed=0)  # fewer places than gaps asked for: what there is, at once
    assert 0 < len(short) < 40 and infill_spans(tokens[:60], fim, 5) == []
    for p, m, s in short:  # the suffix ends where a character starts too
        assert all(fim.starts_char[x[0]] for x in (p, m, s))

    model = Transformer(ModelConfig(vocab_size=fim_tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=128))

    class HalfRight:  # answers every other gap with the true middle (and then stops)
        tok = fim_tok

        def __init__(self) -> None:
            self.model = model

        def generate(self, prompts, params):
            assert params.temperature == 0 and fim.bos in params.stop_ids
            return [SimpleNamespace(prompt_index=i, text=fim_tok.decode(spans[i][1].tolist()) if i % 2 else "x",
                                    finish_reason="stop" if i % 2 else "length") for i in range(len(prompts))]

    r = infill_exact_match(HalfRight(), spans, fim, batch_size=64)
    assert r["n"] == 40 and r["exact_match"] == 0.5 and r["ended"] == 0.5 and len(r["examples"]) == 5
    # the teacher-forced losses: a random model is as unsure with the suffix as without (about ln V nats a token)
    assert abs(r["nll_with_suffix"] - r["nll_left_to_right"]) < 0.5 < r["nll_end"]
    assert abs(r["nll_left_to_right"] - np.log(fim_tok.vocab_size)) < 1.0
