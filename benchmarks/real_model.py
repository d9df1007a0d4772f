"""A real model, improved on a CPU: SmolLM2-135M-Instruct (`cakelm import smollm2`) -> GRPO with LoRA on arithmetic ->
held-out accuracy before and after, wall time and peak memory; the same GRPO with full fine-tuning for a few steps,
for its peak memory; then the improved model exported to GGUF and asked a question through transformers' GGUF
loader. And RLHF on the same model: preference pairs of its own replies judged by the rater (`cakelm prefs`), DPO
with LoRA on them, and the rater's gold reward on held-out prompts before and after.

Every step is a `cakelm` command (printed), run as its own process, so peak memory is that command's.

    python benchmarks/real_model.py --base runs/smollm2 --out runs/smollm2-grpo       # ~35 minutes on 2 cores
    python benchmarks/real_model.py --parts memory --grpo "..."    # one part again (--parts grpo memory gguf dpo)

Prints one table (and adds to OUT/real_model.json). Numbers for the README: see its "LoRA" section.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from cakelm.common import hardware_info

QUESTIONS = ("What is 23 + 48?", "Compute 10 + 52.")  # (the second is held out; the first is in no task set)


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a command (output to `log`): (wall seconds, peak resident memory in MB of it and its children)."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {shlex.join(cmd)}; see {log}")
    return time.time() - t0, usage.ru_maxrss / 1024


def accuracy(ckpt: Path, out: Path, limit: int, max_new_tokens: int, log: Path) -> dict[str, float]:
    run(["cakelm", "eval", str(ckpt), "--tasks", "arithmetic", "--limit", str(limit), "--max-new-tokens",
         str(max_new_tokens), "--json", str(out), "--no-progress"], log)
    task = json.loads(out.read_text())["tasks"]["arithmetic"]
    return {"accuracy": task["accuracy"], "end_of_turn": task["end_of_turn"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/smollm2", help="the imported model (`cakelm import smollm2 DIR`)")
    ap.add_argument("--out", default="runs/smollm2-grpo", help="directory for the runs, logs and the GGUF file")
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps with LoRA")
    ap.add_argument("--full-steps", type=int, default=2, help="steps of the LoRA and full runs compared for memory "
                                                              "(from 2 on, AdamW's state meets a step's activations)")
    ap.add_argument("--limit", type=int, default=100, help="held-out arithmetic problems in each evaluation")
    ap.add_argument("--grpo", default="--group-size 8 --prompts-per-step 8 --max-new-tokens 96 --batch-size 16 "
                                      "--loop.grad-checkpoint --val-size 20 --loop.eval-every 0",
                    help="GRPO options shared by every run")
    ap.add_argument("--lora", default="--lora.rank 16 --lora.alpha 32 --optim.lr 2e-4",
                    help="the LoRA run's own options")
    ap.add_argument("--full", default="--optim.lr 1e-5", help="the full fine-tuning run's own options")
    ap.add_argument("--prefs", default="--prompts 200 --samples 4 --max-new-tokens 96",
                    help="options of `cakelm prefs` (the base model's replies, judged by the rater)")
    ap.add_argument("--dpo", default="--lora.rank 16 --lora.alpha 32 --optim.lr 5e-5 --max-steps 40 --batch-size 8 "
                                     "--loop.eval-every 0 --val-size 20 --loop.grad-checkpoint --reward-model ''",
                    help="options of the DPO run with LoRA")
    ap.add_argument("--gold-prompts", type=int, default=100, help="held-out prompts for the gold reward")
    ap.add_argument("--parts", nargs="+", default=["grpo", "memory", "gguf", "dpo"],
                    choices=("grpo", "memory", "gguf", "dpo"),
                    help="what to run (gguf exports OUT/lora, which the grpo part writes)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = hardware_info(torch.device("cpu"))["cpu"]
    print(f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; base {args.base}")
    grpo = ["cakelm", "grpo", "--init", args.base, *shlex.split(args.grpo)]
    saved = out / "real_model.json"
    result: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    result.update({"cpu": cpu, "base": args.base})
    if "grpo" in args.parts:
        grpo_part(args, grpo, out, result)
    if "memory" in args.parts and args.full_steps:
        for name, extra in (("lora", args.lora), ("full", args.full),
                            ("lora-bf16-base", f"{args.lora} --lora.base-dtype bf16")):
            seconds, peak = run([*grpo, *shlex.split(extra), "--out", str(out / f"memory-{name}"), "--max-steps",
                                 str(args.full_steps), "--overwrite"], out / f"memory-{name}.log")
            result.setdefault("memory", {})[args.grpo] = result.get("memory", {}).get(args.grpo, {})
            result["memory"][args.grpo][name] = {"steps": args.full_steps, "seconds": seconds, "peak_mb": peak}
        print("memory:", result["memory"][args.grpo], flush=True)
    if "gguf" in args.parts:
        gguf_part(out, result)
    if "dpo" in args.parts:
        dpo_part(args, out, result)
    saved.write_text(json.dumps(result, indent=2) + "\n")
    report(result, cpu)


def grpo_part(args: argparse.Namespace, grpo: list[str], out: Path, result: dict) -> None:
    result["grpo_options"], result["lora_options"] = args.grpo, args.lora
    result["before"] = accuracy(Path(args.base), out / "eval-before.json", args.limit, 96, out / "eval-before.log")
    print("before:", result["before"], flush=True)
    seconds, peak = run([*grpo, *shlex.split(args.lora), "--out", str(out / "lora"), "--max-steps",
                         str(args.steps), "--overwrite"], out / "grpo-lora.log")
    result["lora_run"] = {"steps": args.steps, "seconds": seconds, "peak_mb": peak}
    result["after"] = accuracy(out / "lora", out / "eval-after.json", args.limit, 96, out / "eval-after.log")
    print("after:", result["after"], result["lora_run"], flush=True)


def gguf_part(out: Path, result: dict) -> None:
    """Export the improved model to GGUF (q8_0), read it with transformers' own GGUF loader and ask it QUESTIONS
    greedily, next to cakelm's own greedy reply from the checkpoint."""
    gguf = out / "improved.q8_0.gguf"
    run(["cakelm", "export", str(out / "lora"), "--to", "gguf", str(gguf), "--dtype", "q8_0", "--overwrite"],
        out / "export.log")
    import transformers  # the independent reader: transformers' own GGUF loader

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf.name).eval()
    result["gguf"] = {"file": str(gguf), "mb": gguf.stat().st_size / 2**20, "answers": []}
    for q in QUESTIONS:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        reply = hf.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:]
        ours = subprocess.run(["cakelm", "chat", str(out / "lora"), "-p", q, "--temperature", "0",
                               "--max-new-tokens", "48"], capture_output=True, text=True, check=True).stdout
        result["gguf"]["answers"].append({"question": q, "gguf": hf_tok.decode(reply, skip_special_tokens=True),
                                          "cakelm": ours.strip()})


