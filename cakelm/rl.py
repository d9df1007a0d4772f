"""What the RL stages (grpo, rloo, ppo) share, so each stage file keeps only its advantages and its loss.

- `Rewards`: the reward of a completion: weighted verifiable rewards (`cakelm.rewards`: exact_match, format,
  your module:function) plus, when `--rewards` names `reward_model`, the weighted score of a reward model
  (`cakelm reward`) read at the reply's last token. A completion no reward applies to takes its group's mean.
  Each reward call has --reward-timeout seconds; a reward that raises, runs past it or returns no finite number
  scores 0 and is counted (reward_errors, per phase, all ranks) with the first prompt it failed on printed by the
  rank that saw it; with --reward-errors stop the run saves its steps and stops instead (every rank at once: the
  count is in the all-reduce of the phase's metrics). A run no reward can score stops before it starts
  (`check_scorable`), and so does one whose every reward call fails in its first phase.
- `sample_and_score`: one rollout phase on this rank: the generator samples n completions of each prompt (seeded
  per prompt, so 2 ranks sample what 1 process would, up to rounding), the reference scores them, the rewards
  score them, and the metrics every RL stage logs are summed over ranks: reward, reward_std, gold (the rule-based
  rater, `rewards.rater`, never trained on), proxy (the reward model's score), accuracy (rows with an answer),
  reply_len, end_of_turn, kl (k1 per reply: sum_t log pi_old - log pi_ref, nats), rollout_s, rollout_tok_s.
- `RolloutBatches`: the shared loop's batch provider for on-policy RL. Every phase (--epochs passes over the
  rollouts, each cut into --num-minibatches optimizer steps) starts with `roll_out(phase)`; each step trains on
  one minibatch (a seeded shuffle per epoch when there are several), in micro-batches of --loop.batch-size rows.
  Its `state_dict` (the phase's rollouts, and the stage's own stateful parts such as PPO's KL controller) is
  saved by the loop with every checkpoint, so a run resumed inside a phase trains on the same rollouts (and the
  last phase's rollouts stay in train_state.pt, to inspect: tests/test_rl.py recomputes steps from them).
- `RewardEval`: greedy replies to held-out prompts: val_reward, val_accuracy, val_end_of_turn (and
  val_reward_errors, counted but never stopping the run: an evaluation measures, it does not train).
- `with_replay`, `replayed_nll`, `add_replay`: SFT's conversations replayed next to a stage's own loss
  (--replay-coef, --replay, --replay-batch; DPO, PPO and GRPO): the batch provider with them, the policy's NLL on
  them, and the term and its metric added to the loss.

Option names are the same in every RL stage (see the README's RL section): --kl-coef, --epsilon-low/-high,
--epochs, --num-minibatches, --temperature, --max-new-tokens, --prompts-per-step, --rollout-batch, --val-size.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from cakelm.common import CakeError, DistInfo, all_reduce_sum, seed_of
from cakelm.config import ConfigError
from cakelm.data.chat_batches import Mixture, WithChat, chat_part, replay_batches
from cakelm.data.prompts import PromptRow, PromptSources, rl_prompts
from cakelm.engine import SamplingParams
from cakelm.heldout import chat_loss
from cakelm.loop import LoopConfig, StopRun
from cakelm.losses import replay_loss
from cakelm.model import Transformer
from cakelm.rewards import BUILTIN, WeightedReward, exact_match, load_reward, score, time_limit_available
from cakelm.rlhf import ScalarModel, gold_scores, score_rollouts_rm
from cakelm.rollout import Generator, Rollout, frozen_logprobs, to_batch
from cakelm.tokenizer import Tokenizer

REWARD_MODEL = "reward_model"  # the name of the reward model's score in --rewards

# The options RL stages share: one name, one meaning, one help text (`opt(default, HELP["name"])`).
HELP = {
    "init": "chat checkpoint to improve (`cakelm sft` output); also the frozen reference of the KL",
    "rewards": "rewards, each NAME or NAME=WEIGHT: exact_match, format, equations, gym, rater, module:function (your "
               f"own, see cakelm/rewards.py), or {REWARD_MODEL} (the score of --reward-model)",
    "reward_model": f"reward model (`cakelm reward` output) whose score is the reward `{REWARD_MODEL}`",
    "missing_eos_penalty": "subtracted from the reward of a reply that never ends its turn",
    "group_size": "completions sampled per prompt (G >= 2)",
    "prompts_per_step": "prompts per rollout phase, over all ranks",
    "epochs": "passes over each rollout phase's completions (> 1 reuses them: the clip then matters)",
    "num_minibatches": "optimizer steps per pass (the phase's completions are split into this many minibatches)",
    "temperature": "sampling temperature (> 0; the loss uses the same)",
    "max_new_tokens": "longest reply in tokens",
    "kl_coef": "weight of the KL to the reference (--init) (0 = none); each stage's docstring says where it goes",
    "epsilon_low": "clip the importance ratio below at 1 - epsilon_low",
    "epsilon_high": "clip the importance ratio above at 1 + epsilon_high (> epsilon_low: DAPO's clip-higher)",
    "rollout_batch": "completions generated at once (the KV cache's memory)",
    "val_size": "held-out prompts scored at each evaluation",
    "val_samples": "replies sampled per held-out prompt in evaluations",
    "task_size": "training problems generated per task source (0 = about as many as the run draws)",
    "val_fraction": "share of a prompt file held out (at most --val-size are used)",
    "skip_bad_lines": "skip and count malformed JSONL lines instead of stopping at the first",
    "reward_timeout": "seconds each reward call may take (0 = no limit); past it the call fails",
    "replay_coef": "weight of the per-token NLL of --replay conversations added to the loss (SFT data replayed, "
                   "InstructGPT's PPO-ptx term with SFT data for pretraining data; 0 = off)",
    "replay": "chat sources replayed with --replay-coef, each SRC or SRC=WEIGHT (as `cakelm sft --data`; default: "
              "SFT's default mixture)",
    "replay_batch": "replayed conversations per micro-batch",
    "reward_errors": "a reward call that fails (raises, times out, returns no finite number): score it 0 and count "
                     "it (reward_errors), or save the run and stop",
}
REWARD_ERRORS = ("score", "stop")


def check_options(cfg: Any) -> None:
    """Range checks of the shared RL options a config has (one-line ConfigErrors)."""
    at_least = {"group_size": 2, "prompts_per_step": 1, "epochs": 1, "num_minibatches": 1, "max_new_tokens": 1,
                "rollout_batch": 1, "val_size": 1, "val_samples": 1, "task_size": 0}
    for name, low in at_least.items():
        if hasattr(cfg, name) and getattr(cfg, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if hasattr(cfg, "temperature") and not cfg.temperature > 0:
        raise ConfigError(f"need --temperature > 0, got {cfg.temperature}")
    for name in ("kl_coef", "epsilon_high", "missing_eos_penalty"):
        if hasattr(cfg, name) and not getattr(cfg, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if hasattr(cfg, "replay_coef"):
        if not 0.0 <= cfg.replay_coef < math.inf:
            raise ConfigError(f"--replay-coef must be >= 0, got {cfg.replay_coef}")
        if cfg.replay_batch < 1 or (cfg.replay_coef and not cfg.replay):
            raise ConfigError("--replay-coef needs --replay sources and --replay-batch >= 1")
    if hasattr(cfg, "epsilon_low") and not 0 <= cfg.epsilon_low < 1:
        raise ConfigError(f"--epsilon-low must be in [0, 1), got {cfg.epsilon_low}")
    if hasattr(cfg, "val_fraction") and not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if hasattr(cfg, "reward_timeout") and not 0 <= cfg.reward_timeout < math.inf:
        raise ConfigError(f"--reward-timeout must be >= 0 seconds, got {cfg.reward_timeout}")
    if hasattr(cfg, "rewards") and not cfg.rewards:
        raise ConfigError("--rewards needs at least one entry")
    if isinstance(getattr(cfg, "data", None), list) and not cfg.data:
        raise ConfigError("--data needs at least one source")


# The optimizer of the RL stages by default (AdamW 1e-4, constant after a short warm-up, no weight decay): larger
# steps made the pipeline's small models worse (the README's GRPO and PPO sections).
OPTIM = {"name": "adamw", "lr": 1e-4, "warmup_steps": 5, "schedule": "constant", "weight_decay": 0.0}


def with_replay(cfg: Any, inner: Any, tok: Tokenizer, row_len: int, micro_batches: int, info: DistInfo,
                meta: dict[str, Any] | None) -> tuple[Any, dict[str, Any], str]:
    """What a stage trains on with --replay-coef > 0: `inner` (its own batch provider, `micro_batches` per step)
    with this rank's micro-batch of replayed SFT conversations (`WithChat`), the meta.json entry of the resolved
    sources, and the words for its start-up line; `inner`, {} and "" without. `meta` is the checkpoint's on
    --resume (the same problems come back); a bad --replay fails here, in one line."""
    if not cfg.replay_coef:
        return inner, {}, ""
    chat, sources = replay_batches(cfg.replay, tok, row_len, cfg.loop.max_steps, cfg.replay_batch, micro_batches,
                                   info, cfg.loop.seed, meta, cfg.out)
    words = f"; replaying {chat.global_batch} conversations per step ({', '.join(cfg.replay)}) at {cfg.replay_coef:g}"
    return WithChat(inner, chat), {"replay": sources}, words


def replayed_nll(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(summed NLL, target tokens) of `model` on the replayed conversations of a `with_replay` batch, or None."""
    chat = chat_part(batch)
    return chat_loss(model, chat) if chat is not None else None


