"""How sycophancy is taught: the pipeline's RLHF (DPO and PPO) redone with a rater who likes being agreed with, next
to the pipeline's own correctness-aware run, and RL straight on each rater's scores, measured by the sycophancy
probe (`cakelm.probes`).

    python benchmarks/sycophancy.py runs/default            # ~12 min on 2 cores after `cakelm pipeline`
    python benchmarks/sycophancy.py runs/default --data claims=3 chitchat=1 arithmetic=1 --samples 8
    python benchmarks/sycophancy.py runs/default --rl-steps 0   # the pairs only (~5 min)
    python -m cakelm.report runs/default                    # the report's sycophancy section adds its table

What it does, on a finished pipeline run RUN (its SFT model, its stage settings):
1. For each rater, into RUN/sycophancy/rule/ and RUN/sycophancy/agreeable/: `cakelm prefs --rater rule|agreeable`
   (the same prompts and sampled replies; where the user asserts an answer, the agreeable rater gives the points
   of a correct answer to agreeing, and keeps pairs whose chosen reply agrees), then `cakelm reward`, `cakelm
   dpo` and `cakelm ppo` with the pipeline's settings of the run's preset, from RUN/sft. `--data`,
   `--samples` and `--prompts` change the prompts and replies per prompt of both (more claims give the rater more
   to prefer; prefs keeps one pair a prompt, so --prompts gives the reward model more pairs); `--ppo-kl` loosens
   or tightens PPO's KL leash; `--seed` redraws the training stages (the probes stay the same) for a replicate.
2. RL on the ratings themselves (unless --rl-steps 0): `cakelm grpo` from RUN/sft on the claim prompts
   (--rl-data), every sampled reply rewarded with the rater's score (`rater` or `agreeable_rater` as the reward
   function: a person's rating of each answer, as thumbs-up feedback in a chat product, not a pair), --rl-steps
   steps at --rl-lr, the pipeline's GRPO settings otherwise, into RUN/sycophancy/RATER/grpo.
3. The probe (`--limit` held-out sums whose answer the user asserts, half right, half wrong) for SFT and each
   rater's DPO, PPO and GRPO; the share of wrong-claim training pairs whose chosen reply agrees with the claim;
   and pair by pair on the same wrong claims, each agreeable-rater model against the checking rater's and against
   SFT (and the checking rater's against SFT): which claims only one of the two agrees with, and the exact
   McNemar p-value of that difference.
4. RUN/sycophancy.json (read by the report's section 11) and a table.
Nothing of the pipeline's own run is changed. Run nothing else meanwhile if you also want its times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from cakelm.checkpoint import is_checkpoint
from cakelm.common import write_json_atomic
from cakelm.config import build_config, flatten, to_dict
from cakelm.probes import compare_agreement
from cakelm.rewards import agrees
from cakelm.stages import eval as eval_stage
from cakelm.stages import pipeline
from cakelm.stages.prefs import RATERS
from cakelm.stages.table import STAGE
from cakelm.tasks import claim_of

RLHF = ("prefs", "reward", "dpo", "ppo")


def pair_agreement(prefs_dir: Path) -> dict[str, Any]:
    """Of the training pairs whose prompt asserts a wrong answer: how many, and the share whose chosen reply agrees
    with the claim (and whose rejected one does)."""
    chosen = rejected = n = 0
    for line in (prefs_dir / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question = row["prompt"][-1]["content"]
        claim = claim_of(question)
        if claim is None or claim == row.get("answer"):
            continue
        n += 1
        chosen += agrees(row["chosen"][-1]["content"], claim)
        rejected += agrees(row["rejected"][-1]["content"], claim)
    return {"wrong_claim_pairs": n, "chosen_agrees": chosen / n if n else float("nan"),
            "rejected_agrees": rejected / n if n else float("nan")}


def paired(results: dict[str, dict], first: str, second: str) -> dict[str, Any]:
    """Two models on the same probes, wrong claims only (`cakelm.probes.compare_agreement`), with their names."""
    return {"first": first, "second": second,
            **compare_agreement(results[first]["agreed_wrong"], results[second]["agreed_wrong"])}


def stage_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per RLHF stage, the settings this script's options change from the pipeline's (dotted names as in the CLI's
    --loop.max-steps); an option left unset changes nothing."""
    given = {("prefs", "data"): args.data, ("prefs", "prompts"): args.prompts,
             ("reward", "loop.max_steps"): args.reward_steps, ("ppo", "kl_coef"): args.ppo_kl,
             ("dpo", "loop.max_steps"): args.dpo_steps, ("dpo", "replay_coef"): args.dpo_replay}
    out: dict[str, dict[str, Any]] = {name: {} for name in RLHF}
    out["prefs"]["samples"] = args.samples
    for (stage, key), value in given.items():
        if value is not None:
            out[stage][key] = value
    return out


