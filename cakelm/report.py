"""The run report card: RUN/report.html (one self-contained file) and RUN/report.md, written at the end of
`cakelm pipeline` from what the stages left in the run directory.

    python -m cakelm.report runs/default        # (re)write the report of a run
    from cakelm.report import write_report, collect_answers
    html_path, md_path = write_report(Path("runs/default"))

Sections, each from its own file (a missing file gives a "not run" note, so a partial run still gets a report):
  1. The cake: each stage's effect on the number it targets, one picture       RUN/eval.json, RUN/base/metrics.jsonl
  2. Run: code version, hardware, the pipeline config, stage times and results   RUN/pipeline.json
  3. Pretraining: loss and bits-per-byte curves                                 RUN/base/metrics.jsonl
  4. Training curves of every other stage: loss, reward, KL, accuracy         RUN/<stage>/metrics.jsonl
  5. Models: chat loss, task accuracy, end of turn, gold / reward-model reward, KL   RUN/eval.json
  6. Reward over-optimisation: gold and proxy reward against KL (Gao et al. 2022)   RUN/overopt.json
  7. RLHF rounds (`cakelm pipeline --with rounds`)                              RUN/rounds.json
  8. Answers side by side                                                        RUN/answers.json
  9. Transformer vs LSTM (`cakelm compare`)                                        RUN/compare/compare.json
 10. Arithmetic in detail: per operation, new wordings, pass@k, worked steps      RUN/eval.json
 11. Sycophancy: agreement with users' wrong and right claims                     RUN/eval.json
 12. Loops in chat replies: repeated 4-grams, distinct replies                    RUN/eval.json
 13. RL needs a competent start: GRPO from base vs from a chat model             RUN/rl_start.json
     (10-13: `cakelm.report_skills`; RUN/sycophancy.json adds how a rater teaches sycophancy to 11)

report.html embeds its images as base64 PNG data URIs and its CSS inline: no network, no JavaScript, one file to
mail around. report.md links the same images as files in RUN/report_files/. Both are rendered from one list of
sections (paragraphs, tables, images; `cakelm.report_render`), so they always say the same thing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from cakelm.common import (
    CakeError,
    code_version,
    describe_speed,
    hardware_info,
    pick_device,
    read_json,
    write_text_atomic,
)
from cakelm.config import flatten
from cakelm.report_render import (
    MISSING,
    Section,
    figure_png,
    fmt,
    pct,
    pyplot,
    render_html,
    render_markdown,
)
from cakelm.report_skills import SKILL_SECTIONS
from cakelm.stages.table import MODELS, STAGES

MODEL_ORDER = MODELS  # the stage table's model rows, in pipeline order
# Questions for the side-by-side answers (section 8): small talk, arithmetic, a word problem, Shakespeare.
ANSWER_PROMPTS = ["Hello! How are you today?", "What is 17 + 25?",
                  "Tom has 3 apples and buys 4 more. How many apples does he have now?",
                  "Who was Romeo in love with?"]


def _read(path: Path) -> Any | None:
    """JSON of an optional input (None when the file is absent)."""
    return read_json(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# Sections


# The layers of the cake: which stage is which, and the number each one is there to move (as the eval measures it)
LAYER = {"pretrain": "cake", "sft": "icing", "rlhf": "cherry (RLHF)", "rl": "cherry (RL)"}
LAYER_COLOR = {"cake": "#b07a45", "icing": "#f2a7c3", "cherry (RLHF)": "#c0392b", "cherry (RL)": "#8e1b10"}


def _layer(model: str) -> str:
    """A model row's layer, from the stage table: pretrain, sft, or the preset group of an RLHF / RL stage."""
    stage = next(s for s in STAGES if s.model == model)
    return LAYER.get(stage.name) or LAYER.get(stage.preset_key or "", "cherry (RL)")


def _task_accuracy(r: dict[str, Any]) -> tuple[str, float | None]:
    """(task, held-out accuracy) of the task RL trains on: arithmetic, else the eval's first task."""
    tasks = r.get("tasks", {})
    name = "arithmetic" if "arithmetic" in tasks else next(iter(tasks), "")
    return name, tasks.get(name, {}).get("accuracy")


