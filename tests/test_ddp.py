"""DDP: `torchrun --nproc_per_node 2 -m cakelm pretrain` (gloo on CPU) equals a 1-process run of the same global
batch, writes one checkpoint from rank 0, and loads like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from cakelm.checkpoint import load_meta, load_model
from tests.serving import free_port
from tests.test_loop import MICRO, losses, run_pretrain


def _flags(d: dict) -> list[str]:
    """{"loop.batch_size": 4, "loop.progress": False} -> ["--loop.batch-size", "4", "--no-loop.progress"]."""
    out = []
    for k, v in d.items():
        name = k.replace("_", "-")
        if isinstance(v, list):
            out += [f"--{name}", *map(str, v)]
        else:
            out += [f"--{name}" if v else f"--no-{name}"] if isinstance(v, bool) else [f"--{name}", str(v)]
    return out


def val_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_bpb" in r]


def test_ddp_two_processes_match_one(tok_dir, tmp_path) -> None:
    # AdamW with a large epsilon: updates proportional to gradients, so the different summation order of the
    # all-reduce stays at rounding size (see test_gradient_accumulation_invariance)
    common = {**MICRO, "loop.max_steps": 6, "loop.eval_every": 3, "optim.name": "adamw", "optim.eps": 1e-3}
    single = run_pretrain(tok_dir, tmp_path / "single", **common, **{"loop.batch_size": 4, "loop.grad_accum": 2})

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cakelm", "pretrain", "--data", str(tok_dir), "--out", str(tmp_path / "ddp"),
           *_flags({**common, "loop.batch_size": 4, "loop.grad_accum": 1}), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout

    meta = load_meta(tmp_path / "ddp")
    assert meta["world_size"] == 2 and meta["step"] == 6
    la, lb = losses(single), losses(tmp_path / "ddp")
    assert len(la) == len(lb) == 6
    for a, b in zip(la, lb):
        assert abs(a - b) < 1e-4, (la, lb)
    wa, wb = load_model(single)[0].state_dict(), load_model(tmp_path / "ddp")[0].state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # validation is split across ranks and summed: same numbers as the single process
    va, vb = val_rows(single), val_rows(tmp_path / "ddp")
    assert len(va) == len(vb) == 2
    for a, b in zip(va, vb):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["val_bpb"] - b["val_bpb"]) < 1e-4


def test_two_nodes_on_one_machine_match_two_local_processes(tok_dir, tmp_path) -> None:
    """Multi-node as torchrun does it: two launchers (`--nnodes 2`, one process each) meet at a c10d rendezvous on
    localhost, as two machines would at --rdzv-endpoint HOST:PORT, and train exactly as 2 processes on one node."""
    common = {**MICRO, "loop.max_steps": 4, "loop.eval_every": 0, "optim.name": "adamw", "optim.eps": 1e-3,
              "loop.batch_size": 4}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = ["-m", "cakelm", "pretrain", "--data", str(tok_dir), *_flags(common), "--device", "cpu"]
    one_node = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), *stage, "--out", str(tmp_path / "one")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "cakelm-two-nodes", *stage, "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    for node in nodes:
        try:
            _, err = node.communicate(timeout=300)
        finally:
            if node.poll() is None:
                node.kill()
        assert node.returncode == 0, err[-3000:]
    meta = load_meta(tmp_path / "two")
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert losses(tmp_path / "one") == losses(tmp_path / "two")  # the same ranks, shards and sums: bit for bit
    wa, wb = load_model(tmp_path / "one")[0].state_dict(), load_model(tmp_path / "two")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
