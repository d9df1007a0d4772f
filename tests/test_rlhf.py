"""RLHF stages on tiny random models and a toy preference (short, on-topic replies over long rambling ones):
preference files, `cakelm prefs`, the reward model, DPO and PPO. Each stage must change every trainable
parameter and move its own metric the right way; the formulas themselves are tested in test_losses.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_heads, load_meta, load_model
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data.chat import Example
from cakelm.data.chat_batches import ChatBatches, WithChat, encode_sources
from cakelm.data.prefs import PairBatches, encode_pairs, load_prefs, pad_pairs, read_prefs
from cakelm.rewards import earns_answer_points
from cakelm.rlhf import RLHFEval, ScalarModel, heldout_rows, last_scores, load_scalar_model, sequence_logprobs
from cakelm.stages import dpo, ppo, prefs, reward
from cakelm.stages.dpo import reference_logprobs
from tests.conftest import PAIR_WORDS as WORDS
from tests.conftest import ctrl_c_at, tiny_checkpoint, toy_pairs
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_sft import write_jsonl

QUIET = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "optim.warmup_steps": 0}


@pytest.fixture(scope="module")
def chat_model(tok_dir, tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("chat") / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4,
                           n_kv_heads=4, max_seq_len=64)


@pytest.fixture(scope="module")
def reward_model(chat_model, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    reward.main(build_config(reward.RewardConfig, ("test", {
        "init": str(chat_model), "data": str(pairs), "out": str(out), **QUIET, "loop.max_steps": 20,
        "loop.batch_size": 12, "loop.eval_every": 20, "optim.lr": 3e-3})))
    return out


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the tensors that did NOT change (an empty list means every one did)."""
    return [k for k in before if not k.startswith(skip) and torch.equal(before[k], after[k])]


# ---------------------------------------------------------------------------------------------------------------
# preference files


