"""`cakelm ppo`: RLHF with PPO, the policy explores toward the reward model's score, held near the SFT model by KL.

    cakelm ppo                                     # runs/default/sft + runs/default/rm -> runs/default/ppo
    cakelm ppo --kl-coef 0.02 --kl-target 4        # adaptive KL coefficient aiming at 4 nats per reply
    cakelm ppo --ppo-epochs 4 --num-minibatches 4 --rollout-size 128
    torchrun --nproc_per_node 2 -m cakelm ppo

The algorithm (Ouyang et al. 2022, "InstructGPT", arXiv 2203.02155; Ziegler et al. 2019, arXiv 1909.08593; the
"N implementation details of RLHF with PPO", Huang et al. 2024, arXiv 2403.17031), at every rollout phase:
1. Rollouts: --rollout-size prompts (of the training preference pairs, `cakelm prefs`), one reply each sampled
   by the policy through the engine (pure sampling at --temperature), keeping each token's log-prob.
2. Score: the reward model (--reward-model, `cakelm reward`) reads prompt + reply at its last token; a reply that
   never ends its turn loses --missing-eos-penalty.
3. Per-token rewards (`losses.ppo_token_rewards`): -kl_coef * (log pi - log pi_ref) at every reply token (k1 KL to
   the frozen SFT model) plus the score at the last token.
4. Values: the value model (a Transformer with a scalar head, initialised from the reward model) at every reply
   position; advantages by GAE (`losses.gae`, --gamma, --lam), whitened over the batch; returns = A + V.
5. Updates: --ppo-epochs passes over the rollouts in --num-minibatches shuffled minibatches, one optimizer step
   each, minimising per reply token (averaged over the minibatch's tokens)
       clipped policy loss (--cliprange) + --vf-coef x clipped value loss (--cliprange-value)
   (`losses.clipped_policy_loss`, `losses.clipped_value_loss`). Policy and value model are trained together
   (one optimizer, as TRL's PolicyAndValueWrapper).
6. With --kl-target, the KL coefficient adapts after each phase (`losses.adaptive_kl_coef`).

Logged per step: proxy score (reward model), gold (the rater, `cakelm.rewards.rater`, never seen by PPO), KL
per reply, kl_coef, reply length and ended share, policy/value clip fractions, entropy, ratio, value loss.
Every --loop.eval-every steps, on held-out prompts: gold, proxy and KL (the over-optimisation curve: the proxy
keeps rising; where the gold stops following it, the policy is exploiting the reward model).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cakelm.chat_format import format_of, render_prompt
from cakelm.checkpoint import load_heads, load_model, load_train_state, resume_point, save_checkpoint
from cakelm.common import CakeError, DistInfo, all_reduce_sum, init_distributed, print0
from cakelm.config import ConfigError, nested, opt, to_dict
from cakelm.data.chat_batches import Mixture
from cakelm.data.prefs import load_prefs
from cakelm.engine import SamplingParams
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_whiten,
    ppo_token_rewards,
)
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.rlhf import (
    RLHFEval,
    ScalarModel,
    gold_scores,
    heldout_rows,
    load_scalar_model,
    prompt_rows,
    score_rollouts_rm,
)
from cakelm.rollout import PromptRow, completion_logprobs, sample, to_batch
from cakelm.stages.grpo import seed_of


@dataclass
class PPOConfig:
    init: str = opt("runs/default/sft", "chat checkpoint to improve; also the frozen KL reference")
    reward_model: str = opt("runs/default/rm", "reward model (`cakelm reward` output); also the value model's start")
    data: str = opt("runs/default/prefs", "preference data whose prompts are rolled out: a directory with "
                    "train.jsonl and val.jsonl, or one .jsonl file (held-out prompts measure gold and KL)")
    out: str = opt("runs/default/ppo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same rollouts, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    rollout_size: int = opt(64, "replies sampled per rollout phase, over all ranks (one per prompt)")
    ppo_epochs: int = opt(2, "passes over each rollout batch")
    num_minibatches: int = opt(2, "optimizer steps per pass (the rollouts are split into this many minibatches)")
    temperature: float = opt(1.0, "sampling temperature (> 0; the loss uses the same)")
    max_new_tokens: int = opt(64, "longest reply in tokens")
    kl_coef: float = opt(0.1, "weight of the per-token k1 KL penalty in the reward (initial value if adaptive)")
    kl_target: float = opt(0.0, "adapt kl_coef toward this KL per reply in nats (0 = fixed coefficient)")
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller, in replies")
    missing_eos_penalty: float = opt(1.0, "subtracted from the score of a reply that never ends its turn")
    gamma: float = opt(1.0, "discount of GAE")
    lam: float = opt(0.95, "lambda of GAE")
    cliprange: float = opt(0.2, "policy ratio clip")
    cliprange_value: float = opt(0.2, "value clip around the rollout's values")
    vf_coef: float = opt(0.1, "weight of the value loss")
    eval_prompts: int = opt(200, "held-out prompts for gold reward, proxy and KL")
    eval_samples: int = opt(2, "replies sampled per held-out prompt in evaluations")
    val_fraction: float = opt(0.1, "share of prompts held out when --data is a single file")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    # the "cpu" preset: about 2 minutes on 2 cores from the pipeline's SFT model (how it was chosen: README)
    optim: OptimConfig = nested(OptimConfig, name="adamw", lr=1e-4, warmup_steps=4, schedule="constant",
                                weight_decay=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=48, eval_every=16, log_every=4)

    def __post_init__(self) -> None:
        for name in ("rollout_size", "ppo_epochs", "num_minibatches", "max_new_tokens", "kl_horizon",
                     "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rollout_size % self.num_minibatches:
            raise ConfigError(f"--rollout-size {self.rollout_size} must be a multiple of --num-minibatches "
                              f"{self.num_minibatches}")
        if not (self.temperature > 0 and self.kl_coef >= 0 and self.kl_target >= 0 and 0 < self.cliprange < 1
                and self.cliprange_value > 0 and self.vf_coef >= 0 and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("need --temperature > 0, --kl-coef >= 0, --kl-target >= 0, --cliprange in (0, 1), "
                              "--cliprange-value > 0, --vf-coef >= 0, --gamma and --lam in [0, 1]")


PRESETS = {
    "cpu": {},
    "micro": {"rollout_size": 8, "max_new_tokens": 24, "eval_prompts": 8, "loop.max_steps": 4,
              "loop.eval_every": 0, "optim.warmup_steps": 1},
}


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module, so one optimizer (and DDP) covers both; forward returns
    what the PPO loss needs: log-probs and entropy of the targets (N, T) and the values (N, T)."""

    def __init__(self, policy: Transformer, value: ScalarModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, inp: torch.Tensor, target: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp, entropy = completion_logprobs(self.policy, inp, target, temperature)
        return logp, entropy, self.value(inp)


class PPORollouts:
    """batches(step, micro) for the shared loop: at the first step of every phase (ppo_epochs x num_minibatches
    steps) this rank's prompts are rolled out, scored and turned into advantages; each step trains on one
    minibatch of them (a seeded shuffle per epoch)."""

    def __init__(self, cfg: PPOConfig, model: PolicyAndValue, ref: Transformer, rm: ScalarModel, tok: Any,
                 prompts: list[PromptRow], info: DistInfo, device: torch.device) -> None:
        self.cfg, self.model, self.ref, self.rm, self.tok = cfg, model, ref, rm, tok
        self.prompts, self.info, self.device = prompts, info, device
        self.mixture = Mixture([len(prompts)], [1.0], cfg.loop.seed)
        self.local = cfg.rollout_size // info.world_size
        self.steps_per_phase = cfg.ppo_epochs * cfg.num_minibatches
        self.kl_coef = cfg.kl_coef
        self.cache: dict[str, Any] | None = None

    def get(self, step: int, micro: int) -> dict[str, Any]:
        phase, k = divmod(step, self.steps_per_phase)
        if self.cache is None or self.cache["phase"] != phase:
            self.cache = self.roll_out(phase)
        epoch, mb = divmod(k, self.cfg.num_minibatches)
        order = np.random.default_rng([self.cfg.loop.seed, phase, epoch, self.info.rank]).permutation(self.local)
        size = self.local // self.cfg.num_minibatches
        idx = torch.as_tensor(np.sort(order[mb * size:(mb + 1) * size]))
        data = self.cache["data"]
        width = int(data["mask"][idx].sum(0).nonzero().max()) + 1  # trim columns no row of the minibatch uses
        batch = {k: v[idx][:, :width] for k, v in data.items()}
        batch["n"] = batch["mask"].sum().item()
        if micro == 0:  # every step logs its phase's rollout metrics (the loop averages them per step)
            batch["metrics"] = {**self.cache["metrics"], **({} if k == 0 else {"rollout_s": 0.0})}
        return batch

    @torch.no_grad()
    def roll_out(self, phase: int) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        rows = [self.prompts[i] for _, i in self.mixture.slots(phase * cfg.rollout_size + info.rank * self.local,
                                                               self.local)]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                seed=seed_of(cfg.loop.seed, phase, info.rank))
        rolls = sample(self.model.policy, self.tok, [r.messages for r in rows], params)
        seconds = time.perf_counter() - t0
        b = to_batch(rolls, self.tok.pad_id)
        inp, tgt, mask = b["input"].to(self.device), b["target"].to(self.device), b["mask"].to(self.device)
        ref_logp, _ = completion_logprobs(self.ref, inp, tgt, cfg.temperature)
        values = self.model.value(inp) * mask  # (N, T) V(s_t) at every reply position
        proxy = score_rollouts_rm(self.rm, rolls, self.tok.pad_id).to(self.device)
        ended = torch.tensor([float(r.ended) for r in rolls], device=self.device)
        score = proxy - cfg.missing_eos_penalty * (1.0 - ended)
        old_logp = b["old_logp"].to(self.device)
        rewards = ppo_token_rewards(score, old_logp, ref_logp, mask, self.kl_coef)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)  # whitened over this rank's rollouts
        gold = torch.tensor(gold_scores(rows, rolls), device=self.device)
        kl = ((old_logp - ref_logp) * mask).sum(1)  # (N,) k1 KL of each reply
        stats = torch.stack([proxy.sum(), gold.sum(), kl.sum(), ended.sum(), mask.sum(),
                             torch.tensor(float(len(rolls)), device=self.device),
                             torch.tensor(seconds, device=self.device)]).double()
        proxy_s, gold_s, kl_s, ended_s, tokens, n, seconds_s = all_reduce_sum(stats, info).tolist()
        metrics = {"proxy": proxy_s / n, "gold": gold_s / n, "kl": kl_s / n, "kl_coef": self.kl_coef,
                   "reply_len": tokens / n, "ended": ended_s / n, "rollout_s": seconds_s / info.world_size}
        if cfg.kl_target > 0:  # the same on every rank: it reads the global KL
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl_s / n, cfg.kl_target, int(n), cfg.kl_horizon)
        data = {"input": b["input"], "target": b["target"], "mask": b["mask"], "old_logp": b["old_logp"],
                "old_values": values.cpu(), "adv": adv.cpu(), "returns": returns.cpu()}
        return {"phase": phase, "data": data, "metrics": metrics}