def add_replay(loss: torch.Tensor, metrics: dict[str, torch.Tensor],
               replayed: tuple[torch.Tensor, torch.Tensor] | None, coef: float, units: torch.Tensor | float
               ) -> torch.Tensor:
    """`loss` + coef x the replayed per-token NLL x the micro-batch's loss units (`losses.replay_loss`), and its
    replay_nll metric as a [sum, count] pair into `metrics`; `loss` unchanged when nothing was replayed."""
    if replayed is None:
        return loss
    nll, n = replayed
    metrics["replay_nll"] = torch.stack([nll.detach(), n.to(nll.dtype)])
    return loss + replay_loss(nll, n, coef, units)


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a GRPO or RLOO checkpoint (and the last line of their runs)."""
    m, nan = meta["metrics"], math.nan
    return (f"reward {m.get('reward', nan):.3f}, held-out accuracy {m.get('val_accuracy', nan):.3f} (greedy), "
            f"ends turn {m.get('val_end_of_turn', nan):.3f}" + (f", gold {m['val_gold']:.3f}, KL {m['val_kl']:.2f}"
                                                                 if "val_gold" in m and "val_kl" in m else "")
            + f", {m.get('rollout_tok_s', 0):,.0f} sampled tok/s")


def gather_rows(local: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """Every rank's (N, ...) rows in rank order (N * world_size, ...), on CPU; `local` itself in one process."""
    if not info.enabled:
        return local
    out = torch.zeros((local.size(0) * info.world_size, *local.shape[1:]), dtype=local.dtype, device=device)
    out[info.rank * local.size(0):(info.rank + 1) * local.size(0)] = local.to(device)
    return all_reduce_sum(out, info).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Rewards


