"""`cakelm dpo`: Direct Preference Optimization, the policy learns from preference pairs without a reward model.

    cakelm dpo                                     # runs/default/prefs + runs/default/sft -> runs/default/dpo
    cakelm dpo --beta 0.3 --loss-type ipo
    cakelm dpo --data my_prefs.jsonl --reward-model ""      # no reward model: no proxy score in the evaluation
    torchrun --nproc_per_node 2 -m cakelm dpo

For each pair, with log-probabilities summed over the reply's tokens (the SFT loss mask: the reply and its
<|end|>), of the policy pi and of the frozen reference pi_ref (--init, the SFT model):

    h = [log pi(chosen) - log pi_ref(chosen)] - [log pi(rejected) - log pi_ref(rejected)]
    sigmoid: -log sigmoid(beta * h)          (Rafailov et al. 2023, arXiv 2305.18290)
    ipo:     (h - 1 / (2 beta))^2, on per-token mean log-probs (Azar et al. 2023, arXiv 2310.12036; as TRL)

(`losses.dpo_loss`), plus --rpo-alpha x the chosen reply's per-token NLL, -log pi(chosen) / |chosen| (RPO, Pang et
al. 2024, arXiv 2404.19733; TRL's rpo_alpha; `losses.rpo_nll`). On the pipeline's pairs plain DPO (--rpo-alpha 0)
lowered the rater's gold reward by 0.08 and cut greedy arithmetic accuracy from 48% to 14%; with the NLL term (alpha
1) gold rose by 0.07 and accuracy fell to 34.5%; alpha 4 (the default) on pairs whose chosen sum is right (`cakelm
prefs --right-chosen`) raised gold by 0.11 with accuracy 39.0% against SFT's 42.5% (`benchmarks/recipes.py dpo`,
README). --replay-coef g adds g x the per-token NLL of SFT conversations (--replay, default SFT's default mixture;
--replay-batch conversations per micro-batch of pairs), the term InstructGPT (Ouyang et al. 2022, eq. 2, "PPO-ptx")
mixes into RLHF against the loss of skills, here with SFT's data for pretraining data. The reference's log-probs are
computed once, before training, with the same masks and padding as the policy's (`rlhf.sequence_logprobs` for both),
so the first step's DPO loss is exactly ln 2 (the loss logged is that plus alpha x chosen_nll and g x replay_nll).

Logged: loss, chosen_nll, replay_nll (with --replay-coef), the implicit rewards beta * (log pi - log pi_ref) of
chosen and rejected, pairwise accuracy and margin of those rewards, and the drift of the chosen reply's log-prob
from the reference (without RPO it often falls even as the margin grows: both replies get less likely, the rejected
one faster). Every --loop.eval-every steps, on held-out pairs the same numbers, and on their prompts (replies
sampled at temperature 1): the rater's gold reward, the reward model's proxy score (--reward-model) and the KL to
the reference, for the over-optimisation plot. --beta is the knob: smaller beta lets the policy move further from
the reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.common import CakeError, DistInfo, all_reduce_sum, print0
from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import SFT_MIXTURE
from cakelm.data.prefs import EncodedPair, PairBatches, encode_pairs, load_prefs, pad_pairs
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import DPO_LOSSES, dpo_loss, rpo_nll
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.rl import HELP, add_replay, check_options, replayed_nll, with_replay
from cakelm.rlhf import RLHFEval, heldout_rows, sequence_logprobs
from cakelm.scaffold import start


@dataclass
class DPOConfig:
    init: str = opt("runs/default/sft", "chat checkpoint to improve; also the frozen reference")
    data: str = opt("runs/default/prefs", "preference pairs: a directory with train.jsonl and val.jsonl (`cakelm "
                    "prefs` output) or one .jsonl file (split by prompt)")
    out: str = opt("runs/default/dpo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    beta: float = opt(0.1, "strength of the KL anchor to the reference (> 0; smaller moves further)")
    loss_type: str = opt("sigmoid", "sigmoid (DPO) or ipo", choices=DPO_LOSSES)
    rpo_alpha: float = opt(4.0, "weight of the chosen reply's per-token NLL added to the loss (RPO; 0: plain DPO)")
    replay_coef: float = opt(2.0, HELP["replay_coef"])
    replay: list[str] = opt(SFT_MIXTURE, HELP["replay"])
    replay_batch: int = opt(16, HELP["replay_batch"] + " (of --loop.batch-size pairs)")
    reward_model: str = opt("runs/default/rm", "reward model for the proxy score in evaluations (\"\" for none)")
    val_size: int = opt(200, "held-out prompts (of the held-out pairs) for gold reward, proxy and KL")
    val_samples: int = opt(2, "replies sampled per held-out prompt in evaluations")
    max_new_tokens: int = opt(64, "longest reply sampled in evaluations")
    val_fraction: float = opt(0.1, "share of prompts held out when --data is a single file")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, name="adamw", lr=1e-4, warmup_steps=5, schedule="constant",
                                weight_decay=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=40, batch_size=32, eval_every=20, log_every=5)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.rpo_alpha < float("inf"):
            raise ConfigError(f"--rpo-alpha must be >= 0, got {self.rpo_alpha}")
        check_options(self)  # the RL stages' shared options (--replay-coef, --val-size, ...), as PPO's


PRESETS = {
    "cpu": {},
    "micro": {"loop.max_steps": 4, "loop.batch_size": 8, "loop.eval_every": 0, "optim.warmup_steps": 1,
              "val_size": 16, "max_new_tokens": 32, "replay": ["arithmetic"], "replay_batch": 4},
}


def reply_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], mean: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2P,) summed (or, for IPO, per-token mean) log-probs of each row's reply tokens, and (2P,) the sums."""
    sums = sequence_logprobs(model, batch["input"], batch["reply"])
    return (sums / batch["reply"][:, 1:].sum(1).clamp(min=1) if mean else sums), sums


