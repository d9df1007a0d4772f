"""`cakelm pretrain`: train the Transformer to predict the next token of raw text (the cake).

    cakelm pretrain                                   # CPU preset, reads runs/default/tokenizer
    cakelm pretrain --preset 10m --max-steps 2000 --out runs/10m/base
    cakelm pretrain --resume                          # continue runs/default/base exactly where it stopped
    torchrun --nproc_per_node 2 -m cakelm pretrain    # DDP: each rank takes its share of every batch

Reads the token shards and tokenizer written by `cakelm tokenizer` (--data DIR), trains on the shared loop and
writes a checkpoint directory (--out) with metrics.jsonl. Validation reports loss (nats/token) and bits per
byte, which compares across tokenizers. --init CKPT starts from another checkpoint's weights instead of a
random init (continued pretraining).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cakelm.checkpoint import load_model, load_train_state, resume_point, save_checkpoint
from cakelm.common import CakeError, DistInfo, all_reduce_sum, init_distributed, print0, seed_everything
from cakelm.config import nested, opt, to_dict
from cakelm.data.shards import TokenBatches, eval_batches, open_shard
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import bits_per_byte, lm_loss, token_nll
from cakelm.model import PRESETS as MODEL_PRESETS
from cakelm.model import ModelConfig, Transformer, flops_per_token
from cakelm.optim import OptimConfig
from cakelm.tokenizer import Tokenizer


@dataclass
class PretrainConfig:
    data: str = opt("runs/default/tokenizer", "directory written by `cakelm tokenizer` (tokenizer + token shards)")
    out: str = opt("runs/default/base", "checkpoint directory to write")
    init: str | None = opt(None, "start from this checkpoint's weights (and shape) instead of a random init")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same batches, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    # The defaults are the "cpu" preset: the tiny model with Muon, ~3.5 minutes on 2 CPU cores (Muon reached
    # 2.24 val bits/byte there against AdamW's 2.36 at equal steps; see the README).
    model: ModelConfig = nested(ModelConfig, "model shape (ignored with --init or --resume)")
    optim: OptimConfig = nested(OptimConfig, name="muon", lr=1e-2, warmup_steps=20)
    loop: LoopConfig = nested(LoopConfig, max_steps=300, batch_size=16, eval_every=100)


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


def make_evaluate(val_tokens: np.ndarray, tok: Tokenizer, seq_len: int, loop: LoopConfig, device: torch.device,
                  info: DistInfo) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Validation loss (nats per token) and bits per byte over the (first eval_tokens of the) val shard."""
    batches = eval_batches(val_tokens, seq_len, loop.batch_size, loop.eval_tokens, info.rank, info.world_size)
    nbytes = torch.from_numpy(tok.bytes_per_token()).to(device)  # (V,)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        # [sum nll, tokens, sum nll over tokens that carry text, their bytes], in float64 for the sums
        acc = torch.zeros(4, dtype=torch.float64, device=device)
        for b in batches:
            target = b["target"].to(device)
            nll = token_nll(model(b["input"].to(device)), target)  # (B, T)
            tb = nbytes[target]  # (B, T) bytes of each target token; 0 for <|bos|>
            acc += torch.stack([nll.sum(), torch.tensor(float(target.numel()), device=device),
                                (nll * (tb > 0)).sum(), tb.sum()]).double()
        acc = all_reduce_sum(acc, info)
        return {"val_loss": (acc[0] / acc[1]).item(), "val_bpb": bits_per_byte(acc[2].item(), int(acc[3].item()))}

    return evaluate



def _start(cfg: PretrainConfig, tok: Tokenizer, device: torch.device, info: DistInfo
           ) -> tuple[Transformer | None, dict | None]:
    """The model to train and, with --resume, the saved train state. (None, None) when there is nothing to do."""
    out = Path(cfg.out)
    point = resume_point(out, cfg.resume, cfg.overwrite, cfg.loop.max_steps, to_dict(cfg))
    if point == "done":
        print0(f"pretrain: {out} is already complete (raise --max-steps to go on)", info=info)
        return None, None
    if point == "resume":
        model, saved_tok, _ = load_model(out, device)
        if saved_tok.vocab_size != tok.vocab_size:
            raise CakeError(f"--resume: {out} was trained with a different tokenizer than {cfg.data}")
        state = load_train_state(out)
        print0(f"resuming {out} from step {state['step']}", info=info)
        return model.train(), state
    if cfg.resume:
        print0(f"--resume: no checkpoint in {out} yet, starting from scratch", info=info)
    if cfg.init:
        model, init_tok, _ = load_model(cfg.init, device)
        if init_tok.vocab_size != tok.vocab_size:
            raise CakeError(f"--init {cfg.init}: its tokenizer ({init_tok.vocab_size} tokens) differs from "
                            f"{cfg.data} ({tok.vocab_size} tokens)")
        return model.train(), None
    seed_everything(cfg.loop.seed)
    return Transformer(replace(cfg.model, vocab_size=tok.vocab_size)).to(device), None


def main(cfg: PretrainConfig) -> Path:
    info, device = init_distributed(cfg.loop.device)
    t0 = time.time()
    data, out = Path(cfg.data), Path(cfg.out)
    tok = Tokenizer.load(data / "tokenizer.json")
    train_tokens = open_shard(data / "train.bin", tok.vocab_size)
    val_tokens = open_shard(data / "val.bin", tok.vocab_size)

    model, resume_state = _start(cfg, tok, device, info)
    if model is None:
        return out
    mcfg = model.cfg
    seq_len = mcfg.max_seq_len

    batches = TokenBatches(train_tokens, seq_len, cfg.loop.batch_size, cfg.loop.grad_accum, info.rank,
                           info.world_size, cfg.loop.seed)
    evaluate = make_evaluate(val_tokens, tok, seq_len, cfg.loop, device, info)
    print0(f"pretrain: {model.num_params() / 1e6:.2f}M parameters ({mcfg.n_layers} layers, width {mcfg.dim}, "
           f"context {seq_len}), {len(train_tokens):,} train tokens, {batches.rows_per_step * seq_len:,} tokens "
           f"per step, {cfg.loop.max_steps} steps ({batches.epoch_of(cfg.loop.max_steps):.2f} epochs) on {device}"
           + (f" x {info.world_size} ranks" if info.enabled else ""), info=info)

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss_sum, _ = lm_loss(m(batch["input"]), batch["target"])
        return loss_sum, {}

    def save(step: int, metrics: dict, train_state: dict, final: bool) -> None:
        save_checkpoint(out, model, tok, {
            "stage": "pretrain", "step": step, "complete": final, "config": to_dict(cfg), "metrics": metrics,
            "parent": cfg.init, "tokens": train_state["tokens_seen"], "world_size": info.world_size,
            "num_params": model.num_params(), "chat_format": "playscript",
        }, train_state)

    metrics = train(model, cfg.loop, cfg.optim, LoopContext(device, info, out), batches.get, loss_fn, evaluate,
                    save, resume_state, flops_per_token(mcfg, seq_len))
    print0(f"pretrain: step {metrics.get('step')}, val loss {metrics.get('val_loss', float('nan')):.3f}, "
           f"val bpb {metrics.get('val_bpb', float('nan')):.3f}, {metrics.get('tok_per_s', 0):,.0f} tok/s -> {out} "
           f"({time.time() - t0:.0f}s)", info=info)
    return out
