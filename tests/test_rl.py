"""The RL stages' wiring (grpo, rloo, ppo): a logged step is exactly the loss formulas of `losses.py` applied to the
rollouts that step trained on, for each option; RLOO learns, gives no gradient to groups of equal rewards and
pushes the likely-ness of a completion in the direction of its advantage; the 2-process runs of GRPO and RLOO
equal one process on the same global batch.

How a step is checked: the stage runs 1 step, a copy of that checkpoint is kept, and the run is resumed to 2
steps. The train state saved with each checkpoint holds the rollouts its last step trained on (the batch
provider's state), so step 1 is recomputed from the --init weights and the first rollouts, and step 2 from the
copy's weights and the rollouts saved at the end, by code written here from the pure functions alone. The logged
loss and gradient norm must match. (Planted bugs this catches: PPO's KL penalty with its sign flipped, PPO's
advantage whitening removed, GRPO ignoring --scale-rewards; see the closing note of the architecture issue.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cakelm.__main__ import main as cli
from cakelm.checkpoint import OPTIMIZER_DIR, load_heads, load_meta, load_model
from cakelm.config import build_config
from cakelm.losses import (
    IGNORE_INDEX,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_k3,
    kl_penalized_rewards,
    leave_one_out_advantages,
    masked_whiten,
    ppo_token_rewards,
)
from cakelm.rlhf import last_scores, load_scalar_model, pad_sequences
from cakelm.rollout import completion_logprobs
from cakelm.stages import grpo, ppo, rloo
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_checkpoint, tiny_reward_model
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_grpo import REWARD_MODULE
from tests.test_sft import write_jsonl

QUIET = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "optim.warmup_steps": 0,
         "optim.lr": 1e-2}
GROUPS = {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8, "loop.batch_size": 8, "val_size": 4}


@pytest.fixture(scope="module")
def chatty(tok_dir, tmp_path_factory) -> Path:
    """A random tiny chat model that ends its turn in about 40% of its replies (so lengths vary)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("chatty") / "sft", tok_dir, "sft", "chat", end_scale=20.0,
                           dim=64, n_heads=4, n_kv_heads=4, max_seq_len=64)


@pytest.fixture(scope="module")
def rm(chatty, tmp_path_factory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", chatty)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    rows = [{"prompt": f"Tell me about the {w} and the {v}.", "answer": str(i % 7)}
            for i, (w, v) in enumerate((a, b) for a in ("king", "queen", "lord", "lady", "sword", "crown")
                                       for b in ("night", "day", "heart", "blood", "time", "house"))]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture
def user_rewards(tmp_path, monkeypatch) -> None:
    same = "\ndef same(prompt, completion, **fields):\n    return 1.0\n"  # every completion equal
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE + same)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_rewards", None)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rollouts_of(ckpt: Path) -> dict[str, torch.Tensor]:
    """The rollouts the checkpoint's last step trained on (rank 0's), from its train state."""
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
    return state["batches"][0]["rollouts"]["data"]


def two_steps(main: Callable[[Any], Path], cls: type, cfg: dict[str, Any], tmp: Path) -> tuple[Path, Path]:
    """Run 1 step, copy the checkpoint, resume to 2 steps: (the copy, the final checkpoint)."""
    out = tmp / "run"
    main(build_config(cls, ("test", {**cfg, "out": str(out), "loop.max_steps": 1})))
    shutil.copytree(out, tmp / "after1")
    main(build_config(cls, ("test", {**cfg, "out": str(out), "loop.max_steps": 2, "resume": True})))
    return tmp / "after1", out