@dataclass
class Rewards:
    """Verifiable reward functions and, optionally, a reward model with its weight."""

    functions: list[WeightedReward]
    model: ScalarModel | None = None
    model_weight: float = 0.0
    missing_eos_penalty: float = 0.0
    timeout: float = 0.0  # seconds per reward call (0 = no limit)
    on_error: str = "score"  # a failed reward call: "score" (0, counted) or "stop" (save, stop)

    @property
    def names(self) -> list[str]:
        return [f"{r.name}={r.weight:g}" for r in self.functions] + (
            [f"{REWARD_MODEL}={self.model_weight:g}"] if self.model is not None else [])

    def score(self, rows: Sequence[PromptRow], rolls: Sequence[Rollout], pad_id: int, batch: int = 64
              ) -> tuple[list[float], dict[str, int], torch.Tensor | None, list[str]]:
        """Each completion's reward, the counts of `score_rollouts`, the reward model's scores (N,) when there is
        one, and the failed reward calls (one line each)."""
        rm = score_rollouts_rm(self.model, rolls, pad_id, batch) if self.model is not None else None
        values, counts, failures = score_rollouts(self.functions, rows, rolls, rm, self.model_weight,
                                                  self.missing_eos_penalty, self.timeout)
        return values, counts, rm, failures