def ppo_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: PPOConfig
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef x clipped value loss, summed over the minibatch's reply tokens (the loop
    divides by their number), and per-token metrics as [sum, count] pairs."""
    logp, entropy, values = model(batch["input"], batch["target"], cfg.temperature)
    mask = batch["mask"]
    pg, pg_clipped = clipped_policy_loss(logp, batch["old_logp"], batch["adv"], cfg.cliprange, cfg.cliprange)
    vf, vf_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.cliprange_value)
    loss = ((pg + cfg.vf_coef * vf) * mask).sum()
    n = mask.sum()
    extras = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clip_frac": pg_clipped.float(),
              "value_clip_frac": vf_clipped.float(), "entropy": entropy,
              "ratio": torch.exp(logp - batch["old_logp"]).detach()}
    return loss, {k: torch.stack([(v * mask).sum(), n]) for k, v in extras.items()}


def main(cfg: PPOConfig) -> Path:
    info, device = init_distributed(cfg.loop.device)
    t0 = time.time()
    out = Path(cfg.out)
    if cfg.rollout_size % (info.world_size * cfg.num_minibatches):
        raise CakeError(f"--rollout-size {cfg.rollout_size} must be a multiple of {info.world_size} ranks x "
                        f"--num-minibatches {cfg.num_minibatches}")
    loop = replace(cfg.loop, grad_accum=1)  # one minibatch per optimizer step (--loop.grad-accum is not read)
    point = resume_point(out, cfg.resume, cfg.overwrite, cfg.loop.max_steps, to_dict(cfg))
    if point == "done":
        print0(f"ppo: {out} is already complete (raise --max-steps to go on)", info=info)
        return out
    policy, tok, start_meta = load_model(out if point == "resume" else cfg.init, device)
    if point == "fresh" and format_of(start_meta) != "chat":
        raise CakeError(f"ppo: {cfg.init} is a base model; PPO improves a chat model (run `cakelm sft` first)")
    rm, rm_tok, _ = load_scalar_model(cfg.reward_model, device)
    if rm_tok.vocab_size != tok.vocab_size:
        raise CakeError(f"ppo: the reward model {cfg.reward_model} has another tokenizer than {cfg.init}")
    rm.requires_grad_(False)
    value = load_scalar_model(cfg.reward_model, device)[0]  # the value model starts as a copy of the reward model
    if point == "resume":
        value.load_state_dict({k.removeprefix("value."): v for k, v in load_heads(out).items()})
    ref, _, _ = load_model(cfg.init, device)
    ref.requires_grad_(False)
    model = PolicyAndValue(policy, value).to(device)
    value.body.lm_head.weight.requires_grad_(False)
    resume_state = load_train_state(out) if point == "resume" else None
    parent_stage = start_meta.get("parent_stage") if point == "resume" else start_meta.get("stage")
    train_pairs, val_pairs, skipped = load_prefs(cfg.data, cfg.val_fraction, cfg.skip_bad_lines)
    budget = policy.cfg.max_seq_len - cfg.max_new_tokens
    prompts = [p for p in prompt_rows(train_pairs) if len(render_prompt(p.messages, tok, "chat")) <= budget]
    val_rows = heldout_rows(cfg.data, val_pairs, tok, budget)
    val_rows = val_rows[:cfg.eval_prompts]
    if not prompts or not val_rows:
        raise CakeError(f"--data {cfg.data}: no {'training' if not prompts else 'held-out'} prompt leaves room for "
                        f"--max-new-tokens {cfg.max_new_tokens} in the context of {policy.cfg.max_seq_len}")
    batches = PPORollouts(cfg, model, ref, rm, tok, prompts, info, device)
    if resume_state:
        batches.kl_coef = resume_state["kl_coef"]
        if "rollouts" in resume_state:
            batches.cache = resume_state["rollouts"]
    judge = RLHFEval(val_rows, tok, rm, ref, cfg.max_new_tokens, cfg.loop.seed, cfg.eval_samples)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {f"val_{k}": v for k, v in judge(m.policy).items()}

    model.train()
    print0(f"ppo: {policy.num_params() / 1e6:.2f}M policy + {value.body.num_params() / 1e6:.2f}M value parameters "
           f"from {cfg.init} and {cfg.reward_model}; {len(prompts)} prompts, {cfg.rollout_size} replies per phase, "
           f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, {cfg.loop.max_steps} steps on {device}"
           + (f" x {info.world_size} ranks" if info.enabled else "")
           + (f"; resuming from step {resume_state['step']}" if resume_state else ""), info=info)

    def save(step: int, metrics: dict, train_state: dict, final: bool) -> None:
        state = {**train_state, "kl_coef": batches.kl_coef}  # the coefficient of the next rollout phase
        if step % batches.steps_per_phase and batches.cache is not None:
            state["rollouts"] = batches.cache  # inside a phase: the rollouts its remaining steps train on
        save_checkpoint(out, policy, tok, {
            "stage": "ppo", "step": step, "complete": final, "config": to_dict(cfg), "metrics": metrics,
            "parent": cfg.init, "parent_stage": parent_stage, "chat_format": "chat", "world_size": info.world_size,
            "reward_model": cfg.reward_model, "num_params": policy.num_params(), "skipped_lines": skipped,
        }, state, heads={f"value.{k}": v for k, v in value.state_dict().items()})

    metrics = train(model, loop, cfg.optim, LoopContext(device, info, out), batches.get,
                    lambda m, b: ppo_loss(m, b, cfg), evaluate, save, resume_state, show=("proxy", "gold", "kl"))
    print0(f"ppo: step {metrics.get('step')}, held-out gold {metrics.get('val_gold', math.nan):.3f}, proxy "
           f"{metrics.get('val_proxy', math.nan):.3f}, KL {metrics.get('val_kl', math.nan):.2f} -> {out} "
           f"({time.time() - t0:.0f}s)", info=info)
    return out