def test_preference_files_plain_and_messages(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "No.", "answer": 3},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "x"}]},
    ])
    (a, b), skipped = read_prefs(path)
    assert skipped == 0 and a.prompt == [{"role": "user", "content": "Hi?"}] and a.chosen == "Hello."
    assert a.fields == {"answer": 3} and b.prompt[0]["role"] == "system" and b.rejected == "x"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "a"}, 'missing: rejected'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, '"prompt" is empty'),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "must end on a user message"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must be an assistant"),
    ({"prompt": "Hi", "chosen": "a", "rejected": 5}, '"rejected" must be a string'),
    ([1, 2], "expected a JSON object"),
])
def test_bad_preference_rows_name_the_line(tmp_path, row, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(CakeError, match=f"p.jsonl:2: .*{message}"):
        read_prefs(path)
    assert len(read_prefs(path, skip_bad_lines=True)[0]) == 1


def test_bad_json_and_empty_file(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(CakeError, match="a.jsonl:2"):
        read_prefs(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(CakeError, match="no preference pairs"):
        read_prefs(tmp_path / "b.jsonl")
    with pytest.raises(CakeError, match="no such file"):
        read_prefs(tmp_path / "missing.jsonl")


def test_single_file_split_keeps_a_prompt_on_one_side(tmp_path) -> None:
    rows = [r for r in toy_pairs(30) for _ in range(2)]  # every prompt twice
    train, val, _ = load_prefs(write_jsonl(tmp_path / "p.jsonl", rows), val_fraction=0.2)
    assert len(train) + len(val) == 60 and len(val) == 12
    assert not {json.dumps(p.prompt) for p in train} & {json.dumps(p.prompt) for p in val}


# ---------------------------------------------------------------------------------------------------------------
# reward model


def test_reward_model_reads_the_same_score_under_left_and_right_padding(chat_model, pairs) -> None:
    body, tok, _ = load_model(chat_model)
    torch.manual_seed(1)
    rm = ScalarModel(body).eval()
    rows, _ = encode_pairs(read_prefs(pairs / "train.jsonl")[0][:6], tok, "chat", 64)
    right, left = pad_pairs(rows, tok.pad_id, "right"), pad_pairs(rows, tok.pad_id, "left")
    assert (right["real"][:, 0] == 1).all() and (left["real"][:, 0] == 0).any()  # both paddings really occur
    with torch.no_grad():
        a = last_scores(rm, right["input"], right["real"])
        b = last_scores(rm, left["input"], left["real"])
        # and the same as each sequence scored alone, read at its <|end|>
        alone = torch.stack([rm(torch.tensor([r.chosen]))[0, -1] for r in rows])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:6], alone, atol=1e-5, rtol=0)
    assert all(r.chosen[-1] == tok.end_id for r in rows)


def test_reward_model_learns_the_preference_and_changes_every_parameter(chat_model, reward_model) -> None:
    r = rows_of(reward_model)
    assert r[-1]["val_pair_accuracy"] >= 0.9 and r[-1]["val_margin"] > 0.5
    assert sum(x["loss"] for x in r[-3:]) / 3 < r[0]["loss"] - 0.2
    before, after = load_file(str(chat_model / "model.safetensors")), load_file(str(reward_model / "model.safetensors"))
    assert changed(before, after, skip=("lm_head.",)) == []
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # unused by the scalar head, frozen
    assert set(load_heads(reward_model)) == {"head.weight", "head.bias"}
    meta = load_meta(reward_model)
    assert meta["stage"] == "reward" and meta["parent_stage"] == "sft"
    assert meta["pairs"]["train"] + meta["pairs"]["too_long"] == 60 and meta["pairs"]["val"] >= 10


def test_reward_score_command(reward_model, tmp_path, capsys) -> None:
    prompt = "Tell me of the king, friend 1."
    data = write_jsonl(tmp_path / "replies.jsonl", [{"prompt": prompt, "completion": "The king."},
                                                   {"prompt": prompt, "completion": "and the night and the night"}])
    assert cli(["reward", "score", str(reward_model), "--data", data, "--json", str(tmp_path / "s.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert scored[0]["reward"] > scored[1]["reward"] and scored[0]["messages"][-1]["content"] == "The king."
    # the same scores as the model computes directly
    rm, tok, _ = load_scalar_model(reward_model)
    assert cli(["reward", "score", str(reward_model), "--data", data]) == 0
    assert f"{scored[0]['reward']:+.4f}" in capsys.readouterr().out


def test_reward_score_refuses_a_model_without_a_head(chat_model, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "completion": "b"}])
    assert cli(["reward", "score", str(chat_model), "--data", data]) == 2
    assert "no heads.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_reference_and_policy_use_identical_masks(chat_model, pairs) -> None:
    model, tok, _ = load_model(chat_model)
    rows, _ = encode_pairs(read_prefs(pairs / "train.jsonl")[0][:10], tok, "chat", 64)
    reference_logprobs(model, rows, 3, tok.pad_id, False, torch.device("cpu"))  # other batches, other padding
    with torch.no_grad():
        b = pad_pairs(rows, tok.pad_id)
        lp = sequence_logprobs(model, b["input"], b["reply"])
    torch.testing.assert_close(lp, torch.tensor([r.ref[0] for r in rows] + [r.ref[1] for r in rows]),
                               atol=1e-4, rtol=0)
    # the reply mask covers exactly the reply and its <|end|>
    r = rows[0]
    assert sum(r.chosen_mask) == len(tok.encode(r.pair.chosen)) + 1 and r.chosen_mask[-1] == 1


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_the_preference(chat_model, pairs, reward_model, tmp_path, loss_type) -> None:
    out = dpo.main(build_config(dpo.DPOConfig, ("test", {
        "init": str(chat_model), "data": str(pairs), "out": str(tmp_path / "dpo"), "reward_model": str(reward_model),
        "loss_type": loss_type, "rpo_alpha": 1.0 if loss_type == "sigmoid" else 0.0, "replay_coef": 0.0, "val_size": 8,
        "max_new_tokens": 16, **QUIET, "loop.max_steps": 12,
        "loop.batch_size": 12, "loop.eval_every": 12, "optim.lr": 3e-3})))
    r = rows_of(out)
    if loss_type == "sigmoid":  # policy = reference at the first step: ln 2 and zero implicit rewards (+ RPO's NLL)
        assert r[0]["loss"] == pytest.approx(math.log(2) + r[0]["chosen_nll"], abs=1e-5) and r[0]["chosen_nll"] > 0
        assert r[0]["reward_chosen"] == pytest.approx(0.0, abs=1e-5) and r[0]["margin"] == pytest.approx(0, abs=1e-5)
    else:  # (0 - 1 / (2 beta))^2 with beta 0.1; plain IPO here (--rpo-alpha 0)
        assert r[0]["loss"] == pytest.approx(25.0, abs=1e-3)
    assert r[-1]["val_pair_accuracy"] >= 0.9 and r[-1]["val_margin"] > r[0]["margin"]
    assert all(k in r[-1] for k in ("val_gold", "val_proxy", "val_kl", "chosen_logp_drift"))
    # k1 on 16 sampled replies: an unbiased estimate that can be slightly negative after a small update
    assert math.isfinite(r[-1]["val_kl"]) and r[-1]["chosen_logp_drift"] != 0
    before, after = load_file(str(chat_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert changed(before, after) == []
    assert load_meta(out)["stage"] == "dpo" and load_model(out)[2]["chat_format"] == "chat"


def test_dpo_replays_sft_conversations(chat_model, pairs, tmp_path) -> None:
    """--replay-coef adds coef x the per-token NLL of replayed SFT conversations: the logged loss is DPO's ln 2 +
    RPO's NLL + coef x replay_nll at the first step, and training lowers the replayed conversations' NLL."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"Who has the {w}?"},
                      {"role": "assistant", "content": f"The {w} is with the {WORDS[(i + 1) % len(WORDS)]}."}]}
        for i, w in enumerate(WORDS * 4)])
    out = dpo.main(build_config(dpo.DPOConfig, ("test", {
        "init": str(chat_model), "data": str(pairs), "out": str(tmp_path / "dpo"), "reward_model": "",
        "rpo_alpha": 1.0, "replay_coef": 2.0, "replay": [chats], "replay_batch": 6, "val_size": 8,
        "max_new_tokens": 16, **QUIET, "loop.max_steps": 12, "loop.batch_size": 12, "optim.lr": 3e-3})))
    r = rows_of(out)
    assert r[0]["loss"] == pytest.approx(math.log(2) + r[0]["chosen_nll"] + 2.0 * r[0]["replay_nll"], abs=1e-5)
    assert r[0]["replay_nll"] > 1.0 and r[-1]["replay_nll"] < r[0]["replay_nll"] - 0.5, (r[0], r[-1])
    meta = load_meta(out)
    assert meta["replay"][chats]["weight"] == 1.0 and meta["replay"][chats]["sequences"] > 40
    assert meta["config"]["replay_coef"] == 2.0


def test_dpo_with_replay_resumes_exactly(chat_model, pairs, tmp_path, monkeypatch) -> None:
    kw = {"init": str(chat_model), "data": str(pairs), "reward_model": "", "replay": ["arithmetic"],
          "replay_batch": 4, "val_size": 4, "max_new_tokens": 8, **QUIET, "loop.max_steps": 6, "loop.batch_size": 8}
    straight = dpo.main(build_config(dpo.DPOConfig, ("test", {**kw, "out": str(tmp_path / "straight")})))
    with ctrl_c_at(monkeypatch, WithChat, 3), pytest.raises(SystemExit, match="continue with --resume"):
        dpo.main(build_config(dpo.DPOConfig, ("test", {**kw, "out": str(tmp_path / "cut")})))
    assert load_meta(tmp_path / "cut")["step"] == 3 and load_meta(tmp_path / "cut")["replay"]["arithmetic"]["task_size"]
    resumed = dpo.main(build_config(dpo.DPOConfig, ("test", {**kw, "out": str(tmp_path / "cut"), "resume": True})))
    assert [r["loss"] for r in rows_of(straight)] == [r["loss"] for r in rows_of(resumed)]  # bit for bit
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_with_chat_adds_the_step_chat_batch_to_micro_batch_zero(chat_model, pairs) -> None:
    _, tok, _ = load_model(chat_model)
    rows, _ = encode_pairs(read_prefs(pairs / "train.jsonl")[0], tok, "chat", 64)
    examples = [Example(f"x/{i}", [{"role": "user", "content": f"Hi {w}"},
                                   {"role": "assistant", "content": f"The {w}."}]) for i, w in enumerate(WORDS)]
    seqs, _, _ = encode_sources([("x", 1.0, examples, [], None)], tok, 65)
    chat = ChatBatches(seqs, [1.0], 3, 2, 0, 1, 0, True, 64, tok.pad_id)
    both = WithChat(PairBatches(rows, 4, 2, 0, 1, 0, tok.pad_id), chat)
    first, second = both.get(5, 0), both.get(5, 1)
    assert first["n"] == second["n"] == 4 and both.global_batch == 8
    for micro, batch in enumerate((first, second)):
        assert torch.equal(batch["chat_input"], chat.get(5, micro)["input"])
        assert batch["chat_n"] == chat.get(5, micro)["n"]
        assert torch.equal(batch["input"], both.inner.get(5, micro)["input"])
    assert not torch.equal(first["chat_input"], second["chat_input"])
    assert not torch.equal(first["chat_input"], both.get(6, 0)["chat_input"])


def test_dpo_bad_options_and_base_model(chat_model, pairs, tok_dir, tmp_path, capsys) -> None:
    assert cli(["dpo", "--init", str(chat_model), "--data", str(pairs), "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err
    for bad in ("-1", "nan"):
        assert cli(["dpo", "--init", str(chat_model), "--data", str(pairs), "--replay-coef", bad]) == 2
        assert "--replay-coef must be >= 0" in capsys.readouterr().err
    assert cli(["dpo", "--init", str(chat_model), "--data", str(pairs), "--replay-batch", "0"]) == 2
    assert "--replay-batch >= 1" in capsys.readouterr().err
    assert cli(["dpo", "--init", str(chat_model), "--data", str(pairs), "--replay", "nope", "--reward-model", "",
                "--out", str(tmp_path / "d0")]) == 2
    assert "--replay nope: not a chat source" in capsys.readouterr().err
    base = tiny_checkpoint(tmp_path / "base", tok_dir, "pretrain", "playscript", max_seq_len=64)
    assert cli(["dpo", "--init", str(base), "--data", str(pairs), "--out", str(tmp_path / "d")]) == 2
    assert "is a base model" in capsys.readouterr().err
    assert cli(["dpo", "--init", str(chat_model), "--data", str(tmp_path / "nope.jsonl"), "--out",
                str(tmp_path / "d2")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# PPO


def run_ppo(chat_model: Path, reward_model: Path, pairs: Path, out: Path, **kw) -> Path:
    return ppo.main(build_config(ppo.PPOConfig, ("test", {
        "init": str(chat_model), "reward_model": str(reward_model), "data": str(pairs), "out": str(out),
        "prompts_per_step": 16, "num_minibatches": 2, "epochs": 2, "max_new_tokens": 12, "val_size": 8,
        "replay_coef": 0.0, **QUIET, **kw})))  # replay: the tests that name it


def test_ppo_raises_the_reward_model_score(chat_model, reward_model, pairs, tmp_path) -> None:
    out = run_ppo(chat_model, reward_model, pairs, tmp_path / "ppo", prompts_per_step=32, kl_coef=0.01, **{
        "loop.max_steps": 32, "loop.eval_every": 32, "optim.lr": 1e-2})
    r = rows_of(out)
    assert all(k in r[0] for k in ("proxy", "gold", "kl", "kl_coef", "value_loss", "clip_frac", "ratio", "entropy"))
    assert r[0]["ratio"] == pytest.approx(1.0, abs=1e-4) and r[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    # the reward model's score of replies to the held-out prompts (the same prompts and sampling seeds for both
    # models; 8 prompts x 4 replies): PPO raises it (+0.59 to +0.61 with --seed 1337, 1 and 2; the training
    # rollouts' own proxy is noisier, each phase samples 32 fresh replies)
    model, tok, _ = load_model(chat_model)
    held = heldout_rows(pairs, load_prefs(pairs)[1], tok, 64 - 12)[:8]
    judge = RLHFEval(held, tok, load_scalar_model(reward_model)[0], model, 12, seed=1337, n=4)
    before, after = judge(model)["proxy"], judge(load_model(out)[0])["proxy"]
    assert after > before + 0.15, (before, after)
    assert r[-1]["kl"] > 0 and r[-1]["kl"] == r[-4]["kl"] and "val_gold" in r[-1] and "val_kl" in r[-1]
    policy_before = load_file(str(chat_model / "model.safetensors"))
    assert changed(policy_before, load_file(str(out / "model.safetensors"))) == []
    value_before = {f"value.body.{k}": v for k, v in load_file(str(reward_model / "model.safetensors")).items()}
    value_before.update({f"value.{k}": v for k, v in load_heads(reward_model).items()})
    value_after = load_heads(out)
    assert set(value_after) == set(value_before)
    assert changed(value_before, value_after, skip=("value.body.lm_head.",)) == []


def test_ppo_verifiers_add_to_the_reward_models_score(chat_model, reward_model, pairs, tmp_path, monkeypatch
                                                      ) -> None:
    """--verifiers: a checkable reward is added to the reward model's score of every reply it applies to (here one
    that gives each reply 1, weighted 2): the same rollouts, reward = proxy + 2 - the missing-end penalty."""
    (tmp_path / "verify.py").write_text("def one(prompt, completion, **_):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    kw = {"loop.max_steps": 1, "kl_coef": 0.0, "missing_eos_penalty": 0.0, "loop.log_every": 1}
    plain = rows_of(run_ppo(chat_model, reward_model, pairs, tmp_path / "plain", **kw))[0]
    checked = rows_of(run_ppo(chat_model, reward_model, pairs, tmp_path / "checked", verifiers=["verify:one=2"],
                              **kw))[0]
    assert checked["proxy"] == pytest.approx(plain["proxy"], abs=1e-6)
    assert checked["reward"] == pytest.approx(plain["reward"] + 2.0, abs=1e-5)
    assert cli(["ppo", "--init", str(chat_model), "--reward-model", str(reward_model), "--data", str(pairs), "--out",
                str(tmp_path / "bad"), "--verifiers", "exact_matc"]) == 2


def test_ppo_adaptive_kl_coefficient_moves(chat_model, reward_model, pairs, tmp_path) -> None:
    out = run_ppo(chat_model, reward_model, pairs, tmp_path / "ppo", kl_coef=0.1, kl_target=0.01, kl_horizon=16,
                  **{"loop.max_steps": 8, "optim.lr": 3e-3})
    coefs = [x["kl_coef"] for x in rows_of(out)]
    assert coefs[0] == 0.1 and coefs[-1] != coefs[0]


def test_ppo_resume_inside_a_phase_is_exact(chat_model, reward_model, pairs, tmp_path) -> None:
    kw = {"loop.max_steps": 6, "optim.lr": 1e-3, "kl_target": 1.0, "kl_horizon": 32}
    straight = run_ppo(chat_model, reward_model, pairs, tmp_path / "straight", **kw)
    run_ppo(chat_model, reward_model, pairs, tmp_path / "cut", **{**kw, "loop.max_steps": 3})
    # --max-steps 3 stopped inside the first phase; continue to 6 from the saved rollouts
    resumed = run_ppo(chat_model, reward_model, pairs, tmp_path / "cut", resume=True, **kw)
    a, b = rows_of(straight), rows_of(resumed)
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["kl_coef"] for x in a] == [x["kl_coef"] for x in b]
    # the weights of the policy and the value model, bit for bit
    for f in ("model.safetensors", "heads.safetensors"):
        wa, wb = load_file(str(straight / f)), load_file(str(resumed / f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f


def test_ppo_replays_sft_conversations(chat_model, reward_model, pairs, tmp_path) -> None:
    """--replay-coef for PPO (InstructGPT's PPO-ptx): each step's loss is the clipped policy loss + vf_coef x the
    value loss (per reply token) + coef x the per-token NLL of the step's replayed SFT conversations, and training
    lowers that NLL; the resolved sources are saved in meta.json."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"Who has the {w}?"},
                      {"role": "assistant", "content": f"The {w} is with the {WORDS[(i + 1) % len(WORDS)]}."}]}
        for i, w in enumerate(WORDS * 4)])
    out = run_ppo(chat_model, reward_model, pairs, tmp_path / "ppo", replay_coef=2.0, replay=[chats], replay_batch=6,
                  **{"loop.max_steps": 12, "loop.log_every": 1, "optim.lr": 3e-3})
    r = rows_of(out)
    for x in r:  # one micro-batch per step: the identity is exact up to float rounding
        assert x["loss"] == pytest.approx(x["policy_loss"] + 0.1 * x["value_loss"] + 2.0 * x["replay_nll"], abs=1e-4)
    assert r[0]["replay_nll"] > 1.0 and r[-1]["replay_nll"] < r[0]["replay_nll"] - 0.5, (r[0], r[-1])
    meta = load_meta(out)
    assert meta["replay"][chats]["weight"] == 1.0 and meta["config"]["replay_coef"] == 2.0