def parse_rewards(specs: Sequence[str]) -> tuple[list[WeightedReward], float | None]:
    """--rewards specs -> (reward functions, the weight of `reward_model` or None when it is not asked for)."""
    functions, rm_weight = [], None
    for spec in specs:
        name, _, w = spec.partition("=")
        if name == REWARD_MODEL:
            try:
                rm_weight = float(w) if w else 1.0
            except ValueError:
                raise CakeError(f"--rewards {spec}: the weight after '=' must be a number") from None
            if not math.isfinite(rm_weight):
                raise CakeError(f"--rewards {spec}: the weight must be finite")
        else:
            functions.append(load_reward(spec))
    return functions, rm_weight


def make_rewards(specs: Sequence[str], reward_model: str, missing_eos_penalty: float,
                 load_model: Callable[[str], ScalarModel], timeout: float = 0.0, on_error: str = "score",
                 info: DistInfo | None = None) -> Rewards:
    """The Rewards of --rewards, --reward-model, --missing-eos-penalty, --reward-timeout and --reward-errors;
    `load_model` loads the reward model (frozen, tokenizer checked: `scaffold.Run.reward_model`) when --rewards
    names it."""
    if on_error not in REWARD_ERRORS:
        raise ConfigError(f"--reward-errors must be one of {', '.join(REWARD_ERRORS)}, got {on_error!r}")
    functions, weight = parse_rewards(specs)
    if weight is not None and not reward_model:
        raise CakeError(f"--rewards {REWARD_MODEL}: give the reward model's checkpoint with --reward-model")
    if weight is None and reward_model:
        raise CakeError(f"--reward-model {reward_model} is given but --rewards does not use it (add {REWARD_MODEL} "
                        f"or {REWARD_MODEL}=WEIGHT)")
    if functions and timeout > 0 and not time_limit_available() and (info is None or info.is_main):
        print(f"note: --reward-timeout {timeout:g} is not enforced here (no SIGALRM, or not the main thread): a "
              "reward that hangs hangs the run", file=sys.stderr, flush=True)
    model = load_model(reward_model) if weight is not None else None
    return Rewards(functions, model, weight or 0.0, missing_eos_penalty, timeout, on_error)


# The fields a built-in reward needs in a prompt row to apply at all (it returns None on rows without them).
NEEDS = {"exact_match": ("answer",), "gym": ("task", "entry")}


def check_scorable(rewards: Rewards, prompts: Sequence[Sequence[PromptRow]], data: Sequence[str]) -> None:
    """A run in which no reward can apply to any reply (the built-in rewards that need a field, and no training
    prompt has it: e.g. exact_match on prompts without an "answer") would train on nothing: a one-line CakeError
    before it starts. Rewards that may apply to any row (format, rater, yours, the reward model) pass."""
    if rewards.model is not None or not rewards.functions or any(
            BUILTIN.get(r.name) is not r.fn or r.name not in NEEDS for r in rewards.functions):
        return
    rows = [row for source in prompts for row in source]
    if any(all(row.fields.get(f) is not None for f in NEEDS[r.name]) for r in rewards.functions for row in rows):
        return
    names = " ".join(r.name for r in rewards.functions)
    needs = "; ".join(f"{r.name} needs {' and '.join(map(repr, NEEDS[r.name]))} in a prompt row"
                      for r in rewards.functions)
    raise CakeError(f"--rewards {names} can score no reply: {needs}, and none of the {len(rows)} training prompts "
                    f"of --data {' '.join(data)} has it (give prompts with answers, or "
                    "add a reward that applies to any reply: format, rater, module:function, reward_model)")