def cake_section(run: Path) -> list[tuple]:
    """One picture of the recipe's effect: for each stage the number it targets, before -> after. Pretraining
    lowers bits per byte; SFT makes the model a chat model (held-out chat loss); RLHF (DPO, PPO) raises the gold
    reward of the rater that stands in for people; RL (GRPO, RLOO) raises held-out task accuracy."""
    blocks: list[tuple] = []
    ev = _read(run / "eval.json")
    models = (ev or {}).get("models", {})
    names = [m for m in MODEL_ORDER if m in models]
    if not names:
        blocks.append(("note", "Not run: no eval.json with models in it."))
        return blocks
    path = run / "base" / "metrics.jsonl"
    bpb = [r["val_bpb"] for r in read_metrics(path) if "val_bpb" in r] if path.is_file() else []
    panels = [("chat loss, held-out (nats / token, lower is better)", lambda r: r.get("chat", {}).get("loss")),
              ("gold reward, held-out prompts (rater)", lambda r: r.get("rlhf", {}).get("gold")),
              (f"{_task_accuracy(models[names[0]])[0]} accuracy, held-out (%)",
               lambda r: None if _task_accuracy(r)[1] is None else 100 * _task_accuracy(r)[1])]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.4))
    for ax, (title, get) in zip(axes, panels):
        shown = [(m, get(models[m])) for m in names if isinstance(get(models[m]), (int, float))]
        bars = ax.bar([m for m, _ in shown], [v for _, v in shown],
                      color=[LAYER_COLOR[_layer(m)] for m, _ in shown])
        ax.bar_label(bars, fmt="%.2f" if "accuracy" not in title else "%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        if shown:
            lo, hi = min(v for _, v in shown), max(v for _, v in shown)
            ax.set_ylim(0 if "accuracy" in title else lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
        ax.grid(alpha=0.3, axis="y")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in LAYER_COLOR.values()]
    fig.legend(handles, list(LAYER_COLOR), loc="lower center", ncol=len(LAYER_COLOR), fontsize=9,
               bbox_to_anchor=(0.5, -0.06))
    blocks.append(("img", "cake.png", figure_png(fig), "each stage's effect on the number it targets"))

    def change(before: Any, after: Any, spec: str, scale: float = 1.0) -> list[str]:
        if not all(isinstance(x, (int, float)) for x in (before, after)):
            return [f"{fmt(before, spec)} -> {fmt(after, spec)}", MISSING]
        return [f"{fmt(before * scale, spec)} -> {fmt(after * scale, spec)}", fmt((after - before) * scale, "+" + spec)]

    rows = [["pretrain", "cake", "validation bits per byte (first -> last evaluation)",
             *change(bpb[0] if bpb else None, bpb[-1] if bpb else None, ".3f")]]
    ref = models.get("sft", {})
    for m in names:
        layer, r = _layer(m), models[m]
        if layer == "icing":
            rows.append([m, layer, "chat loss (nats / token)", *change(models.get("base", {}).get("chat", {}).get(
                "loss"), r.get("chat", {}).get("loss"), ".3f")])
        elif layer == "cherry (RLHF)":
            rows.append([m, layer, "gold reward (from SFT)", *change(ref.get("rlhf", {}).get("gold"),
                                                                    r.get("rlhf", {}).get("gold"), ".3f")])
        elif layer == "cherry (RL)":
            task, acc = _task_accuracy(r)
            rows.append([m, layer, f"{task} accuracy, % (from SFT)", *change(_task_accuracy(ref)[1], acc, ".1f",
                                                                             100.0)])
    blocks.append(("table", ["stage", "layer", "target", "before -> after", "change"], rows))
    blocks.append(("p", "The cake is self-supervised pretraining, the icing supervised fine-tuning on dialogues, the "
                        "cherry reinforcement learning: from preferences (RLHF: DPO, PPO against a reward model) and "
                        "from verifiable rewards (RL: GRPO, RLOO). Each stage is shown on the number it is there to "
                        "move; the tables below have every number of every model."))
    return blocks


# Training curves: the panels a stage's metrics.jsonl can fill (training value, and its held-out twin)
CURVES = (("loss", ("loss", "val_loss")), ("reward", ("reward", "val_reward")), ("gold reward", ("gold", "val_gold")),
          ("reward margin", ("margin", "val_margin")), ("KL to the reference", ("kl", "val_kl")),
          ("pair accuracy", ("pair_accuracy", "val_pair_accuracy")), ("accuracy", ("accuracy", "val_accuracy")))


def stage_curves(run: Path) -> list[tuple[str, list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]]]]:
    """[(stage, [(panel title, [(metric, [(step, value)])])])] for every training stage after pretraining (the
    stage table's, in pipeline order) with a metrics.jsonl: the CURVES panels it has data for."""
    found = []
    for s in STAGES:
        path = run / str(s.out) / "metrics.jsonl"
        if s.trains and s.name != "pretrain" and path.is_file():
            rows = read_metrics(path)
            panels = [(title, [(k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))])
                               for k in keys]) for title, keys in CURVES]
            panels = [(t, [(k, pts) for k, pts in series if pts]) for t, series in panels]
            found.append((s.name, [(t, series) for t, series in panels if series]))
    return [(name, panels) for name, panels in found if panels]


