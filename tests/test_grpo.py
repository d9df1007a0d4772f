"""`cakelm grpo` on tiny models: rollout log-probs match the training forward, the DDP-split loss equals the
single-process one in every aggregation mode, GRPO raises a reward, exact resume inside a rollout window, the
pipeline of rewards and the one-line errors."""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data.chat import Example
from cakelm.data.prompts import prompts_of
from cakelm.engine import SamplingParams
from cakelm.heldout import chat_loss
from cakelm.losses import aggregate, clipped_policy_loss
from cakelm.model import Transformer
from cakelm.rewards import load_reward
from cakelm.rl import RolloutBatches, score_rollouts
from cakelm.rollout import EngineGenerator, Rollout, completion_logprobs, to_batch
from cakelm.stages import grpo
from cakelm.tokenizer import Tokenizer
from tests.conftest import ctrl_c_at, tiny_checkpoint, tiny_model_config
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_sft import write_jsonl

TINY = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "val_size": 8, "optim.warmup_steps": 0,
        "group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8, "loop.batch_size": 8, "log_kl": False}

# A reward you would write yourself: the share of the letter "e" in the reply (every group has some signal).
REWARD_MODULE = '''
def e_share(prompt, completion, **fields):
    return completion.count("e") / max(len(completion), 1)

def broken(prompt, completion, **fields):
    raise KeyError("no such field")

def royal_e(prompt, completion, topic=None, **fields):
    # signal only for half the prompts: the others' groups all score 0
    return float(completion.count("e")) if topic in ("king", "queen", "lord") else 0.0
'''


