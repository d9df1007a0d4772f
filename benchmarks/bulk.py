"""Bulk generation three ways: static batches computed to the end (each batch running until its longest row is
done, finished rows computed and ignored: `Engine(drop_finished=False)`), static batches that drop finished rows
(`Engine.generate`, the default), and continuous batching (`Batcher.generate`: a finished row's slot takes the
next prompt at once), on the pipeline's bulk jobs: eval's greedy answers to the held-out arithmetic problems (32
rows), its pass@k replies (8 problems x 16 at temperature 1) and a GRPO phase's rollouts (16 prompts x 8 at
temperature 1, seeded per prompt).

    python benchmarks/bulk.py --ckpt runs/default/sft          # a chat checkpoint (the pipeline's SFT model)

Prints, per job, each way's sampled tokens/s, the speed-up over static batches computed to the end, and whether
its completions equal theirs; times are medians of interleaved rounds.
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
    prompts = [render_prompt(m, tok, "chat") for m, *_ in load_task("arithmetic", args.questions)]
    stop_ids, stop_strings = stop_rules(tok, "chat")
    greedy = SamplingParams(max_new_tokens=64, temperature=0, stop_ids=stop_ids, stop_strings=stop_strings)
    sampled = SamplingParams(max_new_tokens=64, temperature=1.0, stop_ids=stop_ids, logprobs=True)
    jobs = {  # name: (prompts, params, samples per prompt, rows at once)
        f"eval: {len(prompts)} questions, greedy": (prompts, greedy, 1, args.batch),
        "eval pass@k: 32 questions x 16, temperature 1": (prompts[:32], sampled, 16, 128),
        "GRPO rollouts: 32 prompts x 8, temperature 1": (prompts[:32], sampled, 8, 128),
    }
    ways = {"to the end": Engine(model, tok, drop_finished=False), "dropped": engine, "continuous": engine}
    for name, (ps, params, n, rows) in jobs.items():
        seeds = list(range(len(ps)))
        times: dict[str, list[float]] = {way: [] for way in ways}
        outs = {}
        for _ in range(args.repeats):
            for way, eng in ways.items():
                t = time.perf_counter()
                outs[way] = run(eng, way == "continuous", ps, params, n, seeds, rows)
                times[way].append(time.perf_counter() - t)
        tokens = sum(len(c.ids) for c in outs["to the end"])
        base = statistics.median(times["to the end"])
        cells = [f"static to the end {tokens / base:,.0f} tok/s"]
        for way in ("dropped", "continuous"):
            t = statistics.median(times[way])
            same = [c.ids for c in outs[way]] == [c.ids for c in outs["to the end"]]
            cells.append(f"{way} {tokens / t:,.0f} tok/s = {base / t:.2f}x (same completions: {same})")
        print(f"{name}, {rows} rows: " + ", ".join(cells) + f"; {tokens} tokens")


def run(engine: Engine, continuous: bool, prompts: list[list[int]], params: SamplingParams, n: int,
        seeds: list[int], rows: int) -> list[Completion]:
    """All completions, in static batches of `rows` rows or continuously in `rows` rows."""
    if continuous:
        # a prefill budget of 64 tokens a row: bulk work wants whole batches of prompts in, not streams kept flowing
        batcher = Batcher(engine, slots=rows, max_queued=len(prompts), chunk=64 * rows)
        return batcher.generate(prompts, params, n=n, seeds=seeds)
    per_call = max(1, rows // n)  # prompts per static batch, as the rollout generator chunks them
    return [c for i in range(0, len(prompts), per_call)
            for c in engine.generate(prompts[i:i + per_call], params, n=n, seeds=seeds[i:i + per_call])]


if __name__ == "__main__":
    main()
