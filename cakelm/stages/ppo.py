"""`cakelm ppo`: RLHF with PPO, the policy explores toward the reward model's score, held near the SFT model by KL.

    cakelm ppo                                     # runs/default/sft + runs/default/rm -> runs/default/ppo
    cakelm ppo --kl-coef 0.02 --kl-target 4        # adaptive KL coefficient aiming at 4 nats per reply
    cakelm ppo --epochs 4 --num-minibatches 4 --prompts-per-step 128
    cakelm ppo --verifiers exact_match=2           # + 2 for a right final number where the prompt has an answer
    cakelm ppo --replay-coef 0                     # without SFT's conversations replayed (PPO-ptx off)
    torchrun --nproc_per_node 2 -m cakelm ppo

The algorithm (Ouyang et al. 2022, "InstructGPT", arXiv 2203.02155; Ziegler et al. 2019, arXiv 1909.08593; the
"N implementation details of RLHF with PPO", Huang et al. 2024, arXiv 2403.17031), at every rollout phase:
1. Rollouts: --prompts-per-step prompts (of the training preference pairs, `cakelm prefs`), one reply each sampled
   by the policy through the rollout generator (pure sampling at --temperature), keeping each token's log-prob.
2. Score: the reward model (--reward-model, `cakelm reward`) reads prompt + reply at its last token; a reply that
   never ends its turn loses --missing-eos-penalty.
3. Per-token rewards (`losses.ppo_token_rewards`): -kl_coef * (log pi - log pi_ref) at every reply token (k1 KL to
   the frozen SFT model) plus the score at the last token. --verifiers add checkable rewards to the score where
   they apply (`--verifiers exact_match=2`: 2 for a right final number on prompts with an answer), so PPO is not
   paid by a reward model that cannot check a sum for getting one wrong.
4. Values: the value model (a Transformer with a scalar head, initialised from the reward model) at every reply
   position; advantages by GAE (`losses.gae`, --gamma, --lam), whitened over the whole batch (all ranks);
   returns = A + V.
5. Updates: --epochs passes over the rollouts in --num-minibatches shuffled minibatches, one optimizer step
   each, minimising per reply token (averaged over the minibatch's tokens)
       clipped policy loss (--epsilon-low/-high) + --vf-coef x clipped value loss (--value-clip)
   (`losses.clipped_policy_loss`, `losses.clipped_value_loss`). Policy and value model are trained together
   (one optimizer, as TRL's PolicyAndValueWrapper). --replay-coef g adds g x the per-token NLL of --replay-batch
   SFT conversations per micro-batch (--replay: SFT's default mixture; `losses.replay_loss`): InstructGPT's
   "PPO-ptx" objective (eq. 2), with SFT's data for pretraining data, so PPO keeps what SFT taught.
6. With --kl-target, the KL coefficient adapts after each phase (`losses.adaptive_kl_coef`); the coefficient
   travels with checkpoints (the batch provider's state).

Logged per step: the RL stages' rollout metrics (`cakelm.rl`: reward = proxy - penalty, proxy, gold (the rater,
never seen by PPO), kl per reply, reply_len, end_of_turn), kl_coef, policy/value clip fractions, entropy, ratio,
value loss, replay_nll (with --replay-coef). Every --loop.eval-every steps, on held-out prompts: gold, proxy and
KL (the over-optimisation curve: the proxy keeps rising; where the gold stops following it, the policy is
exploiting the reward model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cakelm.common import CakeError, all_reduce_sum
from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import SFT_MIXTURE
from cakelm.data.chat_batches import Mixture, chat_part
from cakelm.data.prefs import load_prefs
from cakelm.data.prompts import fitting
from cakelm.engine import SamplingParams
from cakelm.heldout import chat_loss
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig, add_lora
from cakelm.losses import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_moments,
    masked_whiten,
    ppo_token_rewards,
)
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.rewards import load_reward
from cakelm.rl import (
    HELP,
    OPTIM,
    Rewards,
    RolloutBatches,
    add_replay,
    check_options,
    phase_rows,
    sample_and_score,
    with_replay,
)
from cakelm.rlhf import RLHFEval, ScalarModel, heldout_rows, load_scalar_model, prompt_rows
from cakelm.rollout import completion_logprobs
from cakelm.scaffold import start


@dataclass
class PPOConfig:
    init: str = opt("runs/default/sft", HELP["init"])
    reward_model: str = opt("runs/default/rm", "reward model (`cakelm reward` output); also the value model's start")
    data: str = opt("runs/default/prefs", "preference data whose prompts are rolled out: a directory with "
                    "train.jsonl and val.jsonl, or one .jsonl file (held-out prompts measure gold and KL)")
    out: str = opt("runs/default/ppo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same rollouts, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    prompts_per_step: int = opt(64, HELP["prompts_per_step"] + " (one reply each)")
    epochs: int = opt(2, HELP["epochs"])
    num_minibatches: int = opt(2, HELP["num_minibatches"])
    temperature: float = opt(1.0, HELP["temperature"])
    max_new_tokens: int = opt(64, HELP["max_new_tokens"])
    # 0.3: on the AVX2 EPYC 0.1 cost 15 points of arithmetic (0.2: 11, 0.3: 2.5 and 4.0 in two seeds) for the same
    # gold gain; on Zen 4 0.1 kept skills and 0.3 gained a little less gold (README, the RLHF section's sweep),
    # and with replay, lr 3e-4 and penalty 3, 0.3 gained +0.074 gold at +7.0 points there (README, "The Zen 4 kind")
    kl_coef: float = opt(0.3, HELP["kl_coef"] + " (PPO: k1 per token, in the reward; the start when adaptive)")
    kl_target: float = opt(0.0, "adapt --kl-coef toward this KL per reply in nats (0 = fixed coefficient)")
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller, in replies")
    missing_eos_penalty: float = opt(3.0, HELP["missing_eos_penalty"])
    replay_coef: float = opt(2.0, HELP["replay_coef"])
    replay: list[str] = opt(SFT_MIXTURE, HELP["replay"])
    replay_batch: int = opt(16, HELP["replay_batch"] + " (of --loop.batch-size replies)")
    verifiers: list[str] = opt([], "verifiable rewards added to the reward model's score where they apply, each NAME "
                               "or NAME=WEIGHT (`cakelm.rewards`), e.g. exact_match=2: 2 for a right final number on "
                               "the prompts that have an answer (a reward model cannot check a sum); none by default")
    gamma: float = opt(1.0, "discount of GAE")
    lam: float = opt(0.95, "lambda of GAE")
    epsilon_low: float = opt(0.2, HELP["epsilon_low"])
    epsilon_high: float = opt(0.2, HELP["epsilon_high"])
    value_clip: float = opt(0.2, "clip the value model's change from the rollout's values to this")
    vf_coef: float = opt(0.1, "weight of the value loss")
    rollout_batch: int = opt(256, HELP["rollout_batch"])
    val_size: int = opt(200, HELP["val_size"] + " for gold reward, proxy and KL")
    val_samples: int = opt(2, HELP["val_samples"])
    val_fraction: float = opt(0.1, "share of prompts held out when --data is a single file")
    skip_bad_lines: bool = opt(False, HELP["skip_bad_lines"])
    # the "cpu" preset: about 2 minutes on 2 cores from the pipeline's SFT model (how it was chosen: README)
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, **{**OPTIM, "lr": 3e-4, "warmup_steps": 4})
    loop: LoopConfig = nested(LoopConfig, max_steps=48, batch_size=64, eval_every=16, log_every=4)

    def __post_init__(self) -> None:
        check_options(self)
        if self.prompts_per_step % self.num_minibatches:
            raise ConfigError(f"--prompts-per-step {self.prompts_per_step} must be a multiple of --num-minibatches "
                              f"{self.num_minibatches}")
        if not (self.kl_target >= 0 and self.kl_horizon >= 1 and self.value_clip > 0 and self.vf_coef >= 0
                and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("need --kl-target >= 0, --kl-horizon >= 1, --value-clip > 0, --vf-coef >= 0, --gamma and "
                              "--lam in [0, 1]")


PRESETS = {
    "cpu": {},
    "micro": {"prompts_per_step": 8, "max_new_tokens": 24, "val_size": 8, "loop.max_steps": 4,
              "replay": ["arithmetic"], "replay_batch": 4,
              "loop.eval_every": 0, "optim.warmup_steps": 1},
}


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module, so one optimizer (and DDP) covers both; forward returns
    what the PPO loss needs: log-probs and entropy of the targets (N, T) and the values (N, T)."""

    def __init__(self, policy: Transformer, value: ScalarModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, inp: torch.Tensor, target: torch.Tensor, temperature: float, chat: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """+ with `chat` (replayed conversations, --replay-coef) the policy's (summed NLL, target tokens) on them:
        inside forward, so DDP sees every use of the policy's weights."""
        logp, entropy = completion_logprobs(self.policy, inp, target, temperature)
        return logp, entropy, self.value(inp), chat_loss(self.policy, chat) if chat is not None else None


class KLController:
    """PPO's KL coefficient: fixed, or adapted after every phase toward --kl-target (`losses.adaptive_kl_coef`).
    Its state is saved with the rollouts (`RolloutBatches(keep=...)`)."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            self.coef = adaptive_kl_coef(self.coef, kl, self.target, n, self.horizon)

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = state["coef"]


def ppo_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: PPOConfig
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef x clipped value loss, summed over the minibatch's reply tokens (the loop
    divides by their number), and per-token metrics as [sum, count] pairs."""
    logp, entropy, values, replayed = model(batch["input"], batch["target"], cfg.temperature, chat_part(batch))
    mask = batch["mask"]
    pg, pg_clipped = clipped_policy_loss(logp, batch["old_logp"], batch["adv"], cfg.epsilon_low, cfg.epsilon_high)
    vf, vf_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.value_clip)
    loss = ((pg + cfg.vf_coef * vf) * mask).sum()
    n = mask.sum()
    extras = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clip_frac": pg_clipped.float(),
              "value_clip_frac": vf_clipped.float(), "entropy": entropy,
              "ratio": torch.exp(logp - batch["old_logp"]).detach()}
    out = {k: torch.stack([(v * mask).sum(), n]) for k, v in extras.items()}
    # --replay-coef: the micro-batch's SFT conversations; its units are its reply tokens
    return add_replay(loss, out, replayed, cfg.replay_coef, n), out


