"""Training recipes at equal budget: wall time, held-out arithmetic accuracy and end-of-turn rate of `cakelm sft`
or `cakelm grpo` variants trained from the same checkpoint (how the `cpu` defaults in the README were chosen).

    python benchmarks/recipes.py sft --init runs/default/base                  # every SFT variant, ~3 min each
    python benchmarks/recipes.py sft --init runs/default/base --variants default cosine
    python benchmarks/recipes.py grpo --init runs/default/sft --limit 800      # GRPO variants, ~3 min each
    python benchmarks/recipes.py grpo --init runs/default/sft --max-steps 5    # a quick smoke run

Each variant is a set of the stage's options on top of its defaults. Time is the whole stage, data preparation
included; accuracy comes from `cakelm eval` (greedy) on --limit held-out arithmetic problems (200 problems leave
about +-3.5 points of noise; 800 about +-1.7). This machine's speed drifts by tens of percent, so run nothing else
meanwhile and compare variants of one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cakelm.common import peak_memory_mb
from cakelm.config import build_config
from cakelm.stages import eval as eval_stage
from cakelm.stages import grpo, sft

VARIANTS: dict[str, dict[str, dict]] = {
    "sft": {
        "default": {},  # Muon 1e-2, WSD, 220 steps x 48 conversations
        "cosine": {"optim.schedule": "cosine"},
        "adamw": {"optim.name": "adamw", "optim.lr": 3e-3},
        "lr2e-2": {"optim.lr": 2e-2},
        "b64x180": {"loop.batch_size": 64, "loop.max_steps": 180},
    },
    "grpo": {
        "default": {},  # AdamW 1e-4, 80 steps x 16 prompts x 8 replies, exact match
        "lr3e-4": {"optim.lr": 3e-4, "loop.max_steps": 60},
        "t0.7": {"temperature": 0.7},
        "dr-grpo": {"scale_rewards": "none", "aggregation": "constant"},
        "beta0.04": {"beta": 0.04, "optim.lr": 3e-4, "loop.max_steps": 60},
        "equations": {"rewards": ["exact_match", "equations=0.5"]},
        "32x8": {"prompts_per_step": 32, "loop.max_steps": 40},
    },
}
STAGES = {"sft": (sft.SFTConfig, sft.main), "grpo": (grpo.GRPOConfig, grpo.main)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--init", required=True, help="checkpoint to train from (runs/default/base for sft, "
                                                  "runs/default/sft for grpo)")
    ap.add_argument("--variants", nargs="+", default=None, help="names from the stage's table (default: all)")
    ap.add_argument("--max-steps", type=int, default=0, help="override every variant's steps (0 = keep)")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems to evaluate")
    args = ap.parse_args()
    table = VARIANTS[args.stage]
    names = args.variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown {args.stage} variants {unknown}; choose from {list(table)}")
    cls, run = STAGES[args.stage]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            opts = {**table[name], **({"loop.max_steps": args.max_steps} if args.max_steps else {})}
            cfg = build_config(cls, ("variant " + name, opts), ("benchmark", {
                "init": args.init, "out": str(Path(tmp) / name), "loop.progress": False}))
            t0 = time.time()
            run(cfg)
            seconds = time.time() - t0
            ev = build_config(eval_stage.EvalConfig, ("benchmark", {"ckpt": str(Path(tmp) / name), "tasks":
                                                                     ["arithmetic"], "limit": args.limit,
                                                                     "progress": False}))
            task = eval_stage.evaluate_checkpoint(ev)["tasks"]["arithmetic"]
            rows.append((name, cfg.loop.max_steps, seconds, task["accuracy"], task["end_of_turn"]))
    print(f"\n{args.stage} from {args.init}, {args.limit} held-out problems")
    print(f"{'variant':<10} {'steps':>6} {'time':>8} {'accuracy':>9} {'ends turn':>10}")
    for name, steps, seconds, acc, eot in rows:
        print(f"{name:<10} {steps:>6} {seconds:>7.1f}s {100 * acc:>8.1f}% {100 * eot:>9.1f}%")
    print(f"peak memory {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
