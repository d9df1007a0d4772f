"""`cakelm pipeline`: every stage, in order, into one run directory.

    cakelm pipeline                          # the CPU preset on Shakespeare, into runs/default
    cakelm pipeline --preset micro --out runs/smoke
    cakelm pipeline --from pretrain          # redo pretraining (and what follows), keep data and tokenizer
    cakelm pipeline --only sft
    torchrun --nproc_per_node 8 -m cakelm pipeline --preset gpu8 --data my_corpus/   # DDP on 8 GPUs

Under torchrun the training stages (pretrain, sft, reward, dpo, ppo, grpo) run on every rank with DDP; the others
(data, tokenizer, sampling, prefs, eval, compare, report) on rank 0 while the other ranks wait.

Stages: data -> tokenizer -> pretrain -> sample -> sft -> prefs -> reward -> dpo -> ppo -> grpo -> eval
(RUN/data, RUN/tokenizer, RUN/base, RUN/samples.txt, RUN/sft, RUN/prefs (preference pairs judged by the rule-based
rater), RUN/rm (reward model), RUN/dpo, RUN/ppo, RUN/grpo, RUN/eval.json: task accuracy and chat loss of every model,
and for the chat models the rater's gold reward, the reward model's proxy score and the KL to SFT on held-out
prompts; RUN/overopt.json: gold and proxy against KL along the DPO and PPO runs), then compare (RUN/compare: an LSTM
against the Transformer at equal size on the same tokens) and the report card (RUN/report.html, RUN/report.md:
every stage's time and memory, the curves, the models table, the over-optimisation plot, every model's answers to
the same prompts side by side, and the comparison).
A stage whose output is complete and was made with the same resolved config is skipped; once a stage runs,
every later stage runs too (its input changed). An interrupted pretraining continues from its last checkpoint
(also under --only/--from, which otherwise redo their stages).
Each stage prints one summary line; the run ends with a table and RUN/pipeline.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cakelm.checkpoint import load_model
from cakelm.common import (
    barrier,
    hardware_info,
    init_distributed,
    peak_memory_mb,
    pick_device,
    print0,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from cakelm.config import ConfigError, build_config, flatten, opt, to_dict
from cakelm.report import ANSWER_PROMPTS, collect_answers, write_report
from cakelm.rlhf import RLHFEval, heldout_rows, load_scalar_model
from cakelm.stages import compare as compare_stage
from cakelm.stages import data as data_stage
from cakelm.stages import dpo as dpo_stage
from cakelm.stages import eval as eval_stage
from cakelm.stages import grpo as grpo_stage
from cakelm.stages import ppo as ppo_stage
from cakelm.stages import prefs as prefs_stage
from cakelm.stages import pretrain as pretrain_stage
from cakelm.stages import reward as reward_stage
from cakelm.stages import sample as sample_stage
from cakelm.stages import sft as sft_stage
from cakelm.stages import tokenizer as tokenizer_stage

STAGES = ("data", "tokenizer", "pretrain", "sample", "sft", "prefs", "reward", "dpo", "ppo", "grpo", "eval",
          "compare", "report")
TRAINED = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")  # stages that can --resume (and run under DDP)
MAINS: dict[str, Callable[[Any], Any]] = {
    "data": data_stage.main, "tokenizer": tokenizer_stage.main, "pretrain": pretrain_stage.main,
    "sft": sft_stage.main, "prefs": prefs_stage.main, "reward": reward_stage.main, "dpo": dpo_stage.main,
    "ppo": ppo_stage.main, "grpo": grpo_stage.main, "compare": compare_stage.main}
MODELS = ("base", "sft", "dpo", "ppo", "grpo")  # the rows of eval.json, in pipeline order
RLHF_SAMPLES = 2  # replies sampled per held-out prompt for gold, proxy and KL

# Per preset: overrides for each stage (dotted keys, as on the command line), the pretrain, sft and grpo
# stages' presets, the preset of the RLHF stages (prefs, reward, dpo, ppo), that of compare (default: the RLHF
# one), and the number of held-out problems per evaluation task.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"tokenizer": {"vocab_size": 2048}, "pretrain": "cpu", "sft": "cpu", "grpo": "cpu", "rlhf": "cpu",
            "eval_limit": 200},
    "micro": {"tokenizer": {"vocab_size": 512}, "pretrain": "micro", "sft": "micro", "grpo": "micro", "rlhf": "micro",
              "eval_limit": 16},
    "10m": {"tokenizer": {"vocab_size": 4096}, "pretrain": "10m", "sft": "cpu", "grpo": "cpu", "rlhf": "cpu",
            "eval_limit": 500},
    "gpu": {"tokenizer": {"vocab_size": 32768}, "pretrain": "gpu", "sft": "cpu", "grpo": "cpu", "rlhf": "cpu",
            "compare": "gpu", "eval_limit": 1000},
    # `torchrun --nproc_per_node 8 -m cakelm pipeline --preset gpu8 --data YOUR_CORPUS`: every training stage runs
    # under DDP, the others on rank 0.
    "gpu8": {"tokenizer": {"vocab_size": 32768}, "pretrain": "gpu8", "sft": "cpu", "grpo": "cpu", "rlhf": "cpu",
             "compare": "gpu", "eval_limit": 1000},
}


@dataclass
class PipelineConfig:
    preset: str = opt("cpu", "size of every stage: cpu (2 cores, minutes), micro (seconds), 10m, gpu (one GPU), "
                      "gpu8 (8 GPUs under torchrun)",
                      choices=tuple(PRESETS))
    out: str = opt("runs/default", "run directory (one subdirectory per stage)")
    data: list[str] = opt(["shakespeare", "arithmetic"], "text sources for pretraining (see `cakelm data --help`)")
    from_stage: str | None = opt(None, "rerun this stage and every later one", alias="--from", choices=STAGES)
    only: str | None = opt(None, "run just this stage", choices=STAGES)
    prompts: list[str] = opt(["Romeo.\n", "Hamlet.\n", "First Citizen.\n"], "prompts for the sample stage")
    sft_data: list[str] = opt(sft_stage.DEFAULT_DATA, "chat sources for SFT (see `cakelm sft --help`)")
    prefs_data: list[str] = opt(prefs_stage.DEFAULT_DATA,
                                "prompt sources for the preference pairs (see `cakelm prefs --help`)")
    grpo_data: list[str] = opt(["arithmetic"], "prompt sources for GRPO (see `cakelm grpo --help`)")
    rewards: list[str] = opt(["exact_match"], "GRPO rewards (see `cakelm grpo --help`)")
    eval_tasks: list[str] = opt(["arithmetic", "chat"], "what the eval stage measures (see `cakelm eval`; gsm word "
                                "problems are ~0% for every model this size, so the pipeline leaves them out)")
    device: str = opt("auto", "device for training and sampling", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = opt(1337, "random seed")

    def __post_init__(self) -> None:
        if self.from_stage and self.only:
            raise ConfigError("use --from or --only, not both")


def _stage_configs(cfg: PipelineConfig, run: Path) -> dict[str, Any]:
    p = PRESETS[cfg.preset]
    data = build_config(data_stage.DataConfig, ("pipeline", {"data": cfg.data, "out": str(run / "data")}))
    tok = build_config(tokenizer_stage.TokenizerConfig, (f"pipeline preset {cfg.preset}", p["tokenizer"]),
                       ("pipeline", {"data": [str(run / "data")], "out": str(run / "tokenizer")}))
    pre = build_config(pretrain_stage.PretrainConfig,
                       (f"pretrain preset {p['pretrain']}", pretrain_stage.PRESETS[p["pretrain"]]),
                       ("pipeline", {"data": str(run / "tokenizer"), "out": str(run / "base"),
                                     "loop.device": cfg.device, "loop.seed": cfg.seed}))
    sft = build_config(sft_stage.SFTConfig, (f"sft preset {p['sft']}", sft_stage.PRESETS[p["sft"]]),
                       ("pipeline", {"init": str(run / "base"), "data": cfg.sft_data, "out": str(run / "sft"),
                                     "loop.device": cfg.device, "loop.seed": cfg.seed}))
    rl = build_config(grpo_stage.GRPOConfig, (f"grpo preset {p['grpo']}", grpo_stage.PRESETS[p["grpo"]]),
                      ("pipeline", {"init": str(run / "sft"), "data": cfg.grpo_data, "rewards": cfg.rewards,
                                    "out": str(run / "grpo"), "loop.device": cfg.device, "loop.seed": cfg.seed}))
    h = p["rlhf"]
    common = {"loop.device": cfg.device, "loop.seed": cfg.seed}
    prefs = build_config(prefs_stage.PrefsConfig, (f"prefs preset {h}", prefs_stage.PRESETS[h]),
                         ("pipeline", {"init": str(run / "sft"), "out": str(run / "prefs"), "data": cfg.prefs_data,
                                       "device": cfg.device, "seed": cfg.seed}))
    rm = build_config(reward_stage.RewardConfig, (f"reward preset {h}", reward_stage.PRESETS[h]),
                      ("pipeline", {"init": str(run / "sft"), "data": str(run / "prefs"), "out": str(run / "rm"),
                                    **common}))
    dpo = build_config(dpo_stage.DPOConfig, (f"dpo preset {h}", dpo_stage.PRESETS[h]),
                       ("pipeline", {"init": str(run / "sft"), "data": str(run / "prefs"), "out": str(run / "dpo"),
                                     "reward_model": str(run / "rm"), **common}))
    ppo = build_config(ppo_stage.PPOConfig, (f"ppo preset {h}", ppo_stage.PRESETS[h]),
                       ("pipeline", {"init": str(run / "sft"), "data": str(run / "prefs"), "out": str(run / "ppo"),
                                     "reward_model": str(run / "rm"), **common}))
    c = p.get("compare", h)
    cmp = build_config(compare_stage.CompareConfig, (f"compare preset {c}", compare_stage.PRESETS[c]),
                       ("pipeline", {"data": str(run / "tokenizer"), "out": str(run / "compare"), "device": cfg.device,
                                     "seed": cfg.seed}))
    return {"data": data, "tokenizer": tok, "pretrain": pre, "sft": sft, "prefs": prefs, "reward": rm, "dpo": dpo,
            "ppo": ppo, "grpo": rl, "compare": cmp}


def _same(a: dict, b: dict) -> bool:
    """Configs equal up to the flags that say how to (re)start and where to run, not what to compute."""
    ignore = {"resume", "overwrite", "loop.device", "loop.progress", "device", "progress"}
    return {k: v for k, v in flatten(a).items() if k not in ignore} == \
        {k: v for k, v in flatten(b).items() if k not in ignore}


def _status(out: Path, cfg: Any) -> str:
    """'done' (complete, same config), 'partial' (same config, unfinished), or 'stale'/'missing'."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "stale"
    if not _same(meta.get("config", {}), to_dict(cfg)):
        return "stale"
    return "done" if meta.get("complete") else "partial"