@pytest.fixture(scope="module")
def chat_model(tok_dir, tmp_path_factory) -> Path:
    """A random-init tiny model saved as a chat checkpoint (GRPO needs one; it need not be any good)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("chat") / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4,
                           n_kv_heads=4, max_seq_len=64)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    rows = [{"prompt": f"Tell me about the {w} and the {v}.", "answer": str(i % 7), "topic": w}
            for i, (w, v) in enumerate((a, b) for a in ("king", "queen", "lord", "lady", "sword", "crown")
                                       for b in ("night", "day", "heart", "blood", "time", "house"))]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture
def user_rewards(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)  # `module:function` imports from the working directory
    sys.modules.pop("my_rewards", None)


def run_grpo(init: Path, data: list[str], out: Path, **kw) -> Path:
    return grpo.main(build_config(grpo.GRPOConfig, ("test", {"init": str(init), "data": data, "out": str(out),
                                                             **TINY, **kw})))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_logprobs_equal_the_sampling_ones(chat_model) -> None:
    from cakelm.checkpoint import load_model

    model, tok, _ = load_model(chat_model)
    examples = [Example("q", [{"role": "user", "content": "Tell me about the king."}]),
                Example("r", [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "And the night?"}], "3", {"topic": "night"})]
    rows_ = prompts_of(examples)
    assert rows_[1].messages[-1]["content"] == "And the night?" and rows_[1].fields == {"topic": "night",
                                                                                         "answer": "3"}
    for temperature in (1.0, 0.7):
        params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=3)
        rolls = EngineGenerator(model, tok).generate([r.messages for r in rows_], params, n=3)
        assert [r.prompt for r in rolls] == [0, 0, 0, 1, 1, 1]
        batch = to_batch(rolls, tok.pad_id)
        assert batch["mask"].sum(1).tolist() == [len(r.ids) for r in rolls]  # exactly the completion tokens
        with torch.no_grad():
            logp, entropy = completion_logprobs(model, batch["input"], batch["target"], temperature)
        # the training forward (full sequence, right padding) scores each sampled token as the engine did
        # (KV cache, left padding, under the same temperature): the importance ratio starts at 1
        torch.testing.assert_close(logp, batch["old_logp"], atol=2e-5, rtol=0)
        assert (entropy[batch["mask"] == 0] == 0).all() and (entropy[batch["mask"] == 1] > 0).all()


def test_frozen_logprobs_in_chunks_within_the_logits_budget(chat_model, monkeypatch) -> None:
    import cakelm.rollout as rollout
    from cakelm.checkpoint import load_model

    model = load_model(chat_model)[0]
    torch.manual_seed(0)
    inp = torch.randint(0, 320, (7, 20))
    target = torch.where(torch.rand(7, 20) < 0.6, torch.randint(0, 320, (7, 20)), torch.full((7, 20), -100))
    batch = {"input": inp, "target": target}
    with torch.no_grad():
        whole, _ = completion_logprobs(model, inp, target, 0.8)
        logits = torch.log_softmax(model(inp) / 0.8, dim=-1)  # the plain formula, at every position
    plain = logits.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)
    torch.testing.assert_close(whole, plain, atol=1e-5, rtol=0)
    calls = []
    original = rollout.completion_logprobs
    monkeypatch.setattr(rollout, "completion_logprobs", lambda m, i, t, temp: calls.append(len(i)) or
                        original(m, i, t, temp))
    monkeypatch.setattr(rollout, "LOGITS_BUDGET", 3 * 20 * 320)  # three rows of logits at a time
    torch.testing.assert_close(rollout.frozen_logprobs(model, batch, 0.8, 64, torch.device("cpu")), whole,
                               atol=1e-6, rtol=0)
    assert calls == [3, 3, 1]


@pytest.mark.parametrize("tied", [False, True])
def test_training_logprobs_with_the_head_in_recomputed_chunks_equal_the_whole(monkeypatch, tied: bool) -> None:
    """Past HEAD_BUDGET logits, a training forward runs the output head on row chunks that the backward pass
    recomputes: the same log-probs, entropies and gradients as the head over all rows at once."""
    import cakelm.rollout as rollout

    inp, tgt, old, adv, mask = _fixed_batch()  # 22 scored positions
    results = {}
    for budget in (10**9, 320 * 7):  # everything at once; 7 rows of logits at a time (4 chunks)
        monkeypatch.setattr(rollout, "HEAD_BUDGET", budget)
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(tie_embeddings=tied))
        calls: list[int] = []
        model.lm_head.register_forward_hook(lambda m, i, o, calls=calls: calls.append(o.shape[0]))
        logp, entropy = completion_logprobs(model, inp, tgt, 0.7)
        loss, units = aggregate(clipped_policy_loss(logp, old, adv)[0], mask, "token_mean", 7)
        (loss / units).backward()
        results[budget] = (logp.detach(), entropy, [p.grad for p in model.parameters()], calls)
    (logp, ent, grads, calls), (logp2, ent2, grads2, calls2) = results.values()
    # chunked: 4 chunks, then each again in the backward pass (last first)
    assert calls == [22] and calls2 == [7, 7, 7, 1, 1, 7, 7, 7]
    torch.testing.assert_close(logp2, logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent2, ent, rtol=0, atol=1e-6)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import cakelm.rollout as rollout

    faulthandler.dump_traceback_later(150, exit=True)  # a hang prints this rank's Python stacks and fails the test
    rollout.HEAD_BUDGET = 320 * 5  # the output head on chunks of 5 rows, recomputed in the backward pass
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    inp, tgt, old, adv, mask = _fixed_batch()
    half = slice(rank * 3, rank * 3 + 3)  # each rank gets 3 of the 6 completions
    results = {}
    for mode in ("token_mean", "sequence_mean", "constant"):
        logp, _ = completion_logprobs(ddp, inp[half], tgt[half])
        loss, units = aggregate(clipped_policy_loss(logp, old[half], adv[half])[0], mask[half], mode, 7)
        total = torch.tensor([units])
        dist.all_reduce(total)
        (loss * world / total).backward()  # the loop's normalisation: DDP averages, x world turns it into a sum
        if rank == 0:
            results[mode] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(results, out_file)
    # Free the DDP wrapper while the process group is still registered. Otherwise its Reducer, freed with the GIL
    # held when this function returns, drops the group's last reference and ~ProcessGroupGloo joins a gloo worker
    # thread that is destroying a finished allreduce whose thread-local state holds a Python object, waiting for
    # the GIL: a deadlock (py-spy showed both stacks; about 1 run in 25-100 here, twice in CI).
    del ddp
    dist.destroy_process_group()


def _fixed_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    inp = torch.randint(0, 320, (6, 9), generator=g)
    tgt = torch.randint(0, 320, (6, 9), generator=g)
    mask = torch.zeros(6, 9)
    for i, (a, b) in enumerate([(2, 9), (4, 6), (1, 8), (3, 4), (5, 9), (2, 3)]):  # completions of varied length
        mask[i, a:b] = 1
    tgt = torch.where(mask.bool(), tgt, -100)
    old = -torch.rand(6, 9, generator=g) * 6 * mask
    adv = torch.tensor([1.2, -0.4, -0.8, 0.5, 0.5, -1.0])
    return inp, tgt, old, adv, mask


def test_loss_split_across_two_processes_equals_one(tmp_path) -> None:
    """Two DDP ranks, each with half the completions (and the output head in recomputed chunks), give one
    process's gradients on the whole batch."""
    # rank 0's gradients come back in a file it writes (no Manager process to fork from this worker's threads)
    out = tmp_path / "grads.pt"
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180  # the two ranks take ~5 s: a hang fails here in 3 minutes, not at 10
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP ranks did not finish in 180 s")
    split = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    inp, tgt, old, adv, mask = _fixed_batch()
    for mode in ("token_mean", "sequence_mean", "constant"):
        logp, _ = completion_logprobs(model, inp, tgt)
        loss, units = aggregate(clipped_policy_loss(logp, old, adv)[0], mask, mode, 7)
        (loss / units).backward()
        for a, b in zip([p.grad for p in model.parameters()], split[mode], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant"])
def test_replay_is_weighted_by_the_micro_batch_units(mode) -> None:
    """GRPO's loss with replayed conversations is the aggregated policy loss + coef x their per-token NLL x the
    micro-batch's own loss units (reply tokens, replies, or replies x max_new_tokens), so the loop's division by a
    step's units gives coef x the units-weighted mean NLL over micro-batches and ranks (`losses.replay_loss`)."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    inp, tgt, old, adv, mask = _fixed_batch()
    g = torch.Generator().manual_seed(2)
    chat = {"input": torch.randint(0, 320, (2, 10), generator=g), "target": torch.randint(0, 320, (2, 10), generator=g)}
    chat["target"][0, :4] = -100  # a prompt part: not scored
    batch = {"input": inp, "target": tgt, "mask": mask, "old_logp": old, "adv": adv,
             **{f"chat_{k}": v for k, v in chat.items()}}
    cfg = build_config(grpo.GRPOConfig, ("test", {"aggregation": mode, "replay_coef": 2.0, "max_new_tokens": 7}))
    loss, out = grpo.grpo_loss(model, batch, cfg)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, inp, tgt)
        policy, units = aggregate(clipped_policy_loss(logp, old, adv)[0], mask, mode, 7)
        nll, n = chat_loss(model, chat)
    assert {"token_mean": mask.sum().item(), "sequence_mean": 6.0, "constant": 42.0}[mode] == units
    assert n.item() == 16 and out["replay_nll"].tolist() == pytest.approx([nll.item(), 16.0])
    assert loss.item() == pytest.approx((policy + 2.0 * nll / 16 * units).item(), rel=1e-5)


def test_grpo_raises_the_reward(chat_model, prompts, tmp_path, user_rewards) -> None:
    out = run_grpo(chat_model, [prompts], tmp_path / "grpo", rewards=["my_rewards:e_share"], group_size=6,
                   prompts_per_step=6, **{"loop.max_steps": 16, "loop.batch_size": 12, "loop.eval_every": 16,
                                          "optim.lr": 1e-2, "log_kl": True, "log_kl_every": 5})
    r = rows(out)
    assert len(r) == 16 and all(k in r[0] for k in ("reward", "reward_std", "zero_signal", "entropy", "clip_frac",
                                                    "kl", "reply_len", "rollout_s", "rollout_tok_s"))
    assert r[0]["ratio"] == pytest.approx(1.0, abs=1e-4) and r[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    first, last = sum(x["reward"] for x in r[:3]) / 3, sum(x["reward"] for x in r[-3:]) / 3
    assert last > first + 0.1, [round(x["reward"], 3) for x in r]
    # with --kl-coef 0 the reference scores every 5th rollout phase (one per step here) for the log, no other
    assert [x["step"] for x in r if "kl" in x] == [1, 6, 11, 16]
    assert r[-1]["kl"] > 0.01  # it moved away from the reference
    meta = load_meta(out)
    assert meta["stage"] == "grpo" and meta["chat_format"] == "chat" and meta["parent_stage"] == "sft"
    assert meta["rewards"] == ["my_rewards:e_share"] and "val_reward" in meta["metrics"]


def test_first_error_credit_starts_at_the_first_false_equation(chat_model, prompts, tmp_path, monkeypatch) -> None:
    """--credit first-error: the column of the first token of the first false result, in to_batch's layout (also
    when the reply's tokens begin with a space that Rollout.text strips); a reply without one starts at 0
    (sequence credit); and a run with it trains on per-token advantages."""
    tok = Tokenizer.load(chat_model / "tokenizer.json")
    rolls = []
    for text in ("6 + 7 = 12, carry 1. So 86 + 57 = 143.", "  6 + 7 = 12, carry 1. So 86 + 57 = 143.", "6 + 7 = 13."):
        ids = tok.encode(text) + [tok.end_id]
        rolls.append(Rollout(0, [1, 2, 3], ids, text.strip(), True, [0.0] * len(ids)))
    cols = grpo.first_error_columns(rolls, tok).tolist()
    for r, col in zip(rolls[:2], cols):
        k = col - 2  # the reply's token k (a prompt of 3 tokens: its last position predicts the reply's first)
        text = tok.decode(r.ids[:-1])
        assert len(tok.decode(r.ids[:k])) <= text.index("12") < len(tok.decode(r.ids[:k + 1]))  # token k: the "1"
    assert cols[2] == 0
    shapes = []
    real = grpo.first_error_advantages
    monkeypatch.setattr(grpo, "first_error_advantages", lambda *a: shapes.append(tuple(real(*a).shape)) or real(*a))
    out = run_grpo(chat_model, [prompts], tmp_path / "fe", credit="first-error", **{"loop.max_steps": 2})
    assert len(rows(out)) == 2 and load_meta(out)["config"]["credit"] == "first-error"
    assert len(shapes) == 2 and all(len(s) == 2 for s in shapes)  # (N, T) advantages, one phase a step


def test_dynamic_sampling_trains_on_groups_with_signal(chat_model, prompts, tmp_path, user_rewards) -> None:
    """--oversample 4: 8 prompts sampled per phase, some with signal; the 2 trained on are groups whose rewards
    differ, so the trained batch has a zero-signal group only when fewer than 2 of the 8 differ."""
    kw = {"rewards": ["my_rewards:royal_e"], "group_size": 4, "prompts_per_step": 2, "loop.max_steps": 4}
    r = rows(run_grpo(chat_model, [prompts], tmp_path / "dyn", oversample=4, **kw))
    pool, trained = [x["zero_signal"] for x in r], [x["trained_zero_signal"] for x in r]
    assert sum(pool) / len(pool) > 0.25, pool
    assert trained == [max(0, 2 - round(8 * (1 - p))) / 2 for p in pool] and min(trained) == 0.0, (pool, trained)
    plain = rows(run_grpo(chat_model, [prompts], tmp_path / "plain", **kw))
    assert "trained_zero_signal" not in plain[0] and plain[0]["zero_signal"] in (0.0, 0.5, 1.0)


def test_grpo_replays_sft_conversations(chat_model, prompts, tmp_path, user_rewards) -> None:
    """--replay-coef adds coef x the per-token NLL of replayed SFT conversations to GRPO's loss. With every reward
    0 the policy term is exactly 0 (every advantage is 0), so each step's logged loss is 2 x replay_nll, and the
    steps lower it: the replay alone is supervised training on SFT's data."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"Who has the {w}?"},
                      {"role": "assistant", "content": f"The {w} is with the {v}."}]}
        for w in ("king", "queen", "lord", "lady") for v in ("night", "day", "heart", "blood", "time", "house")])
    out = run_grpo(chat_model, [prompts], tmp_path / "grpo", rewards=["my_rewards:e_share=0"], replay_coef=2.0,
                   replay=[chats], replay_batch=6, **{"loop.max_steps": 10, "loop.batch_size": 16, "optim.lr": 3e-3})
    r = rows(out)
    assert len(r) == 10 and all(x["zero_signal"] == 1.0 for x in r)
    for x in r:  # one micro-batch per step: exact up to float rounding
        assert x["loss"] == pytest.approx(2.0 * x["replay_nll"], abs=1e-5), x
    assert r[0]["replay_nll"] > 1.0 and r[-1]["replay_nll"] < r[0]["replay_nll"] - 0.5, (r[0], r[-1])
    meta = load_meta(out)
    assert meta["replay"][chats]["weight"] == 1.0 and meta["config"]["replay_coef"] == 2.0
    plain = rows(run_grpo(chat_model, [prompts], tmp_path / "plain", rewards=["my_rewards:e_share=0"],
                          **{"loop.max_steps": 2, "loop.batch_size": 16, "optim.lr": 3e-3}))
    assert "replay_nll" not in plain[0] and plain[0]["loss"] == 0.0  # no replay: nothing to learn from zero rewards