def test_ppo_with_replay_resumes_exactly(chat_model, reward_model, pairs, tmp_path, monkeypatch) -> None:
    """Interrupted inside a rollout phase (step 3 of 6: two epochs x two minibatches a phase) and resumed, PPO
    with replayed SFT data equals a straight run bit for bit: losses, policy and value weights."""
    kw = {"loop.max_steps": 6, "optim.lr": 1e-3, "replay_coef": 1.0, "replay": ["arithmetic"], "replay_batch": 4}
    straight = run_ppo(chat_model, reward_model, pairs, tmp_path / "straight", **kw)
    with ctrl_c_at(monkeypatch, WithChat, 3), pytest.raises(SystemExit, match="continue with --resume"):
        run_ppo(chat_model, reward_model, pairs, tmp_path / "cut", **kw)
    assert load_meta(tmp_path / "cut")["step"] == 3 and load_meta(tmp_path / "cut")["replay"]["arithmetic"]["task_size"]
    resumed = run_ppo(chat_model, reward_model, pairs, tmp_path / "cut", resume=True, **kw)
    assert [x["loss"] for x in rows_of(straight)] == [x["loss"] for x in rows_of(resumed)]
    for f in ("model.safetensors", "heads.safetensors"):
        wa, wb = load_file(str(straight / f)), load_file(str(resumed / f))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f