def _summary(name: str, out: Path) -> str:
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    if name == "data":
        return f"{meta['train']['documents']} train docs, {meta['train']['bytes'] / 1e6:.2f} MB"
    if name == "tokenizer":
        return f"vocab {meta['vocab_size']}, {meta['val']['bytes_per_token']:.2f} bytes/token"
    if name == "prefs":
        return (f"{meta['train']['pairs']} pairs ({meta['val']['pairs']} held out), mean rater gap "
                f"{meta['gold_gap']:.2f}")
    m = meta["metrics"]
    if name == "reward":
        return f"held-out pair accuracy {m.get('val_accuracy', float('nan')):.3f}, margin {m.get('val_margin', 0):.2f}"
    if name in ("dpo", "ppo"):
        return (f"held-out gold {m.get('val_gold', float('nan')):.3f}, proxy {m.get('val_proxy', float('nan')):.3f}, "
                f"KL {m.get('val_kl', float('nan')):.2f}")
    if name == "compare":
        return (f"val bpb at equal time: Transformer {m.get('transformer_bpb', float('nan')):.3f}, LSTM "
                f"{m.get('lstm_bpb', float('nan')):.3f}")
    if name == "sft":
        return f"val loss {m.get('val_loss', float('nan')):.3f} (assistant tokens)"
    if name == "grpo":
        return (f"reward {m.get('reward', float('nan')):.3f}, held-out accuracy "
                f"{m.get('val_accuracy', float('nan')):.3f} (greedy), {m.get('rollout_tok_s', 0):,.0f} sampled tok/s")
    return f"val bpb {m.get('val_bpb', float('nan')):.3f}, {m.get('tok_per_s', 0):,.0f} tok/s"