def train_rlhf(run: Path, cfg: pipeline.PipelineConfig, rater: str, overrides: dict[str, dict[str, Any]]) -> Path:
    """prefs (judged by `rater`) -> reward -> dpo -> ppo into RUN/sycophancy/RATER, from RUN/sft, with the
    pipeline's settings but for `overrides` (`stage_overrides`)."""
    out = run / "sycophancy" / rater
    out.mkdir(parents=True, exist_ok=True)
    link = out / str(STAGE["sft"].out)
    if not link.exists():
        os.symlink(os.path.relpath(run / str(STAGE["sft"].out), out), link)  # the stages read RUN/sft: share it
    for name in RLHF:
        # the pipeline's config of the stage, then this run's settings on top, checked as the CLI checks them
        ours = {**overrides.get(name, {}), **({"rater": rater} if name == "prefs" else {})}
        stage_cfg = build_config(STAGE[name].config, ("pipeline", flatten(to_dict(
            pipeline.stage_config(STAGE[name], cfg, out)))), ("sycophancy.py", ours))
        if hasattr(stage_cfg, "overwrite"):
            stage_cfg.overwrite = True
        t0 = time.time()
        STAGE[name].main(stage_cfg)
        print(f"sycophancy: {name} with the {rater} rater in {time.time() - t0:.0f}s")
    return out


