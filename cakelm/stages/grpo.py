"""`cakelm grpo`: reinforcement learning from verifiable rewards with GRPO (the cherry, part 1).

    cakelm grpo                                            # runs/default/dpo -> runs/default/grpo, arithmetic
    cakelm grpo --data gsm --rewards gym format=0.1        # word problems, reasoning-gym's scorer + a format bonus
    cakelm grpo --data my_prompts.jsonl --rewards exact_match my_rewards:brevity=0.5
    cakelm grpo --rewards exact_match reward_model=0.5 --reward-model runs/default/rm   # + a reward model's score
    cakelm grpo --scale-rewards none --aggregation constant            # Dr. GRPO
    cakelm grpo --replay-coef 2 --optim.lr 3e-4             # SFT's conversations replayed next to the rollouts
    cakelm grpo --resume                                   # continue an interrupted run exactly
    cakelm grpo --init runs/default/base --from-base --out runs/zero   # RL straight from pretraining (R1-Zero)
    torchrun --nproc_per_node 2 -m cakelm grpo             # rollouts split across ranks, whole groups per rank

The algorithm, at every rollout phase (Group Relative Policy Optimization: Shao et al. 2024, "DeepSeekMath",
arXiv 2402.03300, with the corrections of DAPO, Yu et al. 2025, arXiv 2503.14476, and Dr. GRPO, Liu et al.
2025, arXiv 2503.20783):
1. Rollouts: the next --prompts-per-step questions of the --data mixture; the current policy samples
   --group-size completions of each through the rollout generator (--temperature, --top-p, --max-new-tokens),
   keeping the log-probability of every sampled token. With --oversample K (DAPO's dynamic sampling) it samples
   K x --prompts-per-step questions and trains on the first --prompts-per-step groups whose rewards differ
   (`losses.dynamic_sampling_rows`; groups that are all right or all wrong fill the batch only when too few differ).
2. Rewards: every completion is scored by the --rewards (Python functions, see `cakelm.rewards`, and the reward
   model's score as `reward_model`), weighted and summed (`cakelm.rl.Rewards`). A completion that no reward
   applies to gets its group's mean (advantage 0). A reward call that raises, runs past --reward-timeout or
   returns no number scores 0 and is counted (reward_errors); --reward-errors stop saves the run and stops
   instead. Prompts no reward can score (exact_match and no "answer" anywhere) stop the run before it starts.
3. Advantages relative to the group (`losses.group_advantages`): A_i = (r_i - mean_group) / (std + 1e-4), std of
   the group (--scale-rewards group), of the whole batch (batch) or no division at all (none: Dr. GRPO). Groups
   whose rewards are all equal carry no signal (every A_i = 0); their share is logged as zero_signal. A_i reaches
   every token of its completion; with --credit first-error a completion with A_i < 0 is pushed down only from
   the result of its first false equation on (`losses.first_error_advantages`; the right steps before it spared).
4. Update: --epochs passes over the phase's completions, each in --num-minibatches optimizer steps, minimising
       l_t = -min(rho_t A_i, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) A_i)  [+ kl_coef * KL_k3(pi || pi_ref)_t]
   with rho_t = pi(o_t) / pi_old(o_t), pi_old the policy that sampled (rho = 1 on the first pass; DAPO's
   clip-higher when --epsilon-high > --epsilon-low). The per-token losses are aggregated over the whole step
   (all micro-batches, all ranks) by --aggregation: token_mean (DAPO, the default), sequence_mean (the original
   GRPO: each completion's mean, then the mean over completions) or constant (Dr. GRPO: sum / (completions x
   max_new_tokens)). --mask-truncated leaves completions that hit the token limit out of the loss (DAPO's
   overlong filtering). The KL term (k3, in the loss, as GRPO's paper) needs the frozen --init, loaded when
   --kl-coef > 0 or --log-kl; with --kl-coef 0 it scores only every --log-kl-every-th phase, for the log.
   --replay-coef g adds g x the per-token NLL of --replay-batch SFT conversations per micro-batch (--replay,
   SFT's default mixture; `losses.replay_loss`), InstructGPT's PPO-ptx term as DPO and PPO use it: it holds
   what SFT taught while larger RL steps move the policy (off by default: on the pipeline's arithmetic the
   replay alone gained as much as RL with it; README, GRPO section).

--loop.batch-size counts completions per forward pass; the micro-batches of a step follow from it (completions per
rank and minibatch / batch size), so --loop.grad-accum is not read. With --replay-coef each micro-batch carries
--replay-batch conversations, so a smaller --loop.batch-size also replays more of them per step.

Logged per step (metrics.jsonl): the RL stages' rollout metrics (`cakelm.rl`: reward and its std, gold, accuracy,
reply_len, end_of_turn, kl to the reference, rollout time and sampled tokens/s, reward_errors), zero_signal,
entropy, clip_frac, the importance ratio, kl_penalty (the loss's per-token k3) and replay_nll (with
--replay-coef). Every --loop.eval-every steps: greedy reward, accuracy and end-of-turn share on held-out prompts
(tasks: the held-out problems `cakelm eval` uses).

Why the loss is ~0 and still learns: with rho = 1 and advantages centred in each group, the loss's value is
sum(A_i) ~ 0, but its gradient sum_i A_i grad log pi(o_i) is not (tested in tests/test_grpo.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import BUILTIN_CHAT, SFT_MIXTURE, VAL_FRACTION
from cakelm.engine import SamplingParams
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    aggregate,
    clipped_policy_loss,
    dynamic_sampling_rows,
    first_error_advantages,
    group_advantages,
    kl_k3,
)
from cakelm.optim import OptimConfig
from cakelm.rewards import first_false_equation
from cakelm.rl import (
    HELP,
    OPTIM,
    REWARD_ERRORS,
    RewardEval,
    RolloutBatches,
    add_replay,
    check_options,
    check_scorable,
    gather_rows,
    group_prompts,
    make_rewards,
    phase_rows,
    replayed_nll,
    sample_and_score,
    summary,
    with_replay,
)
from cakelm.rollout import Rollout, completion_logprobs
from cakelm.scaffold import start
from cakelm.tokenizer import Tokenizer

CREDITS = ("sequence", "first-error")


@dataclass
class GRPOConfig:
    init: str = opt("runs/default/dpo", HELP["init"])
    data: list[str] = opt(["arithmetic"], "prompt sources, each SRC or SRC=WEIGHT: " + ", ".join(BUILTIN_CHAT) +
                          ", .jsonl files ({\"prompt\": ..., \"answer\": ...} or {\"messages\"}; other keys are "
                          "passed to the rewards), hf:NAME[:SPLIT]")
    out: str = opt("runs/default/grpo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same rollouts, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    rewards: list[str] = opt(["exact_match"], HELP["rewards"])
    reward_model: str = opt("", HELP["reward_model"])
    missing_eos_penalty: float = opt(0.0, HELP["missing_eos_penalty"])
    reward_timeout: float = opt(5.0, HELP["reward_timeout"])
    reward_errors: str = opt("score", HELP["reward_errors"], choices=REWARD_ERRORS)
    group_size: int = opt(8, HELP["group_size"])
    prompts_per_step: int = opt(16, HELP["prompts_per_step"])
    oversample: int = opt(1, "DAPO's dynamic sampling: roll out this many times --prompts-per-step prompts per phase "
                          "and train on the first --prompts-per-step groups whose rewards differ (1 = off)")
    epochs: int = opt(1, HELP["epochs"])
    num_minibatches: int = opt(1, HELP["num_minibatches"])
    temperature: float = opt(1.0, HELP["temperature"])
    top_p: float = opt(1.0, "nucleus sampling during rollouts (1 = pure sampling)")
    max_new_tokens: int = opt(64, HELP["max_new_tokens"])
    scale_rewards: str = opt("group", "divide centred rewards by the std of the group, the batch, or none "
                             "(Dr. GRPO)", choices=ADVANTAGE_SCALES)
    credit: str = opt("sequence", "which tokens of a reply its advantage reaches: sequence (all of them) or "
                      "first-error (a reply worse than its group's mean is pushed down from its first false "
                      "equation on; the right steps before it are spared)", choices=CREDITS)
    aggregation: str = opt("token_mean", "how token losses are averaged: token_mean (DAPO), sequence_mean "
                           "(GRPO), constant (Dr. GRPO)", choices=AGGREGATIONS)
    epsilon_low: float = opt(0.2, HELP["epsilon_low"])
    epsilon_high: float = opt(0.28, HELP["epsilon_high"])
    kl_coef: float = opt(0.0, HELP["kl_coef"] + " (GRPO: k3 per token, in the loss; 0 as in DAPO and TRL)")
    log_kl: bool = opt(True, "load the frozen --init to log the KL to it even when --kl-coef is 0")
    log_kl_every: int = opt(10, "with --log-kl and --kl-coef 0: log the KL on every N-th rollout phase (the "
                            "reference's forward pass over a phase's completions costs about a fifth of a step here)")
    mask_truncated: bool = opt(False, "leave completions that hit --max-new-tokens out of the loss")
    replay_coef: float = opt(0.0, HELP["replay_coef"])
    replay: list[str] = opt(SFT_MIXTURE, HELP["replay"])
    replay_batch: int = opt(16, HELP["replay_batch"] + " (of --loop.batch-size completions)")
    rollout_batch: int = opt(256, HELP["rollout_batch"])
    task_size: int = opt(0, HELP["task_size"])
    val_size: int = opt(100, HELP["val_size"] + " (greedy), per source")
    val_fraction: float = opt(VAL_FRACTION, HELP["val_fraction"])
    skip_bad_lines: bool = opt(False, HELP["skip_bad_lines"])
    from_base: bool = opt(False, "let --init be a base model: RL straight from pretraining (as DeepSeek-R1-Zero), "
                          "its rollouts in the chat format it has never seen; `benchmarks/rl_start.py` compares it "
                          "with RL from the SFT model")
    # The defaults are the "cpu" preset: about 2.5 minutes on 2 CPU cores from the pipeline's SFT model; how the
    # learning rate and batch were chosen is in the README.
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, **OPTIM)
    loop: LoopConfig = nested(LoopConfig, max_steps=60, batch_size=64, eval_every=30, log_every=1)

    def __post_init__(self) -> None:
        check_options(self)
        if self.oversample < 1:
            raise ConfigError(f"--oversample must be >= 1, got {self.oversample}")
        if self.log_kl_every < 1:
            raise ConfigError(f"--log-kl-every must be >= 1, got {self.log_kl_every}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"need --top-p in (0, 1], got {self.top_p}")


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 32, "val_size": 16, "loop.max_steps": 4,
              "loop.batch_size": 32, "loop.eval_every": 0, "optim.warmup_steps": 1},
}


def first_error_columns(rolls: list[Rollout], tok: Tokenizer) -> torch.Tensor:
    """(N,) the training column (`rollout.to_batch`'s layout) of the token where each reply's first false equation
    gives its result (`rewards.first_false_equation`), or 0 where it writes none."""
    cols = []
    for r in rolls:
        ids = [i for i in r.ids if i != tok.end_id]
        # the reply as its tokens decode (Rollout.text is stripped, so its offsets may be shifted)
        at = first_false_equation(tok.decode(ids, skip_special=True))
        if at is None:
            cols.append(0)
            continue
        # the first token whose prefix decodes past that character (prefixes only grow: a binary search)
        k = bisect.bisect_right(range(len(ids)), at, key=lambda j: len(tok.decode(ids[:j + 1], skip_special=True)))
        cols.append(len(r.prompt_ids) - 1 + min(k, len(ids) - 1))
    return torch.tensor(cols, dtype=torch.long)


def grpo_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: GRPOConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (+ kl_coef * k3 KL) of one micro-batch, summed as `cfg.aggregation` says, and per-token
    metrics as [sum, count] pairs."""
    logp, entropy = completion_logprobs(model, batch["input"], batch["target"], cfg.temperature)
    mask = batch["mask"]
    per_token, clipped = clipped_policy_loss(logp, batch["old_logp"], batch["adv"], cfg.epsilon_low,
                                             cfg.epsilon_high)
    extras = {}
    if "ref_logp" in batch:
        kl = kl_k3(logp, batch["ref_logp"])
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl
        extras["kl_penalty"] = kl.detach()
    loss, units = aggregate(per_token, mask, cfg.aggregation, cfg.max_new_tokens)
    extras.update(entropy=entropy, clip_frac=clipped.float(), ratio=torch.exp(logp - batch["old_logp"]).detach())
    n = mask.sum()
    out = {k: torch.stack([(v * mask).sum(), n]) for k, v in extras.items()}
    # --replay-coef: the micro-batch's SFT conversations, weighted by its own loss units
    return add_replay(loss, out, replayed_nll(model, batch), cfg.replay_coef, units), out


def main(cfg: GRPOConfig) -> Path:
    run = start("grpo", cfg, needs_chat=not cfg.from_base)
    if run is None:
        return Path(cfg.out)
    policy, info, G = run.model, run.info, cfg.group_size
    assert policy is not None
    rewards = make_rewards(cfg.rewards, cfg.reward_model, cfg.missing_eos_penalty, run.reward_model,
                           cfg.reward_timeout, cfg.reward_errors, info)
    pool = cfg.prompts_per_step * cfg.oversample  # prompts sampled per phase
    prompts = group_prompts(cfg, info, run.tok, policy.cfg.max_seq_len, run.meta if run.resumed else None, pool)
    check_scorable(rewards, prompts.train, cfg.data)
    ref = None  # the frozen reference, loaded below once the replay's options have been checked
    mixture = prompts.mixture(cfg.loop.seed)
    generator = run.generator(policy, cfg.rollout_batch)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)

    def roll_out(phase: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows, slots = phase_rows(prompts.train, mixture, phase, pool, info)
        # the reference's log-probs: every phase for the loss's KL term, every --log-kl-every-th for the log alone
        scored_ref = ref if cfg.kl_coef > 0 or phase % cfg.log_kl_every == 0 else None
        s = sample_and_score(generator, rows, slots, params, G, cfg.loop.seed, rewards, scored_ref, info, run.device,
                             phase=phase)
        _, zero = group_advantages(s.all_rewards.float(), G, cfg.scale_rewards)
        metrics = {**s.metrics, "zero_signal": zero / (len(s.all_rewards) // G)}  # of every sampled group
        data, kept, rolls = {**s.batch, "rewards": s.rewards}, s.all_rewards, s.rolls
        if cfg.oversample > 1:  # each rank keeps its own groups with signal (whole groups per rank)
            keep = dynamic_sampling_rows(s.rewards, G, cfg.prompts_per_step // info.world_size)
            data, rolls = {k: v[keep] for k, v in data.items()}, [s.rolls[i] for i in keep.tolist()]
            kept = gather_rows(data["rewards"], info, run.device)
        # group statistics over the whole batch (every rank's rewards; whole groups per rank)
        adv, zero_kept = group_advantages(kept.float(), G, cfg.scale_rewards)
        n = len(rolls)
        data["adv"] = adv[info.rank * n:(info.rank + 1) * n]
        if cfg.credit == "first-error":  # (N,) -> (N, T): 0 before a worse-than-average reply's first false step
            data["adv"] = first_error_advantages(data["adv"], first_error_columns(rolls, run.tok),
                                                 data["mask"].shape[1])
        if cfg.oversample > 1:
            metrics["trained_zero_signal"] = zero_kept / (len(kept) // G)
        if cfg.mask_truncated:
            data["mask"] = data["mask"] * torch.tensor([float(r.ended) for r in rolls])[:, None]
        return data, metrics

    local = cfg.prompts_per_step // info.world_size * G  # completions per rank and phase
    batches = RolloutBatches(roll_out, local, cfg.epochs, cfg.num_minibatches, cfg.loop.batch_size,
                             lambda b: aggregate(torch.zeros_like(b["mask"]), b["mask"], cfg.aggregation,
                                                 cfg.max_new_tokens)[1], cfg.loop.seed, info)
    # SFT's conversations next to each micro-batch of completions, as PPO's --replay-coef
    provider, replay, replaying = with_replay(cfg, batches, run.tok, policy.cfg.max_seq_len, batches.micro_batches,
                                              info, run.meta if run.resumed else None)
    # after the replay's checks, so a bad --replay fails in one line before a reference model is loaded
    ref = run.reference() if cfg.kl_coef > 0 or cfg.log_kl else None
    evaluate = RewardEval(prompts.val, rewards, cfg.max_new_tokens, info, run.device,
                          lambda m: run.generator(m, cfg.rollout_batch))
    run.announce(f"{cfg.prompts_per_step} prompts x {G} completions per phase"
                 + (f" (of {pool} sampled, dynamic sampling)" if cfg.oversample > 1 else "")
                 + f", {cfg.epochs} epoch(s) x {cfg.num_minibatches} minibatch(es); rewards {', '.join(rewards.names)}"
                 + (f"; skipped {prompts.skipped} bad lines" if prompts.skipped else "")
                 + replaying)
    metrics = run.train(policy, provider, lambda m, b: grpo_loss(m, b, cfg), evaluate,
                        meta={"data": prompts.counts, "rewards": cfg.rewards, "skipped_lines": prompts.skipped,
                              **replay},
                        loop=batches.loop(cfg.loop), show=("reward", "accuracy"))
    return run.done(summary({"metrics": metrics}), metrics)