def _eval(cfg: PipelineConfig, run: Path, outs: dict[str, Path], forced: bool) -> tuple[str, str]:
    """Evaluate every model into RUN/eval.json, and collect RUN/overopt.json (skipped when up to date)."""
    path = run / "eval.json"
    settings = {"tasks": cfg.eval_tasks, "limit": PRESETS[cfg.preset]["eval_limit"], "models": list(MODELS),
                "rlhf_samples": RLHF_SAMPLES}
    models = {"base": outs["pretrain"], "sft": outs["sft"], "dpo": outs["dpo"], "ppo": outs["ppo"],
              "grpo": outs["grpo"]}
    old = read_json(path) if path.is_file() else None
    if not forced and old and old.get("settings") == settings:
        print0(f"eval: up to date in {path}, skipped")
        return "skipped", _eval_summary(old["models"])
    results = {}
    device = pick_device(cfg.device)
    ref, tok, _ = load_model(outs["sft"], device)
    rm = load_scalar_model(outs["reward"], device)[0]
    rows = heldout_rows(outs["prefs"], [], tok, ref.cfg.max_seq_len - 64)
    judge = RLHFEval(rows, tok, rm, ref, 64, cfg.seed, RLHF_SAMPLES)
    for name, ckpt in models.items():
        ec = build_config(eval_stage.EvalConfig, ("pipeline", {"ckpt": str(ckpt), "tasks": settings["tasks"],
                                                               "limit": settings["limit"], "device": cfg.device,
                                                               "seed": cfg.seed}))
        results[name] = eval_stage.evaluate_checkpoint(ec)
        if results[name]["format"] == "chat":  # gold, proxy and KL to SFT on the held-out RLHF prompts
            model = load_model(ckpt, device)[0]
            results[name]["rlhf"] = {"n": len(rows) * RLHF_SAMPLES, **judge(model)}
    write_json_atomic(path, {"settings": settings, "models": results})
    write_json_atomic(run / "overopt.json", {"points": _overopt_points(run, results)})
    print0(eval_stage.format_results(results))
    return "ran", _eval_summary(results)