def dpo_part(args: argparse.Namespace, out: Path, result: dict) -> None:
    """Pairs of the base model's own replies (best and worst by the rater), DPO with LoRA on them, then the gold
    reward (the rater), end of turn and KL to the base on the same held-out prompts, sampled with the same seed,
    for the base and the DPO model: what the pipeline's RLHF evaluation measures."""
    from cakelm.checkpoint import load_model
    from cakelm.rlhf import RLHFEval, heldout_rows

    result["prefs_options"], result["dpo_options"] = args.prefs, args.dpo
    prefs = out / "prefs"
    seconds = result.get("dpo", {}).get("prefs_seconds")
    if (prefs / "meta.json").is_file():  # complete pairs from an earlier run (`cakelm prefs` writes it last)
        print(f"reusing the pairs in {prefs} (delete it to make new ones)", flush=True)
    else:
        seconds, _ = run(["cakelm", "prefs", "--init", args.base, "--out", str(prefs), *shlex.split(args.prefs)],
                         out / "prefs.log")
    pairs = json.loads((prefs / "meta.json").read_text())
    seconds_dpo, peak = run(["cakelm", "dpo", "--init", args.base, "--data", str(prefs), "--out",
                             str(out / "dpo-lora"), "--overwrite", *shlex.split(args.dpo)], out / "dpo-lora.log")
    base, tok, _ = load_model(args.base)
    rows = heldout_rows(prefs, [], tok, base.cfg.max_seq_len - 96)[:args.gold_prompts]
    judge = RLHFEval(rows, tok, None, base, 96, seed=0, n=2)
    result["dpo"] = {"pairs": pairs, "prefs_seconds": seconds, "dpo_seconds": seconds_dpo, "dpo_peak_mb": peak,
                     "prompts": len(rows), "before": judge(base), "after": judge(load_model(out / "dpo-lora")[0])}
    print("dpo:", result["dpo"], flush=True)


def report(result: dict, cpu: str) -> None:
    print(f"\n{cpu}")
    if "after" in result:
        b, a, r = result["before"], result["after"], result["lora_run"]
        print("| | held-out arithmetic (greedy) | ends turn |")
        print("|---|---|---|")
        print(f"| {result['base']} (imported) | {b['accuracy']:.1%} | {b['end_of_turn']:.1%} |")
        print(f"| + GRPO with LoRA, {r['steps']} steps ({r['seconds'] / 60:.1f} min, peak {r['peak_mb']:,.0f} MB) | "
              f"{a['accuracy']:.1%} ({(a['accuracy'] - b['accuracy']) * 100:+.1f} points) | {a['end_of_turn']:.1%} |")
    for options, m in result.get("memory", {}).items():
        lo, fu = m["lora"], m["full"]
        print(f"\npeak memory, {lo['steps']} GRPO step(s) of `{options}`: LoRA {lo['peak_mb']:,.0f} MB, full "
              f"fine-tuning {fu['peak_mb']:,.0f} MB ({lo['peak_mb'] / fu['peak_mb']:.0%})")
        if "lora-bf16-base" in m:
            b16 = m["lora-bf16-base"]["peak_mb"]
            print(f"LoRA with the base in bf16 (--lora.base-dtype bf16): {b16:,.0f} MB ({b16 / fu['peak_mb']:.0%})")
    if "gguf" in result:
        g = result["gguf"]
        for x in g["answers"]:
            print(f"\nGGUF q8_0 ({g['mb']:.0f} MB) through transformers: {x['question']!r} -> {x['gguf']!r}\n"
                  f"cakelm chat, the same checkpoint: {x['cakelm']!r}")
    if "dpo" in result:
        d = result["dpo"]
        made = "reused" if d["prefs_seconds"] is None else f"{d['prefs_seconds'] / 60:.1f} min"
        print(f"\nDPO with LoRA (`{result['dpo_options']}`; prefs {made}, DPO "
              f"{d['dpo_seconds'] / 60:.1f} min, peak {d['dpo_peak_mb']:,.0f} MB), {d['prompts']} held-out prompts "
              "x 2 replies:")
        print("| | gold reward | ends turn | reply tokens | KL to the base |\n|---|---|---|---|---|")
        for name, m in (("imported", d["before"]), ("+ DPO with LoRA", d["after"])):
            print(f"| {name} | {m['gold']:.3f} | {m['end_of_turn']:.1%} | {m['reply_len']:.1f} | "
                  f"{m.get('kl', 0):.3f} |")


if __name__ == "__main__":
    main()
