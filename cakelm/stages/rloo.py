"""`cakelm rloo`: REINFORCE Leave-One-Out, RL against a reward model and/or verifiable rewards (the cherry).

    cakelm rloo                                      # runs/default/sft + runs/default/rm -> runs/default/rloo
    cakelm rloo --rewards exact_match --reward-model "" --data arithmetic          # verifiable rewards only
    cakelm rloo --group-size 2 --kl-coef 0.05 --normalize-advantages
    torchrun --nproc_per_node 2 -m cakelm rloo

The algorithm (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs", arXiv 2402.14740; TRL's RLOOTrainer is the reference behaviour), at every rollout phase:
1. Rollouts: the next --prompts-per-step prompts of --data; the policy samples --group-size completions of each.
2. Reward of each completion, as one action: the --rewards (`cakelm.rl.Rewards`: exact_match where the prompt has
   an answer, the reward model's score as `reward_model`), minus --kl-coef x its KL to the frozen --init summed
   over its tokens (k1: log pi_old - log pi_ref; reward shaping, no gradient; `losses.kl_penalized_rewards`).
3. Advantages: each completion's reward minus the mean reward of the other G - 1 completions of its prompt
   (`losses.leave_one_out_advantages`); --normalize-advantages whitens them over the whole batch (all ranks).
4. Update: --epochs passes in --num-minibatches optimizer steps, minimising per completion
       -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A),   rho = pi(y) / pi_old(y)
   with the ratio of whole sequences (exp of the summed token log-prob differences, as TRL), averaged over the
   step's completions. With one epoch and one minibatch rho = 1: plain REINFORCE with the leave-one-out baseline.

Failed reward calls (raising, past --reward-timeout, no number) score 0 and are counted, or save and stop the run
with --reward-errors stop (`cakelm.rl`, as `cakelm grpo`).

Logged per step: the RL stages' rollout metrics (`cakelm.rl`: reward, gold, proxy, accuracy, reply_len,
end_of_turn, kl, reward_errors), zero_signal, entropy, clip_frac, ratio. Every --loop.eval-every steps: greedy
reward, accuracy and end-of-turn share on held-out prompts (`rl.RewardEval`) and, with a reward model, the held-out
gold, proxy and KL of sampled replies (`rlhf.RLHFEval`, the over-optimisation measurement of DPO and PPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.config import nested, opt
from cakelm.data.chat import BUILTIN_CHAT, VAL_FRACTION
from cakelm.engine import SamplingParams
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import clipped_policy_loss, kl_penalized_rewards, leave_one_out_advantages
from cakelm.optim import OptimConfig
from cakelm.rl import (
    HELP,
    OPTIM,
    REWARD_ERRORS,
    REWARD_MODEL,
    RewardEval,
    RolloutBatches,
    check_options,
    check_scorable,
    gather_rows,
    group_prompts,
    make_rewards,
    phase_rows,
    sample_and_score,
    summary,
)
from cakelm.rlhf import RLHFEval
from cakelm.rollout import completion_logprobs
from cakelm.scaffold import start


@dataclass
class RLOOConfig:
    init: str = opt("runs/default/sft", HELP["init"])
    data: list[str] = opt(["arithmetic=1", "chitchat=1"], "prompt sources, each SRC or SRC=WEIGHT: " +
                          ", ".join(BUILTIN_CHAT) + ", .jsonl files, hf:NAME[:SPLIT] (as `cakelm grpo`)")
    out: str = opt("runs/default/rloo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same rollouts, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    rewards: list[str] = opt(["exact_match", REWARD_MODEL], HELP["rewards"])
    reward_model: str = opt("runs/default/rm", HELP["reward_model"])
    missing_eos_penalty: float = opt(0.0, HELP["missing_eos_penalty"])
    reward_timeout: float = opt(5.0, HELP["reward_timeout"])
    reward_errors: str = opt("score", HELP["reward_errors"], choices=REWARD_ERRORS)
    # 8 prompts x 8 replies: on the pipeline's SFT model it kept arithmetic better than 16 x 4 at the same gold
    # reward (the README's RLOO section)
    group_size: int = opt(8, HELP["group_size"])
    prompts_per_step: int = opt(8, HELP["prompts_per_step"])
    epochs: int = opt(1, HELP["epochs"])
    num_minibatches: int = opt(1, HELP["num_minibatches"])
    temperature: float = opt(1.0, HELP["temperature"])
    max_new_tokens: int = opt(64, HELP["max_new_tokens"])
    kl_coef: float = opt(0.05, HELP["kl_coef"] + " (RLOO: k1 summed over each reply, subtracted from its reward)")
    epsilon_low: float = opt(0.2, HELP["epsilon_low"])
    epsilon_high: float = opt(0.2, HELP["epsilon_high"])
    normalize_advantages: bool = opt(False, "whiten the advantages over the whole batch (mean 0, std 1)")
    rollout_batch: int = opt(256, HELP["rollout_batch"])
    task_size: int = opt(0, HELP["task_size"])
    val_size: int = opt(100, HELP["val_size"] + " (greedy), per source")
    val_samples: int = opt(2, HELP["val_samples"] + " for gold, proxy and KL (with a reward model)")
    val_fraction: float = opt(VAL_FRACTION, HELP["val_fraction"])
    skip_bad_lines: bool = opt(False, HELP["skip_bad_lines"])
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, **OPTIM)
    loop: LoopConfig = nested(LoopConfig, max_steps=60, batch_size=64, eval_every=30, log_every=1)

    def __post_init__(self) -> None:
        check_options(self)


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 32, "val_size": 16, "val_samples": 1,
              "loop.max_steps": 4, "loop.batch_size": 32, "loop.eval_every": 0, "optim.warmup_steps": 1},
}


def rloo_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: RLOOConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped sequence-level surrogate summed over the micro-batch's completions (the loop divides by the
    step's completions), and metrics: per-token entropy as a [sum, count] pair, per-completion clip_frac and
    ratio as sums (the loop averages them per completion)."""
    logp, entropy = completion_logprobs(model, batch["input"], batch["target"], cfg.temperature)
    mask = batch["mask"]
    seq_logp, seq_old = (logp * mask).sum(1), (batch["old_logp"] * mask).sum(1)  # (N,)
    loss, clipped = clipped_policy_loss(seq_logp[:, None], seq_old[:, None], batch["adv"], cfg.epsilon_low,
                                        cfg.epsilon_high)  # (N, 1)
    ratio = torch.exp((seq_logp - seq_old).clamp(-20.0, 20.0)).detach()
    return loss.sum(), {"entropy": torch.stack([(entropy * mask).sum(), mask.sum()]),
                        "clip_frac": clipped.float().sum(), "ratio": ratio.sum()}