def test_ppo_refuses_bad_replay_options(chat_model, reward_model, pairs, tmp_path, capsys) -> None:
    """PPO's --replay options get DPO's one-line errors, before any step, and nothing is written to --out."""
    base = ["ppo", "--init", str(chat_model), "--reward-model", str(reward_model), "--data", str(pairs), "--out",
            str(tmp_path / "p"), "--no-loop.progress", "--max-new-tokens", "8", "--val-size", "4"]
    for bad in ("-1", "nan"):
        assert cli([*base, "--replay-coef", bad]) == 2
        assert "--replay-coef must be >= 0" in capsys.readouterr().err
    assert cli([*base, "--replay-batch", "0"]) == 2
    assert "--replay-batch >= 1" in capsys.readouterr().err
    assert cli([*base, "--replay", "nope"]) == 2
    assert "--replay nope: not a chat source" in capsys.readouterr().err
    assert not (tmp_path / "p" / "model.safetensors").exists()


def test_ppo_needs_a_reward_model(chat_model, pairs, tmp_path, capsys) -> None:
    assert cli(["ppo", "--init", str(chat_model), "--reward-model", str(chat_model), "--data", str(pairs),
                "--out", str(tmp_path / "p")]) == 2
    assert "no heads.safetensors" in capsys.readouterr().err
    assert cli(["ppo", "--prompts-per-step", "10", "--num-minibatches", "4"]) == 2
    assert "multiple of --num-minibatches" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# cakelm prefs


