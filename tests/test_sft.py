"""`cakelm sft` and `cakelm eval` on a tiny model: accumulation invariance, exact resume, DDP, learning a task,
the chat-format checkpoint, and the one-line errors."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta, load_model
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data.chat import saved_task_sizes
from cakelm.data.chat_batches import ChatBatches
from cakelm.heldout import chat_loss
from cakelm.losses import IGNORE_INDEX, lm_loss
from cakelm.model import ModelConfig, Transformer
from cakelm.stages import eval as eval_stage
from cakelm.stages import sft
from tests.conftest import ctrl_c_at, tiny_checkpoint
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_loop import losses

TINY = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "val_size": 8, "optim.warmup_steps": 0}
NOREP = {"repeat_unlikelihood": 0.0}  # the tests of plain SFT run without the default repeat penalty


def last_digit_rows(n: int, seed: int) -> list[dict]:
    """A toy task with held-out generalisation: the last digit of a 3-4 digit number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = rng.randint(100, 9999)
        rows.append({"prompt": f"What is the last digit of {x}?", "completion": f"It is {x % 10}.",
                     "answer": str(x % 10)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base(tok_dir, tmp_path_factory) -> Path:
    """A random-init tiny checkpoint standing in for a pretrained base model."""
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "base", tok_dir, "pretrain", "playscript", dim=64,
                           n_heads=4, n_kv_heads=4, max_seq_len=256)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    train = last_digit_rows(600, seed=1)
    held = [r for r in last_digit_rows(100, seed=2) if r["prompt"] not in {t["prompt"] for t in train}]
    return {"train": write_jsonl(root / "train.jsonl", train), "eval": write_jsonl(root / "eval.jsonl", held)}


def run_sft(base: Path, data: list[str], out: Path, **kw) -> Path:
    return sft.main(build_config(sft.SFTConfig, ("test", {"init": str(base), "data": data, "out": str(out),
                                                         **TINY, **NOREP, **kw})))


def test_accumulation_does_not_change_the_loss(base, toy, tmp_path) -> None:
    # 1 micro-batch of 8 conversations and 4 x 2 give the same loss and gradient norm at every step (loss
    # normalised by the target tokens of the whole step); AdamW with a large eps keeps updates proportional
    # to gradients, so rounding-level differences do not grow
    common = {"loop.max_steps": 3, "optim.name": "adamw", "optim.eps": 1e-3}
    a = run_sft(base, [toy["train"]], tmp_path / "a", **common, **{"loop.batch_size": 8, "loop.grad_accum": 1})
    b = run_sft(base, [toy["train"]], tmp_path / "b", **common, **{"loop.batch_size": 4, "loop.grad_accum": 2})
    c = run_sft(base, [toy["train"]], tmp_path / "c", **common, **{"loop.batch_size": 2, "loop.grad_accum": 4,
                                                                    "packing": False})
    ra, rb, rc = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b, c))
    for x, y, z in zip(ra, rb, rc):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) == pytest.approx(z["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4) == pytest.approx(z["grad_norm"], rel=1e-4)
    meta = load_meta(a)
    assert meta["stage"] == "sft" and meta["chat_format"] == "chat" and meta["complete"]


def test_resume_continues_exactly(base, toy, tmp_path, monkeypatch) -> None:
    data, kw = [toy["train"], "arithmetic=0.5"], {"task_size": 200, "loop.batch_size": 8, "loop.max_steps": 6}
    straight = run_sft(base, data, tmp_path / "straight", **kw)
    # Ctrl-C while step 3's batch loads: steps 0-2 are saved
    with ctrl_c_at(monkeypatch, ChatBatches, 3), pytest.raises(SystemExit, match="continue with --resume"):
        run_sft(base, data, tmp_path / "cut", **kw)
    assert load_meta(tmp_path / "cut")["step"] == 3
    resumed = run_sft(base, data, tmp_path / "cut", resume=True, **kw)
    assert losses(straight) == losses(resumed)  # bit for bit
    wa, wb = load_model(straight)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # and so are the weights
    # with generated tasks sized from the run (--task-size 0), going on past the end keeps the same problems
    auto = {**kw, "task_size": 0, "loop.max_steps": 2}
    run_sft(base, ["arithmetic"], tmp_path / "auto", **auto)
    size = load_meta(tmp_path / "auto")["data"]["arithmetic"]["task_size"]
    run_sft(base, ["arithmetic"], tmp_path / "auto", resume=True, **{**auto, "loop.max_steps": 4})
    assert load_meta(tmp_path / "auto")["data"]["arithmetic"]["task_size"] == size
    assert load_meta(tmp_path / "auto")["parent_stage"] == "pretrain"
    with pytest.raises(CakeError, match="options differ"):
        run_sft(base, [toy["train"]], tmp_path / "cut", resume=True, **{**kw, "loop.max_steps": 8})


def test_chat_loss_runs_the_head_at_the_assistant_tokens_only_with_the_full_logits_loss() -> None:
    """SFT's loss (and the held-out chat loss, and RL's replay) applies the output head at the scored positions
    only; the loss and every gradient are those of the head at every position, on packed rows with padding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=16))
    inp, target = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    target[0, :5] = target[1, :3] = target[1, 10:] = IGNORE_INDEX  # prompts and padding are not scored
    segments = torch.tensor([[0] * 8 + [1] * 8, [0] * 10 + [1] * 6])  # two conversations packed in each row
    batch = {"input": inp, "target": target, "segments": segments}
    full, n_full = lm_loss(model(inp, segments=segments), target)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shapes: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    part, n_part = chat_loss(model, batch)
    hook.remove()
    part.backward()
    assert n_part == n_full == 18 and shapes == [(18, 50)]  # 11 + 7 scored positions of 32: 18 rows of logits
    assert part.item() == pytest.approx(full.item(), rel=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    # a batch with nothing to score: 0 and 0, not an error
    none, n_none = chat_loss(model, {**batch, "target": torch.full_like(target, IGNORE_INDEX)})
    assert none.item() == 0.0 and n_none.item() == 0


def test_unlikelihood_adds_its_weighted_term(base, toy, tmp_path) -> None:
    """--unlikelihood A: the step's loss is the assistant tokens' nll plus A x their unlikelihood, both logged per
    assistant token; the nll is the loss of a run without it (the same weights and batch at step 0)."""
    kw = {"loop.max_steps": 1, "loop.batch_size": 8, "loop.log_every": 1}
    plain = run_sft(base, [toy["train"]], tmp_path / "plain", unlikelihood=0.0, **kw)
    ul = run_sft(base, [toy["train"]], tmp_path / "ul", unlikelihood=0.5, **kw)
    (p,), (u,) = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
                  for d in (plain, ul))
    assert u["nll"] == pytest.approx(p["loss"], rel=1e-5) and "unlikelihood" not in p
    assert u["unlikelihood"] > 0.01
    assert u["loss"] == pytest.approx(u["nll"] + 0.5 * u["unlikelihood"], rel=1e-5)


def test_repeat_penalty_marks_the_repeats_of_each_reply(base, toy) -> None:
    """RepeatPenalty's micro-batch 0 carries each reply's tokens that repeat a 4-gram of it as the targets of the
    positions before them (IGNORE_INDEX elsewhere); other micro-batches are the chat batches alone."""
    from cakelm.losses import IGNORE_INDEX
    from cakelm.rollout import Rollout

    class Replies:  # a generator whose replies are known: the second has "5 6 7 8" twice
        def generate(self, rows, params):
            assert params.temperature == 0.0 and params.max_new_tokens == 12 and len(rows) == 2
            return [Rollout(0, [1, 2, 3], [9, 9, 4, 2], "", True, [0.0] * 4),
                    Rollout(1, [1, 2], [5, 6, 7, 8, 5, 6, 7, 8, 2], "", True, [0.0] * 9)]

    class Chat:
        global_batch = 4

        def get(self, step, micro):
            return {"input": torch.zeros(1, 3, dtype=torch.long), "n": 3, "step": step, "micro": micro}

    openings = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    pen = sft.RepeatPenalty(Chat(), Replies(), openings, 2, 12, every=1, rank=0, world_size=1, seed=0, pad_id=0)
    assert pen.reads_model(0) and "repeat_input" not in pen.get(0, 1)
    b = pen.get(0, 0)
    assert b["step"] == 0 and b["repeat_input"].shape == b["repeat_target"].shape == (2, 10)
    assert (b["repeat_target"][0] == IGNORE_INDEX).all()
    want = [IGNORE_INDEX] * 5 + [5, 6, 7, 8, IGNORE_INDEX]  # the prompt has 2 tokens: reply targets start at 1
    assert b["repeat_target"][1].tolist() == want
    assert b["repeat_input"][1].tolist() == [1, 2, 5, 6, 7, 8, 5, 6, 7, 8]
    assert b["repeat_replies"].tolist() == [1.0, 2.0]
    # openings are taken in a seeded order, each step the next ones (wrapping round); with every=2 only even
    # steps answer, and they take the openings odd steps would have taken with every=1
    asked = []
    Replies.generate = lambda self, rows, params: asked.append(rows) or [Rollout(0, [1], [3, 2], "", True, [0.0] * 2)]
    pen.per_step = 1
    for step in range(3):
        pen.get(step, 0)
    half = sft.RepeatPenalty(Chat(), Replies(), openings, 1, 12, every=2, rank=0, world_size=1, seed=0, pad_id=0)
    assert not half.reads_model(1) and "repeat_input" not in half.get(1, 0)
    for step in (0, 2, 4):
        half.get(step, 0)
    assert sorted(pen.order) == list(range(5))
    assert asked[:3] == asked[3:] == [[openings[pen.order[j]]] for j in range(3)]


def test_repeat_unlikelihood_adds_its_weighted_term_and_resumes(base, toy, tmp_path, monkeypatch, capsys) -> None:
    """--repeat-unlikelihood A: the step's loss is the chat nll (that of a run without it) plus A x the
    unlikelihood of the repeats in the model's own greedy replies, logged per assistant token, with the share of
    replies that repeat; the random-init model loops, so the term is not zero. An interrupted run resumes bit for
    bit (its replies depend on the weights only)."""
    kw = {"loop.max_steps": 1, "loop.batch_size": 8, "repeat_prompts": 4, "repeat_tokens": 24}
    plain = run_sft(base, [toy["train"]], tmp_path / "plain", **kw)
    rep = run_sft(base, [toy["train"]], tmp_path / "rep", repeat_unlikelihood=0.5, **kw)
    (p,), (r,) = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
                  for d in (plain, rep))
    assert r["nll"] == pytest.approx(p["loss"], rel=1e-5) and "repeat_unlikelihood" not in p
    assert r["repeat_replies"] > 0 and r["repeat_unlikelihood"] > 0.001
    assert r["loss"] == pytest.approx(r["nll"] + 0.5 * r["repeat_unlikelihood"], rel=1e-5)
    # tasks only: nothing to open from, so the penalty is off, and says so
    run_sft(base, ["arithmetic"], tmp_path / "tasks", task_size=50, repeat_unlikelihood=0.5, **kw)
    assert "--repeat-unlikelihood 0.5 is off: no chat source" in capsys.readouterr().out
    assert "repeat_unlikelihood" not in (tmp_path / "tasks" / "metrics.jsonl").read_text()
    kw = {**kw, "loop.max_steps": 4, "repeat_unlikelihood": 0.5}
    straight = run_sft(base, [toy["train"]], tmp_path / "straight", **kw)
    with ctrl_c_at(monkeypatch, ChatBatches, 2), pytest.raises(SystemExit, match="continue with --resume"):
        run_sft(base, [toy["train"]], tmp_path / "cut", **kw)
    resumed = run_sft(base, [toy["train"]], tmp_path / "cut", resume=True, **kw)
    assert losses(straight) == losses(resumed)


def test_sft_learns_a_held_out_task(base, toy, tmp_path) -> None:
    def accuracy(ckpt: Path) -> dict:  # asked in the chat format, before and after
        cfg = build_config(eval_stage.EvalConfig, ("test", {"ckpt": str(ckpt), "tasks": [toy["eval"]],
                                                            "max_new_tokens": 16, "playscript": False}))
        return eval_stage.evaluate_checkpoint(cfg)["tasks"][toy["eval"]]

    before = accuracy(base)
    out = run_sft(base, [toy["train"]], tmp_path / "sft", **{"loop.max_steps": 150, "loop.batch_size": 32,
                                                             "optim.lr": 2e-2, "loop.log_every": 50})
    after = accuracy(out)
    assert before["n"] == after["n"] >= 90
    assert before["accuracy"] < 0.3 and before["end_of_turn"] < 0.5
    assert after["accuracy"] >= 0.9, (after["accuracy"], after["examples"])
    assert after["end_of_turn"] >= 0.95
    # the checkpoint speaks the chat format: `cakelm chat` answers in it
    model, tok, meta = load_model(out)
    assert meta["chat_format"] == "chat" and meta["parent"] == str(base)


def test_eval_json_and_table(base, toy, tmp_path, capsys) -> None:
    path = tmp_path / "e.json"
    assert cli(["eval", str(base), "--tasks", "arithmetic", toy["eval"], "chat", "--chat-data", toy["eval"],
                "--limit", "12", "--max-new-tokens", "4", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["format"] == "playscript" and set(result["tasks"]) == {"arithmetic", toy["eval"]}
    arith = result["tasks"]["arithmetic"]
    assert arith["n"] + arith["too_long"] == 12 and 0 <= arith["accuracy"] <= 1 and arith["shots"] == 3
    assert result["chat"]["tokens"] > 0 and result["chat"]["loss"] > 0
    table = capsys.readouterr().out
    assert "arithmetic" in table and "chat loss" in table


@pytest.mark.parametrize("args,message", [
    (["--init", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--data", "arithmetic=-1"], "weight must be a positive number"),
    (["--data", "arithmetic", "arithmetic=2"], "--data lists arithmetic twice"),
    (["--task-size", "-1"], "--task-size must be >= 0"),
    (["--val-fraction", "1.5"], "val-fraction must be in (0, 1)"),
    (["--unlikelihood", "-1"], "unlikelihood must be >= 0"),
    (["--unlikelihood", "nan"], "unlikelihood must be >= 0"),
    (["--repeat-unlikelihood", "-1"], "repeat-unlikelihood must be >= 0"),
    (["--repeat-unlikelihood", "nan"], "repeat-unlikelihood must be >= 0"),
    (["--repeat-tokens", "3"], "--repeat-tokens >= 4"),
    (["--repeat-every", "0"], "--repeat-every must be >= 1"),
])
def test_bad_options_are_one_line_errors(base, tmp_path, capsys, args, message) -> None:
    argv = ["sft", "--init", str(base), "--out", str(tmp_path / "o"), "--data", "arithmetic", *args]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_eval_rows(base, tmp_path, capsys) -> None:
    bad = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    assert cli(["eval", str(base), "--tasks", bad]) == 2
    assert 'noanswer.jsonl:1: an evaluation row needs an "answer" field' in capsys.readouterr().err
    # questions need no reference reply: {"prompt", "answer"} or messages ending on the user
    ok = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 2 + 2?", "answer": 4},
                                            {"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "1 + 1?"}], "answer": "2"}])
    cfg = build_config(eval_stage.EvalConfig, ("test", {"ckpt": str(base), "tasks": [ok], "max_new_tokens": 4}))
    assert eval_stage.evaluate_checkpoint(cfg)["tasks"][ok]["n"] == 2


def test_ddp_two_processes_match_one(base, toy, tmp_path) -> None:
    common = {**TINY, **NOREP, "loop.max_steps": 3, "optim.name": "adamw", "optim.eps": 1e-3}
    single = run_sft(base, [toy["train"]], tmp_path / "single", **{**common, "loop.batch_size": 4,
                                                                    "loop.grad_accum": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cakelm", "sft", "--init", str(base), "--data", toy["train"], "--out", str(tmp_path / "ddp"),
           *_flags({**common, "loop.batch_size": 4}), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_meta(tmp_path / "ddp")["world_size"] == 2
    for a, b in zip(losses(single), losses(tmp_path / "ddp"), strict=True):
        assert abs(a - b) < 1e-4


def test_ddp_with_repeat_unlikelihood(base, toy, tmp_path) -> None:
    """Two forward passes before one backward (the chat batch, then the model's own replies) under DDP: each rank
    answers its own openings, the gradients are averaged, and both terms are logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cakelm", "sft", "--init", str(base), "--data", toy["train"], "--out", str(tmp_path / "ddp"),
           *_flags({**TINY, "loop.max_steps": 2, "loop.batch_size": 4, "repeat_unlikelihood": 0.5,
                    "repeat_prompts": 2, "repeat_tokens": 16, "repeat_every": 1}), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and all(r["repeat_unlikelihood"] >= 0 and 0 <= r["repeat_replies"] <= 1 for r in rows)
    assert load_meta(tmp_path / "ddp")["world_size"] == 2


def test_pass_at_k_by_hand() -> None:
    from math import comb

    from cakelm.tasks import pass_at_k

    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # 1 - C(199,100)/C(200,100): no overflow at large n
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_by_hand() -> None:
    from cakelm.tasks import majority_vote

    assert majority_vote(["So it is 12.", "13", "It is 12", "no idea"]) == "12"
    assert majority_vote(["5", "6", "6", "5"]) == "5"  # a tie: the answer seen first
    assert majority_vote(["1,234", "1234", "99"]) == "1234"  # the same number, written two ways
    assert majority_vote(["no idea", ""]) is None and majority_vote([]) is None


def test_eval_pass_at_k(base, tmp_path, monkeypatch) -> None:
    """pass@k over sampled replies: the mean of the unbiased estimate per problem, each problem seeded on its own
    (so the numbers repeat), and off unless asked for; maj@k: the share of problems whose most common answer is
    right."""
    from types import SimpleNamespace

    from cakelm.tasks import pass_at_k

    right = {0: 0, 1: 1, 2: 3, 3: 4, 4: 2}  # problem -> how many of its 4 samples are right (answer 42; else 7)

    class Fake:
        def generate(self, prompts, params, n, seeds):
            assert params.temperature == 0.8 and n == 4 and len(seeds) == len(prompts)
            return [SimpleNamespace(prompt_index=p, text="So it is 42." if s < right[int(prompts[p][0])] else "7")
                    for p in range(len(prompts)) for s in range(n)]

    cfg = build_config(eval_stage.EvalConfig, ("test", {"ckpt": "x", "pass_k": [1, 4, 2], "batch_size": 8}))
    got, maj = eval_stage.sampled_pass_at_k(Fake(), [[p] for p in range(5)], ["42"] * 5,
                                            eval_stage.SamplingParams(max_new_tokens=5), cfg)
    assert list(got) == ["1", "2", "4"]
    for k in (1, 2, 4):
        assert got[str(k)] == pytest.approx(sum(pass_at_k(4, c, k) for c in right.values()) / 5)
    # majorities: 7, 7, 42, 42 and a 2-2 tie that the first answer seen (42) wins
    assert maj == pytest.approx(3 / 5)
    monkeypatch.undo()
    path = tmp_path / "e.json"
    argv = ["eval", str(base), "--tasks", "arithmetic", "--limit", "6", "--max-new-tokens", "4", "--pass-k", "1", "4",
            "--json", str(path)]
    assert cli(argv) == 0
    first = json.loads(path.read_text())["tasks"]["arithmetic"]["pass_at_k"]
    assert set(first) == {"1", "4"} and 0 <= first["1"] <= first["4"] <= 1
    assert 0 <= json.loads(path.read_text())["tasks"]["arithmetic"]["maj_at_k"]["4"] <= first["4"]
    assert cli(argv) == 0 and json.loads(path.read_text())["tasks"]["arithmetic"]["pass_at_k"] == first
    assert cli(["eval", str(base), "--pass-k", "0"]) == 2


def test_saved_task_sizes_read_and_crafted_meta_refused() -> None:
    """What --resume takes from meta.json: the task sizes a run recorded; a crafted entry is a one-line error."""
    meta = {"data": {"arithmetic": {"weight": 0.8, "task_size": 1200}, "chitchat": {"weight": 0.2, "task_size": None}}}
    assert saved_task_sizes(meta, "data", "runs/x") == {"arithmetic": 1200}
    assert saved_task_sizes({}, "replay", "runs/x") == {}
    for entry, message in [([1, 2], "'data' must map each source"), ({"arithmetic": 5}, "'data' must map each source"),
                           ({"arithmetic": {"task_size": "9e9"}}, "data.arithmetic.task_size must be a whole number"),
                           ({"arithmetic": {"task_size": -3}}, "must be a whole number >= 0, got -3"),
                           ({"arithmetic": {"task_size": True}}, "got True"),
                           ({"arithmetic": {"task_size": 1.5}}, "got 1.5")]:
        with pytest.raises(CakeError, match=f"runs/x/meta.json: .*{re.escape(message)}"):
            saved_task_sizes({"data": entry}, "data", "runs/x")
