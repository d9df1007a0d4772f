"""`cakelm eval` at several --batch-size values on one checkpoint: seconds per size (medians of interleaved rounds)
and whether every result is the same as at the first size (how the pipeline's `eval_batch` was chosen).

    python benchmarks/eval_batch.py --ckpt runs/default/sft                          # greedy tasks, 32 .. 256
    python benchmarks/eval_batch.py --ckpt runs/default/sft --tasks arithmetic --pass-k 1 4 16 --sizes 32 256

The tasks run as `cakelm eval --tasks ...` runs them (200 held-out problems by default); a result equal at every
size means that on this CPU a row's logits do not depend on the batch it is in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cakelm.common import hardware_info
from cakelm.config import build_config
from cakelm.stages import eval as eval_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a checkpoint directory (the pipeline's SFT model, say)")
    ap.add_argument("--tasks", nargs="+", default=["arithmetic", "sycophancy", "replies"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256], help="--batch-size values")
    ap.add_argument("--pass-k", type=int, nargs="*", default=[], help="also pass@k (sampled from the first 100)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.sizes or min(args.sizes) < 1 or args.repeats < 1:
        ap.error("--sizes must be >= 1 and --repeats >= 1")
    print(f"{hardware_info(torch.device('cpu'))['cpu']}, torch {torch.__version__}, {torch.get_num_threads()} threads;"
          f" {args.ckpt}, tasks {' '.join(args.tasks)}" + (f", pass@k {args.pass_k}" if args.pass_k else ""))
    configs = {n: build_config(eval_stage.EvalConfig, ("benchmark", {
        "ckpt": args.ckpt, "tasks": args.tasks, "limit": args.limit, "batch_size": n, "pass_k": args.pass_k,
        "pass_limit": 100 if args.pass_k else 0, "progress": False})) for n in args.sizes}
    eval_stage.evaluate_checkpoint(configs[args.sizes[0]])  # warm-up: imports, first allocations, thread pool
    seconds: dict[int, list[float]] = {n: [] for n in args.sizes}
    results: dict[int, str] = {}
    for _ in range(args.repeats):
        for n in args.sizes:  # interleaved, so a drifting machine drifts for every size alike
            t = time.perf_counter()
            r = eval_stage.evaluate_checkpoint(configs[n])
            seconds[n].append(time.perf_counter() - t)
            r.pop("seconds")
            results[n] = json.dumps(r, sort_keys=True)
    first = args.sizes[0]
    print(f"{'batch':>6} {'seconds':>8} {'speed-up':>9}  results")
    for n in args.sizes:
        s = statistics.median(seconds[n])
        same = "the same" if results[n] == results[first] else f"DIFFERENT from batch {first}"
        print(f"{n:>6} {s:>8.2f} {statistics.median(seconds[first]) / s:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
