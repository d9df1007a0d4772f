"""`cakelm pipeline`: every stage, in order, into one run directory.

    cakelm pipeline                          # the CPU preset on Shakespeare, into runs/default
    cakelm pipeline --preset micro --out runs/smoke
    cakelm pipeline --from pretrain          # redo pretraining (and what follows), keep data and tokenizer
    cakelm pipeline --only sft
    cakelm pipeline --only rloo              # an optional stage on a finished run (then `cakelm pipeline` adds it
                                             # to eval.json and the report)
    cakelm pipeline --with rloo              # the default stages and RLOO in its place
    cakelm pipeline --grpo-steps 240         # four times GRPO's steps (on a finished run: GRPO, eval, compare)
    torchrun --nproc_per_node 8 -m cakelm pipeline --preset gpu8 --data my_corpus/   # DDP on 8 GPUs

The stages, their order, their folders in the run directory and what each reads from the earlier ones are the rows
of `cakelm.stages.table` marked `pipeline`: data -> tokenizer -> pretrain -> sample -> sft -> prefs -> reward ->
dpo -> ppo -> grpo (-> rloo, optional) -> eval -> compare, then the report card. RUN/data, RUN/tokenizer, RUN/base,
RUN/samples.txt, RUN/sft, RUN/prefs (preference pairs judged by the rule-based rater), RUN/rm (reward model),
RUN/dpo, RUN/ppo, RUN/grpo, RUN/rloo, RUN/eval.json: task accuracy and chat loss of every model in the run, and for
the chat models the rater's gold reward, the reward model's proxy score and the KL to SFT on held-out prompts;
RUN/overopt.json: gold and proxy against KL along the DPO and PPO runs (measured on the same held-out prompts);
RUN/compare: an LSTM against the Transformer at equal size on the same tokens; the report card (RUN/report.html,
RUN/report.md: every stage's time and memory, the curves, the models table, the over-optimisation plot, every
model's answers to the same prompts side by side, and the comparison).
Under torchrun the training stages run on every rank with DDP; the others on rank 0 while the other ranks wait.
A stage whose output is complete and was made with the same resolved config is skipped; once a stage runs,
every later stage runs too (its input changed). The evaluation is redone when a model's weights, the reward
model's or the held-out prompts changed, and leaves out a model whose parent was made again after it (an optional
stage not redone). An interrupted training stage continues from its last checkpoint
(also under --only/--from, which otherwise redo their stages).
Each stage prints one summary line; the run ends with a table and RUN/pipeline.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cakelm.checkpoint import file_sha256, is_checkpoint, load_meta, load_model, tensors_digest
from cakelm.common import (
    CakeError,
    barrier,
    describe_speed,
    hardware_info,
    init_distributed,
    matmul_gflops,
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
from cakelm.stages import eval as eval_stage
from cakelm.stages import prefs as prefs_stage
from cakelm.stages import sample as sample_stage
from cakelm.stages import sft as sft_stage
from cakelm.stages.table import STAGE, STAGES, Stage
from cakelm.tracking import require

ROWS: tuple[Stage, ...] = tuple(s for s in STAGES if s.pipeline)  # the table's pipeline stages, in order
NAMES: tuple[str, ...] = (*(s.name for s in ROWS), "report")
OPTIONAL: tuple[str, ...] = tuple(s.name for s in ROWS if not s.default)
OWN_STEPS = ("sample", "eval", "report")  # run by the pipeline itself, not through a stage's main(config)
# replies sampled per held-out prompt for gold, proxy and KL: with 2, a model's gold moved by 0.03 (sd) between
# sampling seeds, as much as the +0.05 that DPO and PPO are asked to gain; with 4, DPO's and PPO's gains over
# SFT moved by 0.017-0.018 (`benchmarks/gold_noise.py`), for ~4 s more per chat model on 2 CPU cores
RLHF_SAMPLES = 4

# Per preset: the preset of each group of stages (the `preset_key` of their table rows), the number of held-out
# problems per evaluation task, of those the number whose pass@k is sampled (0: all), and the questions generated
# at once (eval_batch; the small presets' models take 256: greedy tasks 1.8x and the eval stage 1.17x faster than at
# 32, the same replies on the AVX2 EPYC, where a row's numbers do not depend on its batch; default `cakelm eval`'s 32).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"tokenizer": "cpu", "pretrain": "cpu", "sft": "cpu", "rl": "cpu", "rlhf": "cpu", "compare": "cpu",
            "eval_limit": 200, "pass_limit": 100, "eval_batch": 256},
    "micro": {"tokenizer": "micro", "pretrain": "micro", "sft": "micro", "rl": "micro", "rlhf": "micro",
              "compare": "micro", "eval_limit": 16, "eval_batch": 256},
    "10m": {"tokenizer": "10m", "pretrain": "10m", "sft": "cpu", "rl": "cpu", "rlhf": "cpu", "compare": "cpu",
            "eval_limit": 500},
    "gpu": {"tokenizer": "gpu", "pretrain": "gpu", "sft": "cpu", "rl": "cpu", "rlhf": "cpu", "compare": "gpu",
            "eval_limit": 1000},
    # `torchrun --nproc_per_node 8 -m cakelm pipeline --preset gpu8 --data YOUR_CORPUS`: every training stage runs
    # under DDP, the others on rank 0.
    "gpu8": {"tokenizer": "gpu", "pretrain": "gpu8", "sft": "cpu", "rl": "cpu", "rlhf": "cpu", "compare": "gpu",
             "eval_limit": 1000},
}


@dataclass
class PipelineConfig:
    preset: str = opt("cpu", "size of every stage: cpu (2 cores, minutes), micro (seconds), 10m, gpu (one GPU), "
                      "gpu8 (8 GPUs under torchrun)",
                      choices=tuple(PRESETS))
    out: str = opt("runs/default", "run directory (one subdirectory per stage)")
    data: list[str] = opt(["shakespeare", "arithmetic"], "text sources for pretraining (see `cakelm data --help`)")
    from_stage: str | None = opt(None, "rerun this stage and every later one", alias="--from", choices=NAMES)
    only: str | None = opt(None, "run just this stage", choices=NAMES)
    with_stages: list[str] = opt([], "also run these optional stages in their place: " + ", ".join(OPTIONAL),
                                 alias="--with")
    prompts: list[str] = opt(["Romeo.\n", "Hamlet.\n", "First Citizen.\n"], "prompts for the sample stage")
    sft_data: list[str] = opt(sft_stage.DEFAULT_DATA, "chat sources for SFT (see `cakelm sft --help`)")
    prefs_data: list[str] = opt(prefs_stage.DEFAULT_DATA,
                                "prompt sources for the preference pairs (see `cakelm prefs --help`)")
    grpo_data: list[str] = opt(["arithmetic"], "prompt sources for GRPO (see `cakelm grpo --help`)")
    rewards: list[str] = opt(["exact_match"], "GRPO rewards (see `cakelm grpo --help`)")
    grpo_steps: int | None = opt(None, "GRPO's steps (default: the preset's; the cpu preset's 60 fit the time "
                                 "target, 240 answered 11-18 points more held-out sums than SFT: README)")
    eval_tasks: list[str] = opt(["arithmetic", "chat", "sycophancy", "replies"],
                                "what the eval stage measures (see `cakelm eval`; gsm word problems are ~0% for every "
                                "model this size, so the pipeline leaves them out)")
    pass_k: list[int] = opt([1, 4, 16], "the eval stage's pass@k of every chat model (max(k) sampled replies per "
                            "problem, see `cakelm eval --pass-k`; `pass_k = []` in a --config file turns it off)")
    device: str = opt("auto", "device for training and sampling", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = opt(1337, "random seed")
    log_to: str = opt("", "also log every training stage to these trackers, comma-separated: tensorboard, wandb, "
                      "trackio (see `cakelm pretrain --help`); one group per run: `tensorboard --logdir RUN`")

    def __post_init__(self) -> None:
        if self.from_stage and self.only:
            raise ConfigError("use --from or --only, not both")
        if any(k < 1 or k > 256 for k in self.pass_k):
            raise ConfigError("--pass-k values must be in 1..256")
        if self.grpo_steps is not None and self.grpo_steps < 1:
            raise ConfigError(f"--grpo-steps must be >= 1, got {self.grpo_steps}")
        bad = [s for s in self.with_stages if s not in OPTIONAL]
        if bad:
            raise ConfigError(f"--with: {bad[0]} is not an optional stage (optional: {', '.join(OPTIONAL)})")


def _plan(cfg: PipelineConfig) -> list[str]:
    """The steps this run goes through, in order: --only's, else the default stages with --with's and --from's."""
    if cfg.only:
        return [cfg.only]
    return [n for n in NAMES if n == "report" or STAGE[n].default or n in cfg.with_stages or n == cfg.from_stage]


