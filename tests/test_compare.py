"""`cakelm compare` and the LSTM LM: equal parameter counts, identical batches for both models, a complete
compare.json with plots, and a reading that follows the numbers instead of a script."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch

from cakelm.__main__ import build_parser
from cakelm.config import build_config
from cakelm.data.shards import TokenBatches, open_shard
from cakelm.model import PRESETS as MODEL_PRESETS
from cakelm.model import ModelConfig, Transformer
from cakelm.rnn import LSTMLM, lstm_for_params, lstm_num_params
from cakelm.stages import compare
from cakelm.tokenizer import Tokenizer


@pytest.mark.parametrize("vocab,shape", [(320, dict(dim=32, n_layers=2, n_heads=4)), (2048, MODEL_PRESETS["tiny"]),
                                         (4096, MODEL_PRESETS["10m"]), (32768, MODEL_PRESETS["gpt2-small"])])
@pytest.mark.parametrize("lstm_layers", [1, 2, 3])
def test_lstm_matches_transformer_parameters(vocab: int, shape: dict, lstm_layers: int) -> None:
    with torch.device("meta"):  # count parameters without allocating a 124M model
        tf = Transformer(ModelConfig(vocab_size=vocab, **shape))
        cfg = lstm_for_params(tf.num_params(), vocab, lstm_layers)
        lstm = LSTMLM(cfg)
    assert lstm.num_params() == lstm_num_params(vocab, cfg.hidden, lstm_layers)  # the formula is the module
    assert abs(lstm.num_params() / tf.num_params() - 1) < 0.05
    assert cfg.hidden % 8 == 0 or abs(lstm.num_params() / tf.num_params() - 1) < 0.02  # x8 when it fits


def test_lstm_is_causal_and_shapes() -> None:
    torch.manual_seed(0)
    m = LSTMLM(lstm_for_params(50_000, vocab_size=64, n_layers=2)).eval()
    idx = torch.randint(0, 64, (3, 12))
    logits = m(idx)
    assert logits.shape == (3, 12, 64)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64  # changing the future must not change the past
    torch.testing.assert_close(m(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(m(changed)[:, 7:], logits[:, 7:])
    h = m.cfg.hidden
    assert torch.all(m.lstm.bias_ih_l0[h:2 * h] == 1.0)  # forget gates open at init


def _micro(tok_dir, out, **kw) -> compare.CompareConfig:
    return build_config(compare.CompareConfig, ("preset micro", compare.PRESETS["micro"]), (
        "test", {"data": str(tok_dir), "out": str(out), "contexts": [16, 32], "model.max_seq_len": 32,
                 "tokens_per_step": 256, "budget_s": 0.5, "min_steps": 6, "eval_tokens": 1024, "progress": False,
                 "device": "cpu", **kw}))


@pytest.fixture(scope="module")
def micro_result(tok_dir, tmp_path_factory) -> tuple[dict, compare.CompareConfig]:
    out = tmp_path_factory.mktemp("compare")
    cfg = _micro(tok_dir, out)
    assert compare.main(cfg) == out
    return json.loads((out / "compare.json").read_text()), cfg


def test_compare_same_batches_for_both_models(micro_result, tok_dir) -> None:
    r, cfg = micro_result
    tf, ls = r["training"]["transformer"], r["training"]["lstm"]
    # each model's record holds one digest per optimizer step it took
    assert len(tf["batches"]) == tf["steps"] >= cfg.min_steps
    assert len(ls["batches"]) == ls["steps"] >= cfg.min_steps
    n = min(tf["steps"], ls["steps"])
    assert tf["batches"][:n] == ls["batches"][:n]
    assert len(set(tf["batches"][:n])) == n  # a different batch every step, so equality above means something
    # and they are the batches of the configured seed (the race's data order is that of the seed, not another)
    tok = Tokenizer.load(tok_dir / "tokenizer.json")
    other = TokenBatches(open_shard(tok_dir / "train.bin", tok.vocab_size), 32, 256 // 32, seed=cfg.seed + 1)
    other_digest = hashlib.sha1(other.get(0, 0)["input"].numpy().tobytes()).hexdigest()[:12]
    assert other_digest != tf["batches"][0]


def test_compare_json_is_complete(micro_result) -> None:
    r, cfg = micro_result
    out = compare.Path(cfg.out)
    assert abs(r["models"]["lstm"]["params"] / r["models"]["transformer"]["params"] - 1) < 0.05
    assert [row["context"] for row in r["speed"]] == [16, 32]
    for row in r["speed"]:
        assert row["tokens_per_step"] == 256
        for name in compare.NAMES:
            assert row[name]["ms_per_step"] > 0
            assert row[name]["tok_per_s"] == pytest.approx(256 / row[name]["ms_per_step"] * 1000)
    for name in compare.NAMES:
        t = r["training"][name]
        curve = t["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == t["steps"]
        assert len(curve) == 1 + cfg.eval_points
        assert all(math.isfinite(p["val_bpb"]) for p in curve)
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve)
        assert t["final_bpb"] < curve[0]["val_bpb"]  # training helped both
        assert len(r["loss_by_position"][name]) == 32
        assert (out / name / "metrics.jsonl").is_file()
    for png in r["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = r["summary"]
    assert f"{s['transformer']['final_bpb']:.3f}" in r["reading"] and f"{s['lstm']['final_bpb']:.3f}" in r["reading"]
    assert "CPU" in r["reading"] and r["hardware"]["device"] == "cpu"
    assert 0 < r["training"]["unigram_bpb"] < r["training"]["transformer"]["curve"][0]["val_bpb"]  # below random
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "compare" and meta["complete"] and meta["config"] == r["config"]


def test_reading_follows_the_numbers(micro_result) -> None:
    r, _ = micro_result
    for winner, loser in (("transformer", "lstm"), ("lstm", "transformer")):
        fake = copy.deepcopy(r)
        fake["summary"][winner]["final_bpb"], fake["summary"][loser]["final_bpb"] = 2.0, 2.5
        fake["summary"][winner]["context_gain"], fake["summary"][loser]["context_gain"] = 0.8, 0.1
        for row in fake["speed"]:
            row[winner]["tok_per_s"], row[loser]["tok_per_s"] = 2000.0, 1000.0
        text = compare.reading(fake)
        name = {"transformer": "Transformer", "lstm": "LSTM"}[winner]
        assert f"the {name} is better by 0.500 bits/byte" in text
        assert f"The {name} trains faster at every context measured" in text
        assert ("the Transformer gains more from the far context" in text) == (winner == "transformer")


def test_compare_is_a_command() -> None:
    ns = build_parser().parse_args(["compare", "--preset", "micro", "--budget-s", "2"])
    assert ns.command == "compare" and ns.preset == "micro" and ns.budget_s == 2.0
