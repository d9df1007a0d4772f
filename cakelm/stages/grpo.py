"""`cakelm grpo`: reinforcement learning from verifiable rewards with GRPO (the cherry, part 1).

    cakelm grpo                                            # runs/default/sft -> runs/default/grpo, arithmetic
    cakelm grpo --data gsm --rewards gym format=0.1        # word problems, reasoning-gym's scorer + a format bonus
    cakelm grpo --data my_prompts.jsonl --rewards exact_match my_rewards:brevity=0.5
    cakelm grpo --scale-rewards none --aggregation constant            # Dr. GRPO
    cakelm grpo --resume                                   # continue an interrupted run exactly
    torchrun --nproc_per_node 2 -m cakelm grpo             # rollouts split across ranks, whole groups per rank

The algorithm, at every rollout step (Group Relative Policy Optimization: Shao et al. 2024, "DeepSeekMath",
arXiv 2402.03300, with the corrections of DAPO, Yu et al. 2025, arXiv 2503.14476, and Dr. GRPO, Liu et al.
2025, arXiv 2503.20783):
1. Rollouts: the next --prompts-per-step questions of the --data mixture; the current policy samples
   --group-size completions of each through the engine (--temperature, --top-p, --max-new-tokens), keeping
   the log-probability of every sampled token.
2. Rewards: every completion is scored by the --rewards (Python functions, see `cakelm.rewards`), weighted and
   summed. A completion that no reward applies to gets its group's mean (advantage 0).
3. Advantages relative to the group: A_i = (r_i - mean_group) / (std + 1e-4), std of the group (--scale-rewards
   group), of the whole batch (batch) or no division at all (none: Dr. GRPO). Groups whose rewards are all
   equal carry no signal (every A_i = 0); their share is logged as zero_signal.
4. Update: --num-iterations optimizer steps on this rollout batch, each minimising the clipped surrogate
       l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)  [+ beta * KL_k3(pi || pi_ref)_t]
   with rho_t = pi(o_t) / pi_old(o_t), pi_old the policy that sampled (rho = 1 on the first pass; DAPO's
   clip-higher when --epsilon-high > --epsilon-low). The per-token losses are aggregated over the whole step
   (all micro-batches, all ranks) by --aggregation: token_mean (DAPO, the default), sequence_mean (the original
   GRPO: each completion's mean, then the mean over completions) or constant (Dr. GRPO: sum / (completions x
   max_new_tokens)). --mask-truncated leaves completions that hit the token limit out of the loss (DAPO's
   overlong filtering). The KL term needs a frozen copy of --init, loaded when --beta > 0 or --log-kl.

--loop.batch-size counts completions per forward pass; the micro-batches of a step follow from it (completions per
rank / batch size), so --loop.grad-accum is not read.

Logged per step (metrics.jsonl): reward and its std, accuracy (exact match where the rows have an answer),
zero_signal, completion length, truncated share, KL to the reference, entropy, clip fraction, the importance
ratio, rollout time and sampled tokens/s. Every --loop.eval-every steps: greedy reward, accuracy and
end-of-turn share on held-out prompts (tasks: the held-out problems `cakelm eval` uses).

Why the loss is ~0 and still learns: with rho = 1 and advantages centred in each group, the loss's value is
sum(A_i) ~ 0, but its gradient sum_i A_i grad log pi(o_i) is not (tested in tests/test_grpo.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cakelm.chat_format import format_of, render_prompt
from cakelm.checkpoint import load_model, load_train_state, resume_point, save_checkpoint
from cakelm.common import CakeError, DistInfo, all_reduce_sum, init_distributed, print0
from cakelm.config import ConfigError, nested, opt, to_dict
from cakelm.data.chat import BUILTIN_CHAT, VAL_FRACTION, load_sources
from cakelm.data.chat_batches import Mixture
from cakelm.engine import SamplingParams
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import ADVANTAGE_SCALES, AGGREGATIONS, aggregate, clipped_policy_loss, group_advantages, kl_k3
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.rewards import WeightedReward, exact_match, load_reward, score
from cakelm.rollout import PromptRow, Rollout, completion_logprobs, prompts_of, sample, to_batch
from cakelm.tokenizer import Tokenizer


@dataclass
class GRPOConfig:
    init: str = opt("runs/default/sft", "chat checkpoint to improve (`cakelm sft` output)")
    data: list[str] = opt(["arithmetic"], "prompt sources, each SRC or SRC=WEIGHT: " + ", ".join(BUILTIN_CHAT) +
                          ", .jsonl files ({\"prompt\": ..., \"answer\": ...} or {\"messages\"}; other keys are "
                          "passed to the rewards), hf:NAME[:SPLIT]")
    out: str = opt("runs/default/grpo", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same rollouts, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    rewards: list[str] = opt(["exact_match"], "rewards, each NAME or NAME=WEIGHT: exact_match, format, gym, or "
                             "module:function (your own, see cakelm/rewards.py)")
    group_size: int = opt(8, "completions sampled per prompt (G >= 2)")
    prompts_per_step: int = opt(16, "prompts per rollout batch, over all ranks")
    num_iterations: int = opt(1, "optimizer steps on each rollout batch (mu; > 1 makes the clip matter)")
    temperature: float = opt(1.0, "sampling temperature (> 0; the loss uses the same)")
    top_p: float = opt(1.0, "nucleus sampling during rollouts (1 = pure sampling)")
    max_new_tokens: int = opt(64, "longest completion in tokens")
    scale_rewards: str = opt("group", "divide centred rewards by the std of the group, the batch, or none "
                             "(Dr. GRPO)", choices=ADVANTAGE_SCALES)
    aggregation: str = opt("token_mean", "how token losses are averaged: token_mean (DAPO), sequence_mean "
                           "(GRPO), constant (Dr. GRPO)", choices=AGGREGATIONS)
    epsilon_low: float = opt(0.2, "clip the ratio below at 1 - epsilon_low")
    epsilon_high: float = opt(0.28, "clip the ratio above at 1 + epsilon_high (DAPO's clip-higher: > low)")
    beta: float = opt(0.0, "weight of the k3 KL to the reference in the loss (0 = none, as in DAPO and TRL)")
    log_kl: bool = opt(True, "load a frozen copy of --init to log the KL to it even when --beta is 0")
    mask_truncated: bool = opt(False, "leave completions that hit --max-new-tokens out of the loss")
    rollout_batch: int = opt(256, "completions generated at once (memory of the KV cache)")
    task_size: int = opt(0, "training problems generated per task source (0 = about as many as the run draws)")
    val_size: int = opt(100, "held-out prompts per source scored (greedy) at each evaluation")
    val_fraction: float = opt(VAL_FRACTION, "share of a prompt file held out (at most --val-size are used)")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    # The defaults are the "cpu" preset: about 2.5 minutes on 2 CPU cores from the pipeline's SFT model; how the
    # learning rate and batch were chosen is in the README (larger steps than 1e-4 made this model worse).
    optim: OptimConfig = nested(OptimConfig, name="adamw", lr=1e-4, warmup_steps=5, schedule="constant",
                                weight_decay=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=60, batch_size=64, eval_every=30, log_every=1)

    def __post_init__(self) -> None:
        if not self.data or not self.rewards:
            raise ConfigError("--data and --rewards need at least one entry each")
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 (advantages compare completions of a prompt), got "
                              f"{self.group_size}")
        for name in ("prompts_per_step", "num_iterations", "max_new_tokens", "rollout_batch", "val_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError(f"need --temperature > 0 and --top-p in (0, 1]; got {self.temperature}, {self.top_p}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0 and self.beta >= 0):
            raise ConfigError("need 0 <= --epsilon-low < 1, --epsilon-high >= 0 and --beta >= 0")
        if self.task_size < 0 or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--task-size must be >= 0 and --val-fraction in (0, 1)")


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 32, "val_size": 16, "loop.max_steps": 4,
              "loop.batch_size": 32, "loop.eval_every": 0, "optim.warmup_steps": 1},
}


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, rollout batch, rank...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Rollouts:
    """batches(step, micro) for the shared loop. At the first step of every window of --num-iterations steps,
    this rank's prompts are rolled out with the current weights, scored, and cut into micro-batches of
    --batch-size completions, which every step of the window trains on."""

    def __init__(self, cfg: GRPOConfig, model: Transformer, ref: Transformer | None, tok: Tokenizer,
                 rewards: list[WeightedReward], prompts: list[list[PromptRow]], weights: list[float],
                 info: DistInfo, device: torch.device) -> None:
        self.cfg, self.model, self.ref, self.tok, self.rewards = cfg, model, ref, tok, rewards
        self.prompts, self.info, self.device = prompts, info, device
        self.mixture = Mixture([len(p) for p in prompts], weights, cfg.loop.seed)
        self.local = cfg.prompts_per_step // info.world_size  # prompts per rank
        self.cache: dict[str, Any] | None = None

    def get(self, step: int, micro: int) -> dict[str, Any]:
        window = step // self.cfg.num_iterations
        if self.cache is None or self.cache["window"] != window:
            self.cache = self.roll_out(window)
        batch = dict(self.cache["micro"][micro])
        if micro == 0:
            first = step % self.cfg.num_iterations == 0  # later steps of the window reuse these rollouts
            batch["metrics"] = {**self.cache["metrics"], **({} if first else {"rollout_s": 0.0})}
        return batch

    def roll_out(self, window: int) -> dict[str, Any]:
        cfg, info, G = self.cfg, self.info, self.cfg.group_size
        t0 = time.perf_counter()
        slots = self.mixture.slots(window * cfg.prompts_per_step + info.rank * self.local, self.local)
        rows = [self.prompts[s][i] for s, i in slots]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=seed_of(cfg.loop.seed, window, info.rank))
        rolls = sample(self.model, self.tok, [r.messages for r in rows], params, n=G, chunk=cfg.rollout_batch)
        seconds = time.perf_counter() - t0
        rewards, stats = score_rollouts(self.rewards, rows, rolls)
        # group statistics over the whole batch: gather every rank's rewards (whole groups per rank)
        n_local = len(rolls)
        everyone = torch.zeros(n_local * info.world_size, dtype=torch.float64, device=self.device)
        everyone[info.rank * n_local:(info.rank + 1) * n_local] = torch.tensor(rewards, dtype=torch.float64)
        everyone = all_reduce_sum(everyone, info).cpu()
        adv, zero = group_advantages(everyone.float(), G, cfg.scale_rewards)
        adv = adv[info.rank * n_local:(info.rank + 1) * n_local]
        stats += [seconds, sum(len(r.ids) for r in rolls) / seconds]  # rate summed over ranks
        stats = all_reduce_sum(torch.tensor(stats, dtype=torch.float64, device=self.device), info).tolist()
        correct, answered, tokens, ended, unscored, seconds_sum, rate = stats
        n = len(everyone)
        metrics = {"reward": everyone.mean().item(), "reward_std": everyone.std().item(),
                   "accuracy": correct / answered if answered else float("nan"),
                   "zero_signal": zero / (n // G), "completion_len": tokens / n, "truncated": 1 - ended / n,
                   "unscored": unscored / n, "rollout_s": seconds_sum / info.world_size, "rollout_tok_s": rate}
        micro = []
        for start in range(0, n_local, cfg.loop.batch_size):
            part = rolls[start:start + cfg.loop.batch_size]
            b = to_batch(part, self.tok.pad_id)
            b["adv"] = adv[start:start + len(part)]
            if cfg.mask_truncated:
                b["mask"] *= torch.tensor([float(r.ended) for r in part])[:, None]
            if self.ref is not None:
                with torch.no_grad():
                    ref_logp, _ = completion_logprobs(self.ref, b["input"].to(self.device),
                                                      b["target"].to(self.device), cfg.temperature)
                b["ref_logp"] = ref_logp.cpu()
            b["n"] = aggregate(torch.zeros_like(b["mask"]), b["mask"], cfg.aggregation, cfg.max_new_tokens)[1]
            micro.append(b)
        return {"window": window, "micro": micro, "metrics": metrics}


def score_rollouts(rewards: list[WeightedReward], rows: list[PromptRow], rolls: list[Rollout]
                   ) -> tuple[list[float], list[float]]:
    """(reward of each completion, [correct, answered, tokens, ended, unscored] counts). A completion that no
    reward applies to takes the mean of its group's scored ones (0 if none is), so its advantage is 0."""
    values: list[float] = []
    correct = answered = ended = unscored = 0
    for r in rolls:
        row = rows[r.prompt]
        fields = {**row.fields, "finish_reason": "stop" if r.ended else "length"}
        total, _ = score(rewards, row.question, r.text, fields)
        values.append(math.nan if total is None else total)
        unscored += total is None
        if "answer" in row.fields:
            answered += 1
            correct += exact_match(row.question, r.text, row.fields["answer"]) == 1.0
        ended += r.ended
    scored: dict[int, list[float]] = {}  # prompt -> its completions' rewards that some reward applied to
    for r, v in zip(rolls, values):
        if not math.isnan(v):
            scored.setdefault(r.prompt, []).append(v)
    for i, r in enumerate(rolls):
        if math.isnan(values[i]):
            mates = scored.get(r.prompt, [])
            values[i] = sum(mates) / len(mates) if mates else 0.0
    return values, [correct, answered, sum(len(r.ids) for r in rolls), ended, unscored]