def _overopt_points(run: Path, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Gold and proxy against KL: the SFT model (KL 0), then every held-out evaluation along the DPO and PPO runs
    (their metrics.jsonl), then each final model as the eval stage measured it."""
    points = []
    sft = results["sft"].get("rlhf", {})
    for run_name in ("dpo", "ppo"):
        if sft:
            points.append({"run": run_name, "label": "sft", "kl": 0.0, "gold": sft["gold"], "proxy": sft["proxy"]})
        metrics = run / run_name / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        points += [{"run": run_name, "label": f"step {r['step']}", "kl": r["val_kl"], "gold": r["val_gold"],
                    "proxy": r["val_proxy"]} for r in rows if "val_kl" in r and "val_proxy" in r]
    return points


def _eval_summary(results: dict[str, Any]) -> str:
    # in pipeline order (eval.json is written with sorted keys)
    results = {m: results[m] for m in MODELS if m in results}
    task = next(iter(results["sft"]["tasks"]), None)
    if task is None:
        return "chat loss " + " -> ".join(f"{r['chat']['loss']:.3f}" for r in results.values())
    acc = " -> ".join(eval_stage.pct(r["tasks"][task]["accuracy"]) for r in results.values())
    eot = " -> ".join(eval_stage.pct(r["tasks"][task]["end_of_turn"]) for r in results.values())
    gold = " / ".join(f"{m} {r['rlhf']['gold']:.2f}" for m, r in results.items() if r.get("rlhf"))
    return f"{task} {acc} ({' -> '.join(results)}), ends turn {eot}" + (f"; gold {gold}" if gold else "")


def main(cfg: PipelineConfig) -> Path:
    info, _ = init_distributed(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    configs = _stage_configs(cfg, run)
    outs = {"data": run / "data", "tokenizer": run / "tokenizer", "pretrain": run / "base", "sft": run / "sft",
            "prefs": run / "prefs", "reward": run / "rm", "dpo": run / "dpo", "ppo": run / "ppo", "grpo": run / "grpo",
            "compare": run / "compare"}
    rows: list[dict[str, Any]] = []
    upstream_ran = False  # an earlier stage produced new output: everything after it must be redone
    t_run = time.time()
    for name in STAGES:
        if cfg.only and name != cfg.only:
            continue
        forced = upstream_ran or name in (cfg.from_stage, cfg.only)
        ran = False
        # training stages run on every rank (DDP under torchrun); the others on rank 0 while the rest wait
        if name in TRAINED or info.is_main:
            row = _run_stage(name, cfg, run, configs, outs, forced, upstream_ran, rows, t_run)
            rows.append(row)
            ran = row["status"] == "ran" and name not in ("sample", "eval", "report")
        if info.enabled and name not in TRAINED:
            barrier(info)
            flag = [ran]
            dist.broadcast_object_list(flag, src=0)
            ran = flag[0]
        upstream_ran = upstream_ran or ran
    if not info.is_main:
        return run
    lines = [f"{'stage':<10} {'status':<8} {'time':>8} {'peak MB':>8}  result"]
    lines += [f"{r['stage']:<10} {r['status']:<8} {r['seconds']:>7.1f}s {r['peak_mb']:>8.0f}  {r['result']}"
              for r in rows]
    lines.append(f"{'total':<10} {'':<8} {time.time() - t_run:>7.1f}s {peak_memory_mb():>8.0f}")
    print0("\n" + "\n".join(lines))
    _write_summary(cfg, run, rows, t_run)
    return run


def _run_stage(name: str, cfg: PipelineConfig, run: Path, configs: dict[str, Any], outs: dict[str, Path],
               forced: bool, upstream_ran: bool, rows: list[dict[str, Any]], t_run: float) -> dict[str, Any]:
    """Run (or skip) one stage; returns its row of the summary table."""
    t0 = time.time()
    if name == "sample":
        texts = []
        for i, prompt in enumerate(cfg.prompts):
            sc = sample_stage.SampleConfig(ckpt=str(outs["pretrain"]), prompt=prompt, max_new_tokens=120,
                                           temperature=0.8, top_k=50, seed=cfg.seed + i, device=cfg.device)
            texts.append(prompt + sample_stage.main(sc, echo=False)[0])
        write_text_atomic(run / "samples.txt", ("\n" + "-" * 60 + "\n").join(texts) + "\n")
        print0(f"sample: {len(texts)} samples -> {run / 'samples.txt'}\n" + "-" * 60 + "\n" + texts[0].strip())
        return {"stage": name, "status": "ran", "seconds": time.time() - t0,
                "result": f"{len(texts)} samples in samples.txt", "peak_mb": peak_memory_mb()}
    if name == "report":  # always: it reads whatever the run holds, this run's times included
        models = {"base": outs["pretrain"], "sft": outs["sft"], "dpo": outs["dpo"], "ppo": outs["ppo"],
                  "grpo": outs["grpo"]}
        answers = collect_answers(models, ANSWER_PROMPTS, 64, pick_device(cfg.device))
        write_json_atomic(run / "answers.json", answers)
        row = {"stage": name, "status": "ran", "seconds": time.time() - t0, "result": "report.html, report.md",
               "peak_mb": peak_memory_mb()}
        _write_summary(cfg, run, [*rows, row], t_run)
        html, _ = write_report(run)
        print0(f"report: {html}")
        return row
    if name == "eval":
        status, result = _eval(cfg, run, outs, forced)
        return {"stage": name, "status": status, "seconds": time.time() - t0, "result": result,
                "peak_mb": peak_memory_mb()}
    stage_cfg, out = configs[name], outs[name]
    status = _status(out, stage_cfg)
    if status == "done" and not forced:
        print0(f"{name}: up to date in {out}, skipped")
        return {"stage": name, "status": "skipped", "seconds": 0.0, "result": _summary(name, out),
                "peak_mb": peak_memory_mb()}
    if name in TRAINED:
        # an interrupted run of the same config continues, unless its input just changed
        stage_cfg.resume = status == "partial" and not upstream_ran
        stage_cfg.overwrite = True
    MAINS[name](stage_cfg)
    return {"stage": name, "status": "ran", "seconds": time.time() - t0, "result": _summary(name, out),
            "peak_mb": peak_memory_mb()}


def _write_summary(cfg: PipelineConfig, run: Path, rows: list[dict[str, Any]], t_run: float) -> None:
    write_json_atomic(run / "pipeline.json", {"config": to_dict(cfg), "stages": rows, "seconds": time.time() - t_run,
                                              "peak_mb": peak_memory_mb(), "hardware": hardware_info()})
