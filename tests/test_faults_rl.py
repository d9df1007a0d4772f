"""Fault injection for RL and data (issue 22): rewards that hang, raise or meet hostile replies cannot take a run
down; a run that cannot score any reply stops with one line; the same corpus in two folders gives the same split,
tokenizer and first-step loss."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data.sources import Doc, split_documents
from cakelm.loop import StopRun
from cakelm.rewards import BUILTIN, WeightedReward, equations, exact_match, load_reward, score
from cakelm.stages import data as data_stage
from cakelm.stages import pretrain
from cakelm.stages import tokenizer as tokenizer_stage
from cakelm.tasks import final_number
from tests.conftest import make_corpus
from tests.test_ddp import _flags
from tests.test_grpo import TINY, chat_model, prompts, rows, run_grpo  # noqa: F401 (fixtures)
from tests.test_sft import write_jsonl

pytestmark = pytest.mark.faults

# Rewards that break: every 5th call of `hang` spins (a pure-Python loop, 30 s at most so that a missing time
# limit fails the test instead of hanging it), every 3rd call of `flaky` raises; `late` raises from call 17 on,
# i.e. in the second rollout phase of TINY (4 prompts x 4 replies).
FAULTY = '''
import os
import time
calls = {"hang": 0, "flaky": 0, "late": 0, "rank1": 0}

def hang(prompt, completion, **_):
    calls["hang"] += 1
    if calls["hang"] % 5 == 0:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            try:
                pass
            except Exception:  # a reward that swallows errors still cannot swallow the time limit
                pass
    return 1.0

def flaky(prompt, completion, **_):
    calls["flaky"] += 1
    if calls["flaky"] % 3 == 0:
        raise ValueError("cannot parse " + completion[:10])
    return len(completion) / 10

def late(prompt, completion, **_):
    calls["late"] += 1
    if calls["late"] > 16:
        raise ZeroDivisionError("division by zero")
    return completion.count("e") / max(len(completion), 1)

def crash(prompt, completion, **_):  # under torchrun: rank 1's next training step fails with a bug, not a bad input
    if os.environ.get("RANK") == "1":
        import cakelm.loop

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the step")
        cakelm.loop.set_lr = broken
    return completion.count("e") / max(len(completion), 1)

def rank1(prompt, completion, **_):  # under torchrun: fails on rank 1 only, from its second phase (8 calls each)
    calls["rank1"] += 1
    if os.environ.get("RANK") == "1" and calls["rank1"] > 8:
        raise RuntimeError("rank 1 only")
    return completion.count("e") / max(len(completion), 1)
'''


@pytest.fixture
def faulty(tmp_path, monkeypatch) -> Path:
    (tmp_path / "faulty_rewards.py").write_text(FAULTY)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("faulty_rewards", None)
    yield tmp_path
    sys.modules.pop("faulty_rewards", None)


# ----------------------------------------------------------------------------------------------------------------
# Built-in rewards on hostile replies

HOSTILE = {
    "long sum, no result": "1+" * 50_000 + "1",  # the old equation regex backtracked over this: ~110 s
    "long sum with a result": "1 + " * 25_000 + "1 = 25001",
    "5,000-digit equation": "9" * 5000 + " + 1 = 1" + "0" * 5000,  # int() of > 4,300 digits raises
    "5,000-digit answer": "The answer is " + "7" * 5000 + ".",
    "huge decimal": "so " + "1" * 400 + ".5",  # beyond a float: OverflowError in final_number
    "spaces after an operator": "1 + " + " " * 100_000 + "x",
    "equals signs": "= " * 50_000,
    "dots": "1." * 50_000,
    "repeated equations": "1 = " * 25_000,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_builtin_rewards_never_fail_on_hostile_replies(name) -> None:
    """Every built-in, on 10-100k characters of hostile text, under a time limit far above what linear time needs
    (a quadratic regular expression or a 5,000-digit int() would fail here): no failure, finite values."""
    text = HOSTILE[name]
    rewards = [WeightedReward(n, fn, 1.0) for n, fn in BUILTIN.items() if n != "gym"]
    t0 = time.perf_counter()
    total, parts, failures = score(rewards, "What is 12 + 7?", text, {"answer": "19", "finish_reason": "stop"},
                                   timeout=10.0)
    assert failures == [], failures
    assert math.isfinite(total) and all(v is None or math.isfinite(v) for v in parts.values())
    assert time.perf_counter() - t0 < 10.0


def test_hostile_numbers_read_as_expected() -> None:
    # the long or huge equations are not checked; the small one next to them still is
    assert equations("q", "2 + 2 = 4. " + HOSTILE["long sum with a result"]) == 1.0
    assert equations("q", "2 + 2 = 5. " + HOSTILE["5,000-digit equation"]) == 0.0
    assert equations("q", "7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85.") == 1.0
    assert final_number(HOSTILE["huge decimal"]) is None and final_number("9" * 5000) is None
    assert final_number("x " + "9" * 4000) == "9" * 4000  # long but readable numbers are still read
    assert exact_match("q", HOSTILE["5,000-digit answer"], answer="7") == 0.0


def test_time_limit_cuts_a_hanging_reward_and_restores_the_previous_alarm() -> None:
    def spin(prompt, completion, **_):
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # swallows every Exception: the time limit is not one
                pass

    fired = []

    def theirs(signum, frame) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, theirs)
    signal.setitimer(signal.ITIMER_REAL, 100.0)  # someone else's alarm (a test timeout, say)
    try:
        t0 = time.perf_counter()
        total, parts, failures = score([WeightedReward("spin", spin, 1.0), load_reward("format")], "q", "reply",
                                       {"finish_reason": "stop"}, timeout=0.3)
        assert 0.3 <= time.perf_counter() - t0 < 5.0
        assert failures == ["reward spin failed on prompt 'q': timed out after 0.3s (--reward-timeout)"]
        assert total == 1.0 and parts == {"spin": 0.0, "format": 1.0}
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 90.0 < remaining <= 100.0 and not fired  # the other alarm keeps its deadline and its handler
        assert signal.getsignal(signal.SIGALRM) is theirs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------------
# Failing rewards in GRPO runs


def test_failing_rewards_are_scored_and_counted(chat_model, prompts, tmp_path, faulty, capsys) -> None:  # noqa: F811
    """--reward-errors score (the default): a reward that hangs (cut at --reward-timeout) or raises scores 0, the
    run completes, and metrics.jsonl counts the failures per phase (5 of flaky's 16 calls, 3 of hang's)."""
    t0 = time.perf_counter()
    out = run_grpo(chat_model, [prompts], tmp_path / "g", rewards=["faulty_rewards:hang", "faulty_rewards:flaky"],
                   reward_timeout=0.2, **{"loop.max_steps": 2})
    assert time.perf_counter() - t0 < 25  # 6 hangs of 0.2 s, not 30 s each
    r = rows(out)
    assert [x["reward_errors"] for x in r] == [8, 8]
    assert r[-1]["val_reward_errors"] > 0 and all(math.isfinite(x["reward"]) for x in r)
    assert load_meta(out)["complete"] is True
    err = capsys.readouterr().err
    assert "rollout phase 0: 8 of 32 reward calls failed and scored 0; first: reward faulty_rewards:flaky failed " \
           "on prompt 'Tell me about the" in err and "ValueError: cannot parse" in err


def test_reward_errors_stop_saves_then_stops(chat_model, prompts, tmp_path, faulty, capsys) -> None:  # noqa: F811
    """--reward-errors stop: the first failed call (second phase) stops the run with one line, after saving the
    step before it; once the reward is fixed, --resume finishes the run."""
    argv = ["grpo", "--init", str(chat_model), "--data", prompts, "--out", str(tmp_path / "g"),
            *_flags({**TINY, "loop.max_steps": 3}), "--rewards", "faulty_rewards:late", "--reward-errors", "stop"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cakelm grpo: error: --reward-errors stop: 16 failed reward call(s) in rollout phase 1; ")
    assert "first: reward faulty_rewards:late failed on prompt 'Tell me about the" in err
    assert "ZeroDivisionError: division by zero" in err and f"saved step 1 in {tmp_path / 'g'}" in err
    meta = load_meta(tmp_path / "g")
    assert meta["step"] == 1 and meta["complete"] is False
    (faulty / "faulty_rewards.py").write_text(FAULTY.replace('calls["late"] > 16', "False"))
    sys.modules.pop("faulty_rewards", None)
    assert cli([*argv, "--resume"]) == 0
    assert load_meta(tmp_path / "g")["step"] == 3 and [x["step"] for x in rows(tmp_path / "g")] == [1, 2, 3]


def test_reward_errors_stop_every_rank_together(chat_model, prompts, tmp_path, faulty) -> None:  # noqa: F811
    """Under DDP a reward that fails on rank 1 only stops rank 0 too (the failures are in the phase's all-reduce),
    both after saving the same step: no rank waits forever for the other."""
    from tests.test_rl import torchrun

    proc = torchrun("grpo", ["--init", str(chat_model), "--data", prompts, "--out", str(tmp_path / "g"),
                             *_flags({**TINY, "loop.max_steps": 3}), "--rewards", "faulty_rewards:rank1",
                             "--reward-errors", "stop"], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cakelm grpo: error: ")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all("--reward-errors stop: 8 failed reward call(s) in rollout phase 1; first: " in e and
               f"saved step 1 in {tmp_path / 'g'}" in e for e in errors)
    assert sorted("RuntimeError: rank 1 only" in e for e in errors) == [False, True]  # rank 1 says what failed
    # the step was written before either rank exited (torchrun ends every rank when the first one exits, so a rank
    # that left before rank 0 finished saving would cut the save off and end rank 0 before it said why)
    meta = load_meta(tmp_path / "g")
    assert meta["step"] == 1 and meta["complete"] is False
    assert sum("first: on another rank (see its error)" in e for e in errors) == 1
    meta = load_meta(tmp_path / "g")
    assert meta["step"] == 1 and meta["world_size"] == 2 and meta["complete"] is False


def test_a_crash_on_one_rank_ends_the_run_with_its_traceback(chat_model, prompts, tmp_path, faulty) -> None:  # noqa: F811
    """An unexpected error (a bug, not a CakeError) on rank 1 after DDP is built: that rank prints which rank failed
    and the traceback and exits 1, and the run ends; no rank hangs (`__main__.main` frees the traceback, and
    the DDP wrapper in it, before destroying the process group)."""
    from tests.test_rl import torchrun

    proc = torchrun("grpo", ["--init", str(chat_model), "--data", prompts, "--out", str(tmp_path / "g"),
                             *_flags({**TINY, "loop.max_steps": 3}), "--rewards", "faulty_rewards:crash"], tmp_path)
    assert proc.returncode != 0
    assert "cakelm grpo: rank 1 failed:\nTraceback (most recent call last):" in proc.stderr, proc.stderr[-3000:]
    assert "RuntimeError: a bug in the step" in proc.stderr
    # rank 0 then fails in its next collective (the peer is gone) or is ended by torchrun; neither waits (a hang
    # would exceed torchrun()'s time limit)


def test_reward_errors_stop_at_the_first_step_saves_nothing(chat_model, prompts, tmp_path, faulty) -> None:  # noqa: F811
    with pytest.raises(StopRun, match="--reward-errors stop: 5 failed reward call.s. in rollout phase 0") as e:
        run_grpo(chat_model, [prompts], tmp_path / "g", rewards=["faulty_rewards:flaky"], reward_errors="stop")
    assert "saved" not in str(e.value) and not (tmp_path / "g" / "model.safetensors").exists()


def test_unscorable_prompts_are_a_one_line_error(chat_model, tmp_path, capsys) -> None:  # noqa: F811
    """Prompts without an "answer" and the default exact_match: nothing could ever be scored (item 15)."""
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": f"Tell me about the {w}."} for w in
                                                 ("king", "queen", "lord", "lady", "sword", "crown", "night", "day")])
    argv = ["grpo", "--init", str(chat_model), "--data", bare, "--out", str(tmp_path / "g"),
            *_flags({**TINY, "loop.max_steps": 1})]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--rewards exact_match can score no reply: exact_match needs 'answer' in a prompt row" in err
    assert not (tmp_path / "g" / "model.safetensors").exists()
    assert cli([*argv, "--rewards", "exact_match", "format=0.1"]) == 0  # format applies to any reply


# ----------------------------------------------------------------------------------------------------------------
# Reproducible splits


def test_same_corpus_in_two_folders_gives_the_same_split_tokenizer_and_loss(tmp_path) -> None:
    corpus = make_corpus(tmp_path / "original", n_docs=12, words_per_doc=1500)
    outs = []
    for where in ("a/corpus", "somewhere/else/renamed"):  # other parents, other folder names
        folder = tmp_path / where
        shutil.copytree(corpus, folder)
        run = tmp_path / f"run_{len(outs)}"
        data_stage.main(build_config(data_stage.DataConfig, ("t", {"data": [str(folder)], "out": str(run / "data"),
                                                                    "val_fraction": 0.25})))
        tokenizer_stage.main(build_config(tokenizer_stage.TokenizerConfig, (
            "t", {"data": [str(run / "data")], "out": str(run / "tok"), "vocab_size": 320})))
        base = pretrain.main(build_config(pretrain.PretrainConfig, ("t", {
            "data": str(run / "tok"), "out": str(run / "base"), "model.dim": 32, "model.n_layers": 1,
            "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 32, "loop.max_steps": 1,
            "loop.batch_size": 4, "loop.eval_tokens": 512, "loop.progress": False, "optim.warmup_steps": 0})))
        outs.append((run, json.loads((base / "metrics.jsonl").read_text().splitlines()[0])["loss"]))
    (a, loss_a), (b, loss_b) = outs
    for name in ("train.jsonl", "val.jsonl"):
        assert (a / "data" / name).read_bytes() == (b / "data" / name).read_bytes()
    meta_a, meta_b = (json.loads((r / "data" / "meta.json").read_text()) for r in (a, b))
    assert meta_a["val_documents"] == meta_b["val_documents"] and len(meta_a["val_documents"]) == 3
    ta, tb = (json.loads((r / "tok" / "tokenizer.json").read_text())["model"] for r in (a, b))
    assert ta["merges"] == tb["merges"] and ta["vocab"] == tb["vocab"]
    assert (a / "tok" / "train.bin").read_bytes() == (b / "tok" / "train.bin").read_bytes()
    assert loss_a == loss_b


def test_jsonl_rows_split_by_their_text() -> None:
    """Rows without a name are split by their text: the same rows in another file, in another order, at other
    lines, land on the same side; rows with a "name" are split by it."""
    texts = [f"row number {i}" for i in range(40)]
    one = [Doc(f"a.jsonl:{i + 1}", t, named=False) for i, t in enumerate(texts)]
    other = [Doc(f"b.jsonl:{i + 7}", t, named=False) for i, t in enumerate(reversed(texts))]
    val_one, val_other = (sorted(d.text for d in split_documents(docs, 0.1)[1]) for docs in (one, other))
    assert len(val_one) == 4 and val_one == val_other
    same = [Doc("x.jsonl:1", "same", named=False), Doc("x.jsonl:2", "same", named=False)]
    with pytest.raises(CakeError, match="all documents have the same text"):
        split_documents(same, 0.5)
