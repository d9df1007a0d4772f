"""`cakelm pipeline` end to end at the micro preset: stages, skipping, --from/--only, samples, export."""

from __future__ import annotations

import json

from cakelm.checkpoint import load_meta
from cakelm.config import build_config
from cakelm.stages import pipeline


def run(corpus, out, **kw):
    return pipeline.main(build_config(pipeline.PipelineConfig, ("test", {
        "preset": "micro", "data": [str(corpus)], "out": str(out), "prompts": ["KING.\n"],
        "sft_data": ["arithmetic"], "eval_tasks": ["arithmetic"], **kw})))


def test_pipeline_runs_skips_and_reruns(corpus, tmp_path, capsys) -> None:
    out = run(corpus, tmp_path / "run")
    for f in ("data/train.jsonl", "tokenizer/tokenizer.json", "tokenizer/train.bin", "base/model.safetensors",
              "samples.txt", "sft/model.safetensors", "grpo/model.safetensors", "eval.json", "pipeline.json"):
        assert (out / f).is_file(), f
    assert load_meta(out / "base")["complete"] is True
    samples = (out / "samples.txt").read_text()
    assert samples.startswith("KING.\n") and len(samples) > 20
    first = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in first["stages"]] == ["ran"] * 7
    assert load_meta(out / "sft")["chat_format"] == "chat" and load_meta(out / "sft")["parent"] == str(out / "base")
    assert load_meta(out / "grpo")["parent"] == str(out / "sft") and load_meta(out / "grpo")["complete"]
    evals = json.loads((out / "eval.json").read_text())["models"]
    assert [evals[m]["format"] for m in ("base", "sft", "grpo")] == ["playscript", "chat", "chat"]
    for m in ("base", "sft", "grpo"):
        t = evals[m]["tasks"]["arithmetic"]
        assert t["n"] + t["too_long"] == 16 and 0 <= t["accuracy"] <= 1 and 0 <= t["end_of_turn"] <= 1

    run(corpus, tmp_path / "run")  # nothing changed: every stage is skipped except sampling
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped", "skipped", "ran", "skipped", "skipped",
                                                      "skipped"]
    assert "(base -> sft -> grpo)" in again["stages"][-1]["result"]  # in pipeline order, read back from eval.json
    table = capsys.readouterr().out
    assert "pretrain   skipped" in table and "total" in table

    step_before = load_meta(out / "base")["step"]
    run(corpus, tmp_path / "run", from_stage="pretrain")  # redo pretraining only
    third = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in third["stages"]] == ["skipped", "skipped", "ran", "ran", "ran", "ran", "ran"]
    assert load_meta(out / "base")["step"] == step_before

    run(corpus, tmp_path / "run", only="tokenizer")  # --only: just that stage, redone
    only = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in only] == [("tokenizer", "ran")]