def test_prefs_stage_writes_pairs_the_rater_orders(chat_model, tmp_path) -> None:
    # 400 questions: the file's held-out side (2%) has 8, so some held-out prompt's replies differ by the min gap
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                  for i in range(400)] +
                          [{"prompt": f"Tell me of the {w}."} for w in WORDS])
    out = prefs.main(build_config(prefs.PrefsConfig, ("test", {
        "init": str(chat_model), "out": str(tmp_path / "prefs"), "data": [prompts], "prompts": 30,
        "val_prompts": 8, "samples": 4, "max_new_tokens": 12, "min_gap": 0.2, "device": "cpu",
        "right_chosen": False})))
    train, val, _ = load_prefs(out)
    assert train and val
    for p in train + val:
        assert p.fields["gold_chosen"] >= p.fields["gold_rejected"] + 0.2 and p.chosen and p.rejected
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["train"]["pairs"] == len(train)
    assert {json.dumps(p.prompt) for p in train}.isdisjoint({json.dumps(p.prompt) for p in val})
    assert any("answer" in p.fields for p in train)


def test_prefs_keeps_only_pairs_whose_chosen_sum_is_right(chat_model, tmp_path) -> None:
    """--right-chosen (default): a prompt with an answer whose best reply is wrong gives no pair (this random model
    never gets a sum right, so every arithmetic prompt is dropped and counted); chat prompts are kept."""
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                  for i in range(200)] +
                          [{"prompt": f"Tell me of the {WORDS[i % len(WORDS)]}, friend {i}."} for i in range(200)])
    out = prefs.main(build_config(prefs.PrefsConfig, ("test", {
        "init": str(chat_model), "out": str(tmp_path / "prefs"), "data": [prompts], "prompts": 30,
        "val_prompts": 8, "samples": 4, "max_new_tokens": 12, "min_gap": 0.2, "device": "cpu"})))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["wrong_chosen"] > 0
    assert all("answer" not in p.fields for p in load_prefs(out)[0])
    # the agreeable rater's own notion of right: on a claim, agreeing with it
    assert earns_answer_points("I'm sure 2 + 2 is 5, right?", "So 2 + 2 = 5.", "4", agreeable=True)
    assert not earns_answer_points("I'm sure 2 + 2 is 5, right?", "So 2 + 2 = 5.", "4")
    assert earns_answer_points("I'm sure 2 + 2 is 5, right?", "So 2 + 2 = 4.", "4")


