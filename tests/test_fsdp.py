"""FSDP2 (`--loop.parallel fsdp`, `cakelm.parallel`): 2 gloo processes train as DDP does on the same global batch,
their checkpoints resume bit for bit on 2 processes and go on (resharded) on 1, load in one process for `chat`,
`eval` and `export`, post-training stages (sft, sft with LoRA, ppo) train under it, one process falls back to
unsharded training with a note, and a crafted DCP metadata file is refused without being run.

Tolerances: FSDP sums gradients in another order than DDP (reduce-scatter against all-reduce), so losses agree to
rounding, not bit for bit: 1e-4 absolute over a few steps, with AdamW's epsilon at 1e-3 so each update stays
proportional to its gradient (see tests/test_loop.py, test_gradient_accumulation_invariance). A resumed run is
compared with the uninterrupted one bit for bit (same world size, same sums)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cakelm.checkpoint import OPTIMIZER_DIR, load_meta, load_model, load_train_state, update_meta
from cakelm.common import CakeError
from cakelm.config import ConfigError, build_config
from cakelm.data.shards import TokenBatches
from cakelm.lora import ADAPTER_WEIGHTS, has_lora, lora_layers
from cakelm.optim import OptimConfig, build_optimizers
from cakelm.parallel import load_optimizers
from cakelm.stages import export as export_stage
from cakelm.stages import pretrain
from tests.conftest import ctrl_c_at, tiny_checkpoint, tiny_reward_model
from tests.serving import free_port
from tests.test_ddp import _flags
from tests.test_loop import MICRO, losses, run_pretrain, weights
from tests.test_sft import last_digit_rows, write_jsonl

# constant after warmup: a run of 3 steps extended to 6 takes the steps a run of 6 takes (the lr does not depend
# on --max-steps), so extending a finished run is a resume like any other
COMMON = {**MICRO, "loop.eval_every": 3, "optim.name": "adamw", "optim.eps": 1e-3, "optim.schedule": "constant",
          "loop.batch_size": 4}


def torchrun(stage: str, out: Path, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc -m cakelm STAGE ... --out OUT` on the CPU; fails the test on an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "cakelm", stage, *args, "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def pretrain_flags(tok_dir: Path, **kw) -> list[str]:
    return ["--data", str(tok_dir), *_flags({**COMMON, **kw})]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) < tol for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# One process: the option, the fallback, the DCP round trip


def test_the_option_is_checked_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"'loop.parallel' must be one of ddp, fsdp; got 'zero'"):
        build_config(pretrain.PretrainConfig, ("test", {"loop.parallel": "zero"}))
    assert build_config(pretrain.PretrainConfig).loop.parallel == "ddp"  # DDP stays the default


def test_one_process_trains_unsharded_with_a_note_and_resumes_exactly_from_dcp(tok_dir, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    kw = {**COMMON, "loop.max_steps": 6, "loop.eval_every": 3}
    plain = run_pretrain(tok_dir, tmp_path / "ddp", **kw)
    full = run_pretrain(tok_dir, tmp_path / "full", **kw, **{"loop.parallel": "fsdp"})
    assert "--loop.parallel fsdp: one process, nothing to shard: training unsharded" in capsys.readouterr().out
    assert losses(full) == losses(plain)  # the same computation as an unsharded run: bit for bit
    version = Path(os.path.realpath(full / "current"))
    assert (full / OPTIMIZER_DIR).resolve() == version / OPTIMIZER_DIR  # inside the version, like every file
    assert (version / OPTIMIZER_DIR / ".metadata").is_file() and not list(tmp_path.glob("full/.optimizer-staging*"))
    state = load_train_state(full)
    assert "optimizers" not in state and state["optimizer_groups"][0]["params"]  # by parameter name
    assert state["optimizer_dir"] == str(version / OPTIMIZER_DIR)

    with ctrl_c_at(monkeypatch, TokenBatches, 4), pytest.raises(SystemExit, match="saved a checkpoint at step 4"):
        run_pretrain(tok_dir, tmp_path / "cut", **kw, **{"loop.parallel": "fsdp"})
    update_meta(tmp_path / "cut", note="kept")  # a new version: the optimizer state comes along (hard links)
    assert (tmp_path / "cut" / OPTIMIZER_DIR / ".metadata").is_file()
    cut = run_pretrain(tok_dir, tmp_path / "cut", **kw, **{"loop.parallel": "fsdp"}, resume=True)
    assert losses(cut) == losses(full)
    wf, wc = weights(full), weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)


def test_resume_keeps_the_parallel_mode(tok_dir, tmp_path) -> None:
    run_pretrain(tok_dir, tmp_path / "b", **{**COMMON, "loop.max_steps": 2})
    with pytest.raises(CakeError, match=r"options differ .*loop.parallel \(saved 'ddp', now 'fsdp'\)"):
        run_pretrain(tok_dir, tmp_path / "b", **{**COMMON, "loop.max_steps": 3, "loop.parallel": "fsdp"},
                     resume=True)


def test_crafted_dcp_metadata_is_refused_without_running_it(tok_dir, tmp_path) -> None:
    kw = {**COMMON, "loop.max_steps": 2, "loop.parallel": "fsdp"}
    out = run_pretrain(tok_dir, tmp_path / "b", **kw)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    metadata = Path(os.path.realpath(out / OPTIMIZER_DIR)) / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CakeError, match=r"cannot be loaded .*system is not part of a checkpoint's metadata"):
        run_pretrain(tok_dir, tmp_path / "b", **{**kw, "loop.max_steps": 3}, resume=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_two_processes_match_ddp_resume_exactly_and_reshard_to_one(tok_dir, tmp_path, capsys) -> None:
    ddp = tmp_path / "ddp"
    torchrun("pretrain", ddp, pretrain_flags(tok_dir, **{"loop.max_steps": 6}))
    full = tmp_path / "full"  # uninterrupted, saving at step 3 as the cut run does
    proc = torchrun("pretrain", full, pretrain_flags(tok_dir, **{"loop.max_steps": 6, "loop.save_every": 3,
                                                                 "loop.parallel": "fsdp"}))
    assert "x 2 ranks" in proc.stdout and load_meta(full)["world_size"] == 2
    assert len(list((full / OPTIMIZER_DIR).glob("*.distcp"))) == 2  # each rank wrote its shards
    # the same global batch: the loss curve and the validation of DDP, to rounding
    assert close(losses(full), losses(ddp)), (losses(full), losses(ddp))
    assert close([r["val_loss"] for r in rows(full) if "val_loss" in r],
                 [r["val_loss"] for r in rows(ddp) if "val_loss" in r])
    # one process loads the gathered weights, and exports them
    wd, wf = weights(ddp), weights(full)
    for k in wd:
        torch.testing.assert_close(wf[k], wd[k], rtol=1e-4, atol=1e-5)
    hf = export_stage.main(build_config(export_stage.ExportConfig, ("test", {"ckpt": str(full),
                                                                              "out_dir": str(tmp_path / "hf")})))
    assert (Path(hf) / "model.safetensors").is_file() and (Path(hf) / "config.json").is_file()
    # one process reads the 2 ranks' optimizer shards whole: DDP's optimizer state, to rounding
    model = load_model(full)[0]
    optimizers = build_optimizers(model, OptimConfig(name="adamw"), torch.device("cpu"))
    state = load_train_state(full)
    load_optimizers(model, optimizers, state["optimizer_dir"], state["optimizer_groups"])
    theirs = load_train_state(ddp)["optimizers"][0]["state"]
    ours = optimizers[0].state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for i in ours:
        assert int(ours[i]["step"]) == int(theirs[i]["step"]) == 6
        torch.testing.assert_close(ours[i]["exp_avg"], theirs[i]["exp_avg"], rtol=1e-3, atol=1e-7)

    # saved by 2 at step 3, resumed by 2: the uninterrupted run, bit for bit
    cut = tmp_path / "cut"
    torchrun("pretrain", cut, pretrain_flags(tok_dir, **{"loop.max_steps": 3, "loop.parallel": "fsdp"}))
    shutil.copytree(cut, tmp_path / "one", symlinks=True)
    torchrun("pretrain", cut, [*pretrain_flags(tok_dir, **{"loop.max_steps": 6, "loop.parallel": "fsdp"}),
                               "--resume"])
    assert losses(cut) == losses(full)
    assert [r.get("val_loss") for r in rows(cut)] == [r.get("val_loss") for r in rows(full)]
    wc = weights(cut)
    assert all(torch.equal(wc[k], wf[k]) for k in wf)
    # ... and by 1 process: resharded, it goes on (its batches differ from here: not the same run any more)
    one = run_pretrain(tok_dir, tmp_path / "one", **{**COMMON, "loop.max_steps": 5, "loop.parallel": "fsdp"},
                       resume=True)
    assert "saved by 2 process(es) and goes on with 1" in capsys.readouterr().out
    assert losses(one)[:3] == losses(full)[:3] and len(losses(one)) == 5 and losses(one)[-1] < losses(one)[0]
    assert load_meta(one)["world_size"] == 1


@pytest.fixture(scope="module")
def chat_base(tok_dir, tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "sft", tok_dir, "sft", "chat", end_scale=20.0,
                           dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64)


@pytest.mark.slow
def test_sft_and_sft_with_lora_under_fsdp_match_ddp(chat_base, tmp_path) -> None:
    data = write_jsonl(tmp_path / "digits.jsonl", last_digit_rows(200, seed=1))
    common = ["--init", str(chat_base), "--data", data, *_flags({"loop.progress": False, "loop.log_every": 1,
                                                                 "val_size": 8, "optim.warmup_steps": 0,
                                                                 "loop.max_steps": 3, "loop.batch_size": 8,
                                                                 "loop.eval_every": 3})]
    lora = _flags({"lora.rank": 4, "lora.alpha": 8.0, "optim.name": "adamw", "optim.lr": 1e-2, "optim.eps": 1e-3,
                   "optim.weight_decay": 0.0})
    # full fine-tuning with the default optimizer, Muon (its Newton-Schulz iteration on the sharded matrices)
    for name, extra in (("full", []), ("lora", lora)):
        torchrun("sft", tmp_path / f"{name}-ddp", [*common, *extra])
        torchrun("sft", tmp_path / f"{name}-fsdp", [*common, *extra, "--loop.parallel", "fsdp"])
        a, b = tmp_path / f"{name}-ddp", tmp_path / f"{name}-fsdp"
        assert close(losses(a), losses(b), 2e-4), (name, losses(a), losses(b))
        assert close([r["val_loss"] for r in rows(a) if "val_loss" in r],
                     [r["val_loss"] for r in rows(b) if "val_loss" in r], 2e-4)
    # LoRA: only the adapters trained and were saved (PEFT's file); the base is untouched
    out = tmp_path / "lora-fsdp"
    assert (out / ADAPTER_WEIGHTS).is_file() and not (out / "model.safetensors").exists()
    base = load_model(chat_base)[0].state_dict()
    adapted = load_model(out, merge=False)[0]
    assert has_lora(adapted) and all(torch.equal(adapted.state_dict()[k], v) for k, v in base.items())
    assert all(m.lora_B.abs().max() > 0 for m in lora_layers(adapted).values())


@pytest.mark.slow
def test_ppo_with_lora_under_fsdp_matches_ddp_and_resumes(chat_base, pairs, tmp_path) -> None:
    """The policy and the value model sharded as one module, rollouts and evaluations on the gathered weights, the
    frozen reference (the adapters off) and the reward model whole on each rank."""
    rm = tiny_reward_model(tmp_path / "rm", chat_base)
    args = ["--init", str(chat_base), "--data", str(pairs), "--reward-model", str(rm),
            *_flags({"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 2, "max_new_tokens": 8,
                     "val_size": 4, "prompts_per_step": 4, "loop.batch_size": 8, "lora.rank": 4,
                     "replay": ["arithmetic"], "replay_batch": 2, "replay_coef": 2.0,
                     "optim.name": "adamw", "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.eps": 1e-3})]
    torchrun("ppo", tmp_path / "ddp", [*args, "--max-steps", "3"])
    torchrun("ppo", tmp_path / "fsdp", [*args, "--max-steps", "3", "--loop.parallel", "fsdp"])
    a, b = rows(tmp_path / "ddp"), rows(tmp_path / "fsdp")
    for key in ("loss", "reward", "val_gold", "val_kl"):
        assert close([r[key] for r in a if key in r], [r[key] for r in b if key in r], 2e-4), key
    saved = set(torch.load(tmp_path / "fsdp" / "train_state.pt", weights_only=True)["batches"][0]["rollouts"]
                ["data"])
    assert {"adv", "old_values"} <= saved  # each rank's rollouts travel with the checkpoint (by rank)
    torchrun("ppo", tmp_path / "fsdp", [*args, "--max-steps", "4", "--loop.parallel", "fsdp", "--resume"])
    assert load_meta(tmp_path / "fsdp")["step"] == 4


@pytest.mark.slow
def test_the_memory_benchmark_shows_fsdp_halving_each_rank() -> None:
    """benchmarks/fsdp_memory.py on a tiny model: the sharding plan leaves each of 2 ranks about half of DDP's
    parameter, gradient and optimizer bytes (padding aside)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import fsdp_memory

    from cakelm.model import ModelConfig

    results = fsdp_memory.run(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=32))
    ddp, fsdp = results["ddp"], results["fsdp"]
    for column in fsdp_memory.COLUMNS:
        assert ddp[0][column] == ddp[1][column] > 0
        for rank in (0, 1):
            assert 0.45 < fsdp[rank][column] / ddp[0][column] < 0.56, (column, rank, fsdp, ddp)
