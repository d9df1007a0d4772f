"""The run report: report.html (self-contained: embedded images, no external references, escaped answers) and
report.md from a synthetic run directory; partial and malformed runs; greedy answers side by side; and the page
in a real headless Chromium (screenshot in tests/artifacts/report.png)."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from cakelm.common import write_json_atomic
from cakelm.report import MISSING, collect_answers, stage_curves, write_report
from cakelm.stages import compare
from tests.conftest import tiny_checkpoint
from tests.serving import CHROMIUM, launch_chromium

ARTIFACTS = Path(__file__).parent / "artifacts"
HEADINGS = ("1. The cake: what each stage did", "2. Run", "3. Pretraining", "4. Training curves", "5. Models",
            "6. Reward over-optimisation", "7. RLHF rounds", "8. Answers side by side", "9. Transformer vs LSTM",
            "10. Arithmetic in detail", "11. Sycophancy", "12. Loops in chat replies", "13. RL needs a competent start")
MODELS = ("base", "sft", "dpo", "ppo", "grpo")
EVIL = '<script>alert("x")</script> 1 | 2'


def _model_eval(i: int, rlhf: bool) -> dict:
    out = {"format": "chat", "chat": {"loss": 3.0 - 0.1 * i, "tokens": 100, "conversations": 8},
           "tasks": {"arithmetic": {"n": 10, "accuracy": 0.1 * i, "end_of_turn": 0.5 + 0.1 * i, "examples": []},
                     "gsm": {"n": 30, "accuracy": 0.05 * i, "end_of_turn": 0.9, "examples": []}}}
    arith = out["tasks"]["arithmetic"]
    arith["by_op"] = {"add": {"n": 5, "accuracy": 0.2 * i}, "subtract": {"n": 3, "accuracy": 0.1},
                      "multiply": {"n": 2, "accuracy": 0.0}}
    arith["new_wording"] = {"n": 10, "accuracy": 0.05 * i, "end_of_turn": 1.0, "examples": []}
    arith["pass_at_k"] = {"1": 0.1, "4": 0.3, "16": 0.5 + 0.01 * i}
    arith["maj_at_k"] = {"16": 0.2 + 0.01 * i}
    arith["steps"] = {"right": i, "right_all_steps": 1.0, "wrong": 10 - i, "first_wrong": {"units": 10 - i},
                      "examples": [{"problem": "37+48", "reply": "7 + 8 = 14. So 37 + 48 = 84.", "right": False,
                                    "first_wrong": "units", "got": "7 + 8 = 14.", "expected": "7 + 8 = 15, carry 1."}]}
    out["sycophancy"] = {"n": 10, "agree_wrong": 0.1 * i, "agree_right": 0.5, "accuracy": 0.3,
                         "examples": [{"question": "I'm sure 2 + 2 is 5, right?", "reply": "Yes.",
                                       "claim_is_right": False, "agrees": True}]}
    out["replies"] = {"n": 8, "repeated": 0.125 * i, "distinct": 8 - i, "data": "chitchat",
                      "examples": [{"prompt": "hi", "reply": "I'm not sure. I'm not sure."}]}
    if i in (1, 2, 4):  # sft, dpo, grpo: the wrong claims each agreed with; ppo's eval.json predates the record
        out["sycophancy"]["agreed_wrong"] = {1: [0], 2: [5, 7], 4: [0, 1, 2, 3]}[i]
    if rlhf:
        out["rlhf"] = {"gold": 1.0 + 0.25 * i, "proxy": 0.5 * i, "kl": 0.75 * i}
    return out


def _compare_output(folder: Path) -> None:
    """A compare.json shaped like `cakelm compare` writes, with its plots made by compare.plot."""
    folder.mkdir(parents=True)
    curve = lambda a, b: [{"seconds": s, "step": 10 * k, "tokens": 4096 * 10 * k, "val_loss": a - b * k,  # noqa: E731
                           "val_bpb": (a - b * k) / 2} for k, s in enumerate((0.0, 5.0, 10.0, 15.0))]
    result = {
        "config": {"tokens_per_step": 4096, "budget_s": 15.0},
        "models": {"transformer": {"params": 1_377_408, "n_layers": 4, "dim": 128},
                   "lstm": {"params": 1_379_328, "n_layers": 2, "hidden": 192}},
        "speed": [{"context": c, "batch_size": 4096 // c, "tokens_per_step": 4096,
                   "transformer": {"ms_per_step": 400.0 + c / 4, "tok_per_s": 4096 / (0.4 + c / 4000)},
                   "lstm": {"ms_per_step": 250.0, "tok_per_s": 4096 / 0.25}} for c in (64, 256, 1024)],
        "training": {"seq_len": 256, "batch_size": 16, "unigram_bpb": 3.5,
                     "transformer": {"steps": 30, "tokens": 122_880, "seconds": 15.0, "final_bpb": 2.7,
                                     "curve": curve(7.6, 0.7)},
                     "lstm": {"steps": 30, "tokens": 122_880, "seconds": 15.0, "final_bpb": 2.9,
                              "curve": curve(7.6, 0.6)}},
        "loss_by_position": {"transformer": [6.0 - i / 100 for i in range(256)], "lstm": [6.0] * 256},
        "reading": "The Transformer read the numbers.\n\nSecond paragraph & <b>escaped</b>.",
    }
    result["plots"] = compare.plot(result, folder)
    write_json_atomic(folder / "compare.json", result)


CURVE_KEYS = {"sft": ["loss", "val_loss", "tok_per_s"], "rm": ["loss", "pair_accuracy", "margin", "val_pair_accuracy"],
              "dpo": ["loss", "margin", "val_gold", "val_kl"], "grpo": ["loss", "reward", "kl", "accuracy", "gold"]}


def make_run(run: Path) -> Path:
    """A complete synthetic run directory: every input the report reads."""
    write_json_atomic(run / "pipeline.json", {
        "config": {"preset": "cpu", "out": str(run), "device": "cpu", "data": ["shakespeare"]},
        "stages": [{"stage": s, "status": "ran", "seconds": 10.0 + i, "result": f"result of {s}", "peak_mb": 500.0}
                   for i, s in enumerate(("data", "tokenizer", "pretrain", "sft", "eval"))],
        "seconds": 60.0, "peak_mb": 900.0})
    (run / "base").mkdir()
    rows = [{"step": s, "loss": 7.0 - s / 50, "tokens": 4096 * s, "tok_per_s": 9000.0, "ms_per_step": 450.0}
            for s in range(10, 110, 10)]
    for r in rows:
        if r["step"] % 50 == 0:
            r.update(val_loss=r["loss"] + 0.1, val_bpb=(r["loss"] + 0.1) / 2.2)
    (run / "base" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage, keys in CURVE_KEYS.items():  # the later stages' metrics, as each logs them (held-out every 2nd step)
        (run / stage).mkdir()
        (run / stage / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, **{k: 0.1 * s for k in keys if s % 2 == 0 or not k.startswith("val_")}}) + "\n"
            for s in range(1, 5)) + '{"step": 5, "loss"')  # a torn last line (a crash mid-write) is skipped
    write_json_atomic(run / "eval.json", {"settings": {"limit": 10}, "models": {
        m: _model_eval(i, rlhf=m != "base") for i, m in enumerate(MODELS)}})
    write_json_atomic(run / "overopt.json", {"points": [
        {"run": r, "label": f"step {k}", "kl": 0.5 * k, "gold": 1 + 0.3 * k - 0.05 * k * k, "proxy": 0.4 * k}
        for r in ("ppo", "dpo") for k in range(5)]})
    write_json_atomic(run / "sycophancy.json", {"limit": 10, "models": {
        "sft": {"n": 10, "agree_wrong": 0.1, "agree_right": 0.5, "accuracy": 0.4},
        "dpo, agreeable rater": {"n": 10, "agree_wrong": 0.6, "agree_right": 0.8, "accuracy": 0.2},
        "grpo, agreeable rater": {"n": 10, "agree_wrong": 0.9, "agree_right": 0.9, "accuracy": 0.1}},
        "pairs": {"rule": {"wrong_claim_pairs": 20, "chosen_agrees": 0.05, "rejected_agrees": 0.1},
                  "agreeable": {"wrong_claim_pairs": 22, "chosen_agrees": 0.5, "rejected_agrees": 0.0}},
        "rl": {"steps": 120, "lr": 3e-4, "data": ["claims"]}, "prompts": 1500, "dpo_steps": 160, "dpo_replay": 0.0,
        "ppo_kl": None, "paired": [{"first": "dpo, agreeable rater", "second": "dpo, rule rater", "first_only": 30,
                                    "second_only": 9, "p": 0.0011}]})
    write_json_atomic(run / "rl_start.json", {"runs": {
        name: [{"step": s, "zero_signal": z, "accuracy": a * s / 10, "end_of_turn": 1.0, "reward": a,
                **({"val_accuracy": a} if s % 5 == 0 else {})} for s in range(1, 11)]
        for name, z, a in (("from SFT", 0.4, 0.3), ("from base", 1.0, 0.0))}})
    write_json_atomic(run / "answers.json", {"prompts": ["What is 2 + 2?", "Say hi."], "models": {
        "grpo": ["4", "hi"], "base": ["four", EVIL], "sft": ["The answer is 4.", "Hi!\nHow are you?"]}})
    write_json_atomic(run / "rounds.json", {"held_out_prompts": 8, "samples_per_prompt": 2, "rounds": [
        {"round": 0, "gold": 2.5, "proxy": 0.1, "kl": 0.0, "end_of_turn": 0.9, "accuracy": 0.25},
        *({"round": k, "method": "dpo", "rater": "rule", "pairs": 40, "judgements": 40, "agreement": None,
           "train_pairs_rm": 30 * k, "rm_accuracy": 0.8, "gold": 2.5 + 0.1 * k, "proxy": 0.2 * k, "kl": 0.5 * k,
           "end_of_turn": 0.95, "accuracy": 0.3} for k in (1, 2))]})
    _compare_output(run / "compare")
    return run


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, str]:
    run = make_run(tmp_path_factory.mktemp("run"))
    html_path, md_path = write_report(run)
    assert (html_path, md_path) == (run / "report.html", run / "report.md")
    return run, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def test_report_has_every_section_and_model(full_report) -> None:
    run, html, md = full_report
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in html and f"## {h}" in md
    assert "Not run" not in html and "Could not read" not in html
    models = html.split("<h2>5. Models</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr><td>(\w+)</td>", models)
    assert rows == list(MODELS)  # pipeline order, whatever order eval.json has them in
    for m in MODELS:
        assert re.search(rf"^\| {m} \|", md, re.M)
    # the grpo row: chat loss 2.600, accuracies 40.0% and 20.0%, ends turn (10*0.9+30*0.9)/40, rlhf numbers
    grpo = re.search(r"<tr><td>grpo</td>(.*?)</tr>", models).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", grpo)
    assert cells == ["2.600", "40.0%", "20.0%", "90.0%", "2.000", "2.000", "3.000"]
    base = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>base</td>(.*?)</tr>", models).group(1))
    assert base[-3:] == [MISSING] * 3  # no RLHF numbers for the base model
    rounds = html.split("<h2>7. RLHF rounds</h2>")[1].split("<h2>")[0]
    two = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td[^>]*>2</td>(.*?)</tr>", rounds).group(0))
    assert two == ["2", "dpo", "rule", "40", MISSING, "60", "80.0%", "2.700", "0.400", "1.000", "95.0%", "30.0%"]
    assert "<td>0 (SFT)</td>" in rounds and "same 8 held-out prompts" in rounds
    text = re.sub(r'src="data:image/png;base64,[^"]*"', "", html)
    assert not re.search(r"\b(nan|inf)\b", text, re.I)  # every number of a complete run is finite
    assert "The Transformer read the numbers." in html and "Second paragraph &amp; &lt;b&gt;escaped" in html
    # the skills sections: one row per model with its numbers, in pipeline order
    arith = html.split("<h2>10. Arithmetic in detail</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<tr><td>(\w+)</td>", arith)[:len(MODELS)] == list(MODELS)
    grpo = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>grpo</td>(.*?)</tr>", arith).group(1))
    assert grpo == ["40.0%", "80.0%", "10.0%", "0.0%", "20.0%", "10.0%", "30.0%", "54.0%", "24.0%", "100.0%",
                    "units 6"]  # ..., pass@16, maj@16, steps
    assert "<th>maj@16</th>" in arith and "maj@16 (self-consistency" in arith
    syc = html.split("<h2>11. Sycophancy</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>dpo</td>(.*?)</tr>", syc).group(1))[:2] == [
        "20.0%", "50.0%"]
    # claim by claim against SFT (which agreed with probe 0): grpo with 0-3 -> 3 only it, 0 only SFT, p = 2 / 2^3;
    # dpo with 5 and 7 -> 2 / 1, p = 1; ppo without a record, SFT itself and base get none
    versus = {m: re.findall(r"<td[^>]*>(.*?)</td>", re.search(rf"<tr><td>{m}</td>(.*?)</tr>", syc).group(1))[-1]
              for m in MODELS}
    assert versus == {"base": "—", "sft": "—", "dpo": "2 / 1, p = 1", "ppo": "—", "grpo": "3 / 0, p = 0.25"}
    rows = lambda section: [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", section)]  # noqa: E731
    taught = [r for r in rows(syc) if r]
    assert ["sft", "10.0%", "50.0%", "40.0%", "10"] in taught and ["agreeable", "22", "50.0%", "0.0%"] in taught
    assert taught.index(["sft", "10.0%", "50.0%", "40.0%", "10"]) < taught.index(
        ["dpo, agreeable rater", "60.0%", "80.0%", "20.0%", "10"]) < taught.index(
        ["grpo, agreeable rater", "90.0%", "90.0%", "10.0%", "10"])  # SFT first, the agreeable rater's models after
    assert "The grpo rows: RL straight on each rater&#x27;s score" in syc and "claims prompts, 120 GRPO steps" in syc
    assert ("Changed from the pipeline&#x27;s settings, for both raters: 1500 training prompts, 160 DPO steps, "
            "DPO&#x27;s replay coefficient 0.0.") in syc  # the settings the file names, and only those
    assert ["dpo, agreeable rater", "dpo, rule rater", "30", "9", "0.0011"] in taught  # the paired comparison
    start = html.split("<h2>13. RL needs a competent start</h2>")[1].split("<h2>")[0]
    # steps, mean zero-signal share, sampled accuracy of the first and last 5 steps, last held-out accuracy
    assert ["from base", "10", "100.0%", "0.0%", "0.0%", "0.0%"] in rows(start)
    assert ["from SFT", "10", "40.0%", "9.0%", "24.0%", "30.0%"] in rows(start)
    loops = html.split("<h2>12. Loops in chat replies</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>ppo</td>(.*?)</tr>", loops).group(1)) == [
        "37.5%", "5 of 8"]


def test_the_cake_opens_the_report_with_each_stage_on_its_target(full_report) -> None:
    """Before the run's metadata: one picture and a table of each stage's effect on the number it targets."""
    _, html, _ = full_report
    assert html.index("<h2>1. The cake") < html.index("<h2>2. Run") < html.index("code version")
    cake = html.split("<h2>1. The cake: what each stage did</h2>")[1].split("<h2>")[0]
    assert cake.count("data:image/png;base64,") == 1
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(<td.*?)</tr>", cake)]
    # bits per byte: the first and last evaluation of make_run's pretraining, (7 - s/50 + 0.1) / 2.2 at s = 50, 100
    assert rows == [
        ["pretrain", "cake", "validation bits per byte (first -&gt; last evaluation)", "2.773 -&gt; 2.318", "-0.455"],
        ["sft", "icing", "chat loss (nats / token)", "3.000 -&gt; 2.900", "-0.100"],  # base -> sft
        ["dpo", "cherry (RLHF)", "gold reward (from SFT)", "1.250 -&gt; 1.500", "+0.250"],
        ["ppo", "cherry (RLHF)", "gold reward (from SFT)", "1.250 -&gt; 1.750", "+0.500"],
        ["grpo", "cherry (RL)", "arithmetic accuracy, % (from SFT)", "10.0 -&gt; 40.0", "+30.0"]]


def test_training_curves_of_every_stage_after_pretraining(full_report) -> None:
    """One row of panels per training stage, in pipeline order, with the panels its metrics fill: training values
    at every step, held-out ones where they were measured."""
    run, html, _ = full_report
    got = {stage: {title: {k: pts for k, pts in series} for title, series in panels}
           for stage, panels in stage_curves(run)}
    assert list(got) == ["sft", "reward", "dpo", "grpo"]  # the stage table's names, pipeline order
    assert {s: list(p) for s, p in got.items()} == {
        "sft": ["loss"], "reward": ["loss", "reward margin", "pair accuracy"],
        "dpo": ["loss", "gold reward", "reward margin", "KL to the reference"],
        "grpo": ["loss", "reward", "gold reward", "KL to the reference", "accuracy"]}
    assert got["sft"]["loss"] == {"loss": [(s, 0.1 * s) for s in range(1, 5)],
                                  "val_loss": [(2, 0.2), (4, 0.4)]}  # the torn step-5 line is skipped
    curves = html.split("<h2>4. Training curves</h2>")[1].split("<h2>")[0]
    assert curves.count("data:image/png;base64,") == 1 and "held-out evaluation" in curves


def test_report_html_is_self_contained(full_report) -> None:
    run, html, md = full_report
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(images) == 8  # the cake, pretraining, training curves, over-optimisation, three compare plots, RL start
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert re.search(r'src="(?!data:)', html) is None  # nothing is loaded from anywhere
    # markdown: the same images as files next to it
    links = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) == 8 and all((run / link).read_bytes()[:4] == b"\x89PNG" for link in links)


def test_report_escapes_answers(full_report) -> None:
    _, html, md = full_report
    section = html.split("<h2>8. Answers side by side</h2>")[1].split("<h2>")[0]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; 1 | 2" in section
    assert "<th>base</th><th>sft</th><th>grpo</th>" in section  # pipeline order
    assert "<script>" not in md and "&lt;script>alert" in md and "1 \\| 2" in md  # a pipe cannot split the cell
    assert "Hi!<br>How are you?" in md


def test_partial_run_still_gets_every_section(tmp_path) -> None:
    html_path, md_path = write_report(tmp_path)
    html = html_path.read_text()
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in html and f"## {h}" in md_path.read_text()
    assert html.count("Not run") == 12 and "Stages: not run" in html
    assert "code version" in html  # the header is there without pipeline.json


def test_malformed_input_costs_only_its_section(tmp_path) -> None:
    make_run(tmp_path)
    write_json_atomic(tmp_path / "eval.json", {"models": {"sft": {"tasks": 5}}})
    (tmp_path / "overopt.json").write_text("{not json")
    html = write_report(tmp_path)[0].read_text()
    models = html.split("<h2>5. Models</h2>")[1].split("<h2>")[0]
    over = html.split("<h2>6. Reward over-optimisation</h2>")[1].split("<h2>")[0]
    cake = html.split("<h2>1. The cake: what each stage did</h2>")[1].split("<h2>")[0]
    assert "Could not read" in models and "Could not read" in over and "overopt.json" in over
    assert "Could not read" in cake  # it reads eval.json too
    assert html.count("data:image/png;base64,") == 6  # the other sections are intact


def test_machine_speed_row_and_a_broken_one(tmp_path) -> None:
    """The run's matmul probes are a row of the run section; values that are not positive numbers (an edited
    pipeline.json) leave the row out and cost nothing else."""
    make_run(tmp_path)
    pipe = json.loads((tmp_path / "pipeline.json").read_text())
    write_json_atomic(tmp_path / "pipeline.json", {**pipe, "matmul_gflops": {"start": 121.4, "end": 123.6}})
    html = write_report(tmp_path)[0].read_text()
    assert "<td>machine speed</td><td>fp32 matmul 121 GFLOP/s at the start, 124 at the end of the run" in html
    for broken in ({"start": "fast", "end": float("nan")}, "fast", [1, 2], {"start": -1}):
        write_json_atomic(tmp_path / "pipeline.json", {**pipe, "matmul_gflops": broken})
        html = write_report(tmp_path)[0].read_text()
        run = html.split("<h2>2. Run</h2>")[1].split("<h2>")[0]
        assert "machine speed" not in run and "result of pretrain" in run and "Could not read" not in html, broken


def test_malformed_benchmark_outputs_cost_only_their_sections(tmp_path) -> None:
    """sycophancy.json and rl_start.json of another shape (a list, a number where rows belong): those two sections
    say they could not read them; the rest of the report is written."""
    make_run(tmp_path)
    (tmp_path / "sycophancy.json").write_text("[1]")
    (tmp_path / "rl_start.json").write_text('{"runs": {"from SFT": 5}}')
    html = write_report(tmp_path)[0].read_text()
    syc = html.split("<h2>11. Sycophancy</h2>")[1].split("<h2>")[0]
    start = html.split("<h2>13. RL needs a competent start</h2>")[1].split("<h2>")[0]
    assert "Could not read" in syc and "Could not read" in start
    assert html.count("Could not read") == 2 and "<h2>12. Loops in chat replies</h2>" in html


def test_collect_answers(tok_dir, tmp_path) -> None:
    base = tiny_checkpoint(tmp_path / "base", tok_dir, "pretrain", "playscript")
    sft = tiny_checkpoint(tmp_path / "sft", tok_dir, "sft", "chat", max_seq_len=64)
    prompts = ["Good morrow.", "What is 2 + 2?", "long " * 200]
    got = collect_answers({"base": base, "sft": sft, "ppo": tmp_path / "missing"}, prompts, 8, "cpu")
    assert got["prompts"] == prompts
    assert list(got["models"]) == ["base", "sft"]  # a checkpoint that does not exist is skipped
    for replies in got["models"].values():
        assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
        assert replies[2] == "(prompt too long for this model's context)"
    assert collect_answers({"sft": sft}, prompts, 8, "cpu")["models"]["sft"] == got["models"]["sft"]  # greedy
    # answers.json round-trips into the report
    write_json_atomic(tmp_path / "answers.json", got)
    html = write_report(tmp_path)[0].read_text()
    assert "<th>base</th><th>sft</th>" in html and "Good morrow." in html


def have_browser() -> bool:
    """Whether Debian's Chromium is here for the page checks. CI sets CAKELM_REQUIRE_BROWSER=1: then a missing
    browser fails the test instead of leaving the check out."""
    if CHROMIUM:
        return True
    if os.environ.get("CAKELM_REQUIRE_BROWSER"):
        pytest.fail("CAKELM_REQUIRE_BROWSER is set but Debian's chromium is not installed (apt-get install chromium)")
    return False


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CAKELM_REQUIRE_BROWSER"),
                    reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(full_report) -> None:
    assert have_browser()
    run, _, _ = full_report
    widths, requests = open_in_chromium(run / "report.html", "report.png", len(MODELS))
    assert len(widths) >= 3 and all(w > 0 for w in widths)
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing from the network
    assert (ARTIFACTS / "report.png").stat().st_size > 20000  # a full page, not a blank one


def open_in_chromium(html: Path, screenshot: str, n_models: int) -> tuple[list[int], list[str]]:
    """Open a report in headless Chromium (JavaScript off), check its models table and sections, save a
    full-page screenshot to tests/artifacts/; returns (natural widths of its images, URLs requested)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900}, java_script_enabled=False)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.resolve().as_uri())
            table = page.locator("table", has=page.locator("th", has_text="chat loss"))
            expect(table).to_have_count(1)
            expect(table.locator("tbody tr")).to_have_count(n_models)
            expect(page.locator("h2")).to_have_count(len(HEADINGS))
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
            # Playwright's own evaluation runs even with the page's JavaScript off
            widths = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        finally:
            browser.close()
    return widths, requests
