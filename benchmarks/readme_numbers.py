"""The README's pipeline numbers, regenerated from a run directory, so they cannot drift from a run you can name.

    python benchmarks/readme_numbers.py runs/default                   # print the README's tables for this run
    python benchmarks/readme_numbers.py runs/default --check README.md # exit 1 if README.md shows other numbers

It prints the machine line and these blocks: the stage table ("What it gives on 2 CPU cores": each stage's time
and result, from RUN/pipeline.json, which `cakelm pipeline` rewrites at every invocation: run the whole pipeline in
one go, or keep a copy of that run's record and pass it with --pipeline), the models table, the arithmetic,
sycophancy and chat-replies tables (from RUN/eval.json, as the run's report.md shows them) and the evaluation of
base, sft and grpo as `cakelm eval` prints it (the SFT and GRPO sections). With --check, every row must appear
verbatim in the given README; the rows that do not are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cakelm.common import CakeError, describe_speed, read_json
from cakelm.report import fmt, models_section
from cakelm.report_skills import arithmetic_section, replies_section, sycophancy_section
from cakelm.stages.eval import format_results


def stage_table(record: Path) -> list[str]:
    """| stage | time | result | rows from a pipeline record; the total row carries the wall time and peak memory."""
    pipe = read_json(record, "pipeline record")
    if any(r.get("status") != "ran" for r in pipe["stages"]):
        skipped = [r["stage"] for r in pipe["stages"] if r.get("status") != "ran"]
        print(f"note: {', '.join(skipped)} did not run in the last invocation (times 0.0 s): run the whole "
              "pipeline in one go for the README", file=sys.stderr)
    rows = ["| stage | time | result |", "|---|---|---|"]
    rows += [f"| {r['stage']} | {fmt(r['seconds'], '.1f')} s | {r['result']} |" for r in pipe["stages"]]
    minutes, seconds = divmod(round(pipe["seconds"]), 60)
    rows.append(f"| **total** | **{minutes} min {seconds:02d} s wall** | **peak memory "
                f"{pipe['peak_mb'] / 1024:.2f} GB** (the pipeline process's max RSS) |")
    return rows


def models_table(run: Path, section: Callable[[Path], list[tuple]] = models_section) -> list[str]:
    """The first table of a report section (by default the models table) as markdown."""
    table = next(b for b in section(run) if b[0] == "table")
    _, headers, rows = table
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def eval_block(run: Path, models: tuple[str, ...] = ("base", "sft", "grpo")) -> list[str]:
    """The pipeline's evaluation of `models` (RUN/eval.json) in `cakelm eval`'s table format, header included."""
    results = read_json(run / "eval.json", "evaluation")["models"]
    return format_results({m: results[m] for m in models if m in results}).splitlines()


def machine_line(record: Path) -> str:
    pipe = read_json(record, "pipeline record")
    hw, speed = pipe["hardware"], describe_speed(pipe.get("matmul_gflops", {}))
    return (f"{hw['cpu']}, {hw['cpu_cores']} cores, device {hw['device']}, torch {hw['torch']} "
            f"({hw['torch_threads']} threads), Python {hw['python']}" + (f", {speed}" if speed else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run directory written by `cakelm pipeline`")
    ap.add_argument("--check", type=Path, metavar="README", help="check that README shows these rows verbatim")
    ap.add_argument("--pipeline", type=Path, metavar="JSON", help="the pipeline record of the full run (default: "
                    "RUN/pipeline.json, which a later `cakelm pipeline --only ...` replaces)")
    args = ap.parse_args()
    record = args.pipeline or args.run / "pipeline.json"
    try:
        blocks = {"stages": stage_table(record), "models": models_table(args.run),
                  "arithmetic": models_table(args.run, arithmetic_section),
                  "sycophancy": models_table(args.run, sycophancy_section),
                  "replies": models_table(args.run, replies_section), "eval": eval_block(args.run)}
        machine = machine_line(record)
    except (CakeError, KeyError, StopIteration) as e:
        print(f"error: {args.run}: not a complete pipeline run ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(f"machine: {machine}\n")
    for name, rows in blocks.items():
        print(f"{name}:\n" + "\n".join(rows) + "\n")
    if args.check is None:
        return 0
    readme = set(args.check.read_text(encoding="utf-8").splitlines())
    # the tables' header and rule rows are the same in every run; every line of the eval block counts
    missing = [row for name, rows in blocks.items() for row in rows[0 if name == "eval" else 2:] if row not in readme]
    for row in missing:
        print(f"not in {args.check}: {row}")
    print(f"{args.check}: {'up to date with' if not missing else f'{len(missing)} rows differ from'} {args.run}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
