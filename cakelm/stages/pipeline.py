"""`cakelm pipeline`: every stage, in order, into one run directory.

    cakelm pipeline                          # the CPU preset on Shakespeare, into runs/default
    cakelm pipeline --preset micro --out runs/smoke
    cakelm pipeline --from pretrain          # redo pretraining (and what follows), keep data and tokenizer
    cakelm pipeline --only sft

Stages so far: data -> tokenizer -> pretrain -> sample -> sft -> grpo -> eval (RUN/data, RUN/tokenizer, RUN/base,
RUN/samples.txt, RUN/sft, RUN/grpo, RUN/eval.json: task accuracy and chat loss of the base, SFT and GRPO models).
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

from cakelm.common import peak_memory_mb, print0, read_json, write_json_atomic, write_text_atomic
from cakelm.config import ConfigError, build_config, flatten, opt, to_dict
from cakelm.stages import data as data_stage
from cakelm.stages import eval as eval_stage
from cakelm.stages import grpo as grpo_stage
from cakelm.stages import pretrain as pretrain_stage
from cakelm.stages import sample as sample_stage
from cakelm.stages import sft as sft_stage
from cakelm.stages import tokenizer as tokenizer_stage

STAGES = ("data", "tokenizer", "pretrain", "sample", "sft", "grpo", "eval")

# Per preset: overrides for each stage (dotted keys, as on the command line), the pretrain, sft and grpo
# stages' presets, and the number of held-out problems per evaluation task.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"tokenizer": {"vocab_size": 2048}, "pretrain": "cpu", "sft": "cpu", "grpo": "cpu", "eval_limit": 200},
    "micro": {"tokenizer": {"vocab_size": 512}, "pretrain": "micro", "sft": "micro", "grpo": "micro",
              "eval_limit": 16},
    "10m": {"tokenizer": {"vocab_size": 4096}, "pretrain": "10m", "sft": "cpu", "grpo": "cpu", "eval_limit": 500},
    "gpu": {"tokenizer": {"vocab_size": 32768}, "pretrain": "gpu", "sft": "cpu", "grpo": "cpu", "eval_limit": 1000},
}


@dataclass
class PipelineConfig:
    preset: str = opt("cpu", "size of every stage: cpu (2 cores, minutes), micro (seconds), 10m, gpu",
                      choices=tuple(PRESETS))
    out: str = opt("runs/default", "run directory (one subdirectory per stage)")
    data: list[str] = opt(["shakespeare", "arithmetic"], "text sources for pretraining (see `cakelm data --help`)")
    from_stage: str | None = opt(None, "rerun this stage and every later one", alias="--from", choices=STAGES)
    only: str | None = opt(None, "run just this stage", choices=STAGES)
    prompts: list[str] = opt(["Romeo.\n", "Hamlet.\n", "First Citizen.\n"], "prompts for the sample stage")
    sft_data: list[str] = opt(sft_stage.DEFAULT_DATA, "chat sources for SFT (see `cakelm sft --help`)")
    grpo_data: list[str] = opt(["arithmetic"], "prompt sources for GRPO (see `cakelm grpo --help`)")
    rewards: list[str] = opt(["exact_match"], "GRPO rewards (see `cakelm grpo --help`)")
    eval_tasks: list[str] = opt(["arithmetic", "gsm", "chat"], "what the eval stage measures (see `cakelm eval`)")
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
    return {"data": data, "tokenizer": tok, "pretrain": pre, "sft": sft, "grpo": rl}


def _same(a: dict, b: dict) -> bool:
    """Configs equal up to the flags that say how to (re)start and where to run, not what to compute."""
    ignore = {"resume", "overwrite", "loop.device", "loop.progress"}
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
    m = meta["metrics"]
    if name == "sft":
        return f"val loss {m.get('val_loss', float('nan')):.3f} (assistant tokens)"
    if name == "grpo":
        return (f"reward {m.get('reward', float('nan')):.3f}, held-out accuracy "
                f"{m.get('val_accuracy', float('nan')):.3f} (greedy), {m.get('rollout_tok_s', 0):,.0f} sampled tok/s")
    return f"val bpb {m.get('val_bpb', float('nan')):.3f}, {m.get('tok_per_s', 0):,.0f} tok/s"


def _eval(cfg: PipelineConfig, run: Path, outs: dict[str, Path], forced: bool) -> tuple[str, str]:
    """Evaluate the base, SFT and GRPO models into RUN/eval.json (skipped when it is up to date)."""
    path = run / "eval.json"
    settings = {"tasks": cfg.eval_tasks, "limit": PRESETS[cfg.preset]["eval_limit"]}
    models = {"base": outs["pretrain"], "sft": outs["sft"], "grpo": outs["grpo"]}
    old = read_json(path) if path.is_file() else None
    if not forced and old and old.get("settings") == settings:
        print0(f"eval: up to date in {path}, skipped")
        return "skipped", _eval_summary(old["models"])
    results = {}
    for name, ckpt in models.items():
        ec = build_config(eval_stage.EvalConfig, ("pipeline", {"ckpt": str(ckpt), **settings, "device": cfg.device,
                                                               "seed": cfg.seed}))
        results[name] = eval_stage.evaluate_checkpoint(ec)
    write_json_atomic(path, {"settings": settings, "models": results})
    print0(eval_stage.format_results(results))
    return "ran", _eval_summary(results)


def _eval_summary(results: dict[str, Any]) -> str:
    # in pipeline order (eval.json is written with sorted keys)
    results = {m: results[m] for m in ("base", "sft", "grpo") if m in results}
    task = next(iter(results["sft"]["tasks"]), None)
    if task is None:
        return "chat loss " + " -> ".join(f"{r['chat']['loss']:.3f}" for r in results.values())
    acc = " -> ".join(eval_stage.pct(r["tasks"][task]["accuracy"]) for r in results.values())
    eot = " -> ".join(eval_stage.pct(r["tasks"][task]["end_of_turn"]) for r in results.values())
    return f"{task} {acc} ({' -> '.join(results)}), ends turn {eot}"


def main(cfg: PipelineConfig) -> Path:
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    configs = _stage_configs(cfg, run)
    outs = {"data": run / "data", "tokenizer": run / "tokenizer", "pretrain": run / "base", "sft": run / "sft",
            "grpo": run / "grpo"}
    mains: dict[str, Callable[[Any], Any]] = {"data": data_stage.main, "tokenizer": tokenizer_stage.main,
                                             "pretrain": pretrain_stage.main, "sft": sft_stage.main,
                                             "grpo": grpo_stage.main}
    rows: list[dict[str, Any]] = []
    upstream_ran = False  # an earlier stage produced new output: everything after it must be redone
    t_run = time.time()
    for name in STAGES:
        if cfg.only and name != cfg.only:
            continue
        forced = upstream_ran or name in (cfg.from_stage, cfg.only)
        t0 = time.time()
        if name == "sample":
            texts = []
            for i, prompt in enumerate(cfg.prompts):
                sc = sample_stage.SampleConfig(ckpt=str(outs["pretrain"]), prompt=prompt, max_new_tokens=120,
                                               temperature=0.8, top_k=50, seed=cfg.seed + i, device=cfg.device)
                texts.append(prompt + sample_stage.main(sc, echo=False)[0])
            write_text_atomic(run / "samples.txt", ("\n" + "-" * 60 + "\n").join(texts) + "\n")
            print0(f"sample: {len(texts)} samples -> {run / 'samples.txt'}\n" + "-" * 60 + "\n" + texts[0].strip())
            rows.append({"stage": name, "status": "ran", "seconds": time.time() - t0,
                         "result": f"{len(texts)} samples in samples.txt", "peak_mb": peak_memory_mb()})
            continue
        if name == "eval":
            status, result = _eval(cfg, run, outs, forced)
            rows.append({"stage": name, "status": status, "seconds": time.time() - t0, "result": result,
                         "peak_mb": peak_memory_mb()})
            continue
        stage_cfg, out = configs[name], outs[name]
        status = _status(out, stage_cfg)
        if status == "done" and not forced:
            print0(f"{name}: up to date in {out}, skipped")
            rows.append({"stage": name, "status": "skipped", "seconds": 0.0, "result": _summary(name, out),
                         "peak_mb": peak_memory_mb()})
            continue
        if name in ("pretrain", "sft", "grpo"):
            # an interrupted run of the same config continues, unless its input just changed
            stage_cfg.resume = status == "partial" and not upstream_ran
            stage_cfg.overwrite = True
        mains[name](stage_cfg)
        upstream_ran = True
        rows.append({"stage": name, "status": "ran", "seconds": time.time() - t0, "result": _summary(name, out),
                     "peak_mb": peak_memory_mb()})
    total = time.time() - t_run
    lines = [f"{'stage':<10} {'status':<8} {'time':>8} {'peak MB':>8}  result"]
    lines += [f"{r['stage']:<10} {r['status']:<8} {r['seconds']:>7.1f}s {r['peak_mb']:>8.0f}  {r['result']}"
              for r in rows]
    lines.append(f"{'total':<10} {'':<8} {total:>7.1f}s {peak_memory_mb():>8.0f}")
    print0("\n" + "\n".join(lines))
    write_json_atomic(run / "pipeline.json", {"config": to_dict(cfg), "stages": rows, "seconds": total,
                                              "peak_mb": peak_memory_mb()})
    return run