def curves_section(run: Path) -> list[tuple]:
    """The training curves of `stage_curves`, one row of panels per stage."""
    blocks: list[tuple] = []
    found = stage_curves(run)
    if not found:
        blocks.append(("note", "Not run: no metrics.jsonl of a training stage after pretraining."))
        return blocks
    plt = pyplot()
    cols = max(len(p) for _, p in found)
    fig, axes = plt.subplots(len(found), cols, figsize=(3.1 * cols, 2.5 * len(found)), squeeze=False)
    for row, (name, panels) in zip(axes, found):
        for ax in row[len(panels):]:
            ax.axis("off")
        for ax, (title, series) in zip(row, panels):
            for k, pts in series:
                held_out = k.startswith("val_")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if held_out else "-", markersize=3,
                        label="held-out" if held_out else "training", color="tab:red" if held_out else "tab:blue",
                        alpha=0.9 if held_out else 0.7)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend(fontsize=7)
    blocks.append(("img", "curves.png", figure_png(fig), "training curves of every stage after pretraining"))
    blocks.append(("p", "Blue: the training metric at each logged step (for RL, of that step's rollouts); red: the "
                        "held-out evaluation. Pair accuracy: how often the chosen reply out-scores the rejected one "
                        "(reward model, DPO); accuracy: the share of verifiably correct answers (of RL's rollouts, or "
                        "on held-out prompts); KL is to the frozen reference (the SFT model)."))
    return blocks