def loss_and_grad_norm(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.nn.utils.clip_grad_norm_(params, float("inf")).item()


def reply_mask(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return (d["target"] != IGNORE_INDEX).float()


def ended(d: dict[str, torch.Tensor], end_id: int) -> torch.Tensor:
    """(N,) 1 where the completion's last token is the end of turn."""
    mask = reply_mask(d)
    last = mask.size(1) - 1 - mask.flip(1).argmax(1)
    return (d["target"].gather(1, last[:, None]).squeeze(1) == end_id).float()


@torch.no_grad()
def ref_logprobs(ref: torch.nn.Module, d: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    return completion_logprobs(ref, d["input"], d["target"], temperature)[0]


def check(row: dict[str, float], loss: float, grad_norm: float, scale: float = 1.0) -> None:
    """The logged loss and gradient norm equal the recomputed ones. A loss that is ~0 by construction (centred
    advantages at ratio 1) is compared to the rounding of sums of terms of size `scale`."""
    assert row["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6 * scale), (row["loss"], loss)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-3, abs=1e-6), (row["grad_norm"], grad_norm)


# ---------------------------------------------------------------------------------------------------------------
# GRPO


@pytest.mark.parametrize("opts", [
    {},  # group std, token_mean, no KL, temperature 1
    {"scale_rewards": "batch", "aggregation": "sequence_mean", "temperature": 0.7},
    {"scale_rewards": "none", "aggregation": "constant", "kl_coef": 0.3},
    {"epsilon_low": 0.001, "epsilon_high": 0.003, "mask_truncated": True, "scale_rewards": "none"},
])
def test_grpo_step_is_its_loss_on_its_rollouts(chatty, prompts, tmp_path, user_rewards, opts) -> None:
    cfg = {"init": str(chatty), "data": [prompts], "rewards": ["my_rewards:e_share", "format=0.5"], "epochs": 2,
           **GROUPS, **QUIET, **opts}
    after1, out = two_steps(grpo.main, grpo.GRPOConfig, cfg, tmp_path)
    o = build_config(grpo.GRPOConfig, ("test", cfg))
    tok = Tokenizer.load(chatty / "tokenizer.json")
    ref = load_model(chatty)[0]
    rows = rows_of(out)
    assert len(rows) == 2 and rows[0]["rollout_s"] > 0 and rows[1]["rollout_s"] == 0.0  # one phase, two epochs

    def expected(weights: Path, d: dict[str, torch.Tensor]) -> tuple[float, float]:
        model = load_model(weights)[0].train()
        mask = reply_mask(d) * (ended(d, tok.end_id)[:, None] if o.mask_truncated else 1.0)
        adv, _ = group_advantages(d["rewards"].float(), o.group_size, o.scale_rewards)
        logp, _ = completion_logprobs(model, d["input"], d["target"], o.temperature)
        per_token, _ = clipped_policy_loss(logp, d["old_logp"], adv, o.epsilon_low, o.epsilon_high)
        if o.kl_coef:
            per_token = per_token + o.kl_coef * kl_k3(logp, ref_logprobs(ref, d, o.temperature))
        loss, units = aggregate(per_token, mask, o.aggregation, o.max_new_tokens)
        return loss_and_grad_norm(model, loss / units)

    d = rollouts_of(out)
    assert torch.equal(d["input"], rollouts_of(after1)["input"])  # step 2 trained on step 1's rollouts
    check(rows[0], *expected(chatty, d))
    check(rows[1], *expected(after1, d))
    if o.epsilon_high < 0.01:
        assert rows[1]["clip_frac"] > 0  # the second epoch's ratios left the clip range
    if o.mask_truncated:
        assert 0 < ended(d, tok.end_id).mean() < 1  # some replies ended, some were cut: the mask matters


# ---------------------------------------------------------------------------------------------------------------
# RLOO


@pytest.mark.parametrize("opts", [
    {},  # one epoch: step 2 is a new phase, sampled by the updated policy (its KL to --init matters)
    {"kl_coef": 0.5, "normalize_advantages": True, "temperature": 0.8},
    {"epochs": 2, "epsilon_low": 0.001, "epsilon_high": 0.003},  # step 2 reuses the rollouts: the clip matters
])
def test_rloo_step_is_its_loss_on_its_rollouts(chatty, rm, prompts, tmp_path, user_rewards, opts) -> None:
    cfg = {"init": str(chatty), "data": [prompts], "rewards": ["my_rewards:e_share", "reward_model=0.5"],
           "reward_model": str(rm), **GROUPS, **QUIET, **opts}
    after1, out = two_steps(rloo.main, rloo.RLOOConfig, cfg, tmp_path)
    o = build_config(rloo.RLOOConfig, ("test", cfg))
    ref = load_model(chatty)[0]
    rows = rows_of(out)
    assert all(k in rows[0] for k in ("reward", "proxy", "gold", "kl", "zero_signal", "clip_frac", "entropy"))

    def expected(weights: Path, d: dict[str, torch.Tensor]) -> tuple[float, float]:
        model = load_model(weights)[0].train()
        mask = reply_mask(d)
        shaped = kl_penalized_rewards(d["rewards"], d["old_logp"], ref_logprobs(ref, d, o.temperature), mask,
                                      o.kl_coef)
        adv, _ = leave_one_out_advantages(shaped, o.group_size)
        if o.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-4)
        logp, _ = completion_logprobs(model, d["input"], d["target"], o.temperature)
        seq, seq_old = (logp * mask).sum(1), (d["old_logp"] * mask).sum(1)
        ratio = torch.exp(seq - seq_old)
        loss = -torch.minimum(ratio * adv.float(), ratio.clamp(1 - o.epsilon_low, 1 + o.epsilon_high) * adv.float())
        return loss_and_grad_norm(model, loss.mean())

    first, last = rollouts_of(after1), rollouts_of(out)
    check(rows[0], *expected(chatty, first), scale=first["rewards"].abs().sum().item())
    check(rows[1], *expected(after1, last), scale=last["rewards"].abs().sum().item())
    if o.epochs == 2:
        assert rows[1]["clip_frac"] > 0
    else:
        assert rows[1]["kl"] > 0.01  # the second phase was sampled by the updated policy


def test_rloo_raises_the_reward_and_refuses_bad_reward_options(chatty, prompts, tok_dir, tmp_path, user_rewards,
                                                             capsys) -> None:
    # a plain random model (the chatty one learns to end its turn at once at this learning rate: no letters at all)
    plain = tiny_checkpoint(tmp_path / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4, n_kv_heads=4, max_seq_len=64)
    out = rloo.main(build_config(rloo.RLOOConfig, ("test", {
        "init": str(plain), "data": [prompts], "rewards": ["my_rewards:e_share"], "reward_model": "",
        "group_size": 6, "prompts_per_step": 6, "max_new_tokens": 8, "val_size": 8, **QUIET,
        "loop.max_steps": 16, "loop.batch_size": 12, "loop.eval_every": 16})))
    r = rows_of(out)
    first, last = sum(x["reward"] for x in r[:3]) / 3, sum(x["reward"] for x in r[-3:]) / 3
    assert last > first + 0.05, [round(x["reward"], 3) for x in r]
    assert r[0]["ratio"] == pytest.approx(1.0, abs=1e-4) and r[-1]["kl"] > 0.01
    assert {"val_reward", "val_end_of_turn"} <= r[-1].keys()
    meta = load_meta(out)
    assert meta["stage"] == "rloo" and meta["parent_stage"] == "sft" and meta["lineage"][-1]["ckpt"] == str(plain)
    # reward_model named without a checkpoint, and a checkpoint given but not used: one-line errors
    base = ["rloo", "--init", str(chatty), "--data", prompts, "--out", str(tmp_path / "o")]
    assert cli([*base, "--rewards", "exact_match", "reward_model", "--reward-model", ""]) == 2
    assert "give the reward model's checkpoint with --reward-model" in capsys.readouterr().err
    assert cli([*base, "--rewards", "exact_match", "--reward-model", str(chatty)]) == 2
    assert "--rewards does not use it" in capsys.readouterr().err
    for weight, message in (("x", "must be a number"), ("nan", "must be finite"), ("inf", "must be finite")):
        assert cli([*base, "--rewards", f"reward_model={weight}", "--reward-model", str(chatty)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_no_held_out_prompt_is_a_one_line_error(chatty, prompts, tmp_path, monkeypatch) -> None:
    from cakelm import rl
    from cakelm.common import CakeError

    real = rl.rl_prompts
    monkeypatch.setattr(rl, "rl_prompts", lambda *a, **k: dataclasses.replace(real(*a, **k), val=[]))
    with pytest.raises(CakeError, match="no held-out prompt leaves room for --max-new-tokens 8"):
        grpo.main(build_config(grpo.GRPOConfig, ("test", {"init": str(chatty), "data": [prompts],
                                                          "out": str(tmp_path / "g"), **GROUPS, **QUIET})))


def test_rloo_equal_rewards_give_no_gradient(chatty, prompts, tmp_path, user_rewards) -> None:
    # every completion scores 1: each leave-one-out advantage is 0, so nothing moves
    out = rloo.main(build_config(rloo.RLOOConfig, ("test", {
        "init": str(chatty), "data": [prompts], "rewards": ["my_rewards:same"], "reward_model": "", "kl_coef": 0.0,
        **GROUPS, **QUIET, "loop.max_steps": 2})))
    assert all(x["grad_norm"] == 0.0 and x["loss"] == 0.0 and x["zero_signal"] == 1.0 for x in rows_of(out))
    before, after = load_model(chatty)[0].state_dict(), load_model(out)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rloo_gradient_raises_the_completion_with_the_higher_advantage(tok_dir, tmp_path) -> None:
    model, tok, _ = load_model(tiny_checkpoint(tmp_path / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4,
                                               n_kv_heads=4, max_seq_len=64))
    o = build_config(rloo.RLOOConfig, ("test", {}))
    # two completions of one prompt; the first has the positive advantage
    prompt = [tok.bos_id, 5, 6, 7]
    seqs = [prompt + [20, 21, 22], prompt + [30, 31]]
    inp, tgt = torch.full((2, 6), tok.pad_id), torch.full((2, 6), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        inp[i, :len(s) - 1] = torch.tensor(s[:-1])
        tgt[i, len(prompt) - 1:len(s) - 1] = torch.tensor(s[len(prompt):])
    with torch.no_grad():
        old, _ = completion_logprobs(model, inp, tgt)
    batch = {"input": inp, "target": tgt, "old_logp": old, "mask": (tgt != IGNORE_INDEX).float(),
             "adv": leave_one_out_advantages(torch.tensor([1.0, 0.0]), 2)[0]}
    loss, _ = rloo.rloo_loss(model, batch, o)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad  # a small step: the first-order effect
        new, _ = completion_logprobs(model, inp, tgt)
    gain = ((new - old) * batch["mask"]).sum(1)
    assert gain[0] > 0 > gain[1], gain


# ---------------------------------------------------------------------------------------------------------------
# PPO


@pytest.mark.parametrize("opts", [
    {},
    {"kl_coef": 0.5, "gamma": 0.9, "lam": 0.8, "vf_coef": 0.5, "value_clip": 0.05, "epsilon_low": 0.05,
     "epsilon_high": 0.1, "missing_eos_penalty": 2.0, "temperature": 0.8},
])
def test_ppo_step_is_its_loss_on_its_rollouts(chatty, rm, pairs, tmp_path, opts) -> None:
    cfg = {"init": str(chatty), "reward_model": str(rm), "data": str(pairs), "prompts_per_step": 8, "epochs": 1,
           "num_minibatches": 1, "max_new_tokens": 8, "val_size": 4, "replay_coef": 0.0, **QUIET, **opts}
    after1, out = two_steps(ppo.main, ppo.PPOConfig, cfg, tmp_path)
    o = build_config(ppo.PPOConfig, ("test", cfg))
    tok = Tokenizer.load(chatty / "tokenizer.json")
    ref, reward_model = load_model(chatty)[0], load_scalar_model(rm)[0]
    rows = rows_of(out)

    def expected(weights: Path, d: dict[str, torch.Tensor]) -> tuple[float, float]:
        policy = load_model(weights)[0]
        value = load_scalar_model(rm)[0]
        if weights != chatty:
            value.load_state_dict({k.removeprefix("value."): v for k, v in load_heads(weights).items()})
        model = ppo.PolicyAndValue(policy, value).train()
        value.body.lm_head.weight.requires_grad_(False)
        mask = reply_mask(d)
        with torch.no_grad():
            # the reward model's score of each prompt + reply, at its last token, minus the missing-EOS penalty
            last = mask.size(1) - 1 - mask.flip(1).argmax(1)
            seqs = [d["input"][i, :last[i] + 1].tolist() + [d["target"][i, last[i]].item()] for i in range(len(last))]
            ids, real = pad_sequences(seqs, tok.pad_id)
            score = last_scores(reward_model, ids, real) - o.missing_eos_penalty * (1 - ended(d, tok.end_id))
            values = value(d["input"]) * mask
            rewards = ppo_token_rewards(score, d["old_logp"], ref_logprobs(ref, d, o.temperature), mask, o.kl_coef)
            adv, returns = gae(rewards, values, mask, o.gamma, o.lam)
            adv = masked_whiten(adv, mask)
        logp, _, v, _ = model(d["input"], d["target"], o.temperature)
        pg, _ = clipped_policy_loss(logp, d["old_logp"], adv, o.epsilon_low, o.epsilon_high)
        vf, _ = clipped_value_loss(v, values, returns, o.value_clip)
        return loss_and_grad_norm(model, ((pg + o.vf_coef * vf) * mask).sum() / mask.sum())

    check(rows[0], *expected(chatty, rollouts_of(after1)))
    check(rows[1], *expected(after1, rollouts_of(out)))
    assert rows[1]["kl"] > 0.01 and rows[1]["kl_coef"] == o.kl_coef  # phase 2 came from the updated policy


# ---------------------------------------------------------------------------------------------------------------
# Two processes equal one


def torchrun(stage: str, flags: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "cakelm", stage, *flags, "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp)


def assert_same_run(single: Path, ddp: Path) -> None:
    a, b = rows_of(single), rows_of(ddp)
    assert len(a) == len(b) >= 2
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "reward"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, a, b)
    wa, wb = load_model(single)[0].state_dict(), load_model(ddp)[0].state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert load_meta(ddp)["world_size"] == 2


@pytest.mark.parametrize("stage", ["grpo", "rloo", "grpo-lora", "grpo-fsdp"])
def test_two_processes_equal_one(stage, chatty, prompts, tmp_path, user_rewards) -> None:
    # AdamW with a large epsilon: updates proportional to gradients (see test_ddp.py), small enough that the second
    # epoch's ratios stay inside the clip range (clipped everywhere, the gradient would be rounding noise); two
    # epochs of one rollout phase, sampled per prompt so each rank draws what the single process drew
    common = {**GROUPS, **QUIET, "init": str(chatty), "data": [prompts], "epochs": 2, "loop.max_steps": 2,
              "loop.eval_every": 2, "optim.eps": 1e-3, "optim.lr": 1e-5, "rewards": ["my_rewards:e_share"]}
    if stage == "rloo":
        common.update({"reward_model": "", "normalize_advantages": True, "kl_coef": 0.1})
    replay = ["--replay", "arithmetic"] if stage == "grpo" else []
    # FSDP2: the policy sharded over the 2 ranks, rollouts from its gathered weights, the reference whole on each
    sharded = ["--loop.parallel", "fsdp"] if stage == "grpo-fsdp" else []
    if stage == "grpo":  # SFT conversations replayed: 2 per micro-batch, 2 micro-batches on one process, 1 per rank
        common.update({"replay": ["arithmetic"], "replay_batch": 2, "replay_coef": 2.0})
    if stage == "grpo-lora":  # DDP over the adapters alone (the frozen weights are no DDP parameters)
        common.update({"lora.rank": 4, "optim.name": "adamw", "optim.lr": 1e-3, "kl_coef": 0.1,
                       "lora.base_dtype": "bf16"})  # and the frozen base kept in bf16
    stage = stage.removesuffix("-lora").removesuffix("-fsdp")
    main, cls = {"grpo": (grpo.main, grpo.GRPOConfig), "rloo": (rloo.main, rloo.RLOOConfig)}[stage]
    single = main(build_config(cls, ("test", {**common, "out": str(tmp_path / "single")})))
    proc = torchrun(stage, [*_flags({k: v for k, v in common.items() if not isinstance(v, list)}),
                            "--data", prompts, "--rewards", "my_rewards:e_share", *replay, *sharded, "--out",
                            str(tmp_path / "ddp")],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout
    assert_same_run(single, tmp_path / "ddp")
    # sharded runs save their optimizer as each rank's shards (DCP), DDP's as one file
    assert (tmp_path / "ddp" / OPTIMIZER_DIR / ".metadata").is_file() == bool(sharded)
    assert all(x["clip_frac"] < 0.5 and x["grad_norm"] > 1e-3 for x in rows_of(single))  # not degenerate
    if replay:  # the replayed conversations' NLL is the same whole-step mean on 1 process and on 2 ranks
        a, b = rows_of(single), rows_of(tmp_path / "ddp")
        assert all(y["replay_nll"] == pytest.approx(x["replay_nll"], rel=1e-4) for x, y in zip(a, b))
    val_a, val_b = rows_of(single)[-1], rows_of(tmp_path / "ddp")[-1]
    assert val_a["val_reward"] == pytest.approx(val_b["val_reward"], rel=1e-4)  # held-out prompts split over ranks
