"""RL needs a competent start: GRPO from the base model and from a chat model at equal budget, on a finished
pipeline run: the share of groups with no signal (every reply scored the same) and the accuracy over the steps.

    python benchmarks/rl_start.py runs/default          # ~2 min on 2 cores: one GRPO run from RUN/base
    python -m cakelm.report runs/default                # the report's section 13 draws the plot

RL from a chat model is the pipeline's own GRPO stage (RUN/grpo, from RUN/dpo: SFT, then DPO). RL from the base
model is the same stage with the same settings (the run's preset, seed, prompts, rewards, steps) from RUN/base with
`--from-base`, into RUN/rl_start/grpo_base: rollouts in the chat format, which the base model has never seen, the
way DeepSeek-R1-Zero trained a base model. With a reward of 1 for a right answer and 0 otherwise, a group of
replies that are all wrong has no signal (every advantage is 0), so a model that never succeeds gets no gradient
at all. The script
writes RUN/rl_start.json (both runs' per-step zero-signal share, sampled accuracy and end-of-turn share, and
their held-out greedy accuracy where they measured it) and prints a table every 10 steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cakelm.checkpoint import is_checkpoint, load_meta
from cakelm.common import write_json_atomic
from cakelm.stages import pipeline
from cakelm.stages.table import STAGE

KEYS = ("zero_signal", "accuracy", "end_of_turn", "reward", "val_accuracy")


def curve(metrics: Path) -> list[dict[str, Any]]:
    """The per-step rows of a GRPO run's metrics.jsonl, only the keys this comparison plots."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS if k in r}} for r in rows if "step" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished `cakelm pipeline` run directory (with base/ and grpo/)")
    ap.add_argument("--skip-training", action="store_true", help="reuse RUN/rl_start/grpo_base as it is")
    args = ap.parse_args()
    run: Path = args.run
    grpo_out = run / str(STAGE["grpo"].out)
    if not (run / "pipeline.json").is_file() or not is_checkpoint(grpo_out) or not is_checkpoint(run / "base"):
        raise SystemExit(f"rl_start: {run} is not a finished pipeline run (pipeline.json, base/ and grpo/)")
    cfg = pipeline.run_config(run)
    out = run / "rl_start" / "grpo_base"
    t0 = time.time()
    if not args.skip_training:
        stage_cfg = pipeline.stage_config(STAGE["grpo"], cfg, run)  # the pipeline's GRPO, exactly
        stage_cfg.init, stage_cfg.out = str(run / str(STAGE["pretrain"].out)), str(out)
        stage_cfg.from_base, stage_cfg.overwrite = True, True
        STAGE["grpo"].main(stage_cfg)
    start = str(load_meta(grpo_out).get("parent_stage") or "chat model")  # the model the pipeline's GRPO started from
    runs = {f"from {start.upper()}": curve(grpo_out / "metrics.jsonl"), "from base": curve(out / "metrics.jsonl")}
    write_json_atomic(run / "rl_start.json", {"runs": runs, "seconds": time.time() - t0})
    print(f"{'step':>5} " + " ".join(f"{name + ': ' + k:>24}" for name in runs for k in ("zero signal", "accuracy")))
    by_step = {name: {r["step"]: r for r in rows} for name, rows in runs.items()}
    last = max(max(s) for s in by_step.values())
    for step in [1, *range(10, last + 1, 10)]:
        cells = []
        for name in runs:
            r = by_step[name].get(step, {})
            cells += [f"{100 * r['zero_signal']:.0f}%" if "zero_signal" in r else "-",
                      f"{100 * r['accuracy']:.0f}%" if "accuracy" in r else "-"]
        print(f"{step:>5} " + " ".join(f"{c:>24}" for c in cells))
    for name, rows in runs.items():
        held = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        print(f"{name}: held-out greedy accuracy " + ", ".join(f"step {s} {100 * a:.1f}%" for s, a in held))
    print(f"-> {run / 'rl_start.json'} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