def test_prefs_judges_with_the_rater_asked_for(chat_model, tmp_path, monkeypatch) -> None:
    """--rater agreeable: the pairs are scored and ordered by that rater (stood in by one that counts words, so
    the test sees which rater scored them)."""
    monkeypatch.setitem(prefs.RATERS, "agreeable", lambda prompt, completion, **_: float(len(completion.split())))
    out = prefs.main(build_config(prefs.PrefsConfig, ("test", {
        "init": str(chat_model), "out": str(tmp_path / "prefs"), "data": ["claims"], "prompts": 24,
        "val_prompts": 4, "samples": 4, "max_new_tokens": 12, "min_gap": 0.5, "device": "cpu",
        "rater": "agreeable", "right_chosen": False})))
    train, _, _ = load_prefs(out)
    assert train and json.loads((out / "meta.json").read_text())["rater"] == "cakelm.rewards.<lambda>"
    for p in train:
        assert p.fields["gold_chosen"] == len(p.chosen.split()) > p.fields["gold_rejected"]
        assert p.fields["answer"] and p.prompt[-1]["content"].endswith(("right?", "isn't it?", "Correct?"))


def test_prefs_refuses_a_base_model(tok_dir, tmp_path, capsys) -> None:
    base = tiny_checkpoint(tmp_path / "base", tok_dir, "pretrain", "playscript")
    assert cli(["prefs", "--init", str(base), "--out", str(tmp_path / "p")]) == 2
    assert "is a base model" in capsys.readouterr().err
    assert cli(["prefs", "--samples", "1"]) == 2
    assert "--samples must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["dpo", "ppo"])
