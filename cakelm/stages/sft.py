"""`cakelm sft`: supervised fine-tuning on conversations, so the model learns to play the assistant (the icing).

    cakelm sft                                           # runs/default/base -> runs/default/sft, default mixture
    cakelm sft --init runs/default/base --data my_chats.jsonl --out runs/mine/sft
    cakelm sft --data chitchat=0.3 arithmetic=0.5 gsm=0.2 --max-steps 600
    cakelm sft --resume                                  # continue an interrupted run exactly
    torchrun --nproc_per_node 2 -m cakelm sft            # DDP, as for pretraining

Starts from --init (any checkpoint: its model, tokenizer and context are inherited) and trains on a weighted
mixture of chat sources (see `cakelm.data.chat`): a source is drawn for each example with probability
proportional to its weight (`SRC=W`, default 1).
- Conversations are rendered in the chat format (`chat_format.py`). The loss covers only the assistant's
  tokens, each reply's <|end|> included, so the model learns what to say and when to stop; it is normalised
  by the number of those tokens in the whole step (all micro-batches, all ranks), so gradient accumulation
  and DDP do not change it.
- --loop.batch-size counts conversations. With --packing (the default) they are packed into rows of the
  context length with attention that stays inside each conversation: the same loss, less padding.
- Validation: loss per assistant token on held-out conversations of each source (held-out problems for tasks).

Writes a checkpoint whose meta.json says "chat_format": "chat", so `cakelm chat`, `serve` and `eval` use the
chat tokens. `cakelm eval` measures what SFT did (task accuracy, replies that end their turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cakelm.checkpoint import load_model, load_train_state, resume_point, save_checkpoint
from cakelm.common import CakeError, DistInfo, all_reduce_sum, init_distributed, print0
from cakelm.config import ConfigError, nested, opt, to_dict
from cakelm.data.chat import BUILTIN_CHAT, VAL_FRACTION, load_sources
from cakelm.data.chat_batches import ChatBatches, Seq, encode_examples, fixed_batches
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import lm_loss
from cakelm.model import flops_per_token
from cakelm.optim import OptimConfig
from cakelm.tokenizer import Tokenizer

DEFAULT_DATA = ["chitchat=0.1", "arithmetic=0.85", "gsm=0.05"]


@dataclass
class SFTConfig:
    init: str = opt("runs/default/base", "checkpoint to fine-tune (its model, tokenizer and context are inherited)")
    data: list[str] = opt(DEFAULT_DATA, "chat sources, each SRC or SRC=WEIGHT: " + ", ".join(BUILTIN_CHAT) +
                          ", .jsonl files ({\"messages\"} or {\"prompt\", \"completion\"}), hf:NAME[:SPLIT]")
    out: str = opt("runs/default/sft", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same batches, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    packing: bool = opt(True, "pack several conversations per row (attention does not cross them; same loss)")
    task_size: int = opt(0, "training problems generated per task source (0 = about as many as the run draws)")
    val_size: int = opt(200, "held-out conversations per source for the validation loss")
    val_fraction: float = opt(VAL_FRACTION, "share of a file's (or chitchat's) conversations held out (at most "
                              "--val-size are used); `cakelm eval` holds out the same ones at the default")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    # The defaults are the "cpu" preset: under 3 minutes on 2 CPU cores from the pipeline's base model; how it
    # was chosen is in the README.
    optim: OptimConfig = nested(OptimConfig, name="muon", lr=1e-2, warmup_steps=20, schedule="wsd",
                                min_lr_ratio=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=220, batch_size=48, eval_every=110, log_every=10)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data needs at least one source")
        if self.task_size < 0 or self.val_size < 1:
            raise ConfigError("--task-size must be >= 0 and --val-size >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"val_size": 32, "loop.max_steps": 20, "loop.batch_size": 16, "loop.eval_every": 0,
              "loop.log_every": 5, "optim.warmup_steps": 2},
}


def make_evaluate(val: dict[str, list[Seq]], tok: Tokenizer, cfg: SFTConfig, row_len: int, device: torch.device,
                  info: DistInfo) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Validation loss per assistant token, overall and per source."""
    batches = {name: fixed_batches(seqs, cfg.loop.batch_size, tok.pad_id, cfg.packing, row_len, info.rank,
                                   info.world_size) for name, seqs in val.items()}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        # [sum nll, tokens] per source, summed over ranks
        acc = torch.stack([heldout_loss(model, bs, device) for bs in batches.values()])
        acc = all_reduce_sum(acc, info)
        out = {"val_loss": (acc[:, 0].sum() / acc[:, 1].sum()).item()}
        if len(batches) > 1:
            out.update({f"val_loss/{name}": (acc[i, 0] / acc[i, 1]).item() for i, name in enumerate(batches)})
        return out

    return evaluate