def stage_config(s: Stage, cfg: PipelineConfig, run: Path) -> Any:
    """A stage's config in a pipeline run: its preset for this pipeline preset, then its inputs (earlier stages'
    outputs), the pipeline options it takes, its output, and the device, seed and trackers."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if s.preset_key:
        name = PRESETS[cfg.preset][s.preset_key]
        layers.append((f"{s.name} preset {name}", (s.presets or {})[name]))
    default = s.config()
    over: dict[str, Any] = {"out": str(run / str(s.out))}
    for key, src in s.inputs.items():
        path = str(run / str(STAGE[src].out))
        over[key] = [path] if isinstance(getattr(default, key), list) else path
    over.update({key: getattr(cfg, option) for key, option in s.options.items()
                 if getattr(cfg, option) is not None})  # None: the stage preset's (--grpo-steps)
    where = "loop." if hasattr(default, "loop") else ""
    over.update({f"{where}{k}": getattr(cfg, k) for k in ("device", "seed", "log_to")
                 if hasattr(getattr(default, "loop", default), k)})
    return build_config(s.config, *layers, ("pipeline", over))


def run_config(run: Path) -> PipelineConfig:
    """The pipeline config a finished run was made with (RUN/pipeline.json), without what said which stages to
    (re)run: for tools that redo part of a run its way (`benchmarks/sycophancy.py`, `benchmarks/rl_start.py`)."""
    path = run / "pipeline.json"
    if not path.is_file():
        raise CakeError(f"{run}: not a pipeline run (no pipeline.json)")
    config = read_json(path)["config"]
    return build_config(PipelineConfig, ("run", {k: v for k, v in config.items()
                                                 if k not in ("from_stage", "only", "with_stages")}))


def _stage_configs(cfg: PipelineConfig, run: Path) -> dict[str, Any]:
    return {s.name: stage_config(s, cfg, run) for s in ROWS if s.name not in OWN_STEPS}


def _same(a: dict, b: dict) -> bool:
    """Configs equal up to the flags that say how to (re)start and where to run, not what to compute."""
    ignore = {"resume", "overwrite", "loop.device", "loop.progress", "loop.log_to", "device", "progress"}
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


def _summary(s: Stage, out: Path) -> str:
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    return s.summary(meta) if s.summary else ""


def _models(run: Path) -> dict[str, Path]:
    """The run's models (the table's model rows) that have a checkpoint, in pipeline order; a model whose parent
    checkpoint was made again after it (an optional stage left out of a run that redid SFT) is left out, said."""
    out = {}
    for s in ROWS:
        ckpt = run / str(s.out)
        if not (s.model and is_checkpoint(ckpt)):
            continue
        parent = load_meta(ckpt).get("parent")
        if parent and is_checkpoint(parent) and _mtime(Path(parent)) > _mtime(ckpt):
            print0(f"eval: leaving out {s.model}: {parent} was made again after it (run `cakelm pipeline --only "
                   f"{s.name}` to redo it)")
            continue
        out[s.model] = ckpt
    return out


def _mtime(ckpt: Path) -> int:
    return (ckpt / "model.safetensors").stat().st_mtime_ns


def _digest(path: Path) -> str:
    """A fingerprint of a file (a checkpoint's weights, held-out prompts): an evaluation made from other contents
    is out of date. Weights by what they hold (`checkpoint.tensors_digest`), so a model retrained bit for bit is
    not evaluated again."""
    return (tensors_digest(path) if path.suffix == ".safetensors" else file_sha256(path))[:16]


def _eval(cfg: PipelineConfig, run: Path, forced: bool) -> tuple[str, str]:
    """Evaluate every model of the run into RUN/eval.json, and collect RUN/overopt.json (skipped when up to date:
    the same settings and the same weights of every model)."""
    path = run / "eval.json"
    models = _models(run)
    rm, prefs = run / str(STAGE["reward"].out), run / str(STAGE["prefs"].out)
    # what the numbers are computed from: every model's weights, the reward model's, the held-out prompts
    inputs = {**models, "reward model": rm}
    settings = {"tasks": cfg.eval_tasks, "limit": PRESETS[cfg.preset]["eval_limit"], "models": list(models),
                "pass_k": cfg.pass_k, "pass_limit": PRESETS[cfg.preset].get("pass_limit", 0),
                "rlhf_samples": RLHF_SAMPLES, "weights": {m: _digest(p / "model.safetensors") for m, p in
                                                          inputs.items()},
                "prompts": _digest(prefs / "val_prompts.jsonl")}
    old = read_json(path) if path.is_file() else None
    if not forced and old and old.get("settings") == settings:
        print0(f"eval: up to date in {path}, skipped")
        return "skipped", _eval_summary(old["models"])
    results = {}
    device = pick_device(cfg.device)
    ref, tok, _ = load_model(run / str(STAGE["sft"].out), device)
    rows = heldout_rows(prefs, [], tok, ref.cfg.max_seq_len - 64)
    judge = RLHFEval(rows, tok, load_scalar_model(rm, device)[0], ref, 64, cfg.seed, RLHF_SAMPLES)
    batch = PRESETS[cfg.preset].get("eval_batch", 32)
    for name, ckpt in models.items():
        ec = build_config(eval_stage.EvalConfig, ("pipeline", {"ckpt": str(ckpt), "tasks": settings["tasks"],
                                                               "limit": settings["limit"], "device": cfg.device,
                                                               "seed": cfg.seed,
                                                               "pass_k": [] if name == "base" else cfg.pass_k,
                                                               "pass_limit": settings["pass_limit"],
                                                               "batch_size": batch}))
        results[name] = eval_stage.evaluate_checkpoint(ec)
        if results[name]["format"] == "chat":  # gold, proxy and KL to SFT on the held-out RLHF prompts
            model = load_model(ckpt, device)[0]
            results[name]["rlhf"] = {"n": len(rows) * RLHF_SAMPLES, **judge(model)}
    write_json_atomic(path, {"settings": settings, "models": results})
    write_json_atomic(run / "overopt.json", {"points": _overopt_points(run, results)})
    print0(eval_stage.format_results(results))
    return "ran", _eval_summary(results)


def _overopt_points(run: Path, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Gold and proxy against KL: the SFT model (KL 0, as the eval step measured it), then every held-out
    evaluation along the runs measured on the same prompts, the preference data's held-out ones (DPO, PPO: val_kl
    and val_proxy in their metrics.jsonl). RLOO measures its own --data's held-out prompts: not on this curve."""
    points = []
    sft = results.get("sft", {}).get("rlhf", {})
    for s in ROWS:
        metrics = run / str(s.out) / "metrics.jsonl"
        if not (s.model and s.inputs.get("data") == "prefs" and s.model in results and metrics.is_file()):
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        found = [{"run": s.model, "label": f"step {r['step']}", "kl": r["val_kl"], "gold": r["val_gold"],
                  "proxy": r["val_proxy"]} for r in rows if "val_kl" in r and "val_proxy" in r]
        if found and sft:
            points.append({"run": s.model, "label": "sft", "kl": 0.0, "gold": sft["gold"], "proxy": sft["proxy"]})
        points += found
    return points


def _eval_summary(results: dict[str, Any]) -> str:
    # in pipeline order (eval.json is written with sorted keys)
    results = {s.model: results[s.model] for s in ROWS if s.model in results}
    task = next(iter(results["sft"]["tasks"]), None)
    if task is None:
        return "chat loss " + " -> ".join(f"{r['chat']['loss']:.3f}" for r in results.values())
    acc = " -> ".join(eval_stage.pct(r["tasks"][task]["accuracy"]) for r in results.values())
    eot = " -> ".join(eval_stage.pct(r["tasks"][task]["end_of_turn"]) for r in results.values())
    gold = " / ".join(f"{m} {r['rlhf']['gold']:.2f}" for m, r in results.items() if r.get("rlhf"))
    return f"{task} {acc} ({' -> '.join(results)}), ends turn {eot}" + (f"; gold {gold}" if gold else "")


def main(cfg: PipelineConfig) -> Path:
    info, _ = init_distributed(cfg.device)
    require(cfg.log_to)  # a tracker's package missing: say so before the first stage, not at the first training
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    configs = _stage_configs(cfg, run)
    rows: list[dict[str, Any]] = []
    # the machine's speed at the start and at the end: what the stage times are read against (pipeline.json)
    speed = {"start": matmul_gflops(pick_device(cfg.device))} if info.is_main else {}
    upstream_ran = False  # an earlier stage produced new output: everything after it must be redone
    t_run = time.time()
    for name in _plan(cfg):
        trains = name in STAGE and STAGE[name].trains
        forced = upstream_ran or name in (cfg.from_stage, cfg.only)
        ran = False
        # training stages run on every rank (DDP under torchrun); the others on rank 0 while the rest wait
        if trains or info.is_main:
            row = _run_stage(name, cfg, run, configs, forced, upstream_ran, rows, t_run, speed)
            rows.append(row)
            ran = row["status"] == "ran" and name not in OWN_STEPS
        if info.enabled and not trains:
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
    speed["end"] = matmul_gflops(pick_device(cfg.device))
    lines.append(f"machine: {describe_speed(speed)}")
    print0("\n" + "\n".join(lines))
    _write_summary(cfg, run, rows, t_run, speed)
    return run


def _run_stage(name: str, cfg: PipelineConfig, run: Path, configs: dict[str, Any], forced: bool,
               upstream_ran: bool, rows: list[dict[str, Any]], t_run: float, speed: dict[str, float]
               ) -> dict[str, Any]:
    """Run (or skip) one stage; returns its row of the summary table."""
    t0 = time.time()

    def row(status: str, result: str) -> dict[str, Any]:
        return {"stage": name, "status": status, "seconds": time.time() - t0 if status == "ran" else 0.0,
                "result": result, "peak_mb": peak_memory_mb()}

    if name == "sample":
        texts = []
        for i, prompt in enumerate(cfg.prompts):
            sc = sample_stage.SampleConfig(ckpt=str(run / str(STAGE["pretrain"].out)), prompt=prompt,
                                           max_new_tokens=120, temperature=0.8, top_k=50, seed=cfg.seed + i,
                                           device=cfg.device)
            texts.append(prompt + sample_stage.main(sc, echo=False)[0])
        write_text_atomic(run / str(STAGE["sample"].out), ("\n" + "-" * 60 + "\n").join(texts) + "\n")
        print0(f"sample: {len(texts)} samples -> {run / 'samples.txt'}\n" + "-" * 60 + "\n" + texts[0].strip())
        return row("ran", f"{len(texts)} samples in samples.txt")
    if name == "report":  # always: it reads whatever the run holds, this run's times included
        answers = collect_answers(_models(run), ANSWER_PROMPTS, 64, pick_device(cfg.device))
        write_json_atomic(run / "answers.json", answers)
        done = row("ran", "report.html, report.md")
        _write_summary(cfg, run, [*rows, done], t_run, speed)
        html, _ = write_report(run)
        print0(f"report: {html}")
        return done
    if name == "eval":
        return row(*_eval(cfg, run, forced))
    s, stage_cfg = STAGE[name], configs[name]
    out = run / str(s.out)
    status = _status(out, stage_cfg)
    if status == "done" and not forced:
        print0(f"{name}: up to date in {out}, skipped")
        return row("skipped", _summary(s, out))
    if s.trains:
        # an interrupted run of the same config continues, unless its input just changed
        stage_cfg.resume = status == "partial" and not upstream_ran
    if hasattr(stage_cfg, "overwrite"):  # the run directory is the pipeline's: an out-of-date output is redone
        stage_cfg.overwrite = True
    s.main(stage_cfg)
    return row("ran", _summary(s, out))


def _write_summary(cfg: PipelineConfig, run: Path, rows: list[dict[str, Any]], t_run: float,
                   speed: dict[str, float]) -> None:
    """RUN/pipeline.json: the config, every stage's row, the total time and memory, the hardware, and its fp32
    matmul speed (GFLOP/s, `matmul_gflops`) at the start and the end of the run."""
    write_json_atomic(run / "pipeline.json", {"config": to_dict(cfg), "stages": rows, "seconds": time.time() - t_run,
                                              "peak_mb": peak_memory_mb(), "hardware": hardware_info(),
                                              "matmul_gflops": speed})
