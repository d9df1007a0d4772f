"""`cakelm pipeline` end to end at the micro preset: stages, skipping, --from/--only, samples, export."""

from __future__ import annotations

import json
import math
import os
import re

from cakelm.checkpoint import load_meta
from cakelm.config import build_config
from cakelm.report import SECTIONS
from cakelm.stages import pipeline
from tests.test_report import CHROMIUM, open_in_chromium


def run(corpus, out, **kw):
    return pipeline.main(build_config(pipeline.PipelineConfig, ("test", {
        "preset": "micro", "data": [str(corpus)], "out": str(out), "prompts": ["KING.\n"],
        "sft_data": ["arithmetic"], "prefs_data": ["arithmetic"], "eval_tasks": ["arithmetic"], **kw})))


def test_pipeline_runs_skips_and_reruns(corpus, tmp_path, capsys) -> None:
    out = run(corpus, tmp_path / "run")
    for f in ("data/train.jsonl", "tokenizer/tokenizer.json", "tokenizer/train.bin", "base/model.safetensors",
              "samples.txt", "sft/model.safetensors", "prefs/train.jsonl", "rm/heads.safetensors",
              "dpo/model.safetensors", "ppo/heads.safetensors", "grpo/model.safetensors", "eval.json", "overopt.json",
              "compare/compare.json", "answers.json", "report.html", "report.md", "pipeline.json"):
        assert (out / f).is_file(), f
    assert load_meta(out / "base")["complete"] is True
    samples = (out / "samples.txt").read_text()
    assert samples.startswith("KING.\n") and len(samples) > 20
    first = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in first["stages"]] == ["ran"] * 13
    assert load_meta(out / "sft")["chat_format"] == "chat" and load_meta(out / "sft")["parent"] == str(out / "base")
    assert load_meta(out / "grpo")["parent"] == str(out / "sft") and load_meta(out / "grpo")["complete"]
    evals = json.loads((out / "eval.json").read_text())["models"]
    models = ("base", "sft", "dpo", "ppo", "grpo")
    assert [evals[m]["format"] for m in models] == ["playscript", "chat", "chat", "chat", "chat"]
    for m in models:
        t = evals[m]["tasks"]["arithmetic"]
        assert t["n"] + t["too_long"] == 16 and 0 <= t["accuracy"] <= 1 and 0 <= t["end_of_turn"] <= 1
        assert m == "base" or all(math.isfinite(evals[m]["rlhf"][k]) for k in ("gold", "proxy", "kl"))
    assert evals["sft"]["rlhf"]["kl"] == 0.0 and "rlhf" not in evals["base"]
    points = json.loads((out / "overopt.json").read_text())["points"]
    assert {p["run"] for p in points} == {"dpo", "ppo"} and all(math.isfinite(p["gold"]) for p in points)

    # the report card: every section, every model's row with finite numbers, and it renders in Chromium
    html = (out / "report.html").read_text()
    for title, _ in SECTIONS:
        assert f">{title}</h2>" in html, title
    models_html = html.split(">3. Models</h2>")[1].split("<h2")[0]
    for m in models:
        row = re.search(rf"<tr><td>{m}</td>.*?</tr>", models_html).group(0)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        numbers = [float(c.rstrip("%")) for c in cells[1:] if c not in ("—", "")]
        # accuracy, ends turn (+ gold, proxy, KL for chat models); chat loss is not measured here
        assert len(numbers) == (2 if m == "base" else 5) and all(map(math.isfinite, numbers)), (m, cells)
    if CHROMIUM or os.environ.get("CAKELM_REQUIRE_BROWSER"):
        widths, requests = open_in_chromium(out / "report.html", "pipeline_report.png", len(models))
        assert len(widths) >= 4 and all(w > 0 for w in widths)

    run(corpus, tmp_path / "run")  # nothing changed: every stage is skipped except sampling and the report
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 3 + ["ran"] + ["skipped"] * 8 + ["ran"]
    # in pipeline order, read back from eval.json
    assert "(base -> sft -> dpo -> ppo -> grpo)" in again["stages"][-3]["result"]
    table = capsys.readouterr().out
    assert "pretrain   skipped" in table and "total" in table

    step_before = load_meta(out / "base")["step"]
    run(corpus, tmp_path / "run", from_stage="pretrain")  # redo pretraining only
    third = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in third["stages"]] == ["skipped", "skipped"] + ["ran"] * 11
    assert load_meta(out / "base")["step"] == step_before

    run(corpus, tmp_path / "run", only="tokenizer")  # --only: just that stage, redone
    only = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in only] == [("tokenizer", "ran")]