def main(cfg: PPOConfig) -> Path:
    run = start("ppo", cfg)
    if run is None:
        return Path(cfg.out)
    policy, tok, info, device = run.model, run.tok, run.info, run.device
    assert policy is not None
    if cfg.prompts_per_step % (info.world_size * cfg.num_minibatches):
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of {info.world_size} ranks x "
                          f"--num-minibatches {cfg.num_minibatches}")
    rm = run.reward_model(cfg.reward_model)
    value = load_scalar_model(cfg.reward_model, device)[0]  # the value model starts as a copy of the reward model
    if cfg.lora.on:  # it trains adapters of its own (and its head), like the policy
        add_lora(value.body, cfg.lora)
    value.body.lm_head.weight.requires_grad_(False)
    # what heads.safetensors keeps of it: everything, or under LoRA what trains (the rest is the reward model's)
    kept = [n for n, p in value.named_parameters() if p.requires_grad] if cfg.lora.on else list(value.state_dict())

    def value_tensors() -> dict[str, torch.Tensor]:
        sd = value.state_dict()
        return {f"value.{k}": sd[k] for k in kept}

    if run.resumed:
        saved = {k.removeprefix("value."): v for k, v in run.heads().items()}
        missing = [k for k in kept if k not in saved]
        if missing:
            raise CakeError(f"{run.out}: heads.safetensors lacks the value model's {missing[0]}")
        value.load_state_dict(saved, strict=not cfg.lora.on)
    ref = run.reference()
    model = PolicyAndValue(policy, value).to(device)
    train_pairs, val_pairs, skipped = load_prefs(cfg.data, cfg.val_fraction, cfg.skip_bad_lines)
    budget = policy.cfg.max_seq_len - cfg.max_new_tokens
    prompts = fitting(prompt_rows(train_pairs), tok, budget)
    val_rows = heldout_rows(cfg.data, val_pairs, tok, budget)[:cfg.val_size]
    if not prompts or not val_rows:
        raise ConfigError(f"--data {cfg.data}: no {'training' if not prompts else 'held-out'} prompt leaves room for "
                          f"--max-new-tokens {cfg.max_new_tokens} in the context of {policy.cfg.max_seq_len}")
    mixture = Mixture([len(prompts)], [1.0], cfg.loop.seed)
    generator = run.generator(policy, cfg.rollout_batch)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    rewards = Rewards([load_reward(spec) for spec in cfg.verifiers], rm, 1.0, cfg.missing_eos_penalty)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    @torch.no_grad()
    def roll_out(phase: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows, slots = phase_rows([prompts], mixture, phase, cfg.prompts_per_step, info)
        s = sample_and_score(generator, rows, slots, params, 1, cfg.loop.seed, rewards, ref, info, device)
        b = {k: v.to(device) for k, v in s.batch.items()}
        values = value(b["input"]) * b["mask"]  # (N, T) V(s_t) at every reply position
        token_rewards = ppo_token_rewards(s.rewards.to(device), b["old_logp"], b["ref_logp"], b["mask"], kl.coef)
        adv, returns = gae(token_rewards, values, b["mask"], cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, b["mask"], moments=all_reduce_sum(masked_moments(adv, b["mask"]), info))
        metrics = {**s.metrics, "kl_coef": kl.coef}
        kl.update(s.metrics["kl"], len(s.all_rewards))  # the next phase's coefficient (the same on every rank)
        data = {**s.batch, "score": s.rewards, "old_values": values.cpu(), "adv": adv.cpu(), "returns": returns.cpu()}
        return data, metrics

    batches = RolloutBatches(roll_out, cfg.prompts_per_step // info.world_size, cfg.epochs, cfg.num_minibatches,
                             cfg.loop.batch_size, lambda b: b["mask"].sum().item(), cfg.loop.seed, info,
                             keep={"kl": kl})
    # SFT's conversations next to each micro-batch of rollouts, as DPO's --replay-coef
    provider, replay, replaying = with_replay(cfg, batches, tok, policy.cfg.max_seq_len, batches.micro_batches, info,
                                              run.meta if run.resumed else None)
    judge = RLHFEval(val_rows, tok, rm, ref, cfg.max_new_tokens, cfg.loop.seed, cfg.val_samples)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {f"val_{k}": v for k, v in judge(m.policy, run.generator(m.policy, cfg.rollout_batch)).items()}

    run.announce(f"+ {value.body.num_params() / 1e6:.2f}M value parameters from {cfg.reward_model}; {len(prompts)} "
                 f"prompts, {cfg.prompts_per_step} replies per phase, {cfg.epochs} epochs x {cfg.num_minibatches} "
                 "minibatches" + replaying)
    metrics = run.train(model, provider, lambda m, b: ppo_loss(m, b, cfg), evaluate,
                        meta={"reward_model": cfg.reward_model, "skipped_lines": skipped, **replay},
                        heads=value_tensors, loop=batches.loop(cfg.loop), show=("proxy", "gold", "kl"))
    return run.done(f"held-out gold {metrics.get('val_gold', math.nan):.3f}, proxy "
                    f"{metrics.get('val_proxy', math.nan):.3f}, KL {metrics.get('val_kl', math.nan):.2f}", metrics)
