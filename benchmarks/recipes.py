"""Training recipes at equal budget: wall time, held-out arithmetic accuracy and end-of-turn rate of `cakelm sft`,
`cakelm grpo`, `cakelm dpo` or `cakelm rloo` variants trained from the same checkpoint (how the `cpu` defaults in
the README were chosen).

    python benchmarks/recipes.py sft --init runs/default/base                  # every SFT variant, ~3 min each
    python benchmarks/recipes.py sft --init runs/default/base --variants default cosine
    python benchmarks/recipes.py sft --init runs/default/base --variants norep ul0.3 ul0.6 ul1.0 ul2.0 \
        seed1-norep seed1-ul1.0 seed2-norep seed2-ul1.0                        # token-level unlikelihood
    python benchmarks/recipes.py sft --init runs/default/base --variants default seed1 seed2 every1 \
        seed1-every1 seed2-every1 rep1.0-every1 rep6.0 seed2-rep6.0 every1-p4   # the repeat penalty
    python benchmarks/recipes.py grpo --init runs/default/sft --limit 800      # GRPO variants, ~3 min each
    python benchmarks/recipes.py grpo --init runs/default/sft --max-steps 5    # a quick smoke run
    python benchmarks/recipes.py dpo --init runs/default/sft                   # DPO variants, ~1.5 min each
    python benchmarks/recipes.py rloo --init runs/default/sft                  # RLOO variants, 1-3.5 min each
    python benchmarks/recipes.py ppo --init runs/default/sft                   # PPO variants, ~1 min each

For dpo, ppo and rloo, every row (and a first row for --init itself) also has the rater's gold reward, the reward
model's score and the KL to --init on the held-out prompts of RUN/prefs (4 replies each, sampled with seed 0),
scored by RUN/rm (the pipeline's preference data and reward model; --run, default runs/default).

Each variant is a set of the stage's options on top of its defaults. Time is the whole stage, data preparation
included; accuracy comes from `cakelm eval` (greedy) on --limit held-out arithmetic problems (200 problems leave
about +-3.5 points of noise; 800 about +-1.7), loops from its `replies` task (the share of greedy replies to
held-out chat openings with a repeated 4-gram); the first row is --init itself. This machine's speed drifts by
tens of percent, so run nothing else meanwhile and compare variants of one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cakelm.checkpoint import load_model
from cakelm.common import peak_memory_mb
from cakelm.config import build_config
from cakelm.data.prefs import load_prefs
from cakelm.rlhf import RLHFEval, heldout_rows, load_scalar_model
from cakelm.stages import eval as eval_stage
from cakelm.stages.table import STAGE

NOREP = {"repeat_unlikelihood": 0.0}  # SFT as it was before the repeat penalty became the default
# PPO as it was before 2026-12-03 (no replay, lr 1e-4, missing end of turn -1): the rows measured then keep it
OLD_PPO = {"replay_coef": 0.0, "optim.lr": 1e-4, "missing_eos_penalty": 1.0, "loop.eval_every": 0}

VARIANTS: dict[str, dict[str, dict]] = {
    "sft": {
        "default": {},  # Muon 1e-2, WSD, 220 steps x 48 conversations, repeat penalty 3.0 every 2nd step
        # the rows measured before the repeat penalty was the default run without it, as they were
        "norep": NOREP,
        "cosine": {**NOREP, "optim.schedule": "cosine"},
        "adamw": {**NOREP, "optim.name": "adamw", "optim.lr": 3e-3},
        "lr2e-2": {**NOREP, "optim.lr": 2e-2},
        "lr5e-3": {"optim.lr": 5e-3},  # half the default rate: does SFT's arithmetic vary less between base models?
        "b64x180": {**NOREP, "loop.batch_size": 64, "loop.max_steps": 180},
        # token-level unlikelihood against loops (README, "Loops"), and two more seeds with and without it
        "ul0.3": {**NOREP, "unlikelihood": 0.3},
        "ul0.6": {**NOREP, "unlikelihood": 0.6},
        "ul1.0": {**NOREP, "unlikelihood": 1.0},
        "ul2.0": {**NOREP, "unlikelihood": 2.0},
        "seed1-norep": {**NOREP, "loop.seed": 1},
        "seed1-ul1.0": {**NOREP, "loop.seed": 1, "unlikelihood": 1.0},
        "seed2-norep": {**NOREP, "loop.seed": 2},
        "seed2-ul1.0": {**NOREP, "loop.seed": 2, "unlikelihood": 1.0},
        # sequence-level unlikelihood on the repeats of the model's own greedy replies (README, "Loops"): its
        # weight, every step or every 2nd (the default), fewer replies a step, and the default on two more seeds
        "seed1": {"loop.seed": 1},
        "seed2": {"loop.seed": 2},
        "rep1.0-every1": {"repeat_unlikelihood": 1.0, "repeat_every": 1},
        "rep6.0": {"repeat_unlikelihood": 6.0},
        "seed2-rep6.0": {"loop.seed": 2, "repeat_unlikelihood": 6.0},
        "every1": {"repeat_every": 1},
        "seed1-every1": {"loop.seed": 1, "repeat_every": 1},
        "seed2-every1": {"loop.seed": 2, "repeat_every": 1},
        "every1-p4": {"repeat_every": 1, "repeat_prompts": 4},  # half the replies a step
    },
    "grpo": {
        "default": {},  # AdamW 1e-4, 60 steps x 16 prompts x 8 replies, exact match
        "steps120": {"loop.max_steps": 120},  # twice the budget
        "steps240": {"loop.max_steps": 240},  # four times: about SFT + 15 on 800 problems (README, 2026-12-04)
        "seed1-steps120": {"loop.seed": 1, "loop.max_steps": 120},
        "seed1-steps240": {"loop.seed": 1, "loop.max_steps": 240},
        "seed2-steps240": {"loop.seed": 2, "loop.max_steps": 240},
        "steps480": {"loop.max_steps": 480},  # eight times (README)
        "seed1-steps480": {"loop.seed": 1, "loop.max_steps": 480},
        "32x8-lr2e-4": {"prompts_per_step": 32, "optim.lr": 2e-4},  # twice the replies per step, at 2x the rate
        "lr3e-4": {"optim.lr": 3e-4, "loop.max_steps": 60},
        "t0.7": {"temperature": 0.7},
        "dr-grpo": {"scale_rewards": "none", "aggregation": "constant"},
        "kl0.04": {"kl_coef": 0.04, "optim.lr": 3e-4, "loop.max_steps": 60},
        "equations": {"rewards": ["exact_match", "equations=0.5"]},
        "32x8": {"prompts_per_step": 32, "loop.max_steps": 40},
        "dyn2": {"oversample": 2},  # DAPO dynamic sampling: 32 prompts sampled, the first 16 with signal trained
        "dyn2-40": {"oversample": 2, "loop.max_steps": 40},  # about the default's rollouts
        "dyn3-40": {"oversample": 3, "loop.max_steps": 40},
        "dyn2-lr2e-4": {"oversample": 2, "optim.lr": 2e-4},
        "epochs2": {"epochs": 2, "loop.max_steps": 120},  # each phase's rollouts trained on twice (the clip matters)
        "mb2": {"num_minibatches": 2, "loop.max_steps": 120},  # two optimizer steps per phase, half the rollouts each
        "mb4": {"num_minibatches": 4, "loop.max_steps": 240},
        "mb2-dyn2": {"num_minibatches": 2, "loop.max_steps": 120, "oversample": 2},
        "seed1": {"loop.seed": 1},  # the default with other rollouts and prompt order: run-to-run spread
        "seed2": {"loop.seed": 2},
        # a quarter of the questions chat openings judged by the rater (which gives a looping reply no length point)
        "chat": {"data": ["arithmetic", "chitchat=0.25"], "rewards": ["exact_match", "rater=0.25"]},
        # SFT's conversations replayed next to the rollouts (the PPO-ptx term DPO and PPO use), at higher rates
        "replay2": {"replay_coef": 2.0},
        "replay2-lr3e-4": {"replay_coef": 2.0, "optim.lr": 3e-4},
        "replay2-lr1e-3": {"replay_coef": 2.0, "optim.lr": 1e-3},
        "replay4-lr1e-3": {"replay_coef": 4.0, "optim.lr": 1e-3},
        # the control: the replay alone (every reward 0, so every advantage is 0), to tell RL's part from SFT's
        "replay2-lr3e-4-only": {"replay_coef": 2.0, "optim.lr": 3e-4, "rewards": ["exact_match=0"]},
        "replay2-lr3e-4-seed1": {"replay_coef": 2.0, "optim.lr": 3e-4, "loop.seed": 1},
        "replay2-lr3e-4-only-seed1": {"replay_coef": 2.0, "optim.lr": 3e-4, "rewards": ["exact_match=0"],
                                      "loop.seed": 1},
        "replay2-lr3e-4-b8": {"replay_coef": 2.0, "optim.lr": 3e-4, "replay_batch": 8},  # half the conversations
        "g16": {"group_size": 16, "prompts_per_step": 8},  # 16 replies per question, the default's replies per step
        "16x16": {"group_size": 16},  # 16 replies per question, twice the replies per step
        # a worse-than-average reply pushed down from its first false equation on, its right steps before it spared
        "first-error": {"credit": "first-error"},
        "first-error-lr2e-4": {"credit": "first-error", "optim.lr": 2e-4},
        "first-error-lr3e-4": {"credit": "first-error", "optim.lr": 3e-4},
        "first-error-steps120": {"credit": "first-error", "loop.max_steps": 120},
        "first-error-seed1": {"credit": "first-error", "loop.seed": 1},
    },
    "dpo": {  # evaluations during training off: they sample, and take longer than the training
        # sigmoid, beta 0.1, RPO alpha 4, AdamW 1e-4, 40 steps x 32 pairs, 16 SFT conversations replayed at 2
        "default": {"loop.eval_every": 0},
        "seed1": {"loop.seed": 1, "loop.eval_every": 0},
        # SFT's data replayed next to the pairs at other weights (InstructGPT's PPO-ptx term, SFT data for
        # pretraining data); off, as until 2026-12-03 (the rows below it were measured without it)
        "replay1": {"replay_coef": 1.0, "loop.eval_every": 0},
        "replay4": {"replay_coef": 4.0, "loop.eval_every": 0},
        "noreplay": {"replay_coef": 0.0, "loop.eval_every": 0},
        "noreplay-seed1": {"replay_coef": 0.0, "loop.seed": 1, "loop.eval_every": 0},
        "rpo1": {"rpo_alpha": 1.0, "replay_coef": 0.0, "loop.eval_every": 0},
        "plain": {"rpo_alpha": 0.0, "replay_coef": 0.0, "loop.eval_every": 0},
        "beta0.3": {"rpo_alpha": 0.0, "beta": 0.3, "replay_coef": 0.0, "loop.eval_every": 0},
        "lr5e-5": {"rpo_alpha": 0.0, "optim.lr": 5e-5, "replay_coef": 0.0, "loop.eval_every": 0},
        "steps20": {"rpo_alpha": 0.0, "loop.max_steps": 20, "replay_coef": 0.0, "loop.eval_every": 0},
        "rpo1-lr5e-5": {"rpo_alpha": 1.0, "optim.lr": 5e-5, "replay_coef": 0.0, "loop.eval_every": 0},
        "rpo2": {"rpo_alpha": 2.0, "replay_coef": 0.0, "loop.eval_every": 0},
        "rpo2-beta0.3": {"rpo_alpha": 2.0, "beta": 0.3, "replay_coef": 0.0, "loop.eval_every": 0},
        "rpo1-steps20": {"rpo_alpha": 1.0, "loop.max_steps": 20, "replay_coef": 0.0, "loop.eval_every": 0},
    },
    "ppo": {  # evaluations during training off, as for dpo
        # 48 steps x 64 replies, KL 0.3, lr 3e-4, 16 SFT conversations replayed at 2, missing end of turn -3
        "default": {"loop.eval_every": 0},
        "seed1": {"loop.seed": 1, "loop.eval_every": 0},
        # the rows below are measured against the defaults before 2026-12-03 (OLD_PPO: lr 1e-4, penalty 1, no replay)
        "old-default": OLD_PPO,
        "kl0.1": {**OLD_PPO, "kl_coef": 0.1},  # the default until 2026-12-02
        "em2": {**OLD_PPO, "verifiers": ["exact_match=2"], "kl_coef": 0.1},
        "kl0.2": {**OLD_PPO, "kl_coef": 0.2},
        "kl0.3": {**OLD_PPO, "kl_coef": 0.3},
        "kl0.3-seed1": {**OLD_PPO, "kl_coef": 0.3, "loop.seed": 1},  # other rollouts: the spread
        "kl0.5": {**OLD_PPO, "kl_coef": 0.5},
        "em2-kl0.3": {**OLD_PPO, "verifiers": ["exact_match=2"], "kl_coef": 0.3},
        "em4-kl0.3": {**OLD_PPO, "verifiers": ["exact_match=4"], "kl_coef": 0.3},
        # adaptive KL (Ziegler et al. 2019) toward 0.5 nats per reply; a horizon of 128 replies lets the coefficient
        # move up to 10% per phase of 64 replies (the default 10,000 barely moves it in this run's 768 replies)
        "kl-t0.5": {**OLD_PPO, "kl_target": 0.5, "kl_horizon": 128, "kl_coef": 0.1},
        # a larger step, and a larger penalty for a reply that never ends its turn (SFT's chat replies run into the
        # token limit 13% of the time at temperature 1; DPO brings that to 2%, PPO at the old defaults does not)
        "lr3e-4": {**OLD_PPO, "optim.lr": 3e-4},
        "eos3": {**OLD_PPO, "missing_eos_penalty": 3.0},
        "lr3e-4-eos3": {**OLD_PPO, "optim.lr": 3e-4, "missing_eos_penalty": 3.0},
        "lr3e-4-kl0.5": {**OLD_PPO, "optim.lr": 3e-4, "kl_coef": 0.5},
        # SFT's data replayed next to the rollouts (InstructGPT's PPO-ptx; DPO's --replay-coef)
        "replay2": {**OLD_PPO, "replay_coef": 2.0},
        "replay1-lr3e-4": {**OLD_PPO, "replay_coef": 1.0, "optim.lr": 3e-4},
        "replay2-lr3e-4": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 3e-4},
        "replay2-lr3e-4-seed1": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 3e-4, "loop.seed": 1},
        "replay4-lr3e-4": {**OLD_PPO, "replay_coef": 4.0, "optim.lr": 3e-4},
        "replay2-lr3e-4-kl0.1": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 3e-4, "kl_coef": 0.1},
        "replay2-lr5e-4": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 5e-4},
        "replay2-lr5e-4-seed1": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 5e-4, "loop.seed": 1},
        "replay2-lr5e-4-eos3": {**OLD_PPO, "replay_coef": 2.0, "optim.lr": 5e-4, "missing_eos_penalty": 3.0},
        "replay-b8": {"replay_batch": 8, "loop.eval_every": 0},  # the default with half the replayed conversations
    },
    "rloo": {  # evaluations during training off, as for dpo; every row names its prompts x replies per step
        "8x8": {"loop.eval_every": 0},  # the default: arithmetic + chitchat, exact match + reward model, KL 0.05
        "16x4": {"group_size": 4, "prompts_per_step": 16, "loop.eval_every": 0},
        "arith-em": {"data": ["arithmetic"], "rewards": ["exact_match"], "reward_model": "", "group_size": 4,
                     "prompts_per_step": 16, "loop.eval_every": 0},
        "arith": {"data": ["arithmetic"], "group_size": 4, "prompts_per_step": 16, "loop.eval_every": 0},
        "rm-only": {"rewards": ["reward_model"], "group_size": 4, "prompts_per_step": 16, "loop.eval_every": 0},
        "lr3e-5": {"optim.lr": 3e-5, "group_size": 4, "prompts_per_step": 16, "loop.eval_every": 0},
        "kl0": {"kl_coef": 0.0, "group_size": 4, "prompts_per_step": 16, "loop.eval_every": 0},
    },
}


def preference_judge(init: str, prefs: str, rm: str, max_new_tokens: int = 64) -> RLHFEval:
    """Gold, proxy and KL to --init on the held-out prompts of the pipeline's preference data."""
    ref, tok, _ = load_model(init)
    rows = heldout_rows(prefs, load_prefs(prefs)[1], tok, ref.cfg.max_seq_len - max_new_tokens)
    return RLHFEval(rows, tok, load_scalar_model(rm)[0], ref.eval(), max_new_tokens, seed=0, n=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=list(VARIANTS))
    ap.add_argument("--init", required=True, help="checkpoint to train from (runs/default/base for sft, "
                                                  "runs/default/sft for grpo and dpo)")
    ap.add_argument("--variants", nargs="+", default=None, help="names from the stage's table (default: all)")
    ap.add_argument("--max-steps", type=int, default=0, help="override every variant's steps (0 = keep)")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems to evaluate")
    ap.add_argument("--run", type=Path, default=Path("runs/default"), help="the pipeline run whose preference data "
                    "(RUN/prefs) and reward model (RUN/rm) dpo, ppo and rloo use and are judged with")
    args = ap.parse_args()
    table = VARIANTS[args.stage]
    names = args.variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown {args.stage} variants {unknown}; choose from {list(table)}")
    cls, run = STAGE[args.stage].config, STAGE[args.stage].main
    rlhf = args.stage in ("dpo", "ppo", "rloo")
    prefs, rm = str(args.run / "prefs"), str(args.run / "rm")
    judge = preference_judge(args.init, prefs, rm) if rlhf else None
    # where the stage reads the run's preference data and reward model (rloo: the reward model only)
    inputs = {"dpo": {"data": prefs, "reward_model": rm}, "ppo": {"data": prefs, "reward_model": rm},
              "rloo": {"reward_model": rm}}.get(args.stage, {})

    def measure(ckpt: str) -> tuple[float, float, dict[str, float]]:
        ev = build_config(eval_stage.EvalConfig, ("benchmark", {"ckpt": ckpt, "tasks": ["arithmetic", "replies"],
                                                                 "limit": args.limit, "progress": False}))
        result = eval_stage.evaluate_checkpoint(ev)
        task = result["tasks"]["arithmetic"]
        prefs = judge(load_model(ckpt)[0].eval()) if judge else {}
        return task["accuracy"], task["end_of_turn"], result["replies"]["repeated"], prefs

    rows = [("(init)", 0, 0.0, *measure(args.init))]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            opts = {**table[name], **({"loop.max_steps": args.max_steps} if args.max_steps else {})}
            cfg = build_config(cls, ("variant " + name, opts), ("benchmark", {
                "init": args.init, "out": str(Path(tmp) / name), "loop.progress": False, **inputs}))
            t0 = time.time()
            run(cfg)
            rows.append((name, cfg.loop.max_steps, time.time() - t0, *measure(str(Path(tmp) / name))))
    print(f"\n{args.stage} from {args.init}, {args.limit} held-out problems"
          + (f"; gold, proxy and KL on {len(judge.rows)} held-out prompts x 4 replies" if judge else ""))
    print(f"{'variant':<12} {'steps':>6} {'time':>8} {'accuracy':>9} {'ends turn':>10} {'loops':>6}"
          + (f" {'gold':>7} {'proxy':>7} {'KL':>6}" if judge else ""))
    for name, steps, seconds, acc, eot, loops, prefs in rows:
        print(f"{name:<12} {steps:>6} {seconds:>7.1f}s {100 * acc:>8.1f}% {100 * eot:>9.1f}% {100 * loops:>5.1f}%"
              + (f" {prefs['gold']:>7.3f} {prefs['proxy']:>7.3f} {prefs['kl']:>6.2f}" if prefs else ""))
    print(f"peak memory {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