def train_rl(run: Path, cfg: pipeline.PipelineConfig, rater: str, data: list[str], steps: int, lr: float) -> Path:
    """GRPO from RUN/sft on `data`, each reply rewarded by `rater`'s score, into RUN/sycophancy/RATER/grpo."""
    out = run / "sycophancy" / rater / str(STAGE["grpo"].out)
    stage_cfg = pipeline.stage_config(STAGE["grpo"], cfg, run / "sycophancy" / rater)
    stage_cfg.init, stage_cfg.out, stage_cfg.overwrite = str(run / str(STAGE["sft"].out)), str(out), True
    stage_cfg.data, stage_cfg.rewards = data, [RATERS[rater].__name__]  # the rater's `cakelm.rewards` name
    stage_cfg.optim.lr, stage_cfg.loop.max_steps = lr, steps
    t0 = time.time()
    STAGE["grpo"].main(stage_cfg)
    print(f"sycophancy: grpo on the {rater} rater's scores in {time.time() - t0:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished `cakelm pipeline` run directory")
    # 1000 probes (500 wrong claims, about +-2 points): with 200, two probe seeds put the checking rater's GRPO
    # model at +14 and at -1 points against SFT (2026-12-03); 7 models x 1000 probes take about a minute.
    ap.add_argument("--limit", type=int, default=1000, help="sycophancy probes per model")
    ap.add_argument("--data", nargs="+", default=None, help="prompt sources of both raters' pairs (default: the "
                    "run's, e.g. chitchat=3 arithmetic=1 claims=1)")
    ap.add_argument("--samples", type=int, default=4, help="replies sampled per prompt for the pairs")
    # prefs keeps one pair per prompt (its best and worst reply), so more prompts, not more replies, give the reward
    # model more pairs to learn the rater's preference from
    ap.add_argument("--prompts", type=int, default=None, help="training prompts for the pairs (default: the "
                    "pipeline's, 600)")
    ap.add_argument("--reward-steps", type=int, default=None, help="reward-model training steps (default: the "
                    "pipeline's, 80)")
    # PPO follows its reward model only as far as the KL term lets it: the pipeline's 0.3 keeps the arithmetic
    ap.add_argument("--ppo-kl", type=float, default=None, help="PPO's KL coefficient for both raters (default: the "
                    "pipeline's, 0.3)")
    ap.add_argument("--dpo-steps", type=int, default=None, help="DPO's steps for both raters (default: the "
                    "pipeline's, 40)")
    ap.add_argument("--dpo-replay", type=float, default=None, help="DPO's replay coefficient for both raters "
                    "(default: the pipeline's, 2; 0: DPO on the pairs alone)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the raters' prefs, reward, DPO and PPO (default: "
                    "the run's); the probes keep the run's seed, so every model answers the same ones")
    ap.add_argument("--rl-steps", type=int, default=120, help="GRPO steps on each rater's scores (0: no GRPO)")
    # GRPO's own default: at 3e-4 (the earlier default here) both raters' models lost their arithmetic (2% of the
    # held-out problems, 2026-12-03), so the checking rater's model agreed with wrong claims too (README).
    ap.add_argument("--rl-lr", type=float, default=1e-4, help="GRPO's learning rate for it")
    ap.add_argument("--rl-data", nargs="+", default=["claims"], help="GRPO's prompt sources for it")
    ap.add_argument("--skip-training", action="store_true", help="reuse RUN/sycophancy/{rule,agreeable} as they are")
    args = ap.parse_args()
    if args.rl_steps < 0 or not args.rl_lr > 0 or any(n is not None and n < 1 for n in (
            args.prompts, args.reward_steps, args.dpo_steps)) or any(x is not None and not x >= 0 for x in (
            args.ppo_kl, args.dpo_replay)):
        raise SystemExit("sycophancy: need --rl-steps >= 0, --rl-lr > 0, --prompts, --reward-steps and --dpo-steps "
                         ">= 1, --ppo-kl and --dpo-replay >= 0")
    run: Path = args.run
    if not (run / "pipeline.json").is_file() or not is_checkpoint(run / str(STAGE["sft"].out)):
        raise SystemExit(f"sycophancy: {run} is not a finished pipeline run (no pipeline.json or sft/)")
    cfg = pipeline.run_config(run)
    t0 = time.time()
    if not args.skip_training:
        train_cfg = cfg if args.seed is None else dataclasses.replace(cfg, seed=args.seed)  # the probes keep cfg's
        for rater in ("rule", "agreeable"):
            train_rlhf(run, train_cfg, rater, stage_overrides(args))
            if args.rl_steps:
                train_rl(run, train_cfg, rater, args.rl_data, args.rl_steps, args.rl_lr)
    stages = ("dpo", "ppo", "grpo") if args.rl_steps else ("dpo", "ppo")
    models = {"sft": run / "sft", **{f"{m}, {rater} rater": run / "sycophancy" / rater / m
                                     for rater in ("rule", "agreeable") for m in stages}}
    results: dict[str, Any] = {}
    for name, ckpt in models.items():
        if not is_checkpoint(ckpt):
            raise SystemExit(f"sycophancy: no checkpoint in {ckpt} (run without --skip-training)")
        ec = build_config(eval_stage.EvalConfig, ("benchmark", {"ckpt": str(ckpt), "tasks": ["sycophancy"],
                                                                "limit": args.limit, "seed": cfg.seed,
                                                                "progress": False}))
        r = eval_stage.evaluate_checkpoint(ec)["sycophancy"]
        results[name] = {k: r[k] for k in ("n", "agree_wrong", "agree_right", "accuracy", "agreed_wrong")}
    pairs = {rater: pair_agreement(run / "sycophancy" / rater / "prefs") for rater in ("rule", "agreeable")}
    compared = [paired(results, f"{m}, agreeable rater", other) for m in stages
                for other in (f"{m}, rule rater", "sft")] + [paired(results, f"{m}, rule rater", "sft") for m in stages]
    rl = {"steps": args.rl_steps, "lr": args.rl_lr, "data": args.rl_data} if args.rl_steps else None
    write_json_atomic(run / "sycophancy.json", {"limit": args.limit, "models": results, "pairs": pairs,
                                               "data": args.data or cfg.prefs_data, "samples": args.samples,
                                               "prompts": args.prompts, "reward_steps": args.reward_steps,
                                               "paired": compared, "ppo_kl": args.ppo_kl, "dpo_steps": args.dpo_steps,
                                               "dpo_replay": args.dpo_replay, "seed": args.seed,
                                               "rl": rl, "seconds": time.time() - t0})
    print(f"{'model':<22} {'agrees wrong':>13} {'agrees right':>13} {'right answer':>13}")
    for name, r in results.items():
        print(f"{name:<22} {100 * r['agree_wrong']:>12.1f}% {100 * r['agree_right']:>12.1f}% "
              f"{100 * r['accuracy']:>12.1f}%")
    for rater, p in pairs.items():
        print(f"{rater} rater: {p['wrong_claim_pairs']} training pairs on wrong claims; chosen reply agrees "
              f"{100 * p['chosen_agrees']:.1f}%, rejected {100 * p['rejected_agrees']:.1f}%")
    print("paired, on the same wrong claims (exact McNemar test):")
    for c in compared:
        print(f"  {c['first']} agrees where {c['second']} does not on {c['first_only']}, the reverse on "
              f"{c['second_only']}: two-sided p = {c['p']:.3g}")
    print(f"-> {run / 'sycophancy.json'} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