def heldout_loss(model: torch.nn.Module, batches: list[dict], device: torch.device) -> torch.Tensor:
    """[summed nll, number of target tokens] over chat batches, float64 (the loss is their ratio)."""
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        loss_sum, n = chat_loss(model, b, device)
        acc += torch.stack([loss_sum.double(), n.double()])
    return acc


def chat_loss(model: torch.nn.Module, batch: dict, device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nll of the target tokens, their number) of a chat batch (packed or not)."""
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return lm_loss(model(batch["input"], segments=batch.get("segments")), batch["target"])


def main(cfg: SFTConfig) -> Path:
    info, device = init_distributed(cfg.loop.device)
    t0 = time.time()
    out = Path(cfg.out)
    point = resume_point(out, cfg.resume, cfg.overwrite, cfg.loop.max_steps, to_dict(cfg))
    if point == "done":
        print0(f"sft: {out} is already complete (raise --max-steps to go on)", info=info)
        return out
    if cfg.resume and point == "fresh":
        print0(f"--resume: no checkpoint in {out} yet, starting from {cfg.init}", info=info)
    model, tok, start_meta = load_model(out if point == "resume" else cfg.init, device)
    resume_state = load_train_state(out) if point == "resume" else None
    parent_stage = start_meta.get("parent_stage") if point == "resume" else start_meta.get("stage")
    model.train()
    seq_len = model.cfg.max_seq_len
    saved_sizes = {src: c["task_size"] for src, c in start_meta.get("data", {}).items() if c.get("task_size")} \
        if point == "resume" else None
    draws = cfg.loop.max_steps * cfg.loop.batch_size * cfg.loop.grad_accum * info.world_size
    sources, skipped = load_sources(cfg.data, draws, cfg.task_size, cfg.val_fraction, cfg.val_size, cfg.loop.seed,
                                    cfg.skip_bad_lines, task_sizes=saved_sizes)
    if skipped:
        print0(f"sft: skipped {skipped} bad lines (--skip-bad-lines)", info=info)
    train_seqs, val_seqs, counts = [], {}, {}
    for src, weight, train_ex, val_ex, task_size in sources:
        seqs, c = encode_examples(train_ex, tok, "chat", seq_len + 1)
        if not seqs:
            raise CakeError(f"--data {src}: no conversation has an assistant reply that fits the context")
        vseqs, _ = encode_examples(val_ex, tok, "chat", seq_len + 1)
        train_seqs.append(seqs)
        val_seqs[src] = vseqs
        counts[src] = {"weight": weight, **c, "val_sequences": len(vseqs), "task_size": task_size}
    print0("sft: " + "; ".join(f"{s} (weight {c['weight']:g}): {c['sequences']:,} sequences, "
                               f"{c['target_tokens'] / max(c['sequences'], 1):.0f} target tokens each"
                               + (f", {c['truncated']} truncated" if c["truncated"] else "")
                               for s, c in counts.items()), info=info)
    batches = ChatBatches(train_seqs, [c["weight"] for c in counts.values()], cfg.loop.batch_size,
                          cfg.loop.grad_accum, info.rank, info.world_size, cfg.loop.seed, cfg.packing, seq_len,
                          tok.pad_id)
    evaluate = make_evaluate(val_seqs, tok, cfg, seq_len, device, info)
    print0(f"sft: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}, {batches.global_batch} conversations "
           f"per step, {cfg.loop.max_steps} steps on {device}" + (f" x {info.world_size} ranks" if info.enabled
                                                                  else "")
           + (f"; resuming from step {resume_state['step']}" if resume_state else ""), info=info)

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return chat_loss(m, batch)[0], {}

    def save(step: int, metrics: dict, train_state: dict, final: bool) -> None:
        save_checkpoint(out, model, tok, {
            "stage": "sft", "step": step, "complete": final, "config": to_dict(cfg), "metrics": metrics,
            "parent": cfg.init, "parent_stage": parent_stage, "chat_format": "chat", "data": counts,
            "skipped_lines": skipped, "tokens": train_state["tokens_seen"], "world_size": info.world_size,
            "num_params": model.num_params(),
        }, train_state)

    metrics = train(model, cfg.loop, cfg.optim, LoopContext(device, info, out), batches.get, loss_fn, evaluate,
                    save, resume_state, flops_per_token(model.cfg, seq_len))
    print0(f"sft: step {metrics.get('step')}, train loss {metrics.get('loss', float('nan')):.3f}, val loss "
           f"{metrics.get('val_loss', float('nan')):.3f} -> {out} ({time.time() - t0:.0f}s)", info=info)
    return out