def run_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    pipe = _read(run / "pipeline.json")
    cfg = (pipe or {}).get("config", {})
    try:
        device = pick_device(cfg.get("device", "auto"))
    except CakeError:
        device = pick_device("auto")
    hw = hardware_info(device)
    blocks.append(("table", ["", ""], [
        ["run directory", str(run)], ["code version", code_version()],
        ["hardware", f"{hw['cpu']}, {hw['cpu_cores']} cores" + (f", GPU {hw['gpu']}" if hw["gpu"] else "")],
        ["device", hw["device"]], ["torch", f"{hw['torch']} ({hw['torch_threads']} threads)"],
        *([["machine speed", f"{speed} of the run (shared VMs drift: read the times against it)"]]
          if (speed := describe_speed((pipe or {}).get("matmul_gflops", {}))) else [])]))
    if pipe is None:
        blocks.append(("note", "Stages: not run (no pipeline.json in the run directory)."))
        return blocks
    blocks.append(("table", ["stage", "status", "time", "peak memory", "result"], [
        [r.get("stage", "?"), r.get("status", "?"), fmt(r.get("seconds"), ".1f") + " s",
         fmt(r.get("peak_mb"), ",.0f") + " MB", str(r.get("result", ""))] for r in pipe.get("stages", [])] + [
        ["total", "", fmt(pipe.get("seconds"), ".1f") + " s", fmt(pipe.get("peak_mb"), ",.0f") + " MB", ""]]))
    blocks.append(("table", ["pipeline option", "value"],
                     [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in sorted(flatten(cfg).items())]))
    return blocks


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows (a torn last line from a crash is skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pretrain_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    path = run / "base" / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    if not rows:
        blocks.append(("note", f"Not run: no pretraining metrics ({path.relative_to(run)})."))
        return blocks
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train")
    a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", label="validation")
    a.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    a.legend()
    bpb = [r for r in val if "val_bpb" in r]
    b.plot([r["step"] for r in bpb], [r["val_bpb"] for r in bpb], "o-", color="tab:red")
    b.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    blocks.append(("img", "pretrain.png", figure_png(fig), "pretraining loss and bits per byte"))
    last = rows[-1]
    blocks.append(("table", ["steps", "tokens", "train loss", "val loss", "val bits/byte", "tokens/s"], [[
        str(last.get("step", MISSING)), fmt(last.get("tokens"), ",.0f"), fmt(train[-1]["loss"] if train else None),
        fmt(val[-1]["val_loss"] if val else None), fmt(bpb[-1]["val_bpb"] if bpb else None),
        fmt(last.get("tok_per_s"), ",.0f")]]))
    return blocks


def models_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    ev = _read(run / "eval.json")
    if ev is None:
        blocks.append(("note", "Not run: no eval.json."))
        return blocks
    models = ev.get("models", {})
    names = [m for m in MODEL_ORDER if m in models] + sorted(m for m in models if m not in MODEL_ORDER)
    tasks: list[str] = []
    for m in names:
        tasks += [t for t in models[m].get("tasks", {}) if t not in tasks]
    headers = ["model", "chat loss", *(f"{Path(t).name} accuracy" for t in tasks), "ends turn", "gold reward",
               "reward-model score", "KL to SFT"]
    rows = []
    for m in names:
        r = models[m]
        per_task = r.get("tasks", {})
        # end of turn over every question asked (tasks weighted by their number of questions)
        asked = [(t.get("n", 0), t.get("end_of_turn")) for t in per_task.values()
                 if isinstance(t.get("end_of_turn"), (int, float)) and math.isfinite(t["end_of_turn"])]
        n = sum(k for k, _ in asked)
        rlhf = r.get("rlhf", {})
        rows.append([m, fmt(r.get("chat", {}).get("loss")),
                     *(pct(per_task.get(t, {}).get("accuracy")) for t in tasks),
                     pct(sum(k * e for k, e in asked) / n if n else None),
                     fmt(rlhf.get("gold")), fmt(rlhf.get("proxy")), fmt(rlhf.get("kl"))])
    blocks.append(("table", headers, rows))
    settings = ev.get("settings", {})
    blocks.append(("p", "Chat loss: nats per assistant token on held-out conversations (lower is better). Accuracy:"
                     " greedy answers to held-out problems"
                     + (f" ({settings['limit']} per task)" if "limit" in settings else "") +
                     ". Ends turn: replies that end their turn themselves. Gold reward: the rule-based rater's mean "
                     "score on held-out prompts; reward-model score: the learned reward model's (the proxy); KL to "
                     "SFT: nats per reply."))
    return blocks


def overopt_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    data = _read(run / "overopt.json")
    points = (data or {}).get("points", [])
    if not points:
        blocks.append(("note", "Not run: no overopt.json."))
        return blocks
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    runs = list(dict.fromkeys(p["run"] for p in points))
    for i, name in enumerate(runs):
        pts = sorted((p for p in points if p["run"] == name), key=lambda p: p["kl"])
        for ax, key in ((a, "gold"), (b, "proxy")):
            ax.plot([p["kl"] for p in pts], [p[key] for p in pts], "o-", color=f"C{i}", label=name.upper())
    a.set(xlabel="KL to the SFT model (nats per reply)", ylabel="gold reward (rater)", title="gold reward")
    b.set(xlabel="KL to the SFT model (nats per reply)", ylabel="reward-model score", title="proxy reward")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    blocks.append(("img", "overopt.png", figure_png(fig), "gold and proxy reward against KL"))
    blocks.append(("p", "As the policy moves away from the SFT model (KL grows), the proxy (the reward model it "
                     "optimises) keeps rising while the gold reward (what we actually want) rises, then stalls or "
                     "falls: reward over-optimisation (Gao et al. 2022, \"Scaling Laws for Reward Model "
                     "Overoptimization\")."))
    blocks.append(("table", ["run", "point", "KL", "gold", "proxy"],
                     [[p["run"], str(p.get("label", "")), fmt(p.get("kl")), fmt(p.get("gold")), fmt(p.get("proxy"))]
                      for p in points]))
    return blocks


def answers_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    data = _read(run / "answers.json")
    if not data or not data.get("prompts"):
        blocks.append(("note", "Not run: no answers.json."))
        return blocks
    models = data.get("models", {})
    names = [m for m in MODEL_ORDER if m in models] + sorted(m for m in models if m not in MODEL_ORDER)
    rows = [[prompt, *(str(models[m][i]) if i < len(models[m]) else MISSING for m in names)]
            for i, prompt in enumerate(data["prompts"])]
    blocks.append(("p", "Greedy replies of each model to the same prompts (a base model is asked in the playscript "
                     "format, the others in the chat format)."))
    blocks.append(("table", ["prompt", *names], rows))
    return blocks


def rounds_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    data = _read(run / "rounds.json")
    rows = (data or {}).get("rounds", [])
    if not rows:
        blocks.append(("note", "Not run: no rounds.json (`cakelm rlhf-round`)."))
        return blocks
    blocks.append(("table", ["round", "update", "rater", "pairs judged", "agreement", "RM pairs", "RM accuracy",
                             "gold reward", "reward-model score", "KL to SFT", "ends turn", "arithmetic right"],
                   [[str(r["round"]) + (" (SFT)" if r["round"] == 0 else ""), r.get("method", ""), r.get("rater", ""),
                     f"{r.get('labelled', r.get('judgements')):,}" if "judgements" in r else "",
                     pct(r.get("agreement")),
                     f"{r['train_pairs_rm']:,}" if "train_pairs_rm" in r else "", pct(r.get("rm_accuracy")),
                     fmt(r.get("gold")), fmt(r.get("proxy")), fmt(r.get("kl")), pct(r.get("end_of_turn")),
                     pct(r.get("accuracy"))] for r in rows]))
    blocks.append(("p", f"Each round judges new pairs of the latest policy's replies, retrains the reward model on "
                        f"every round's judgements and updates the policy. Measured on the same "
                        f"{data.get('held_out_prompts', '')} held-out prompts every round; the reward-model score of "
                        "a row is by that round's reward model (round 0 by round 1's), so compare the gold column "
                        "across rounds."))
    return blocks


def compare_section(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    folder = run / "compare"
    r = _read(folder / "compare.json")
    if r is None:
        blocks.append(("note", "Not run: no compare/compare.json (`cakelm compare`)."))
        return blocks
    m, tr = r["models"], r["training"]
    blocks.append(("table", ["model", "parameters", "shape", "steps", "tokens", "train time", "val bits/byte"], [
        ["Transformer", f"{m['transformer']['params']:,}",
         f"{m['transformer']['n_layers']} layers, width {m['transformer']['dim']}",
         str(tr["transformer"]["steps"]), fmt(tr["transformer"]["tokens"], ",.0f"),
         fmt(tr["transformer"]["seconds"], ".1f") + " s", fmt(tr["transformer"]["final_bpb"])],
        ["LSTM", f"{m['lstm']['params']:,}", f"{m['lstm']['n_layers']} layers, hidden {m['lstm']['hidden']}",
         str(tr["lstm"]["steps"]), fmt(tr["lstm"]["tokens"], ",.0f"), fmt(tr["lstm"]["seconds"], ".1f") + " s",
         fmt(tr["lstm"]["final_bpb"])],
        ["token frequencies alone", "", "(unigram reference)", "", "", "", fmt(tr.get("unigram_bpb"))]]))
    blocks.append(("table", ["context", "batch", "Transformer ms/step", "Transformer tokens/s", "LSTM ms/step",
                               "LSTM tokens/s", "Transformer / LSTM speed"], [
        [str(row["context"]), str(row["batch_size"]), fmt(row["transformer"]["ms_per_step"], ".1f"),
         fmt(row["transformer"]["tok_per_s"], ",.0f"), fmt(row["lstm"]["ms_per_step"], ".1f"),
         fmt(row["lstm"]["tok_per_s"], ",.0f"),
         fmt(row["transformer"]["tok_per_s"] / row["lstm"]["tok_per_s"], ".2f") + "x"] for row in r["speed"]]))
    for name in r.get("plots", []):
        if (folder / name).is_file():
            blocks.append(("img", f"compare_{name}", (folder / name).read_bytes(), name.removesuffix(".png")))
    for para in r.get("reading", "").split("\n\n"):
        if para.strip():
            blocks.append(("p", para.strip()))
    return blocks


SECTIONS = (("1. The cake: what each stage did", cake_section), ("2. Run", run_section),
            ("3. Pretraining", pretrain_section), ("4. Training curves", curves_section), ("5. Models", models_section),
            ("6. Reward over-optimisation", overopt_section), ("7. RLHF rounds", rounds_section),
            ("8. Answers side by side", answers_section), ("9. Transformer vs LSTM", compare_section),
            *SKILL_SECTIONS)


def build_sections(run: Path) -> list[Section]:
    """Every section, in order. An input that exists but cannot be read gives that section a note saying why,
    instead of costing the whole report."""
    out = []
    for title, build in SECTIONS:
        try:
            blocks = build(run)
        except (CakeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as e:
            blocks = [("note", f"Could not read this section's input: {type(e).__name__}: {e}")]
        out.append(Section(title, blocks))
    return out


def write_report(run: Path) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/report.md (+ RUN/report_files/*.png) from whatever the run holds."""
    run = Path(run)
    if not run.is_dir():
        raise CakeError(f"run directory not found: {run}")
    sections = build_sections(run)
    title = f"cakelm report: {run.resolve().name}"
    html_path, md_path = run / "report.html", run / "report.md"
    write_text_atomic(html_path, render_html(title, sections))
    write_text_atomic(md_path, render_markdown(title, sections, run / "report_files"))
    return html_path, md_path


# ----------------------------------------------------------------------------------------------------------------
# Answers side by side (RUN/answers.json, written by the pipeline)


@torch.no_grad()
def collect_answers(models: dict[str, Path], prompts: list[str], max_new_tokens: int = 96,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Greedy replies of each checkpoint to each prompt, in the format it speaks (a base model gets the
    playscript, a fine-tuned one the chat tokens), batched through the engine as `cakelm eval` does.
    Returns {"prompts": [...], "models": {name: [reply per prompt]}}; checkpoints that do not exist are skipped
    (a partial run). A prompt too long for a model's context gets a note instead of a reply."""
    from cakelm.chat_format import fit_history, format_of, render_prompt, stop_rules
    from cakelm.checkpoint import is_checkpoint, load_model
    from cakelm.engine import Engine, SamplingParams

    dev = pick_device(device) if isinstance(device, str) else device
    out: dict[str, Any] = {"prompts": list(prompts), "models": {}}
    for name, ckpt in models.items():
        if not is_checkpoint(ckpt):
            continue
        model, tok, meta = load_model(ckpt, dev)
        fmt_name = format_of(meta)
        engine = Engine(model, tok)
        max_new = min(max_new_tokens, engine.context // 2)
        ids, fits = [], []
        for p in prompts:
            try:
                fitted, _ = fit_history([{"role": "user", "content": p}], tok, fmt_name, engine.context - max_new)
                ids.append(render_prompt(fitted, tok, fmt_name))
                fits.append(True)
            except CakeError:
                fits.append(False)
        stop_ids, stop_strings = stop_rules(tok, fmt_name)
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_ids=stop_ids, stop_strings=stop_strings)
        replies = iter([c.text.strip() for c in sorted(engine.generate(ids, params), key=lambda c: c.prompt_index)]
                       if ids else [])
        out["models"][name] = [next(replies) if ok else "(prompt too long for this model's context)" for ok in fits]
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cakelm.report RUN_DIR")
    try:
        for p in write_report(Path(sys.argv[1])):
            print(p)
    except CakeError as e:
        sys.exit(f"report: error: {e}")
