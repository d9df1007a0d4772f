"""`cakelm rlhf-round`: two rounds with the rule-based rater end to end (pairs -> label DB -> reward model on every
round -> DPO -> gold/proxy/KL table), the human path stopping for labels, and the report's rounds section."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from cakelm.checkpoint import load_meta
from cakelm.common import CakeError
from cakelm.config import ConfigError, build_config
from cakelm.data.labels import LabelStore
from cakelm.report import write_report
from cakelm.stages import rounds
from tests.conftest import tiny_checkpoint


def round_cfg(run, **kw) -> rounds.RoundConfig:
    # 100 pairs: about a third become preferences (the rest ties or both bad), enough for a held-out side in
    # every round (with 40, round 2 had ~9, one held out, and passed or failed by the draw)
    return build_config(rounds.RoundConfig, ("test", {
        "run": str(run), "preset": "micro", "data": ["arithmetic"], "pairs": 100, "val_prompts": 8,
        "max_new_tokens": 24, "min_gap": 0.05, "device": "cpu", **kw}))


@pytest.fixture(scope="module")
def run_dir(tok_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("rounds") / "run"
    tiny_checkpoint(run / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4, n_kv_heads=4, max_seq_len=128)
    return run


def test_two_rule_rounds(run_dir) -> None:
    first = rounds.main(round_cfg(run_dir))
    second = rounds.main(round_cfg(run_dir))
    assert (first, second) == (run_dir / "rounds" / "1", run_dir / "rounds" / "2")
    table = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in table] == [0, 1, 2]
    assert table[0]["kl"] == 0.0 and table[0]["policy"] == str(run_dir / "sft")
    for r in table:
        assert all(math.isfinite(r[k]) for k in ("gold", "proxy", "kl", "reply_len", "end_of_turn")), r
    # round 2's policy moved from SFT (two DPO updates); its sampled k1 KL estimate may be slightly negative
    before, after = (load_file(str(d / "model.safetensors")) for d in (run_dir / "sft", second / "policy"))
    assert all(not torch.equal(before[k], after[k]) for k in before if "lm_head" not in k)

    store = LabelStore(run_dir / "rounds" / "label.db")
    assert store.rounds() == [1, 2]
    for n in (1, 2):
        pairs, judged = store.pairs(n), store.judgements(n)
        # every pair judged once, by the rater, through the store
        assert len(judged) == len(pairs) == table[n]["pairs"] == table[n]["judgements"]
        assert {j["labeller"] for j in judged} == {"rule"}
    # round 2's replies are the round-1 policy's; its prompts were not asked in round 1
    assert {p["model_a"] for p in store.pairs(2)} == {str(run_dir / "rounds" / "1" / "policy")}
    asked = {json.dumps(p["prompt"]) for p in store.pairs(1)}
    assert not any(json.dumps(p["prompt"]) in asked for p in store.pairs(2))
    # the reward model learns from every round, the policy update from its own round
    assert table[2]["train_pairs_rm"] > table[1]["train_pairs_rm"] == table[1]["train_pairs_round"]
    assert table[2]["train_pairs_rm"] > table[2]["train_pairs_round"]
    train2 = [json.loads(line) for line in (second / "prefs" / "train.jsonl").read_text().splitlines()]
    assert {r["round"] for r in train2} == {2}
    for n in (1, 2):
        meta = load_meta(run_dir / "rounds" / str(n) / "policy")
        assert meta["rlhf_round"] == n and meta["stage"] == "dpo"
    assert load_meta(run_dir / "rounds" / "2" / "policy")["parent"] == str(run_dir / "rounds" / "1" / "policy")

    # a finished round is not redone; an interrupted one (here: stopped before its measurement) continues with
    # its pairs, judgements and checkpoints, and adds no rows
    with pytest.raises(CakeError, match="round 2 is finished"):
        rounds.main(round_cfg(run_dir, round=2))
    n_pairs = len(store.pairs())
    (second / "round.json").unlink()
    assert rounds.main(round_cfg(run_dir)) == second
    assert len(store.pairs()) == n_pairs and len(store.judgements()) == n_pairs
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())["rounds"]] == [0, 1, 2]
    with pytest.raises(CakeError, match="--val-prompts 9 differs from the earlier rounds' 8"):
        rounds.main(round_cfg(run_dir, val_prompts=9))

    html = write_report(run_dir)[0].read_text()
    section = html.split(">7. RLHF rounds</h2>")[1].split("<h2")[0]
    assert "<td>0 (SFT)</td>" in section and re.search(r"<tr><td[^>]*>2</td>", section) and "Not run" not in section


def test_human_round_waits_for_labels(tok_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    tiny_checkpoint(run / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4, n_kv_heads=4, max_seq_len=128)
    out = rounds.main(round_cfg(run, rater="human", pairs=8))
    assert "cakelm label" in capsys.readouterr().out
    assert not (out / "rm").exists() and not (out / "round.json").exists()
    store = LabelStore(run / "rounds" / "label.db")
    pairs = store.pairs(1)
    assert pairs and not store.judgements(1)
    # a person labels them (the store is what the web page writes through); the same command then trains
    for i, p in enumerate(pairs):
        store.record(p["id"], "ann", "a" if i % 3 else "b")
    rounds.main(round_cfg(run, rater="human", pairs=8))
    row = json.loads((out / "round.json").read_text())
    assert row["rater"] == "human" and row["judgements"] == len(pairs)
    assert len(store.pairs()) == len(pairs)  # the re-run did not sample new pairs


def test_round_errors(tmp_path, run_dir) -> None:
    with pytest.raises(CakeError, match="no SFT checkpoint"):
        rounds.main(round_cfg(tmp_path / "empty"))
    with pytest.raises(CakeError, match="round 5 starts from round 4's policy, and round 4 is not finished"):
        rounds.main(round_cfg(run_dir, round=5))
    with pytest.raises(ConfigError, match="--min-judged"):
        round_cfg(run_dir, min_judged=0.0)