def main(cfg: RLOOConfig) -> Path:
    run = start("rloo", cfg)
    if run is None:
        return Path(cfg.out)
    policy, info, G = run.model, run.info, cfg.group_size
    assert policy is not None
    rewards = make_rewards(cfg.rewards, cfg.reward_model, cfg.missing_eos_penalty, run.reward_model,
                           cfg.reward_timeout, cfg.reward_errors, info)
    prompts = group_prompts(cfg, info, run.tok, policy.cfg.max_seq_len, run.meta if run.resumed else None)
    check_scorable(rewards, prompts.train, cfg.data)
    ref = run.reference()
    mixture = prompts.mixture(cfg.loop.seed)
    generator = run.generator(policy, cfg.rollout_batch)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)

    def roll_out(phase: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows, slots = phase_rows(prompts.train, mixture, phase, cfg.prompts_per_step, info)
        s = sample_and_score(generator, rows, slots, params, G, cfg.loop.seed, rewards, ref, info, run.device,
                             phase=phase)
        b = s.batch
        shaped = kl_penalized_rewards(s.rewards, b["old_logp"], b["ref_logp"], b["mask"], cfg.kl_coef)
        adv, _ = leave_one_out_advantages(shaped, G)  # whole groups per rank: local is exact
        # groups whose rewards (before the KL shaping, which is never exactly equal) are all the same, every rank's
        zero = leave_one_out_advantages(s.all_rewards, G)[1]
        if cfg.normalize_advantages:  # over the whole batch, every rank's
            everyone = gather_rows(adv, info, run.device)
            adv = (adv - everyone.mean()) / (everyone.std() + 1e-4)
        data = {**b, "rewards": s.rewards, "adv": adv.float()}
        return data, {**s.metrics, "zero_signal": zero / (len(s.all_rewards) // G)}

    local = cfg.prompts_per_step // info.world_size * G
    batches = RolloutBatches(roll_out, local, cfg.epochs, cfg.num_minibatches, cfg.loop.batch_size,
                             lambda b: float(b["mask"].size(0)), cfg.loop.seed, info)
    reward_eval = RewardEval(prompts.val, rewards, cfg.max_new_tokens, info, run.device,
                             lambda m: run.generator(m, cfg.rollout_batch))
    judge = RLHFEval(prompts.val, run.tok, rewards.model, ref, cfg.max_new_tokens, cfg.loop.seed, cfg.val_samples) \
        if rewards.model is not None else None

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        out = reward_eval(m)
        if judge is not None:  # every rank measures the same seeded samples
            out.update({f"val_{k}": v for k, v in judge(m, run.generator(m, cfg.rollout_batch)).items()
                        if k in ("gold", "proxy", "kl")})
        return out

    run.announce(f"{cfg.prompts_per_step} prompts x {G} completions per phase, {cfg.epochs} epoch(s) x "
                 f"{cfg.num_minibatches} minibatch(es); rewards {', '.join(rewards.names)}, KL coefficient "
                 f"{cfg.kl_coef}" + (f"; skipped {prompts.skipped} bad lines" if prompts.skipped else ""))
    metrics = run.train(policy, batches, lambda m, b: rloo_loss(m, b, cfg), evaluate,
                        meta={"data": prompts.counts, "rewards": cfg.rewards, "reward_model": cfg.reward_model,
                              "skipped_lines": prompts.skipped},
                        loop=batches.loop(cfg.loop), show=("reward", "accuracy"))
    return run.done(summary({"metrics": metrics}), metrics)
