"""Bulk generation: today's static batches (`Engine.generate`, 32 prompts at a time, each batch running until its
longest row is done) against continuous batching (`Batcher.generate`, 32 rows, a finished row's slot taking the
next prompt at once), on the two bulk jobs of the pipeline: eval's greedy answers to the held-out arithmetic
problems, and RL rollouts (32 prompts x 8 samples at temperature 1, seeded per prompt).

    python benchmarks/bulk.py --ckpt runs/default/sft          # a chat checkpoint (the pipeline's SFT model)

Both ways give the same completions (checked and printed); times are medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cakelm.batching import Batcher
from cakelm.chat_format import render_prompt, stop_rules
from cakelm.checkpoint import load_model
from cakelm.common import hardware_info
from cakelm.engine import Completion, Engine, SamplingParams
from cakelm.stages.eval import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a chat-format checkpoint")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="static batch size = continuous batch rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(hardware_info(torch.device("cpu"))["cpu"])
    model, tok, _ = load_model(args.ckpt)
    engine = Engine(model, tok)
    prompts = [render_prompt(m, tok, "chat") for m, _ in load_task("arithmetic", args.questions)]
    stop_ids, stop_strings = stop_rules(tok, "chat")
    jobs = {
        f"eval: {len(prompts)} questions, greedy": (prompts, SamplingParams(
            max_new_tokens=64, temperature=0, stop_ids=stop_ids, stop_strings=stop_strings), 1),
        f"rollouts: {args.batch} prompts x 8, temperature 1": (prompts[:args.batch], SamplingParams(
            max_new_tokens=64, temperature=1.0, stop_ids=stop_ids, logprobs=True), 8),
    }
    for name, (ps, params, n) in jobs.items():
        seeds = list(range(len(ps)))
        times: dict[str, list[float]] = {"static": [], "continuous": []}
        outs = {}
        for _ in range(args.repeats):
            for label in times:
                t = time.perf_counter()
                outs[label] = run(engine, label, ps, params, n, seeds, args.batch)
                times[label].append(time.perf_counter() - t)
        same = [c.ids for c in outs["static"]] == [c.ids for c in outs["continuous"]]
        tokens = sum(len(c.ids) for c in outs["static"])
        s, c = statistics.median(times["static"]), statistics.median(times["continuous"])
        print(f"{name}: static batches {tokens / s:,.0f} tok/s, continuous {tokens / c:,.0f} tok/s = {s / c:.2f}x "
              f"({tokens} tokens; the same completions: {same})")


def run(engine: Engine, how: str, prompts: list[list[int]], params: SamplingParams, n: int, seeds: list[int],
        rows: int) -> list[Completion]:
    """All completions, in static batches of `rows` rows or continuously in `rows` rows."""
    if how == "continuous":
        # a prefill budget of 64 tokens a row: bulk work wants whole batches of prompts in, not streams kept flowing
        batcher = Batcher(engine, slots=rows, max_queued=len(prompts), chunk=64 * rows)
        return batcher.generate(prompts, params, n=n, seeds=seeds)
    per_call = max(1, rows // n)  # prompts per static batch, as the rollout generator chunks them
    return [c for i in range(0, len(prompts), per_call)
            for c in engine.generate(prompts[i:i + per_call], params, n=n, seeds=seeds[i:i + per_call])]


if __name__ == "__main__":
    main()