@pytest.mark.parametrize("extra", [{}, {"oversample": 2}, {"replay_coef": 1.0, "replay": ["arithmetic"],
                                                              "replay_batch": 4}])
def test_resume_inside_a_rollout_window_is_exact(chat_model, prompts, tmp_path, monkeypatch, extra) -> None:
    """Also with dynamic sampling (--oversample 2): which questions a phase samples follows from its number, so a
    resumed run draws the same pool and keeps the same groups; and with SFT conversations replayed next to the
    rollouts (--replay-coef), which are a function of (step, micro-batch)."""
    kw = {"epochs": 2, "loop.max_steps": 6, "rewards": ["exact_match", "format=0.5"], **extra}
    straight = run_grpo(chat_model, [prompts], tmp_path / "straight", **kw)
    # Ctrl-C during step 3: steps 0-2 saved, step 3 reuses step 2's rollouts
    with ctrl_c_at(monkeypatch, RolloutBatches, 3, micro=0), \
            pytest.raises(SystemExit, match="continue with --resume"):
        run_grpo(chat_model, [prompts], tmp_path / "cut", **kw)
    assert load_meta(tmp_path / "cut")["step"] == 3
    resumed = run_grpo(chat_model, [prompts], tmp_path / "cut", resume=True, **kw)
    a, b = rows(straight), rows(resumed)
    assert [x["loss"] for x in a] == [x["loss"] for x in b] and [x["reward"] for x in a] == [x["reward"] for x in b]
    assert ("replay_nll" in a[0]) == ("replay_coef" in extra)  # the replay ran (and only where asked)
    from cakelm.checkpoint import load_model
    wa, wb = load_model(straight)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    assert a[3]["rollout_s"] == 0.0 and a[2]["rollout_s"] > 0  # step 3 trained on step 2's rollouts
    assert a[3]["clip_frac"] >= 0 and a[2]["ratio"] == pytest.approx(1.0, abs=1e-4)