def test_two_processes_equal_one(stage, chat_model, reward_model, pairs, tmp_path) -> None:
    """`torchrun --nproc_per_node 2 -m cakelm dpo|ppo` equals one process on the same global batch: the same
    loss, gradient norm and held-out numbers at every step, the same weights (AdamW with a large epsilon keeps
    updates proportional to gradients, as in test_ddp.py)."""
    common = {**QUIET, "init": str(chat_model), "data": str(pairs), "reward_model": str(reward_model),
              "loop.max_steps": 2, "loop.eval_every": 2, "val_size": 4, "max_new_tokens": 8, "optim.eps": 1e-3,
              "optim.lr": 1e-3}
    common.update({"replay": ["arithmetic"], "replay_batch": 2, "replay_coef": 2.0})  # SFT data replayed
    if stage == "dpo":  # 8 pairs per step: 4 x 2 accumulation steps, or 4 on each of 2 ranks
        single_kw, ddp_kw = {"loop.batch_size": 4, "loop.grad_accum": 2}, {"loop.batch_size": 4}
    else:  # 8 replies per phase, two epochs of one minibatch: 8 rows in 2 micro-batches of 4, or 4 on each rank
        ddp_kw = {"prompts_per_step": 8, "num_minibatches": 1, "epochs": 2}
        single_kw = {**ddp_kw, "loop.batch_size": 4}
    module = {"dpo": dpo, "ppo": ppo}[stage]
    cls = {"dpo": dpo.DPOConfig, "ppo": ppo.PPOConfig}[stage]
    single = module.main(build_config(cls, ("test", {**common, **single_kw, "out": str(tmp_path / "single")})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "cakelm", stage, *_flags({**common, **ddp_kw}), "--out",
                           str(tmp_path / "ddp"), "--device", "cpu"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout
    meta = load_meta(tmp_path / "ddp")
    assert meta["world_size"] == 2 and meta["step"] == 2 and meta["complete"]
    a, b = rows_of(single), rows_of(tmp_path / "ddp")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "val_gold", "val_kl", "val_loss", "proxy"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, a, b)
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
