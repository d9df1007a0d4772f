"""`cakelm pretrain`: train the Transformer to predict the next token of raw text (the cake).

    cakelm pretrain                                   # CPU preset, reads runs/default/tokenizer
    cakelm pretrain --preset 10m --max-steps 2000 --out runs/10m/base
    cakelm pretrain --resume                          # continue runs/default/base exactly where it stopped
    torchrun --nproc_per_node 2 -m cakelm pretrain    # DDP: each rank takes its share of every batch
    torchrun --nproc_per_node 2 -m cakelm pretrain --loop.parallel fsdp   # FSDP2: and of the model (cakelm.parallel)
    cakelm pretrain --fim-rate 0.5 --out runs/fim/base # also learn to fill in the middle (cakelm/data/fim.py)

Reads the token shards and tokenizer written by `cakelm tokenizer` (--data DIR: train.bin/val.bin, or the
fixed-size shards of a streamed corpus, memory-mapped, each rank reading only its own rows), trains on the shared
loop and writes a checkpoint directory (--out) with metrics.jsonl. Validation reports loss (nats/token) and bits
per byte, which compares across tokenizers. --init CKPT starts from another checkpoint's weights instead of a
random init (continued pretraining). --fim-rate R rewrites that share of the documents of every row into
fill-in-the-middle order (adding the three FIM tokens to the vocabulary when it lacks them), so the model can also
fill a gap (`cakelm sample --prefix ... --suffix ...`); validation stays plain left-to-right text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cakelm.common import CakeError
from cakelm.config import ConfigError, nested, opt
from cakelm.data.fim import FIM_TOKENS, FimIds, fim_row
from cakelm.data.shards import TokenBatches, open_tokens
from cakelm.heldout import shard_evaluator
from cakelm.loop import LoopConfig
from cakelm.losses import lm_loss
from cakelm.model import PRESETS as MODEL_PRESETS
from cakelm.model import ModelConfig, Transformer, flops_per_token
from cakelm.optim import OptimConfig
from cakelm.scaffold import start
from cakelm.tokenizer import Tokenizer


@dataclass
class PretrainConfig:
    data: str = opt("runs/default/tokenizer", "directory written by `cakelm tokenizer` (tokenizer + token shards)")
    out: str = opt("runs/default/base", "checkpoint directory to write")
    init: str | None = opt(None, "start from this checkpoint's weights (and shape) instead of a random init")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same batches, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    fim_rate: float = opt(0.0, "share of documents rewritten into fill-in-the-middle order (Bavarian et al. 2022; "
                          "0 = plain next-token pretraining; the paper trains with 0.5 to 0.9)")
    fim_spm_rate: float = opt(0.5, "of the rewritten documents, the share in suffix-prefix-middle order (else "
                              "prefix-suffix-middle)")
    # The defaults are the "cpu" preset: the tiny model with Muon, ~3.5 minutes on 2 CPU cores (Muon reached
    # 2.24 val bits/byte there against AdamW's 2.36 at equal steps; see the README).
    model: ModelConfig = nested(ModelConfig, "model shape (ignored with --init or --resume)")
    optim: OptimConfig = nested(OptimConfig, name="muon", lr=1e-2, warmup_steps=20)
    loop: LoopConfig = nested(LoopConfig, max_steps=300, batch_size=16, eval_every=100)


    def __post_init__(self) -> None:
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


def _model(name: str) -> dict[str, Any]:
    return {f"model.{k}": v for k, v in MODEL_PRESETS[name].items()}


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults
    # Seconds, for tests and smoke runs.
    "micro": {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.max_seq_len": 256,
              "loop.max_steps": 30, "loop.batch_size": 8, "loop.eval_every": 0, "loop.eval_tokens": 4096,
              "loop.log_every": 5, "optim.warmup_steps": 5, "optim.name": "adamw", "optim.lr": 3e-3},
    "10m": {**_model("10m"), "loop.max_steps": 3000, "loop.batch_size": 16, "loop.eval_every": 250,
            "optim.name": "adamw", "optim.lr": 1e-3, "optim.warmup_steps": 100},
    # One GPU, ~100M parameters (GPT-2 small shape), bf16, compiled; about 0.5M tokens per step.
    "gpu": {**_model("gpt2-small"), "loop.max_steps": 5000, "loop.batch_size": 32, "loop.grad_accum": 16,
            "loop.eval_every": 250, "loop.eval_tokens": 1_000_000, "loop.compile": True, "optim.name": "adamw",
            "optim.lr": 6e-4, "optim.warmup_steps": 200, "optim.schedule": "wsd"},
    # Eight GPUs under torchrun, ~300M parameters: 16 x 4 x 8 ranks x 1024 = 0.5M tokens per step, 15,000 steps
    # (~7.9B tokens, about 25 tokens per parameter). Needs a corpus of that size (--data).
    "gpu8": {**_model("gpt2-medium"), "loop.max_steps": 15000, "loop.batch_size": 16, "loop.grad_accum": 4,
             "loop.eval_every": 500, "loop.eval_tokens": 1_000_000, "loop.compile": True, "optim.name": "adamw",
             "optim.lr": 3e-4, "optim.warmup_steps": 500, "optim.schedule": "wsd"},
}


def main(cfg: PretrainConfig) -> Path:
    data = Path(cfg.data)
    tok = Tokenizer.load(data / "tokenizer.json")
    train_tokens = open_tokens(data, "train", tok.vocab_size)  # memory-mapped: a corpus of any size opens at once
    val_tokens = open_tokens(data, "val", tok.vocab_size)
    transform = None
    if cfg.fim_rate > 0:
        if cfg.init and not cfg.resume and FIM_TOKENS[0] not in Tokenizer.load(Path(cfg.init)).special_tokens:
            raise CakeError(f"--fim-rate adds the fill-in-the-middle tokens to the vocabulary, and {cfg.init} has "
                            "none: pretrain from scratch (or --init a model pretrained with --fim-rate)")
        tok = tok.with_special_tokens(FIM_TOKENS)  # new ids past the data's: its tokens read the same
        fim = FimIds.of(tok)
        transform = partial(fim_row, rate=cfg.fim_rate, spm_rate=cfg.fim_spm_rate, fim=fim)
    run = start("pretrain", cfg, needs_chat=False, fmt="playscript", tok=tok)
    if run is None:
        return Path(cfg.out)
    if run.model is None:  # from scratch (the scaffold seeded the init with --seed)
        run.model = Transformer(replace(cfg.model, vocab_size=tok.vocab_size)).to(run.device)
    mcfg, info = run.model.cfg, run.info
    seq_len = mcfg.max_seq_len
    batches = TokenBatches(train_tokens, seq_len, cfg.loop.batch_size, cfg.loop.grad_accum, info.rank,
                           info.world_size, cfg.loop.seed, transform)
    evaluate = shard_evaluator(val_tokens, tok, seq_len, cfg.loop.batch_size, cfg.loop.eval_tokens, run.device, info)
    run.announce(f"{mcfg.n_layers} layers, width {mcfg.dim}, context {seq_len}; {len(train_tokens):,} train tokens, "
                 f"{batches.rows_per_step * seq_len:,} tokens per step ({batches.epoch_of(cfg.loop.max_steps):.2f} "
                 "epochs)" + (f"; fill-in-the-middle on {cfg.fim_rate:.0%} of documents" if transform else ""))

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss_sum, _ = lm_loss(m(batch["input"]), batch["target"])
        return loss_sum, {}

    metrics = run.train(run.model, batches, loss_fn, evaluate, flops_per_token=flops_per_token(mcfg, seq_len))
    return run.done(f"val loss {metrics.get('val_loss', float('nan')):.3f}, val bpb "
                    f"{metrics.get('val_bpb', float('nan')):.3f}, {metrics.get('tok_per_s', 0):,.0f} tok/s", metrics)


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a pretraining checkpoint."""
    m = meta["metrics"]
    return f"val bpb {m.get('val_bpb', float('nan')):.3f}, {m.get('tok_per_s', 0):,.0f} tok/s"