def test_resume_refuses_a_crafted_batch_state(chat_model, prompts, tmp_path, capsys) -> None:
    """A train_state.pt whose rollouts were tampered with (or come from another run shape) is refused with one line,
    before any step trains on them; the checkpoint is left as it was."""
    run_grpo(chat_model, [prompts], tmp_path / "g", epochs=2, **{"loop.max_steps": 1})
    path = tmp_path / "g" / "train_state.pt"
    good = torch.load(path, weights_only=False)
    argv = ["grpo", "--init", str(chat_model), "--data", prompts, "--out", str(tmp_path / "g"), "--resume",
            "--epochs", "2", "--max-steps", "2", *_flags({k: v for k, v in TINY.items() if k != "loop.max_steps"})]
    for batches in ([{"bogus": 1}], [], [{"rollouts": {"phase": 0, "metrics": {},
                                                       "data": {"mask": torch.ones(3, 2)}}}]):
        torch.save({**good, "batches": batches}, path)
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "holds no batch state this stage can continue from" in err and len(err.splitlines()) == 1, err
        assert load_meta(tmp_path / "g")["step"] == 1
    torch.save(good, path)  # the real one resumes
    assert cli(argv) == 0 and load_meta(tmp_path / "g")["step"] == 2


def test_rewards_none_and_mask_truncated(chat_model, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    rows_ = prompts_of([Example("a", [{"role": "user", "content": "x"}], "4"),
                        Example("b", [{"role": "user", "content": "y"}])])  # b has no answer: exact_match is None

    def roll(prompt: int, text: str, ended: bool) -> Rollout:
        return Rollout(prompt, [tok.bos_id, tok.user_id], [5, tok.end_id if ended else 6], text, ended, [-1.0, -2.0])

    rolls = [roll(0, "It is 4.", True), roll(0, "It is 5.", False), roll(1, "?", True), roll(1, "!", True)]
    values, counts, failures = score_rollouts(
        [load_reward("exact_match"), load_reward("format=0.5")], rows_, rolls)
    assert values == [1.5, 0.0, 0.5, 0.5]  # format counts where exact_match does not apply
    assert counts == {"correct": 1, "answered": 2, "tokens": 8, "ended": 3, "unscored": 0, "calls": 8, "errors": 0}
    assert failures == []
    values, counts, _ = score_rollouts([load_reward("exact_match")], rows_, rolls)
    assert values == [1.0, 0.0, 0.0, 0.0] and counts["unscored"] == 2  # 0: the group has no scored reply
    batch = to_batch(rolls, tok.pad_id)
    assert batch["input"].shape == (4, 3) and batch["target"][0].tolist() == [-100, 5, tok.end_id]
    assert batch["old_logp"][0].tolist() == [0.0, -1.0, -2.0]


@pytest.mark.parametrize("args,message", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--temperature", "0"], "need --temperature > 0"),
    (["--oversample", "0"], "--oversample must be >= 1"),
    (["--rewards", "nope"], "not a built-in reward"),
    (["--rewards", "my_rewards:missing"], "my_rewards has no function missing"),
    (["--rewards", "my_rewards:broken"], "every reward call of the first rollout phase failed (16): reward "
                                         "my_rewards:broken failed on prompt 'Tell me about the"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--log-kl-every", "0"], "--log-kl-every must be >= 1, got 0"),
    (["--replay-coef", "-1"], "--replay-coef must be >= 0"),
    (["--replay-coef", "1", "--replay-batch", "0"], "--replay-batch >= 1"),
    (["--replay-coef", "1", "--replay", "nope"], "--replay nope: not a chat source"),
])
def test_bad_options_are_one_line_errors(chat_model, prompts, tmp_path, capsys, user_rewards, monkeypatch, args,
                                         message) -> None:
    from cakelm.scaffold import Run
    loaded = []  # the frozen reference (for the logged KL): a bad --replay fails before it is loaded
    monkeypatch.setattr(Run, "reference", lambda self: loaded.append(1) or Transformer(self.model.cfg))
    argv = ["grpo", "--init", str(chat_model), "--out", str(tmp_path / "o"), "--data", prompts,
            *_flags(TINY), "--log-kl", *args]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o" / "model.safetensors").exists()
    if "--replay" in args or "--replay-batch" in args:
        assert loaded == []


def test_base_model_is_refused(tok_dir, prompts, tmp_path, capsys) -> None:
    tiny_checkpoint(tmp_path / "base", tok_dir, "pretrain", "playscript")
    assert cli(["grpo", "--init", str(tmp_path / "base"), "--data", prompts, "--out", str(tmp_path / "o")]) == 2
    assert "run `cakelm sft` first" in capsys.readouterr().err
    chat = tiny_checkpoint(tmp_path / "chat", tok_dir, "sft", "chat")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "king " * 80}, {"prompt": "queen " * 80}])
    with pytest.raises(CakeError, match="no prompt of at most 24 tokens fits the model's context"):
        run_grpo(chat, [long], tmp_path / "o2")


def test_ranks_must_split_the_prompts(chat_model, prompts, tmp_path) -> None:
    # (the 2-process run equal to 1 process: tests/test_rl.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    odd = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "cakelm", "grpo", "--init", str(chat_model), "--data", prompts,
                          "--out", str(tmp_path / "odd"), *_flags({**TINY, "prompts_per_step": 3}), "--device",
                          "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert odd.returncode != 0 and "must be a multiple of the 2 ranks" in odd.stderr
    assert not (tmp_path / "odd" / "model.safetensors").exists()


def test_mask_truncated_leaves_cut_replies_out(chat_model, prompts, tmp_path) -> None:
    # a random model almost never says <|end|> within 3 tokens: with --mask-truncated nothing is trained on
    out = run_grpo(chat_model, [prompts], tmp_path / "masked", mask_truncated=True, max_new_tokens=3,
                   **{"loop.max_steps": 2, "optim.lr": 1e-2})
    r = rows(out)
    assert all(x["end_of_turn"] == 0.0 and x["loss"] == 0.0 and x["grad_norm"] == 0.0 for x in r)
    from cakelm.checkpoint import load_model
    before, after = load_model(chat_model)[0].state_dict(), load_model(out)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
