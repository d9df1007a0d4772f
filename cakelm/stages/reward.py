"""`cakelm reward`: a reward model from preference pairs (Bradley-Terry), and `cakelm reward score` to use it.

    cakelm reward                                  # runs/default/prefs + runs/default/sft -> runs/default/rm
    cakelm reward --data my_prefs.jsonl --margin 1.0 --center 0.01
    cakelm reward score runs/default/rm --data replies.jsonl [--json scored.jsonl]
    torchrun --nproc_per_node 2 -m cakelm reward

The model is the SFT Transformer with its LM head set aside and a scalar head (Linear(C, 1)) on the final hidden
state (`cakelm.rlhf.ScalarModel`). A reply's reward is the head's output at the last real token of prompt + reply,
the <|end|> that closes the reply: never a padding position, for right or left padding alike. Training minimises
the Bradley-Terry loss of each pair (`losses.bradley_terry`, InstructGPT's reward model):

    -log sigmoid(r_chosen - r_rejected - margin) + center * (r_chosen + r_rejected)^2

with margin = --margin x the rater's score gap when the rows carry it ("gold_chosen"/"gold_rejected", as Llama 2
uses rating levels; 0 by default), and --center pinning the scale-free rewards near 0 (TRL's
center_rewards_coefficient). Logged: loss, pairwise accuracy and mean margin r_chosen - r_rejected, on training
batches and (every --loop.eval-every steps) on the held-out pairs, also per source (chat, arithmetic...).

`cakelm reward score CKPT --data FILE` scores replies: rows {"prompt", "completion"} or {"messages": [...]} that
end on an assistant reply; prints each score (or writes the rows with a "reward" field to --json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.chat_format import render
from cakelm.common import CakeError, DistInfo, all_reduce_sum, pick_device, write_text_atomic
from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import read_chat_jsonl
from cakelm.data.prefs import EncodedPair, PairBatches, encode_pairs, load_prefs, pad_pairs
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import bradley_terry
from cakelm.optim import OptimConfig
from cakelm.rlhf import ScalarModel, last_scores, load_scalar_model, pad_sequences
from cakelm.scaffold import start


@dataclass
class RewardConfig:
    init: str = opt("runs/default/sft", "chat checkpoint the reward model starts from (`cakelm sft` output)")
    data: str = opt("runs/default/prefs", "preference pairs: a directory with train.jsonl and val.jsonl (`cakelm "
                    "prefs` output) or one .jsonl file (split by prompt)")
    out: str = opt("runs/default/rm", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    margin: float = opt(0.0, "margin = this x (gold_chosen - gold_rejected) when the rows carry the rater's scores")
    center: float = opt(0.01, "weight of (r_chosen + r_rejected)^2, which keeps rewards centred near 0")
    val_fraction: float = opt(0.1, "share of prompts held out when --data is a single file")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, name="adamw", lr=3e-4, warmup_steps=10, schedule="cosine",
                                weight_decay=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=80, batch_size=32, eval_every=40, log_every=10)

    def __post_init__(self) -> None:
        if self.margin < 0 or self.center < 0 or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("need --margin >= 0, --center >= 0 and --val-fraction in (0, 1)")


PRESETS = {
    "cpu": {},
    "micro": {"loop.max_steps": 6, "loop.batch_size": 8, "loop.eval_every": 0, "optim.warmup_steps": 1},
}


def margins(rows: list[EncodedPair], scale: float) -> torch.Tensor:
    """(P,) the Bradley-Terry margin of each pair: scale x the rater's gap where the row has one, else 0."""
    return torch.tensor([scale * (float(r.pair.fields.get("gold_chosen", 0.0)) -
                                  float(r.pair.fields.get("gold_rejected", 0.0))) for r in rows])