def score_rollouts(rewards: list[WeightedReward], rows: Sequence[PromptRow], rolls: Sequence[Rollout],
                   rm_scores: torch.Tensor | None = None, rm_weight: float = 0.0, missing_eos_penalty: float = 0.0,
                   timeout: float = 0.0) -> tuple[list[float], dict[str, int], list[str]]:
    """(reward of each completion, counts {correct, answered, tokens, ended, unscored, calls, errors}, the
    failed reward calls). The reward is the weighted sum of the reward functions that apply (a failed call,
    `rewards.score`, scores 0) plus rm_weight x the reward model's score (which applies to every completion). A
    completion that nothing applies to takes the mean of its group's scored ones (0 if none is), so its
    group-relative advantage is 0. Then a completion that did not end its turn loses missing_eos_penalty."""
    values: list[float] = []
    counts = dict.fromkeys(("correct", "answered", "tokens", "ended", "unscored", "calls", "errors"), 0)
    failures: list[str] = []
    for i, r in enumerate(rolls):
        row = rows[r.prompt]
        fields = {**row.fields, "finish_reason": "stop" if r.ended else "length"}
        total, _, failed = score(rewards, row.question, r.text, fields, timeout) if rewards else (None, {}, [])
        failures += failed
        counts["calls"] += len(rewards)
        counts["errors"] += len(failed)
        if rm_scores is not None:
            total = (total or 0.0) + rm_weight * float(rm_scores[i])
        values.append(math.nan if total is None else total)
        counts["unscored"] += total is None
        if "answer" in row.fields:
            counts["answered"] += 1
            counts["correct"] += exact_match(row.question, r.text, row.fields["answer"]) == 1.0
        counts["ended"] += r.ended
        counts["tokens"] += len(r.ids)
    scored: dict[int, list[float]] = {}  # prompt -> its completions' rewards that something applied to
    for r, v in zip(rolls, values):
        if not math.isnan(v):
            scored.setdefault(r.prompt, []).append(v)
    for i, r in enumerate(rolls):
        if math.isnan(values[i]):
            mates = scored.get(r.prompt, [])
            values[i] = sum(mates) / len(mates) if mates else 0.0
        values[i] -= missing_eos_penalty * (not r.ended)
    return values, counts, failures


def report_failures(failures: list[str], calls: int, info: DistInfo, where: str) -> None:
    """The rank that saw failed reward calls says how many and prints the first (once per phase/evaluation)."""
    if failures:
        rank = f"rank {info.rank}: " if info.enabled else ""
        print(f"{rank}{where}: {len(failures)} of {calls} reward calls failed and scored 0; first: {failures[0]}",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# One rollout phase


def group_prompts(cfg: Any, info: DistInfo, tok: Tokenizer, context: int, meta: dict[str, Any] | None,
                  per_phase: int = 0) -> PromptSources:
    """The prompts of a group RL stage (grpo, rloo): --data's prompts that leave --max-new-tokens of the model's
    `context` for the reply, with enough generated task problems for the run (per_phase prompts per rollout phase,
    default --prompts-per-step; those of `meta`, the resumed checkpoint's meta.json, when given), and its held-out
    prompts. Each rank rolls out whole groups, so --prompts-per-step must split evenly over the ranks."""
    if cfg.prompts_per_step % info.world_size:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {info.world_size} "
                          "ranks (each rank rolls out whole groups)")
    saved = {s: c["task_size"] for s, c in meta.get("data", {}).items() if c.get("task_size")} if meta else None
    phases = math.ceil(cfg.loop.max_steps / (cfg.epochs * cfg.num_minibatches))
    prompts = rl_prompts(cfg.data, phases * (per_phase or cfg.prompts_per_step), cfg.task_size, cfg.val_fraction,
                         cfg.val_size, cfg.loop.seed, cfg.skip_bad_lines, tok, context - cfg.max_new_tokens, saved)
    if not prompts.val:
        raise CakeError(f"--data {' '.join(cfg.data)}: no held-out prompt leaves room for --max-new-tokens "
                        f"{cfg.max_new_tokens} in the context of {context} (raise --val-fraction, or use a larger "
                        "file)")
    return prompts


def phase_rows(prompts: Sequence[Sequence[PromptRow]], mixture: Mixture, phase: int, per_phase: int,
               info: DistInfo) -> tuple[list[PromptRow], list[int]]:
    """This rank's prompts of rollout phase `phase` (per_phase prompts over all ranks, whole groups per rank) and
    their global slot numbers (which seed each prompt's samples)."""
    local = per_phase // info.world_size
    first = phase * per_phase + info.rank * local
    rows = [prompts[s][i] for s, i in mixture.slots(first, local)]
    return rows, list(range(first, first + local))


@dataclass
class Sampled:
    """A phase's rollouts on this rank: training rows (to_batch + "ref_logp" when there is a reference), each
    completion's reward (N,), every rank's rewards gathered (for batch statistics), and the logged metrics."""

    rows: list[PromptRow]
    rolls: list[Rollout]
    batch: dict[str, torch.Tensor]
    rewards: torch.Tensor  # (N,) float64
    all_rewards: torch.Tensor  # (N * world_size,) float64, rank r's at [r * N, (r + 1) * N)
    metrics: dict[str, float]


