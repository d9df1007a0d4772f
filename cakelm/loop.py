"""The one training loop every stage runs on.

A stage hands `train()` a model, a batch function and a loss function; the loop owns everything else:
optimizers and the LR schedule, gradient accumulation, DDP (gradient sync only on the last micro-step) or FSDP2
(--loop.parallel fsdp: `cakelm.parallel`), autocast, gradient clipping, periodic evaluation, JSONL metrics, a
progress bar, checkpoints and exact resume.

Contracts:
- `batches.get(step, micro) -> dict` returns this rank's micro-batch `micro` of optimizer step `step` (tensors
  on CPU) and `"n"`, the number of loss units it holds (target tokens for language modelling). It must be a
  pure function of (step, micro) and the provider's state: that is what makes `--resume` exact. A provider that
  keeps state between steps (an RL stage's rollouts, which several steps train on; PPO's KL coefficient) has
  `state_dict() -> dict` and `load_state_dict(dict)`: the loop saves that state with every checkpoint and
  restores it on resume, so no stage saves or restores batch state itself.
- `loss_fn(model, batch) -> (loss_sum, metrics)` returns the loss *summed* over the batch's units. The loop
  divides by the units of the whole step (all micro-batches, all ranks), so 8 micro-batches of 1 row give the
  same gradient as 1 micro-batch of 8 rows. A metric is a scalar sum (logged per unit, like the loss) or a
  pair [sum, count] (logged as sum / count over the whole step, e.g. per token when the units are sequences).
- A batch may carry `"metrics"`: floats describing the whole step (the same on every rank, e.g. the reward of
  RL rollouts), read from micro-batch 0 and averaged over the steps of a logging window.
- `evaluate(model) -> dict` runs on every rank (it may all-reduce) under no_grad/eval mode; a sharded model
  (FSDP) holds its whole weights meanwhile, so each rank may run forward passes of its own number and shape.
  A provider whose `get` runs the model (an RL stage's rollouts) says so with `reads_model(step) -> bool`, the
  same on every rank, and a sharded model holds its whole weights for those calls too.
- `save(step, metrics, train_state, final)` is called on rank 0 only; train_state["batches"] holds every rank's
  batch state (a list by rank). Under --loop.parallel fsdp the module's parameters read whole on rank 0 during
  the call, and train_state["optimizer_dir"] names the directory of sharded optimizer state every rank has
  written (DCP) that the checkpoint must take in (`checkpoint.save_checkpoint(optimizer_dir=...)`); its
  "optimizer_groups" are the optimizers' hyperparameters, and it holds no "optimizers".

A non-finite step never reaches the weights: when the step's loss (summed over all ranks, so every rank agrees)
or its gradient norm is NaN or inf, the update is skipped (gradients dropped, optimizer untouched) and the step
still counts for the schedule and the data, so a resumed run takes exactly the same decisions. Each skip is
logged with the micro-batch(es) whose loss was not finite and counted in the metrics row (`skipped`); after
`--loop.max-skipped` skipped steps in a row the run stops with an error, without saving. No checkpoint is ever
saved from weights that are not all finite: the last good one stays as it was.

Ctrl-C (SIGINT) is graceful: the loop finishes the step it is in, saves, and exits; `--resume` continues as if
nothing happened. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cakelm.common import (
    CakeError,
    DistInfo,
    all_reduce_sum,
    barrier,
    cpu_has_bf16_matrix_units,
    finite_json,
    gather_object,
    keep_freed_memory,
    pick_dtype,
    print0,
    write_text_atomic,
)
from cakelm.config import ConfigError, opt
from cakelm.model import Transformer
from cakelm.optim import OptimConfig, build_optimizers, lr_multiplier, set_lr
from cakelm.parallel import (
    PARALLEL,
    full_state_dict,
    full_weights,
    load_optimizers,
    non_finite_parameter,
    replicated,
    save_optimizers,
    shard,
    swapped,
)
from cakelm.tracking import Tracker, parse_backends

Batch = dict[str, Any]


class StopRun(CakeError):
    """Raised by a batch provider to end the run (e.g. an RL stage's failed reward with --reward-errors stop; on
    every rank alike): the loop saves the steps done, then stops with this message and where it saved."""


class BatchSource(Protocol):
    """What the loop reads batches from (see the module docstring; state_dict/load_state_dict are optional)."""

    def get(self, step: int, micro: int) -> Batch: ...


# Dense bf16 peak FLOP/s of common GPUs, for MFU on CUDA (CPU MFU is measured by benchmarks/).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclass
class LoopConfig:
    max_steps: int = opt(1000, "optimizer steps to train for", alias="--max-steps")
    batch_size: int = opt(16, "examples per micro-batch on each process: token rows (pretrain), conversations "
                          "(sft; packed into rows), pairs (reward, dpo), replies (ppo, grpo, rloo)",
                          alias="--batch-size")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    eval_every: int = opt(100, "evaluate every N steps, and always at the end (0 = only at the end)")
    eval_tokens: int = opt(0, "tokens of validation data per evaluation (0 = all of it)")
    log_every: int = opt(10, "write a metrics line every N steps")
    save_every: int = opt(0, "save a resumable checkpoint every N steps (0 = only at the end)")
    device: str = opt("auto", "device", alias="--device", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = opt("auto", "autocast dtype: auto = bf16 on CUDA; on a CPU with bf16 matrix units (AMX) bf16 when a "
                     "start-up probe finds this stage's training step at least 1.5x faster in bf16 than in fp32, "
                     "else fp32", choices=("auto", "fp32", "bf16"))
    parallel: str = opt("ddp", "how the processes of a torchrun job share the training: ddp (each holds the whole "
                        "model; gradients are all-reduced) or fsdp (FSDP2: weights, gradients and optimizer state "
                        "sharded over the processes, for models that do not fit one device; see cakelm/parallel.py)",
                        choices=PARALLEL)
    compile: bool = opt(False, "torch.compile the model (faster on GPUs; minutes of compiling on a CPU)")
    grad_checkpoint: bool = opt(False, "recompute each block's activations in the backward pass: far less memory "
                                "for ~1/3 more compute (models of 100M+ parameters, long rows)")
    seed: int = opt(1337, "random seed (init, data order, sampling)", alias="--seed")
    progress: bool = opt(True, "show a progress bar")
    max_skipped: int = opt(5, "steps in a row whose loss or gradient norm is NaN/inf that are skipped (not "
                           "applied) before the run stops with an error, saving nothing (0 = stop at the first)")
    log_to: str = opt("", "also log the metrics, config and hardware to these trackers, comma-separated: "
                      "tensorboard (OUT/tb), wandb (OUT/wandb, offline unless logged in), trackio; metrics.jsonl is "
                      "always written", alias="--log-to")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_tokens", "save_every", "max_skipped"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        parse_backends(self.log_to)


@dataclass
class LoopContext:
    """Where the loop runs: device, ranks, output directory."""

    device: torch.device
    dist: DistInfo
    out: Path


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Mixed precision where it pays (bf16/fp16 on accelerators); plain fp32 needs no context."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


AUTO_DTYPE_ENV = "CAKELM_AUTO_DTYPE"  # fp32 or bf16: what --loop.dtype auto means on a CPU, without probing
# bf16 must beat fp32 by this much on the step, measured at start-up, on a CPU with bf16 matrix units (AMX: bf16
# matmuls 7-10x faster than fp32 ones, far above it). CPUs without them stay fp32 unprobed: on Zen 4 EPYCs
# (AVX512-BF16, no AMX) the default pipeline's pretraining probed at 1.31-1.81x and its SFT at 1.18-1.71x, on
# two VMs of the same model name, so the choice flipped between runs of one command, and so did the models (SFT
# models of one command answered 44.5% and 37.2% of 800 held-out problems): a run must repeat on its machine.
BF16_MIN_SPEEDUP = 1.5


def step_speedup(step: Callable[[torch.dtype], None], repeats: int = 3) -> float:
    """How much faster `step(dtype)` (a forward and backward pass under autocast to dtype) runs in bf16 than in
    fp32: fp32 time / bf16 time, each the best of `repeats` passes, interleaved, after one warm-up pass each
    (oneDNN builds its bf16 kernels on first use). When the warm-up bf16 pass is over 3x slower than the fp32 one
    (a CPU without bf16 units emulates it, ~25x slower: measured on an AVX2 EPYC), that ratio is the answer: no
    more slow passes. The global random state is restored afterwards."""
    rng = torch.get_rng_state()
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for r in range(repeats + 1):
        warm = {}
        for dtype in best:
            t = time.perf_counter()
            step(dtype)
            warm[dtype] = time.perf_counter() - t
            if r:
                best[dtype] = min(best[dtype], warm[dtype])
        if r == 0 and warm[torch.bfloat16] > 3 * warm[torch.float32]:
            best = warm
            break
    torch.set_rng_state(rng)
    return best[torch.float32] / best[torch.bfloat16]


def probe_step(model: nn.Module, loss_of: Callable[[], torch.Tensor], device: torch.device
               ) -> Callable[[torch.dtype], None]:
    """What `step_speedup` times: the loss `loss_of()` under autocast to the given dtype, its backward, and the
    gradients dropped (nothing of the probe reaches training)."""
    def step(dtype: torch.dtype) -> None:
        with autocast(device, dtype):
            loss = loss_of()
        loss.float().backward()
        model.zero_grad(set_to_none=True)
    return step


def train_dtype(cfg: LoopConfig, device: torch.device, info: DistInfo, resume_state: dict[str, Any] | None,
                step: Callable[[torch.dtype], None] | None) -> torch.dtype:
    """The autocast dtype of this run, said once. fp32/bf16 as asked; `auto`: the dtype of the run being resumed
    (so a resume is exact), bf16 on CUDA GPUs with bf16, on a CPU with bf16 matrix units (AMX;
    `cpu_has_bf16_matrix_units`, not known: probed too) bf16 if `step_speedup(step)` (this stage's own training
    step on its first batch) finds it at least BF16_MIN_SPEEDUP x faster on every rank, else fp32;
    $CAKELM_AUTO_DTYPE pins the CPU's choice; fp32 on a CPU when there is no step to time (batches that come from
    the model being trained: an RL stage's rollouts, SFT's own replies for its repeat penalty; a model to be
    sharded, too big to run whole on each rank) and elsewhere. Loss,
    reductions and optimizer state stay fp32 either way (autocast casts only the matmuls' inputs)."""
    if cfg.dtype != "auto":
        return pick_dtype(cfg.dtype, device)
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if resume_state is not None:  # a run saved before the choice was recorded trained in pick_dtype's
        return names.get(resume_state.get("dtype"), pick_dtype("auto", device))
    if device.type != "cpu":
        return pick_dtype("auto", device)
    pinned = os.environ.get(AUTO_DTYPE_ENV, "")
    if pinned:
        if pinned not in names:
            raise CakeError(f"${AUTO_DTYPE_ENV} must be fp32 or bf16, got {pinned!r}")
        print0(f"--loop.dtype auto: {pinned} (${AUTO_DTYPE_ENV})", info=info)
        return names[pinned]
    if step is None:
        print0("--loop.dtype auto: fp32 (no step to time before training: this stage's batches come from the model "
               "being trained (rollouts; SFT's own replies for --repeat-unlikelihood), or it is to be sharded)",
               info=info)
        return torch.float32
    if cpu_has_bf16_matrix_units() is False:
        print0("--loop.dtype auto: fp32 (this CPU has no bf16 matrix units (AMX), and on its vector units bf16 gains "
               f"too little and too unsteadily to choose by a probe; ${AUTO_DTYPE_ENV}=bf16 forces it)", info=info)
        return torch.float32
    speedup = torch.tensor(step_speedup(step))
    if info.enabled:  # every rank must choose alike: the slowest rank's view decides
        dist.all_reduce(speedup, op=dist.ReduceOp.MIN)
    dtype = torch.bfloat16 if speedup.item() >= BF16_MIN_SPEEDUP else torch.float32
    print0(f"--loop.dtype auto: {'bf16' if dtype == torch.bfloat16 else 'fp32'} (a training step of this model ran "
           f"{speedup.item():.2f}x as fast in bf16 as in fp32 on this CPU; bf16 needs >= {BF16_MIN_SPEEDUP}x)",
           info=info)
    return dtype


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _gpu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the resumed step are dropped so
    the file tells the story of the run that actually produced the checkpoint. Every line is strict JSON: a
    value that is NaN or infinite (the loss of a window whose steps were all skipped, the gradient norm of a
    skipped step) is written as null. Each row also goes to `tracker` (--log-to), if any."""

    def __init__(self, path: Path, start_step: int, enabled: bool, tracker: Tracker | None = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(finite_json(row), allow_nan=False) + "\n")
            if self.tracker is not None:
                self.tracker.log(row)


class GracefulStop:
    """While active (in the main thread), the first SIGINT only sets `requested`; the loop stops at the next
    step boundary. A second SIGINT raises KeyboardInterrupt as usual."""

    def __init__(self, announce: bool) -> None:
        self.requested, self.announce, self._previous = False, announce, None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _non_finite(micro_losses: torch.Tensor, grad_norm: torch.Tensor, info: DistInfo) -> str:
    """What made a step non-finite, for the log: the micro-batches (and ranks) whose loss was NaN/inf, else the
    gradient norm. Every rank calls it (one all-reduce), since every rank skips the same steps."""
    bad = torch.zeros(info.world_size, micro_losses.numel(), device=micro_losses.device)
    bad[info.rank] = (~torch.isfinite(micro_losses)).float()
    where = all_reduce_sum(bad, info).nonzero().tolist()
    if not where:
        return f"gradient norm {grad_norm.item()} (every micro-batch's loss was finite)"
    shown = ", ".join(f"{m}" + (f" on rank {r}" if info.enabled else "") for r, m in where[:4])
    return f"non-finite loss in micro-batch {shown}{' and more' if len(where) > 4 else ''}"


def train(model: nn.Module, cfg: LoopConfig, optim_cfg: OptimConfig, ctx: LoopContext, batches: BatchSource,
          loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
          evaluate: Callable[[nn.Module], dict[str, float]] | None,
          save: Callable[[int, dict[str, Any], dict[str, Any], bool], None],
          resume_state: dict[str, Any] | None = None, flops_per_token: float | None = None,
          show: tuple[str, ...] = (), tracker: Tracker | None = None) -> dict[str, Any]:
    """Train `model` (already on ctx.device) from step 0, or from `resume_state`, to cfg.max_steps.
    `show` names metrics to display in the progress bar besides the loss. `tracker` (rank 0's; the caller closes
    it) gets every metrics row too. Returns the last logged metrics (including the final evaluation)."""
    device, info = ctx.device, ctx.dist
    if device.type == "cpu":
        keep_freed_memory()  # before the probe: the step it times should page-fault as the real ones do
    fsdp = cfg.parallel == "fsdp"
    sharded = fsdp and info.enabled
    start_step = int(resume_state["step"]) if resume_state is not None else 0
    probe = None  # this stage's step on its first batch, when the batches are a pure function of (step, micro)
    if not sharded and not hasattr(batches, "state_dict") and getattr(batches, "reads_model", None) is None:
        probe = probe_step(model, lambda: loss_fn(model, _to(batches.get(start_step, 0), device))[0], device)
    dtype = train_dtype(cfg, device, info, resume_state, probe)
    if fsdp and not info.enabled:
        print0("--loop.parallel fsdp: one process, nothing to shard: training unsharded (the optimizer state is still "
               "saved sharded, in DCP's format, so the run resumes on any number of processes)", info=info)
    if sharded:
        shard(model, dtype)  # before the optimizers are built: they must hold the shards
    optimizers = build_optimizers(model, optim_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = 0
    if resume_state is not None:
        start = int(resume_state["step"])
        if ("optimizer_dir" in resume_state) != fsdp:  # (a run saved before --loop.parallel existed was ddp)
            raise CakeError(f"--resume: {ctx.out} was saved with --loop.parallel "
                            f"{'fsdp' if 'optimizer_dir' in resume_state else 'ddp'}; resume it with the same")
        if resume_state["world_size"] != info.world_size:
            # the sharded optimizer state reshards; a stage's batch state (RL rollouts) is by rank and does not
            if not fsdp or "batches" in resume_state:
                raise CakeError(f"--resume: the run was saved with {resume_state['world_size']} process(es) and "
                                f"this is {info.world_size}; resume with the same number (data order depends on it"
                                + (", and this stage's batch state is by rank)" if fsdp else ")"))
            print0(f"--resume: the run was saved by {resume_state['world_size']} process(es) and goes on with "
                   f"{info.world_size}: its weights and optimizer state are resharded; from here on its batches "
                   "differ from those of an uninterrupted run", info=info)
        if fsdp:
            load_optimizers(model, optimizers, resume_state["optimizer_dir"], resume_state["optimizer_groups"])
        elif len(resume_state["optimizers"]) != len(optimizers):
            raise CakeError("--resume: the saved run used another optimizer (see --optim.name in its meta.json)")
        else:
            for o, s in zip(optimizers, resume_state["optimizers"], strict=True):
                o.load_state_dict(s)
        torch.set_rng_state(resume_state["rng"]["torch"])
        if "batches" in resume_state:  # each rank's own (its rollouts differ from the others')
            try:
                batches.load_state_dict(resume_state["batches"][info.rank])  # type: ignore[attr-defined]
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
                raise CakeError(f"--resume: {ctx.out}/train_state.pt holds no batch state this stage can continue "
                                f"from ({type(e).__name__}: {str(e)[:200]})") from None
    for m in model.modules():  # the model, or the Transformer inside a wrapper (a scalar-head model)
        if isinstance(m, Transformer):
            m.grad_checkpoint = cfg.grad_checkpoint
    fwd: nn.Module = torch.compile(model) if cfg.compile else model
    if info.enabled and not sharded:
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    whole = full_weights if sharded else lambda _: nullcontext()  # a sharded model's weights for eval, rollouts
    log = MetricsLog(ctx.out / "metrics.jsonl", start, info.is_main, tracker)
    peak = _gpu_peak(device)
    bar = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not (info.is_main and cfg.progress))
    last: dict[str, Any] = {}
    # the state of the current logging window travels with checkpoints, so a resumed run logs the same averages
    saved_log = (resume_state or {}).get("log", {})
    tokens_seen = int(resume_state["tokens_seen"]) if resume_state else 0
    steps_since_log, tokens_since_log = saved_log.get("steps", 0), saved_log.get("tokens", 0)
    skipped_since_log = saved_log.get("skipped", 0)  # steps of the window whose update was skipped (non-finite)
    skipped_in_row = int((resume_state or {}).get("skipped_in_row", 0))
    loss_acc = torch.tensor(saved_log.get("loss_sum", 0.0), device=device)
    batch_metrics: dict[str, float] = dict(saved_log.get("batch_metrics", {}))  # summed over the window's steps
    t_log = time.perf_counter()
    model.train()

    def save_all(step_done: int, final: bool) -> None:
        """Every rank hands rank 0 its batch state (and under fsdp writes its optimizer shards and sends rank 0 its
        weights); rank 0 saves the checkpoint."""
        # the weights are the same on every rank (DDP; FSDP sums each rank's verdict), so all decide alike here
        bad = non_finite_parameter(model, info, sharded)
        if bad is not None:
            bar.close()
            raise CakeError(f"step {step_done}: parameter {bad} holds NaN or inf; not saving it (the last checkpoint "
                            f"in {ctx.out}, if any, is untouched)")
        state: dict[str, Any] = {}
        weights: dict[str, torch.Tensor] = {}
        if fsdp:  # every rank writes its shards where no reader looks; the checkpoint's save moves them in
            staged = ctx.out / f".optimizer-staging-step-{step_done}"
            if info.is_main:
                shutil.rmtree(staged, ignore_errors=True)  # a save cut off before (same step, same name)
            barrier(info)
            state["optimizer_groups"] = save_optimizers(model, optimizers, staged)
            state["optimizer_dir"] = str(staged)
            weights = full_state_dict(model) if sharded else {}
        batch_states = gather_object(batches.state_dict(), info) if hasattr(batches, "state_dict") else None
        if not info.is_main:
            return
        state.update({"step": step_done, "tokens_seen": tokens_seen, "world_size": info.world_size,
                      "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                      "rng": {"torch": torch.get_rng_state()}, "skipped_in_row": skipped_in_row,
                      "log": {"steps": steps_since_log, "tokens": tokens_since_log, "loss_sum": loss_acc.item(),
                              "skipped": skipped_since_log, "batch_metrics": dict(batch_metrics)}})
        if not fsdp:
            state["optimizers"] = [o.state_dict() for o in optimizers]
        if batch_states is not None:
            state["batches"] = batch_states  # by rank
        with swapped(model, weights) if sharded else nullcontext():
            save(step_done, last, state, final)

    completed = start  # optimizer steps fully applied
    with GracefulStop(announce=info.is_main and cfg.progress) as stop:
        for step in range(start, cfg.max_steps):
            lr = set_lr(optimizers, lr_multiplier(step, cfg.max_steps, optim_cfg))
            try:
                reads = getattr(batches, "reads_model", None)
                with whole(model) if reads is not None and reads(step) else nullcontext():
                    micro = [batches.get(step, m) for m in range(cfg.grad_accum)]
            except StopRun as e:
                if completed == start:
                    raise
                barrier(info)
                save_all(completed, False)
                barrier(info)  # no rank exits before rank 0 has written: torchrun ends the others when one exits
                bar.close()
                raise StopRun(f"{e}; saved step {completed} in {ctx.out} (--resume continues)") from None
            # one all-reduce per step: the units of the whole global batch, and whether any rank got a Ctrl-C
            flags = torch.tensor([float(sum(b["n"] for b in micro)), float(stop.requested)], device=device)
            n_units, stop_requested = all_reduce_sum(flags, info).tolist()
            if stop_requested and completed > start:
                barrier(info)
                save_all(completed, False)
                barrier(info)  # as above: rank 0 finishes writing before any rank exits
                bar.close()
                raise SystemExit(f"stopped: saved a checkpoint at step {completed} in {ctx.out}; "
                                 "continue with --resume")
            step_tokens = sum(b["input"].numel() for b in micro) * info.world_size
            for k, v in micro[0].get("metrics", {}).items():
                batch_metrics[k] = batch_metrics.get(k, 0.0) + float(v)
            step_loss = torch.zeros((), device=device)
            micro_losses = []  # to name the micro-batch whose loss was not finite
            step_extra: dict[str, torch.Tensor] = {}
            for m, batch in enumerate(micro):
                # FSDP reduce-scatters every micro-step's gradients: its shards accumulate, not whole gradients
                sync = nullcontext() if not info.enabled or sharded or m == cfg.grad_accum - 1 else fwd.no_sync()
                with sync:
                    with autocast(device, dtype):
                        loss_sum, extra = loss_fn(fwd, _to(batch, device))
                    # DDP (and FSDP) average gradients over ranks; scaling by world_size turns that into a sum, so
                    # the gradient is that of (total loss / total units) over the whole global batch.
                    (loss_sum * (info.world_size / max(n_units, 1.0))).backward()
                step_loss += loss_sum.detach()
                micro_losses.append(loss_sum.detach().float())
                for k, v in extra.items():
                    step_extra[k] = step_extra.get(k, 0) + v.detach().float()
            grad_norm = replicated(torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip if optim_cfg.grad_clip > 0
                                                                  else float("inf")))
            step_loss = all_reduce_sum(step_loss, info)  # over all ranks: NaN on every rank if on any
            # DDP's gradients are all-reduced (FSDP's norm is summed over the shards), so the norm is the same on
            # every rank too: all ranks agree to skip
            if bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm)):
                skipped_in_row = 0
                for o in optimizers:
                    o.step()
                loss_acc += step_loss / max(n_units, 1.0)  # a step with no units (all masked) logs 0
            else:
                skipped_in_row += 1
                skipped_since_log += 1
                what = _non_finite(torch.stack(micro_losses), grad_norm, info)
                if skipped_in_row > cfg.max_skipped:
                    bar.close()
                    raise CakeError(f"step {step + 1}: {skipped_in_row} step(s) in a row with a non-finite loss or "
                                    f"gradient norm (the last: {what}); stopped without saving (the last "
                                    f"checkpoint in {ctx.out}, if any, is untouched: --loop.save-every N keeps "
                                    "one every N steps); lower --lr, or raise --loop.max-skipped")
                if info.is_main:
                    bar.write(f"step {step + 1}: {what}; update skipped ({skipped_in_row} in a row, the run stops "
                              f"after {cfg.max_skipped})", file=sys.stderr)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            completed = step + 1  # a skipped step counts too: the schedule and the data go on as planned
            tokens_seen += step_tokens
            tokens_since_log += step_tokens
            steps_since_log += 1
            bar.update(1)

            final = completed == cfg.max_steps
            row: dict[str, Any] = {}
            if completed % cfg.log_every == 0 or final:
                dt = time.perf_counter() - t_log
                applied = steps_since_log - skipped_since_log  # a window of skipped steps only logs loss null
                row = {"step": completed, "loss": (loss_acc / applied).item() if applied else math.nan, "lr": lr,
                       "grad_norm": grad_norm.item(), "tokens": tokens_seen, "skipped": skipped_since_log,
                       "tok_per_s": tokens_since_log / dt, "ms_per_step": 1000 * dt / steps_since_log}
                for k, v in step_extra.items():
                    v = all_reduce_sum(v, info)
                    row[k] = (v / max(n_units, 1.0)).item() if v.ndim == 0 else (v[0] / v[1].clamp(min=1e-12)).item()
                row.update({k: v / steps_since_log for k, v in batch_metrics.items()})
                if flops_per_token:
                    row["tflops"] = flops_per_token * row["tok_per_s"] / info.world_size / 1e12
                    if peak:
                        row["mfu"] = row["tflops"] * 1e12 / peak
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{row[k]:.3f}" for k in show if k in row},
                                tok_s=f"{row['tok_per_s']:,.0f}", refresh=False)
                loss_acc.zero_()
                batch_metrics.clear()
                steps_since_log, tokens_since_log, skipped_since_log = 0, 0, 0
                t_log = time.perf_counter()
            t_pause = time.perf_counter()
            if evaluate and (final or (cfg.eval_every and completed % cfg.eval_every == 0)):
                model.eval()
                with torch.no_grad(), autocast(device, dtype), whole(model):
                    val = evaluate(model)
                model.train()
                row = {"step": completed, **row, **val}
                if info.is_main:
                    bar.write(f"step {completed}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if row:
                last.update(row)
                log.write(row)
            if final or (cfg.save_every and completed % cfg.save_every == 0):
                barrier(info)
                save_all(completed, final)
                barrier(info)
            t_log += time.perf_counter() - t_pause  # evaluation and saving do not count against throughput
    bar.close()
    return last