def reward_loss(model: torch.nn.Module, batch: dict[str, Any], center: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed Bradley-Terry loss of a batch of P pairs (rows 0..P-1 chosen, P..2P-1 rejected) and per-pair
    accuracy and margin sums."""
    r = last_scores(model, batch["input"], batch["real"])  # (2P,)
    P = r.numel() // 2
    rc, rr = r[:P], r[P:]
    loss = bradley_terry(rc, rr, batch["margin"], center).sum()
    return loss, {"pair_accuracy": (rc > rr).float().sum().detach(), "margin": (rc - rr).sum().detach()}


def make_evaluate(val: list[EncodedPair], batch_size: int, pad_id: int, device: torch.device, info: DistInfo
                  ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Held-out pairwise accuracy, mean margin and loss, overall and per source."""
    mine = val[info.rank::info.world_size]
    sources = sorted({str(r.pair.fields.get("source", "all")) for r in val})

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc = torch.zeros(len(sources), 4, dtype=torch.float64, device=device)  # pairs, correct, margin, loss
        for i in range(0, len(mine), batch_size):
            part = mine[i:i + batch_size]
            b = pad_pairs(part, pad_id)
            r = last_scores(model, b["input"].to(device), b["real"].to(device))
            rc, rr = r[:len(part)], r[len(part):]
            loss = bradley_terry(rc, rr)
            for j, row in enumerate(part):
                s = sources.index(str(row.pair.fields.get("source", "all")))
                acc[s] += torch.stack([torch.tensor(1.0, device=device), (rc[j] > rr[j]).double(),
                                       (rc[j] - rr[j]).double(), loss[j].double()])
        acc = all_reduce_sum(acc, info)
        tot = acc.sum(0)
        out = {"val_pair_accuracy": (tot[1] / tot[0]).item(), "val_margin": (tot[2] / tot[0]).item(),
               "val_loss": (tot[3] / tot[0]).item()}
        if len(sources) > 1:
            out.update({f"val_pair_accuracy/{s}": (acc[i, 1] / acc[i, 0]).item() for i, s in enumerate(sources)})
        return out

    return evaluate


def main(cfg: RewardConfig) -> Path:
    run = start("reward", cfg)
    if run is None:
        return Path(cfg.out)
    assert run.model is not None
    tok, info = run.tok, run.info
    model = ScalarModel(run.model).to(run.device)  # a fresh head on the chat model, or the one being resumed
    if run.resumed:
        model.load_head(run.heads(), run.out)
    train_pairs, val_pairs, skipped = load_prefs(cfg.data, cfg.val_fraction, cfg.skip_bad_lines)
    rows, dropped = encode_pairs(train_pairs, tok, "chat", run.model.cfg.max_seq_len)
    val_rows, _ = encode_pairs(val_pairs, tok, "chat", run.model.cfg.max_seq_len)
    if not rows or not val_rows:
        raise CakeError(f"--data {cfg.data}: no {'training' if not rows else 'held-out'} pair fits the context of "
                        f"{run.model.cfg.max_seq_len} tokens")
    batches = PairBatches(rows, cfg.loop.batch_size, cfg.loop.grad_accum, info.rank, info.world_size,
                          cfg.loop.seed, tok.pad_id, extra=lambda part: {"margin": margins(part, cfg.margin)})
    evaluate = make_evaluate(val_rows, cfg.loop.batch_size, tok.pad_id, run.device, info)
    run.announce(f"{len(rows)} training pairs ({dropped} too long), {len(val_rows)} held out; "
                 f"{batches.global_batch} pairs per step" + (f"; skipped {skipped} bad lines" if skipped else ""),
                 params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    metrics = run.train(model, batches, lambda m, b: reward_loss(m, b, cfg.center), evaluate,
                        meta={"head": "scalar", "pairs": {"train": len(rows), "val": len(val_rows),
                                                          "too_long": dropped, "skipped_lines": skipped}},
                        heads=model.head_tensors, show=("pair_accuracy",))
    return run.done(f"held-out pair accuracy {metrics.get('val_pair_accuracy', float('nan')):.3f}, margin "
                    f"{metrics.get('val_margin', float('nan')):.3f}", metrics)


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a reward model."""
    m = meta["metrics"]
    return (f"held-out pair accuracy {m.get('val_pair_accuracy', float('nan')):.3f}, margin "
            f"{m.get('val_margin', 0):.2f}")


# ----------------------------------------------------------------------------------------------------------------
# cakelm reward score


@dataclass
class ScoreConfig:
    ckpt: str = opt("", "reward model checkpoint (`cakelm reward` output)", positional=True)
    data: str = opt("", "JSONL of replies to score: {\"prompt\", \"completion\"} or {\"messages\"} rows")
    json: str | None = opt(None, "write the rows with a \"reward\" field to this JSONL file instead of printing")
    batch_size: int = opt(32, "replies scored at once")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")


def score_main(cfg: ScoreConfig) -> list[float]:
    if not cfg.data:
        raise CakeError("--data is required: a JSONL file of replies to score")
    device = pick_device(cfg.device)
    model, tok, _ = load_scalar_model(cfg.ckpt, device)
    examples, _ = read_chat_jsonl(cfg.data)
    seqs = []
    for ex in examples:
        ids, _ = render(ex.messages, tok, "chat")
        if len(ids) > model.body.cfg.max_seq_len:
            raise CakeError(f"{ex.name}: {len(ids)} tokens, longer than the reward model's context "
                            f"({model.body.cfg.max_seq_len})")
        seqs.append(ids)
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), cfg.batch_size):
            ids, real = pad_sequences(seqs[i:i + cfg.batch_size], tok.pad_id)
            scores += last_scores(model, ids.to(device), real.to(device)).tolist()
    if cfg.json:
        write_text_atomic(cfg.json, "".join(json.dumps({"messages": ex.messages, **ex.fields, "reward": s},
                                                       ensure_ascii=False) + "\n" for ex, s in zip(examples, scores)))
        print(f"reward score: {len(scores)} replies -> {cfg.json} (mean {sum(scores) / len(scores):.3f})")
    else:
        for ex, s in zip(examples, scores):
            print(f"{s:+.4f}  {ex.name}: {ex.messages[-1]['content'][:80]!r}")
    return scores