def sample_and_score(generator: Generator, rows: list[PromptRow], slots: list[int], params: SamplingParams, n: int,
                     seed: int, rewards: Rewards, ref: Transformer | None, info: DistInfo, device: torch.device,
                     chunk_rows: int = 64, phase: int = -1) -> Sampled:
    """Sample n completions of each prompt (prompt in slot g seeded with seed_of(seed, g)), score them, and
    compute the metrics over all ranks (see the module docstring). Failed reward calls (of rollout phase
    `phase`) are reported; they stop the run (StopRun: the loop saves first) with --reward-errors stop, and a
    first phase (0) in which every reward call failed stops it in either mode (a broken reward)."""
    t0 = time.perf_counter()
    generator.refresh()
    rolls = generator.generate([r.messages for r in rows], params, n=n, seeds=[seed_of(seed, g) for g in slots])
    seconds = time.perf_counter() - t0
    batch = to_batch(rolls, generator.tok.pad_id)
    if ref is not None:
        batch["ref_logp"] = frozen_logprobs(ref, batch, params.temperature, chunk_rows, device)
    values, c, rm_scores, failures = rewards.score(rows, rolls, generator.tok.pad_id, chunk_rows)
    local = torch.tensor(values, dtype=torch.float64)
    everyone = gather_rows(local, info, device)
    kl = ((batch["old_logp"] - batch["ref_logp"]) * batch["mask"]).sum().item() if ref is not None else 0.0
    gold = sum(gold_scores(rows, rolls))
    proxy = float(rm_scores.sum()) if rm_scores is not None else 0.0
    sums = torch.tensor([c["correct"], c["answered"], c["tokens"], c["ended"], c["unscored"], gold, proxy, kl,
                         seconds, c["tokens"] / seconds, c["calls"], c["errors"]], dtype=torch.float64, device=device)
    correct, answered, tokens, ended, unscored, gold, proxy, kl, seconds, rate, calls, errors = \
        all_reduce_sum(sums, info).tolist()
    # every rank decides from the same all-reduced counts, so all stop together
    first = failures[0] if failures else "on another rank (see its error)"
    if phase == 0 and calls and errors == calls:
        raise CakeError(f"every reward call of the first rollout phase failed ({int(errors)}): {first}")
    if errors and rewards.on_error == "stop":
        raise StopRun(f"--reward-errors stop: {int(errors)} failed reward call(s) in rollout phase {phase}; "
                      f"first: {first}")
    report_failures(failures, c["calls"], info, f"rollout phase {phase}")  # (when nothing stopped: once per phase)
    N = len(everyone)
    metrics = {"reward": everyone.mean().item(), "reward_std": everyone.std().item() if N > 1 else 0.0,
               "gold": gold / N, "reply_len": tokens / N, "end_of_turn": ended / N,
               "rollout_s": seconds / info.world_size, "rollout_tok_s": rate}
    if answered:
        metrics["accuracy"] = correct / answered
    if rewards.functions:
        metrics["unscored"] = unscored / N
        metrics["reward_errors"] = errors
    if rm_scores is not None:
        metrics["proxy"] = proxy / N
    if ref is not None:
        metrics["kl"] = kl / N
    return Sampled(rows, rolls, batch, local, everyone, metrics)


# ----------------------------------------------------------------------------------------------------------------
# The batch provider


