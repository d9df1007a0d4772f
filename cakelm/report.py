"""The run report card: RUN/report.html (one self-contained file) and RUN/report.md, written at the end of
`cakelm pipeline` from what the stages left in the run directory.

    python -m cakelm.report runs/default        # (re)write the report of a run
    from cakelm.report import write_report, collect_answers
    html_path, md_path = write_report(Path("runs/default"))

Sections, each from its own file (a missing file gives a "not run" note, so a partial run still gets a report):
  1. Run: code version, hardware, the pipeline config, stage times and results   RUN/pipeline.json
  2. Pretraining: loss and bits-per-byte curves                                 RUN/base/metrics.jsonl
  3. Models: chat loss, task accuracy, end of turn, gold / reward-model reward, KL   RUN/eval.json
  4. Reward over-optimisation: gold and proxy reward against KL (Gao et al. 2022)   RUN/overopt.json
  5. Answers side by side                                                        RUN/answers.json
  6. Transformer vs LSTM (`cakelm compare`)                                        RUN/compare/compare.json

report.html embeds its images as base64 PNG data URIs and its CSS inline: no network, no JavaScript, one file to
mail around. report.md links the same images as files in RUN/report_files/. Both are rendered from one list of
sections (paragraphs, tables, images), so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cakelm.common import CakeError, code_version, hardware_info, pick_device, read_json, write_text_atomic
from cakelm.config import flatten
from cakelm.stages.table import MODELS

MODEL_ORDER = MODELS  # the stage table's model rows, in pipeline order
MISSING = "—"
# Questions for the side-by-side answers (section 6): small talk, arithmetic, a word problem, Shakespeare.
ANSWER_PROMPTS = ["Hello! How are you today?", "What is 17 + 25?",
                  "Tom has 3 apples and buys 4 more. How many apples does he have now?",
                  "Who was Romeo in love with?"]


@dataclass
class Section:
    """One report section: a title and blocks, each ("p", text) | ("note", text) | ("pre", text) |
    ("table", headers, rows) | ("img", file name, png bytes, alt text)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Formatting helpers


def fmt(x: Any, spec: str = ".3f") -> str:
    """A number for a table cell; a missing value (None, NaN, not a number) is the dash."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return MISSING
    return format(x, spec)


def pct(x: Any) -> str:
    """A rate in [0, 1] as a percentage (the dash when missing)."""
    return MISSING if fmt(x) == MISSING else f"{100 * x:.1f}%"


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read(path: Path) -> Any | None:
    """JSON of an optional input (None when the file is absent)."""
    return read_json(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# Sections


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
        ["device", hw["device"]], ["torch", f"{hw['torch']} ({hw['torch_threads']} threads)"]]))
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
    plt = _pyplot()
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
    blocks.append(("img", "pretrain.png", _figure_png(fig), "pretraining loss and bits per byte"))
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
    plt = _pyplot()
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
    blocks.append(("img", "overopt.png", _figure_png(fig), "gold and proxy reward against KL"))
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


SECTIONS = (("1. Run", run_section), ("2. Pretraining", pretrain_section), ("3. Models", models_section),
            ("4. Reward over-optimisation", overopt_section), ("5. RLHF rounds", rounds_section),
            ("6. Answers side by side", answers_section), ("7. Transformer vs LSTM", compare_section))


def build_sections(run: Path) -> list[Section]:
    """Every section, in order. An input that exists but cannot be read gives that section a note saying why,
    instead of costing the whole report."""
    out = []
    for title, build in SECTIONS:
        try:
            blocks = build(run)
        except (CakeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            blocks = [("note", f"Could not read this section's input: {type(e).__name__}: {e}")]
        out.append(Section(title, blocks))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering: one list of sections, two formats

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
       margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; white-space: pre-wrap;
         overflow-wrap: anywhere; max-width: 32em; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; }
.note { color: #777; font-style: italic; } .sub { color: #666; }
"""


NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(%|x| s| MB)?")


def _is_num(cell: str) -> bool:
    """Right-align plain numbers (with a unit at most) in HTML tables."""
    return NUMBER.fullmatch(cell) is not None


def render_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for s in sections:
        out.append(f"<section><h2>{esc(s.title)}</h2>")
        for b in s.blocks:
            if b[0] in ("p", "note"):
                out.append(f'<p{" class=note" if b[0] == "note" else ""}>{esc(b[1])}</p>')
            elif b[0] == "pre":
                out.append(f"<pre>{esc(b[1])}</pre>")
            elif b[0] == "table":
                _, headers, rows = b
                out.append("<table>")
                if any(headers):
                    out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>")
                out.append("<tbody>" + "".join(
                    "<tr>" + "".join(f'<td{" class=num" if _is_num(c) else ""}>{esc(c)}</td>' for c in row) + "</tr>"
                    for row in rows) + "</tbody></table>")
            elif b[0] == "img":
                _, _, png, alt = b
                out.append(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,'
                           f'{base64.b64encode(png).decode("ascii")}"></figure>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    # markdown renders raw HTML and a reply may contain some: escape & and < (enough to keep tags inert); pipes and
    # newlines are kept inside the table cell
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, sections: Sequence[Section], files: Path) -> str:
    """Markdown; images are written into `files` and linked relative to the markdown file's folder."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if b[0] == "p":
                out += [_md_cell(b[1]).replace("<br>", "\n"), ""]
            elif b[0] == "note":
                out += [f"*{_md_cell(b[1])}*", ""]
            elif b[0] == "pre":
                out += ["```", b[1], "```", ""]
            elif b[0] == "table":
                _, headers, rows = b
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif b[0] == "img":
                _, name, png, alt = b
                files.mkdir(parents=True, exist_ok=True)
                (files / name).write_bytes(png)
                out += [f"![{_md_cell(alt)}]({files.name}/{name})", ""]
    return "\n".join(out)


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