def grpo_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: GRPOConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (+ beta * k3 KL) of one micro-batch, summed as `cfg.aggregation` says, and per-token
    metrics as [sum, count] pairs."""
    logp, entropy = completion_logprobs(model, batch["input"], batch["target"], cfg.temperature)
    mask = batch["mask"]
    per_token, clipped = clipped_policy_loss(logp, batch["old_logp"], batch["adv"], cfg.epsilon_low,
                                             cfg.epsilon_high)
    extras = {}
    if "ref_logp" in batch:
        kl = kl_k3(logp, batch["ref_logp"])
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
        extras["kl"] = kl.detach()
    loss, _ = aggregate(per_token, mask, cfg.aggregation, cfg.max_new_tokens)
    extras.update(entropy=entropy, clip_frac=clipped.float(), ratio=torch.exp(logp - batch["old_logp"]).detach())
    n = mask.sum()
    return loss, {k: torch.stack([(v * mask).sum(), n]) for k, v in extras.items()}


def make_evaluate(cfg: GRPOConfig, tok: Tokenizer, rewards: list[WeightedReward], rows: list[PromptRow],
                  info: DistInfo, device: torch.device) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Greedy replies to the held-out prompts (this rank's share): mean reward, accuracy, ends-turn share."""
    mine = rows[info.rank::info.world_size]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        rolls = sample(model, tok, [r.messages for r in mine], params, chunk=cfg.rollout_batch) if mine else []
        values, (correct, answered, _, ended, _) = score_rollouts(rewards, mine, rolls)
        acc = all_reduce_sum(torch.tensor([sum(values), len(values), correct, answered, ended],
                                          dtype=torch.float64, device=device), info).tolist()
        out = {"val_reward": acc[0] / acc[1], "val_end_of_turn": acc[4] / acc[1]}
        if acc[3]:
            out["val_accuracy"] = acc[2] / acc[3]
        return out

    return evaluate