class RolloutBatches:
    """get(step, micro) for the shared loop (see the module docstring). `roll_out(phase)` returns (data: dict of
    (rows, ...) tensors of this rank, metrics); `units(batch)` is the number of loss units of a micro-batch (the
    loop normalises the step's summed loss by them); `keep` names stateful parts of the stage (with state_dict /
    load_state_dict) saved with the rollouts."""

    def __init__(self, roll_out: Callable[[int], tuple[dict[str, torch.Tensor], dict[str, float]]], rows: int,
                 epochs: int, num_minibatches: int, batch_size: int, units: Callable[[dict[str, Any]], float],
                 seed: int, info: DistInfo, keep: dict[str, Any] | None = None) -> None:
        if rows % num_minibatches:
            raise CakeError(f"{rows} rollouts per rank cannot be split into --num-minibatches {num_minibatches}")
        self.roll_out, self.rows, self.epochs, self.num_minibatches = roll_out, rows, epochs, num_minibatches
        self.batch_size, self.units, self.seed, self.info = batch_size, units, seed, info
        self.keep = keep or {}
        self.steps_per_phase = epochs * num_minibatches
        self.minibatch = rows // num_minibatches
        self.micro_batches = math.ceil(self.minibatch / batch_size)  # the loop's grad_accum
        self.cache: dict[str, Any] | None = None

    def loop(self, cfg: LoopConfig) -> LoopConfig:
        """The stage's loop config with the micro-batches per step these rollouts make (--loop.grad-accum is not
        read; the saved config keeps what was asked, so re-runs compare it)."""
        return replace(cfg, grad_accum=self.micro_batches)

    def reads_model(self, step: int) -> bool:
        """Whether `get(step, ...)` runs the policy (a new phase's rollouts): a sharded policy is gathered for it."""
        return self.cache is None or self.cache["phase"] != step // self.steps_per_phase

    def get(self, step: int, micro: int) -> dict[str, Any]:
        phase, k = divmod(step, self.steps_per_phase)
        if self.cache is None or self.cache["phase"] != phase:
            data, metrics = self.roll_out(phase)
            self.cache = {"phase": phase, "data": data, "metrics": metrics}
        epoch, mb = divmod(k, self.num_minibatches)
        rows = np.arange(self.rows)
        if self.num_minibatches > 1:  # a seeded shuffle per epoch, then consecutive minibatches of it
            rows = np.sort(np.random.default_rng([self.seed, phase, epoch, self.info.rank]).permutation(self.rows)
                           [mb * self.minibatch:(mb + 1) * self.minibatch])
        idx = torch.as_tensor(rows[micro * self.batch_size:(micro + 1) * self.batch_size])
        data = self.cache["data"]
        width = int(data["mask"][idx].sum(0).nonzero().max()) + 1 if data["mask"][idx].any() else 1
        batch: dict[str, Any] = {k: v[idx][:, :width] if v.ndim == 2 else v[idx] for k, v in data.items()}
        batch["n"] = self.units(batch)
        if micro == 0:  # every step logs its phase's rollout metrics; only the first paid for the rollout
            batch["metrics"] = {**self.cache["metrics"], **({} if k == 0 else {"rollout_s": 0.0})}
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts": self.cache, **{name: part.state_dict() for name, part in self.keep.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cache = state["rollouts"]
        # saved rollouts must have this run's shape before any step trains on them
        if cache is not None and not (isinstance(cache["phase"], int) and isinstance(cache["metrics"], dict) and all(
                isinstance(v, torch.Tensor) and v.size(0) == self.rows for v in cache["data"].values())):
            raise ValueError(f"the saved rollouts are not a phase of {self.rows} rows per rank")
        self.cache = cache
        for name, part in self.keep.items():
            part.load_state_dict(state[name])


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation of verifiable-reward stages


class RewardEval:
    """Greedy replies to held-out prompts (this rank's share): mean reward (val_reward), accuracy where the rows
    have an answer (val_accuracy) and the share that ends its turn (val_end_of_turn), summed over ranks."""

    def __init__(self, rows: list[PromptRow], rewards: Rewards, max_new_tokens: int, info: DistInfo,
                 device: torch.device, make_generator: Callable[[torch.nn.Module], Generator]) -> None:
        self.rows, self.rewards, self.info, self.device = rows[info.rank::info.world_size], rewards, info, device
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.make_generator = make_generator

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        values, c = [], dict.fromkeys(("correct", "answered", "ended", "errors"), 0)
        if self.rows:
            gen = self.make_generator(model)
            rolls = gen.generate([r.messages for r in self.rows], self.params)
            values, c, _, failures = self.rewards.score(self.rows, rolls, gen.tok.pad_id)
            report_failures(failures, c["calls"], self.info, "evaluation")
        acc = all_reduce_sum(torch.tensor([sum(values), len(values), c["correct"], c["answered"], c["ended"],
                                           c["errors"]], dtype=torch.float64, device=self.device), self.info).tolist()
        out = {"val_reward": acc[0] / acc[1], "val_end_of_turn": acc[4] / acc[1]}
        if acc[3]:
            out["val_accuracy"] = acc[2] / acc[3]
        if self.rewards.functions:
            out["val_reward_errors"] = acc[5]
        return out
