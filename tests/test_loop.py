"""The shared loop: accumulation invariance, exact resume, metrics and checkpoints, via the pretrain stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cakelm.checkpoint import load_meta, load_model
from cakelm.config import build_config
from cakelm.data.shards import TokenBatches
from cakelm.stages import pretrain
from tests.conftest import ctrl_c_at

MICRO = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 32,
         "loop.eval_tokens": 2048, "loop.eval_every": 0, "loop.log_every": 1, "loop.progress": False,
         "optim.warmup_steps": 2}


def run_pretrain(tok_dir: Path, out: Path, **kw) -> Path:
    flat = {**MICRO, "data": str(tok_dir), "out": str(out), **kw}
    return pretrain.main(build_config(pretrain.PretrainConfig, ("test", flat)))


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out)[0].state_dict()


def test_pretrain_writes_checkpoint_and_metrics(tok_dir, tmp_path) -> None:
    out = run_pretrain(tok_dir, tmp_path / "base", **{"loop.max_steps": 12, "loop.eval_every": 6})
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.json", "current", "meta.json", "metrics.jsonl", "model.safetensors", "tokenizer.json", "train_state.pt"]
    meta = load_meta(out)
    assert meta["stage"] == "pretrain" and meta["step"] == 12 and meta["complete"] is True
    assert meta["config"]["loop"]["max_steps"] == 12  # the resolved config is saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"val_loss", "val_bpb"} <= rows[5].keys() and {"val_loss", "val_bpb"} <= rows[11].keys()
    assert rows[-1]["val_loss"] < rows[5]["val_loss"]  # it learns
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert 0 < rows[-1]["val_bpb"] < 8


def test_refuses_to_overwrite_without_flag(tok_dir, tmp_path) -> None:
    from cakelm.common import CakeError

    run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 2})
    with pytest.raises(CakeError, match="already holds a checkpoint"):
        run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 2})
    run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 3, "overwrite": True})
    assert load_meta(tmp_path / "b")["step"] == 3


def test_gradient_accumulation_invariance(tok_dir, tmp_path) -> None:
    """1 micro-batch of 8 rows == 8 micro-batches of 1 row (same rows, loss normalised over the step)."""
    # AdamW with a large epsilon makes each update proportional to its gradient, so float-rounding differences
    # between the two ways of summing stay at rounding size instead of being normalised up to the lr
    opt = {"optim.name": "adamw", "optim.eps": 1e-3, "loop.max_steps": 3}
    a = run_pretrain(tok_dir, tmp_path / "a", **opt, **{"loop.batch_size": 8, "loop.grad_accum": 1})
    b = run_pretrain(tok_dir, tmp_path / "b", **opt, **{"loop.batch_size": 1, "loop.grad_accum": 8})
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("log_every", [1, 5])
def test_resume_is_exact(tok_dir, tmp_path, monkeypatch: pytest.MonkeyPatch, log_every: int) -> None:
    kw = {"loop.max_steps": 16, "loop.log_every": log_every, "loop.eval_every": 8}
    full = run_pretrain(tok_dir, tmp_path / "full", **kw)

    # Ctrl-C while step 9's batch loads (steps 0-8 are done): the loop saves 9 steps at the step boundary.
    with ctrl_c_at(monkeypatch, TokenBatches, 9), pytest.raises(SystemExit, match="saved a checkpoint at step 9"):
        run_pretrain(tok_dir, tmp_path / "cut", **kw)
    assert load_meta(tmp_path / "cut")["step"] == 9 and load_meta(tmp_path / "cut")["complete"] is False

    cut = run_pretrain(tok_dir, tmp_path / "cut", **kw, resume=True)
    assert losses(cut) == losses(full)  # the resumed loss curve is the uninterrupted one, bit for bit
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut] == [r["step"] for r in rows_full]
    assert [r.get("val_loss") for r in rows_cut] == [r.get("val_loss") for r in rows_full]
    wf, wc = weights(full), weights(cut)
    for k in wf:
        assert torch.equal(wf[k], wc[k]), k


def test_resume_refuses_a_different_run(tok_dir, tmp_path) -> None:
    from cakelm.common import CakeError

    run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 4})
    with pytest.raises(CakeError, match=r"options differ .*optim.lr \(saved 0.01, now 0.5\)"):
        run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 8, "optim.lr": 0.5}, resume=True)
    run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 4}, resume=True)  # complete: nothing to do
    assert load_meta(tmp_path / "b")["step"] == 4
    longer = run_pretrain(tok_dir, tmp_path / "b", **{"loop.max_steps": 6}, resume=True)  # go on to 6 steps
    assert load_meta(longer)["step"] == 6 and len(losses(longer)) == 6


def test_batches_are_deterministic_and_sharded(tok_dir) -> None:
    import numpy as np

    tokens = np.memmap(tok_dir / "train.bin", dtype=np.uint16, mode="r")
    one = TokenBatches(tokens, 16, batch_size=4, grad_accum=2, seed=3)
    r0 = TokenBatches(tokens, 16, batch_size=4, grad_accum=1, rank=0, world_size=2, seed=3)
    r1 = TokenBatches(tokens, 16, batch_size=4, grad_accum=1, rank=1, world_size=2, seed=3)
    for step in (0, 5, 1000):  # step 1000 is past the first epoch
        assert torch.equal(one.get(step, 0)["input"], r0.get(step, 0)["input"])
        assert torch.equal(one.get(step, 1)["input"], r1.get(step, 0)["input"])
        b = one.get(step, 0)
        assert torch.equal(b["input"][:, 1:], b["target"][:, :-1])
    # one epoch visits every window exactly once
    n = one.n_windows
    seen = sorted(one._window(g) for g in range(n))
    assert seen == list(range(n))