@torch.no_grad()
def reference_logprobs(ref: Transformer, rows: list[EncodedPair], batch_size: int, pad_id: int, mean: bool,
                       device: torch.device) -> None:
    """Fill row.ref (chosen, rejected) with the reference's reply log-probs, batch by batch."""
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        b = {k: v.to(device) for k, v in pad_pairs(part, pad_id).items()}
        lp = reply_logprobs(ref, b, mean)[0].cpu()
        for j, r in enumerate(part):
            r.ref = (lp[j].item(), lp[len(part) + j].item())


def ref_of(rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
    """The batch's reference log-probs (2P,): chosen rows, then rejected (as `pad_pairs` lays them out)."""
    return {"ref_logp": torch.tensor([r.ref[0] for r in rows] + [r.ref[1] for r in rows])}


def dpo_batch_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: DPOConfig
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO (+ RPO) loss of P pairs and per-pair metrics as [sum, count] pairs."""
    logp, sums = reply_logprobs(model, batch, cfg.loss_type == "ipo")  # (2P,)
    ref = batch["ref_logp"]
    P = logp.numel() // 2
    loss, rc, rr = dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:], cfg.beta, cfg.loss_type)
    nll = rpo_nll(sums[:P], batch["reply"][:P, 1:].sum(1))
    n = torch.tensor(float(P), device=logp.device)
    metrics = {"reward_chosen": rc.sum(), "reward_rejected": rr.sum(), "pair_accuracy": (rc > rr).float().sum(),
               "margin": (rc - rr).sum(), "chosen_logp_drift": (logp[:P] - ref[:P]).detach().sum(),
               "chosen_nll": nll.detach().sum()}
    total = (loss + cfg.rpo_alpha * nll if cfg.rpo_alpha else loss).sum()
    out = {k: torch.stack([v, n]) for k, v in metrics.items()}
    # --replay-coef: the micro-batch's replayed conversations; its units are its P pairs
    return add_replay(total, out, replayed_nll(model, batch), cfg.replay_coef, P), out


def make_evaluate(val: list[EncodedPair], judge: Callable[[torch.nn.Module], dict[str, float]] | None,
                  cfg: DPOConfig, pad_id: int, device: torch.device, info: DistInfo
                  ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Held-out pair metrics (all ranks share the pairs), then `judge`'s gold/proxy/KL on held-out prompts (rank
    0's numbers are everyone's: sampling is seeded)."""
    mine = val[info.rank::info.world_size]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc = torch.zeros(4, dtype=torch.float64, device=device)  # pairs, loss, correct, margin
        for i in range(0, len(mine), cfg.loop.batch_size):
            part = mine[i:i + cfg.loop.batch_size]
            b = {k: v.to(device) for k, v in {**pad_pairs(part, pad_id), **ref_of(part)}.items()}
            loss, m = dpo_batch_loss(model, b, cfg)
            acc += torch.stack([m["pair_accuracy"][1], loss, m["pair_accuracy"][0], m["margin"][0]]).double()
        acc = all_reduce_sum(acc, info)
        out = {"val_loss": (acc[1] / acc[0]).item(), "val_pair_accuracy": (acc[2] / acc[0]).item(),
               "val_margin": (acc[3] / acc[0]).item()}
        if judge is not None:
            out.update({f"val_{k}": v for k, v in judge(model).items()})
        return out

    return evaluate


def main(cfg: DPOConfig) -> Path:
    run = start("dpo", cfg)
    if run is None:
        return Path(cfg.out)
    model, tok, info = run.model, run.tok, run.info
    assert model is not None
    ref = run.reference()
    train_pairs, val_pairs, skipped = load_prefs(cfg.data, cfg.val_fraction, cfg.skip_bad_lines)
    rows, dropped = encode_pairs(train_pairs, tok, "chat", model.cfg.max_seq_len)
    val_rows, _ = encode_pairs(val_pairs, tok, "chat", model.cfg.max_seq_len)
    if not rows or not val_rows:
        raise CakeError(f"--data {cfg.data}: no {'training' if not rows else 'held-out'} pair fits the context of "
                        f"{model.cfg.max_seq_len} tokens")
    pairs = PairBatches(rows, cfg.loop.batch_size, cfg.loop.grad_accum, info.rank, info.world_size, cfg.loop.seed,
                        tok.pad_id, extra=ref_of)  # ref_of reads the reference's log-probs when a batch is made
    # before the reference's pass: a bad --replay fails at once
    batches, replay, replaying = with_replay(cfg, pairs, tok, model.cfg.max_seq_len, cfg.loop.grad_accum, info,
                                             run.meta if run.resumed else None)
    t_ref = time.time()
    reference_logprobs(ref, rows + val_rows, 64, tok.pad_id, cfg.loss_type == "ipo", run.device)
    print0(f"dpo: reference log-probs of {len(rows) + len(val_rows)} pairs in {time.time() - t_ref:.1f}s", info=info)
    rm = run.reward_model(cfg.reward_model) if cfg.reward_model else None
    held = heldout_rows(cfg.data, val_pairs, tok, model.cfg.max_seq_len - cfg.max_new_tokens)[:cfg.val_size]
    judge = RLHFEval(held, tok, rm, ref, cfg.max_new_tokens, cfg.loop.seed, cfg.val_samples)
    evaluate = make_evaluate(val_rows, lambda m: judge(m, run.generator(m)), cfg, tok.pad_id, run.device, info)
    run.announce(f"beta {cfg.beta}, {cfg.loss_type} loss; {len(rows)} training pairs ({dropped} too long), "
                 f"{len(val_rows)} held out; {pairs.global_batch} pairs per step"
                 + (f"; skipped {skipped} bad lines" if skipped else "")
                 + replaying)
    metrics = run.train(model, batches, lambda m, b: dpo_batch_loss(m, b, cfg), evaluate,
                        meta={"pairs": {"train": len(rows), "val": len(val_rows), "too_long": dropped,
                                        "skipped_lines": skipped}, **replay},
                        show=("pair_accuracy", "margin"))
    return run.done(f"held-out pair accuracy {metrics.get('val_pair_accuracy', math.nan):.3f}, gold "
                    f"{metrics.get('val_gold', math.nan):.3f}, KL {metrics.get('val_kl', math.nan):.2f}", metrics)

