"""Training dtype: bf16 autocast follows the fp32 loss curve, and `--loop.dtype auto` decides by a probe of this
model's step (pinned by $CAKELM_AUTO_DTYPE, kept on resume) and says why."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cakelm import loop
from cakelm.checkpoint import load_train_state
from cakelm.common import CakeError, DistInfo
from cakelm.data.shards import TokenBatches
from cakelm.loop import LoopConfig, step_speedup, train_dtype
from cakelm.model import ModelConfig, Transformer
from tests.conftest import ctrl_c_at
from tests.test_loop import losses, run_pretrain, weights

CPU, ONE = torch.device("cpu"), DistInfo()


def test_bf16_training_follows_the_fp32_curve(tok_dir, tmp_path) -> None:
    """Autocast bf16 rounds the matmuls' inputs to 8 bits of mantissa; loss, reductions and AdamW stay fp32. On the
    micro model the two curves stay within 0.05 nats of each other over 20 steps while the loss falls by ~2 nats
    (measured: at most ~0.01 apart); a bf16 run that diverged or did not learn would fail."""
    kw = {"loop.max_steps": 20, "optim.name": "adamw", "optim.lr": 3e-3}
    fp32 = losses(run_pretrain(tok_dir, tmp_path / "fp32", **kw, **{"loop.dtype": "fp32"}))
    bf16 = losses(run_pretrain(tok_dir, tmp_path / "bf16", **kw, **{"loop.dtype": "bf16"}))
    assert fp32[0] - fp32[-1] > 1.0 and bf16[0] - bf16[-1] > 1.0  # both learn
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.05
    assert fp32 != bf16  # bf16 did run: its rounding shows
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "bf16").values())  # weights stay fp32


def test_auto_decides_by_the_probe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("CAKELM_AUTO_DTYPE")
    monkeypatch.setattr(loop, "cpu_has_bf16_matrix_units", lambda: True)  # an AMX Xeon
    auto, step = LoopConfig(dtype="auto"), lambda dtype: None
    for speedup, want in ((1.6, torch.bfloat16), (1.05, torch.float32), (0.04, torch.float32)):
        monkeypatch.setattr(loop, "step_speedup", lambda *a, s=speedup, **k: s)
        assert train_dtype(auto, CPU, ONE, None, step) == want
        said = capsys.readouterr().out
        assert f"{speedup:.2f}x as fast in bf16" in said and ("bf16 (" if want == torch.bfloat16 else "fp32 (") in said
    # asked for explicitly, resuming a run, or no step to time (an RL stage): no probe
    monkeypatch.setattr(loop, "step_speedup", lambda *a, **k: pytest.fail("probed"))
    assert train_dtype(LoopConfig(dtype="fp32"), CPU, ONE, None, step) == torch.float32
    assert train_dtype(LoopConfig(dtype="bf16"), CPU, ONE, None, step) == torch.bfloat16
    assert train_dtype(auto, CPU, ONE, {"dtype": "bf16"}, step) == torch.bfloat16
    assert train_dtype(auto, CPU, ONE, {"dtype": "fp32"}, step) == torch.float32
    assert train_dtype(auto, CPU, ONE, {"step": 3}, step) == torch.float32  # saved before the choice was recorded
    assert train_dtype(auto, CPU, ONE, None, None) == torch.float32
    assert "rollouts" in capsys.readouterr().out
    # no matrix units (a Zen 4 EPYC): fp32 without a probe, said why; unknown (not Linux): the probe decides
    monkeypatch.setattr(loop, "cpu_has_bf16_matrix_units", lambda: False)
    assert train_dtype(auto, CPU, ONE, None, step) == torch.float32
    assert "no bf16 matrix units" in capsys.readouterr().out
    monkeypatch.setattr(loop, "cpu_has_bf16_matrix_units", lambda: None)
    monkeypatch.setattr(loop, "step_speedup", lambda *a, **k: 1.6)
    assert train_dtype(auto, CPU, ONE, None, step) == torch.bfloat16
    monkeypatch.setenv("CAKELM_AUTO_DTYPE", "bf16")
    monkeypatch.setattr(loop, "cpu_has_bf16_matrix_units", lambda: False)
    assert train_dtype(auto, CPU, ONE, None, step) == torch.bfloat16  # pinned wins
    assert "(CAKELM_AUTO_DTYPE)" in capsys.readouterr().out.replace("$", "")
    monkeypatch.setenv("CAKELM_AUTO_DTYPE", "fp16")
    with pytest.raises(CakeError, match="must be fp32 or bf16, got 'fp16'"):
        train_dtype(auto, CPU, ONE, None, step)


def test_the_probe_times_the_stage_step_and_leaves_no_trace(tok_dir, tmp_path, monkeypatch) -> None:
    """The loop hands the probe this stage's own step on its first batch (both dtypes run, gradients dropped, the
    random state untouched), and the run trains in what the probe chose (saved for resume)."""
    monkeypatch.delenv("CAKELM_AUTO_DTYPE")
    monkeypatch.setattr(loop, "cpu_has_bf16_matrix_units", lambda: True)
    seen = {}

    def fake_speedup(step, repeats=3):
        for dt in (torch.float32, torch.bfloat16):
            step(dt)
        seen["called"] = True
        return 2.0

    monkeypatch.setattr(loop, "step_speedup", fake_speedup)
    out = run_pretrain(tok_dir, tmp_path / "p", **{"loop.max_steps": 2, "loop.dtype": "auto"})
    assert seen["called"] and load_train_state(out)["dtype"] == "bf16"
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    idx = torch.randint(0, 64, (2, 16))
    rng = torch.get_rng_state()

    def step(dtype):
        with loop.autocast(CPU, dtype):
            out = model(idx)
        out.float().sum().backward()
        torch.rand(3)  # a step that draws random numbers
        model.zero_grad(set_to_none=True)

    speedup = step_speedup(step, repeats=1)
    assert math.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_cpu_matrix_units_read_from_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from cakelm import common

    def with_cpuinfo(text: str | None) -> bool | None:
        real = Path.read_text

        def fake(self, *a, **k):
            if str(self) == "/proc/cpuinfo":
                if text is None:
                    raise FileNotFoundError(self)
                return text
            return real(self, *a, **k)
        monkeypatch.setattr(Path, "read_text", fake)
        try:
            return common.cpu_has_bf16_matrix_units()
        finally:
            monkeypatch.setattr(Path, "read_text", real)

    xeon = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    epyc = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert with_cpuinfo(xeon) is True and with_cpuinfo(epyc) is False
    assert with_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\n") is None  # an ARM listing: unknown
    assert with_cpuinfo(None) is None  # no /proc (macOS, Windows)


def test_resume_keeps_the_dtype_the_run_started_with(tok_dir, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that `auto` started in bf16 resumes in bf16 even where auto would now say fp32 (another machine, or a
    noisy probe), so the resumed run is the uninterrupted one bit for bit."""
    kw = {"loop.max_steps": 10, "loop.dtype": "auto"}
    monkeypatch.setenv("CAKELM_AUTO_DTYPE", "bf16")
    full = run_pretrain(tok_dir, tmp_path / "full", **kw)
    with ctrl_c_at(monkeypatch, TokenBatches, 5), pytest.raises(SystemExit, match="saved a checkpoint at step 5"):
        run_pretrain(tok_dir, tmp_path / "cut", **kw)
    monkeypatch.setenv("CAKELM_AUTO_DTYPE", "fp32")
    cut = run_pretrain(tok_dir, tmp_path / "cut", **kw, resume=True)
    assert losses(cut) == losses(full)
    assert losses(full) != losses(run_pretrain(tok_dir, tmp_path / "fp32", **kw))  # fp32 would differ
    wf, wc = weights(full), weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)


def test_gpu_throughput_script_runs_on_cpu() -> None:
    """benchmarks/gpu_throughput.py (the throughput part of gpu_check.sh) on a CPU, as a smoke test of the script:
    it trains (the loss falls), prints its row, and says no flash kernel runs off CUDA."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_throughput.py"), "--device", "cpu",
                          "--preset", "tiny", "--vocab-size", "512", "--batch-size", "2", "--seconds", "1",
                          "--modes", "eager"], capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "flash attention: n/a (not CUDA)" in run.stdout
    row = next(line for line in run.stdout.splitlines() if line.startswith("eager"))
    first, last = (float(x) for x in re.search(r"(\d+\.\d+) -> (\d+\.\d+)", row).groups())
    assert last < first and "True" in row  # fused AdamW on CPU too


def test_the_probe_stops_early_where_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without bf16 units (bf16 ~25x slower), one warm-up pass of each is enough to say no."""
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock) * 1.0)

    def step(dtype):  # fp32 passes take 1 tick, bf16 passes 25
        calls.append(dtype)
        for _ in range(24 if dtype == torch.bfloat16 else 0):
            next(clock)

    assert step_speedup(step) == pytest.approx(1 / 25)
    assert calls == [torch.float32, torch.bfloat16]
