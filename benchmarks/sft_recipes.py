"""SFT recipes at equal budget: wall time, held-out arithmetic accuracy and end-of-turn rate of `cakelm sft`
variants fine-tuned from the same base model (how the `cpu` defaults in the README were chosen).

    python benchmarks/sft_recipes.py --base runs/default/base                       # every variant, ~3 min each
    python benchmarks/sft_recipes.py --base runs/default/base --variants default cosine
    python benchmarks/sft_recipes.py --base runs/default/base --max-steps 20        # a quick smoke run

Each variant is a set of `cakelm sft` options on top of the defaults (the default mixture of chitchat,
arithmetic and gsm). Time is the whole `sft` stage, data preparation included; accuracy comes from `cakelm
eval` on the 200 held-out arithmetic problems. This machine's speed drifts by tens of percent, so run nothing
else meanwhile and compare variants of one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cakelm.common import peak_memory_mb
from cakelm.config import build_config
from cakelm.stages import eval as eval_stage
from cakelm.stages import sft

VARIANTS: dict[str, dict] = {
    "default": {},  # Muon 1e-2, WSD, 220 steps x 48 conversations
    "cosine": {"optim.schedule": "cosine"},
    "adamw": {"optim.name": "adamw", "optim.lr": 3e-3},
    "lr2e-2": {"optim.lr": 2e-2},
    "b64x180": {"loop.batch_size": 64, "loop.max_steps": 180},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="checkpoint to fine-tune (e.g. runs/default/base)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max-steps", type=int, default=0, help="override every variant's steps (0 = keep)")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems to evaluate")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            opts = {**VARIANTS[name], **({"loop.max_steps": args.max_steps} if args.max_steps else {})}
            cfg = build_config(sft.SFTConfig, ("variant " + name, opts), ("benchmark", {
                "init": args.base, "out": str(Path(tmp) / name), "loop.progress": False}))
            t0 = time.time()
            sft.main(cfg)
            seconds = time.time() - t0
            ev = build_config(eval_stage.EvalConfig, ("benchmark", {"ckpt": str(Path(tmp) / name), "tasks":
                                                                     ["arithmetic"], "limit": args.limit,
                                                                     "progress": False}))
            task = eval_stage.evaluate_checkpoint(ev)["tasks"]["arithmetic"]
            rows.append((name, f"{cfg.loop.max_steps} x {cfg.loop.batch_size}", seconds, task["accuracy"],
                         task["end_of_turn"]))
    print(f"\n{'variant':<10} {'steps x batch':>14} {'sft time':>9} {'accuracy':>9} {'ends turn':>10}")
    for name, shape, seconds, acc, eot in rows:
        print(f"{name:<10} {shape:>14} {seconds:>8.1f}s {100 * acc:>8.1f}% {100 * eot:>9.1f}%")
    print(f"peak memory {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
