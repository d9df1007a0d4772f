"""How much of a gold-reward difference is sampling noise: the pipeline's RLHF evaluation (gold reward, proxy and KL
to SFT on the held-out preference prompts, `cakelm.rlhf.RLHFEval`) repeated with several sampling seeds and
replies per prompt, for the chat models of a finished run.

    python benchmarks/gold_noise.py runs/default                       # SFT, DPO, PPO; 5 seeds x 2 and 4 replies
    python benchmarks/gold_noise.py runs/default --models sft dpo ppo grpo --seeds 8 --samples 4

The pipeline's evaluation draws its replies once (one seed, `pipeline.RLHF_SAMPLES` replies per prompt), so the
gold gain it reports for DPO and PPO (goal: >= +0.05 over SFT) is one draw. This prints each draw, then per
replies-per-prompt setting the mean gain over SFT of every model and its standard deviation across seeds: the
spread of the pipeline's own number. Each judge call samples 158 prompts x n replies from one model (seconds).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from cakelm.checkpoint import load_model
from cakelm.common import hardware_info
from cakelm.data.prefs import load_prefs
from cakelm.rlhf import RLHFEval, heldout_rows, load_scalar_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished pipeline run directory (its sft, prefs and rm folders)")
    ap.add_argument("--models", nargs="+", default=["sft", "dpo", "ppo"], help="chat models of the run; the first "
                    "is the one gains are measured from")
    ap.add_argument("--seeds", type=int, default=5, help="sampling seeds 0..N-1")
    ap.add_argument("--samples", type=int, nargs="+", default=[2, 4], help="replies per prompt to compare")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="as the pipeline's evaluation")
    args = ap.parse_args()
    if args.seeds < 1 or not args.samples or min(args.samples) < 1 or args.max_new_tokens < 1:
        raise SystemExit("gold_noise: need --seeds >= 1, --samples >= 1 each and --max-new-tokens >= 1")
    missing = [str(args.run / m) for m in [*args.models, "prefs", "rm"] if not (args.run / m).exists()]
    if missing:
        raise SystemExit(f"gold_noise: not found: {', '.join(missing)} (run `cakelm pipeline` first)")
    ref, tok, _ = load_model(args.run / "sft")
    ref.eval()  # the KL reference; also the "sft" model below (evaluation only changes no weights)
    prefs = str(args.run / "prefs")
    rows = heldout_rows(prefs, load_prefs(prefs)[1], tok, ref.cfg.max_seq_len - args.max_new_tokens)
    rm = load_scalar_model(str(args.run / "rm"))[0]
    models = {m: ref if m == "sft" else load_model(args.run / m)[0].eval() for m in args.models}
    base = args.models[0]
    print(f"cpu: {hardware_info()['cpu']}; {len(rows)} held-out prompts; gains over {base}")
    for n in args.samples:
        gains: dict[str, list[float]] = {m: [] for m in args.models[1:]}
        golds: list[float] = []
        for seed in range(args.seeds):
            judge = RLHFEval(rows, tok, rm, ref, args.max_new_tokens, seed=seed, n=n)
            gold = {m: judge(model)["gold"] for m, model in models.items()}
            golds.append(gold[base])
            for m in gains:
                gains[m].append(gold[m] - gold[base])
            print(f"  {n} replies, seed {seed}: " + ", ".join(f"{m} {g:.3f}" for m, g in gold.items()), flush=True)
        sd = statistics.stdev(golds) if len(golds) > 1 else float("nan")
        print(f"{n} replies per prompt: {base} gold {statistics.mean(golds):.3f} (sd {sd:.3f} across seeds); "
              + "; ".join(f"{m} {statistics.mean(g):+.3f} (sd {statistics.stdev(g) if len(g) > 1 else 0:.3f})"
                          for m, g in gains.items()), flush=True)


if __name__ == "__main__":
    main()
