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
- --unlikelihood A adds A x the token-level unlikelihood of each reply's own earlier tokens (losses.py), a
  training-side answer to replies that loop; the logged `nll` and `unlikelihood` are per assistant token.
- Validation: loss per assistant token on held-out conversations of each source (held-out problems for tasks).

Writes a checkpoint whose meta.json says "chat_format": "chat", so `cakelm chat`, `serve` and `eval` use the
chat tokens. `cakelm eval` measures what SFT did (task accuracy, replies that end their turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.common import CakeError, print0
from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import BUILTIN_CHAT, VAL_FRACTION, load_sources
from cakelm.data.chat_batches import ChatBatches, encode_examples
from cakelm.heldout import chat_evaluator, chat_logits
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import lm_loss, unlikelihood_loss
from cakelm.model import flops_per_token
from cakelm.optim import OptimConfig
from cakelm.scaffold import start

DEFAULT_DATA = ["chitchat=0.1", "arithmetic=0.8", "claims=0.05", "gsm=0.05"]


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
    unlikelihood: float = opt(0.0, "weight of token-level unlikelihood on each reply's own earlier tokens, against "
                              "replies that loop (Welleck et al. 2019; 0 = off)")
    # The defaults are the "cpu" preset: under 3 minutes on 2 CPU cores from the pipeline's base model; how it
    # was chosen is in the README.
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
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
        if not 0.0 <= self.unlikelihood < float("inf"):
            raise ConfigError(f"unlikelihood must be >= 0, got {self.unlikelihood}")


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"val_size": 32, "loop.max_steps": 20, "loop.batch_size": 16, "loop.eval_every": 0,
              "loop.log_every": 5, "optim.warmup_steps": 2},
}


def main(cfg: SFTConfig) -> Path:
    run = start("sft", cfg, needs_chat=False)
    if run is None:
        return Path(cfg.out)
    model, tok, info = run.model, run.tok, run.info
    assert model is not None
    seq_len = model.cfg.max_seq_len
    saved_sizes = {src: c["task_size"] for src, c in run.meta.get("data", {}).items() if c.get("task_size")} \
        if run.resumed else None
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
    evaluate = chat_evaluator(val_seqs, tok.pad_id, cfg.loop.batch_size, cfg.packing, seq_len, run.device, info)
    run.announce(f"{batches.global_batch} conversations per step")

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = chat_logits(m, batch)
        nll = lm_loss(logits, batch["target"])[0]
        if not cfg.unlikelihood:
            return nll, {}
        ul = unlikelihood_loss(logits, batch["target"], batch.get("segments"))
        return nll + cfg.unlikelihood * ul, {"nll": nll, "unlikelihood": ul}

    metrics = run.train(model, batches, loss_fn, evaluate, meta={"data": counts, "skipped_lines": skipped},
                        flops_per_token=flops_per_token(model.cfg, seq_len))
    return run.done(f"train loss {metrics.get('loss', float('nan')):.3f}, val loss "
                    f"{metrics.get('val_loss', float('nan')):.3f}", metrics)


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of an SFT checkpoint."""
    return f"val loss {meta['metrics'].get('val_loss', float('nan')):.3f} (assistant tokens)"
