"""Greedy accuracy next to maj@k and pass@k on the same problems: the pipeline's eval samples pass@k and maj@k on the
first `pass_n` held-out arithmetic problems (RUN/eval.json), while its greedy accuracy covers all of them; this
re-runs the greedy replies of each chat model with the eval's own functions and scores the first `pass_n`.

    python benchmarks/maj_vs_greedy.py runs/default          # ~15 s on 2 cores

Prints one row per model: greedy on those problems, pass@1, pass@max(k) and maj@max(k) from eval.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cakelm.checkpoint import is_checkpoint, load_model
from cakelm.common import hardware_info
from cakelm.config import build_config
from cakelm.engine import Engine
from cakelm.stages import eval as eval_stage
from cakelm.tasks import is_correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished `cakelm pipeline` run (its eval.json and checkpoints)")
    args = ap.parse_args()
    path = args.run / "eval.json"
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"maj_vs_greedy: cannot read {path}: {e}") from None
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; {args.run}")
    print(f"{'model':<8} {'problems':>8} {'greedy':>8} {'pass@1':>8} {'pass@k':>8} {'maj@k':>8}")
    order = ("sft", "dpo", "ppo", "grpo")  # the pipeline's order (eval.json's keys are sorted)
    for name, r in sorted(models.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])):
        t = r.get("tasks", {}).get("arithmetic", {})
        if "maj_at_k" not in t or not is_checkpoint(args.run / name):
            continue  # the base model (no samples), or an eval.json from before maj@k
        n, (k, maj) = t["pass_n"], next(iter(t["maj_at_k"].items()))
        model, tok, _ = load_model(args.run / name)
        cfg = build_config(eval_stage.EvalConfig, ("benchmark", {"ckpt": str(args.run / name), "limit": t["n"],
                                                                 "progress": False}))
        problems = eval_stage.load_task("arithmetic", t["n"])
        kept, done = eval_stage.greedy_replies(Engine(model.eval(), tok), r["format"], [p[0] for p in problems],
                                               cfg, "greedy")
        right = [is_correct(c.text, problems[i][1]) for i, c in zip(kept, done)][:n]
        print(f"{name:<8} {n:>8} {sum(right) / n:>8.1%} {t['pass_at_k']['1']:>8.1%} {t['pass_at_k'][k]:>8.1%} "
              f"{maj:>8.1%}   (k = {k})")


if __name__ == "__main__":
    main()