def main(cfg: GRPOConfig) -> Path:
    info, device = init_distributed(cfg.loop.device)
    t0 = time.time()
    out = Path(cfg.out)
    if cfg.prompts_per_step % info.world_size:
        raise CakeError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {info.world_size} "
                        "ranks (each rank rolls out whole groups)")
    local = cfg.prompts_per_step // info.world_size * cfg.group_size  # completions per rank and rollout batch
    # micro-batches of --batch-size completions (the config itself keeps what was asked: re-runs compare it)
    loop = replace(cfg.loop, grad_accum=math.ceil(local / cfg.loop.batch_size))
    rewards = [load_reward(spec) for spec in cfg.rewards]
    point = resume_point(out, cfg.resume, cfg.overwrite, cfg.loop.max_steps, to_dict(cfg))
    if point == "done":
        print0(f"grpo: {out} is already complete (raise --max-steps to go on)", info=info)
        return out
    model, tok, start_meta = load_model(out if point == "resume" else cfg.init, device)
    if point == "fresh" and format_of(start_meta) != "chat":
        raise CakeError(f"grpo: {cfg.init} is a base model (it speaks the playscript); GRPO improves a chat model: "
                        "run `cakelm sft` first and pass its checkpoint as --init")
    resume_state = load_train_state(out) if point == "resume" else None
    parent_stage = start_meta.get("parent_stage") if point == "resume" else start_meta.get("stage")
    ref = None
    if cfg.beta > 0 or cfg.log_kl:
        ref, _, _ = load_model(cfg.init, device)
        ref.requires_grad_(False)
    saved_sizes = {s: c["task_size"] for s, c in start_meta.get("data", {}).items() if c.get("task_size")} \
        if point == "resume" else None
    draws = math.ceil(cfg.loop.max_steps / cfg.num_iterations) * cfg.prompts_per_step
    sources, skipped = load_sources(cfg.data, draws, cfg.task_size, cfg.val_fraction, cfg.val_size, cfg.loop.seed,
                                    cfg.skip_bad_lines, reply_required=False, task_sizes=saved_sizes)
    budget = model.cfg.max_seq_len - 1  # a prompt needs room for at least one new token
    prompts, val_rows, counts = [], [], {}
    for src, weight, train_ex, val_ex, task_size in sources:
        rows = prompts_of(train_ex)
        fits = [r for r in rows if len(render_prompt(r.messages, tok, "chat")) < budget]
        if not fits:
            raise CakeError(f"--data {src}: no prompt fits the model's context of {model.cfg.max_seq_len} tokens")
        prompts.append(fits)
        val_rows += prompts_of(val_ex)
        counts[src] = {"weight": weight, "prompts": len(fits), "too_long": len(rows) - len(fits),
                       "val_prompts": len(val_ex), "task_size": task_size}
    batches = Rollouts(cfg, model, ref, tok, rewards, prompts, [c["weight"] for c in counts.values()], info, device)
    if resume_state and "rollouts" in resume_state:
        batches.cache = resume_state["rollouts"]  # resumed inside a window: train on the same rollouts
    evaluate = make_evaluate(cfg, tok, rewards, val_rows, info, device)
    model.train()
    print0(f"grpo: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}; {cfg.prompts_per_step} prompts x "
           f"{cfg.group_size} completions per rollout batch, {cfg.num_iterations} step(s) each, "
           f"{cfg.loop.max_steps} steps on {device}" + (f" x {info.world_size} ranks" if info.enabled else "")
           + "; rewards " + ", ".join(f"{r.name}={r.weight:g}" for r in rewards)
           + (f"; skipped {skipped} bad lines" if skipped else "")
           + (f"; resuming from step {resume_state['step']}" if resume_state else ""), info=info)

    def save(step: int, metrics: dict, train_state: dict, final: bool) -> None:
        if step % cfg.num_iterations and batches.cache is not None:
            train_state = {**train_state, "rollouts": batches.cache}  # the next step still trains on these
        save_checkpoint(out, model, tok, {
            "stage": "grpo", "step": step, "complete": final, "config": to_dict(cfg), "metrics": metrics,
            "parent": cfg.init, "parent_stage": parent_stage, "chat_format": "chat", "data": counts,
            "rewards": cfg.rewards, "skipped_lines": skipped, "world_size": info.world_size,
            "num_params": model.num_params(),
        }, train_state)

    metrics = train(model, loop, cfg.optim, LoopContext(device, info, out), batches.get,
                    lambda m, b: grpo_loss(m, b, cfg), evaluate, save, resume_state,
                    show=("reward", "accuracy"))
    print0(f"grpo: step {metrics.get('step')}, reward {metrics.get('reward', float('nan')):.3f}, held-out "
           f"accuracy {metrics.get('val_accuracy', float('nan')):.3f}, ends turn "
           f"{metrics.get('val_end_of_turn', float('nan')):.3f} -> {out} ({time.time() - t0:.0f}s)", info=info)
    return out

