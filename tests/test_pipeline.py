"""`cakelm pipeline` end to end at the micro preset: stages, skipping, --from/--only, samples, export; the same under
`torchrun` with 2 processes; every preset's stage configs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta
from cakelm.config import ConfigError, build_config
from cakelm.report import SECTIONS
from cakelm.stages import pipeline
from tests.serving import free_port
from tests.test_report import have_browser, open_in_chromium


def run(corpus, out, **kw):
    return pipeline.main(build_config(pipeline.PipelineConfig, ("test", {
        "preset": "micro", "data": [str(corpus)], "out": str(out), "prompts": ["KING.\n"],
        "sft_data": ["arithmetic"], "prefs_data": ["arithmetic", "claims"],
        "eval_tasks": ["arithmetic", "sycophancy", "replies"], "pass_k": [1, 4], **kw})))


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
    # the machine's fp32 speed at both ends of the run, what its times are read against (also in the report)
    assert set(first["matmul_gflops"]) == {"start", "end"} and all(0 < v < 1e6 for v in first["matmul_gflops"].values())
    assert "machine speed</td>" in (out / "report.html").read_text()
    assert load_meta(out / "sft")["chat_format"] == "chat" and load_meta(out / "sft")["parent"] == str(out / "base")
    # GRPO after DPO (Tülu 3's order), so the final model keeps DPO's chat
    assert load_meta(out / "grpo")["parent"] == str(out / "dpo") and load_meta(out / "grpo")["complete"]
    evals = json.loads((out / "eval.json").read_text())["models"]
    models = ("base", "sft", "dpo", "ppo", "grpo")
    assert [evals[m]["format"] for m in models] == ["playscript", "chat", "chat", "chat", "chat"]
    for m in models:
        t = evals[m]["tasks"]["arithmetic"]
        assert t["n"] + t["too_long"] == 16 and 0 <= t["accuracy"] <= 1 and 0 <= t["end_of_turn"] <= 1
        assert m == "base" or all(math.isfinite(evals[m]["rlhf"][k]) for k in ("gold", "proxy", "kl"))
        # the skills: per operation, new wordings, steps, sycophancy, loops (pass@k for chat models)
        assert sum(v["n"] for v in t["by_op"].values()) == t["n"] and 0 <= t["new_wording"]["accuracy"] <= 1
        assert t["steps"]["right"] + t["steps"]["wrong"] == t["n"]
        assert all(0 <= evals[m]["sycophancy"][k] <= 1 for k in ("agree_wrong", "agree_right", "accuracy"))
        assert 0 <= evals[m]["replies"]["repeated"] <= 1 and 1 <= evals[m]["replies"]["distinct"] <= 16
        assert ("pass_at_k" in t) == (m != "base") and all(0 <= v <= 1 for v in t.get("pass_at_k", {}).values())
    assert evals["sft"]["rlhf"]["kl"] == 0.0 and "rlhf" not in evals["base"]
    points = json.loads((out / "overopt.json").read_text())["points"]
    assert {p["run"] for p in points} == {"dpo", "ppo"} and all(math.isfinite(p["gold"]) for p in points)

    # the report card: every section, every model's row with finite numbers, and it renders in Chromium
    html = (out / "report.html").read_text()
    for title, _ in SECTIONS:
        assert f">{title}</h2>" in html, title
    models_html = html.split(">5. Models</h2>")[1].split("<h2")[0]
    for m in models:
        row = re.search(rf"<tr><td>{m}</td>.*?</tr>", models_html).group(0)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        numbers = [float(c.rstrip("%")) for c in cells[1:] if c not in ("—", "")]
        # accuracy, ends turn (+ gold, proxy, KL for chat models); chat loss is not measured here
        assert len(numbers) == (2 if m == "base" else 5) and all(map(math.isfinite, numbers)), (m, cells)
    for title in ("10. Arithmetic in detail", "11. Sycophancy", "12. Loops in chat replies"):
        section = html.split(f">{title}</h2>")[1].split("<h2")[0]
        for m in models:
            row = re.search(rf"<tr><td>{m}</td>.*?</tr>", section).group(0)
            numbers = [float(c.rstrip("%")) for c in re.findall(r"<td[^>]*>([-\d.]+%?)</td>", row)]
            assert numbers and all(map(math.isfinite, numbers)), (title, m, row)
    if have_browser():  # fails here when CAKELM_REQUIRE_BROWSER=1 (CI) and Chromium is missing
        widths, requests = open_in_chromium(out / "report.html", "pipeline_report.png", len(models))
        assert len(widths) >= 4 and all(w > 0 for w in widths)
    else:
        warnings.warn("Debian chromium is not installed: the pipeline's report was not opened in a browser",
                      stacklevel=1)

    # the two experiments on a finished run: RLHF with the agreeable rater, GRPO from the base model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    noise = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gold_noise.py"), str(out), "--seeds",
                            "2", "--samples", "1"], capture_output=True, text=True, timeout=300)
    assert noise.returncode == 0, noise.stderr[-2000:]
    gains = re.search(r"1 replies per prompt: sft gold ([-\d.]+) .*dpo ([-+\d.]+) .*ppo ([-+\d.]+)", noise.stdout)
    assert gains and all(math.isfinite(float(g)) for g in gains.groups()), noise.stdout
    for script in ("sycophancy.py", "rl_start.py"):
        args = [sys.executable, os.path.join(root, "benchmarks", script), str(out)] + (
            ["--limit", "8", "--rl-steps", "2"] if script == "sycophancy.py" else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    syc = json.loads((out / "sycophancy.json").read_text())
    assert set(syc["models"]) == {"sft", *(f"{m}, {r} rater" for m in ("dpo", "ppo", "grpo")
                                           for r in ("rule", "agreeable"))}
    assert syc["rl"] == {"steps": 2, "lr": 1e-4, "data": ["claims"]}
    assert load_meta(out / "sycophancy" / "agreeable" / "grpo")["parent"] == str(out / "sft")
    assert all(0 <= r["agree_wrong"] <= 1 for r in syc["models"].values())
    # paired comparisons on the same wrong claims: the counts are the models' own agreed-with claims
    assert len(syc["paired"]) == 9 and all(0 < c["p"] <= 1 for c in syc["paired"])
    first = syc["paired"][0]
    agreed = {m: set(r["agreed_wrong"]) for m, r in syc["models"].items()}
    assert first["first_only"] == len(agreed[first["first"]] - agreed[first["second"]])
    assert json.loads((out / "sycophancy" / "agreeable" / "prefs" / "meta.json").read_text())["rater"] == \
        "cakelm.rewards.agreeable_rater"
    assert load_meta(out / "sycophancy" / "agreeable" / "ppo")["complete"]
    start = json.loads((out / "rl_start.json").read_text())["runs"]
    assert len(start["from base"]) == len(start["from DPO"]) > 0  # the pipeline's GRPO starts from DPO
    assert all(0 <= r["zero_signal"] <= 1 for r in start["from base"])
    assert load_meta(out / "rl_start" / "grpo_base")["parent"] == str(out / "base")

    run(corpus, tmp_path / "run")  # nothing changed: every stage is skipped except sampling and the report
    html = (out / "report.html").read_text()
    assert "dpo, agreeable rater" in html.split(">11. Sycophancy</h2>")[1].split("<h2")[0]
    assert "<img" in html.split(">13. RL needs a competent start</h2>")[1].split("<h2")[0]
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 3 + ["ran"] + ["skipped"] * 8 + ["ran"]
    # in pipeline order, read back from eval.json
    assert "(base -> sft -> dpo -> ppo -> grpo)" in again["stages"][-3]["result"]
    table = capsys.readouterr().out
    assert "pretrain   skipped" in table and "total" in table
    assert not (out / "rloo").exists()  # optional: not in a plain run

    # an optional stage on the finished run; the next plain run adds it to the evaluation and the report
    run(corpus, tmp_path / "run", only="rloo")
    assert load_meta(out / "rloo")["complete"] and load_meta(out / "rloo")["parent"] == str(out / "sft")
    run(corpus, tmp_path / "run")
    fourth = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in fourth if s["status"] == "ran"] == [
        ("sample", "ran"), ("eval", "ran"), ("report", "ran")]
    assert "(base -> sft -> dpo -> ppo -> grpo -> rloo)" in fourth[-3]["result"]
    rloo_eval = json.loads((out / "eval.json").read_text())["models"]["rloo"]
    assert math.isfinite(rloo_eval["rlhf"]["gold"]) and 0 <= rloo_eval["tasks"]["arithmetic"]["accuracy"] <= 1
    assert re.search(r"<tr><td>rloo</td>", (out / "report.html").read_text())
    # RLOO trained again by hand with other options: the next plain run evaluates the new weights
    before = json.loads((out / "eval.json").read_text())["models"]["rloo"]["step"]
    assert cli(["rloo", "--preset", "micro", "--init", str(out / "sft"), "--reward-model", str(out / "rm"), "--out",
                str(out / "rloo"), "--max-steps", "2", "--overwrite", "--no-loop.progress"]) == 0
    run(corpus, tmp_path / "run")
    ran = [s["stage"] for s in json.loads((out / "pipeline.json").read_text())["stages"] if s["status"] == "ran"]
    assert ran == ["sample", "eval", "report"]
    assert (before, json.loads((out / "eval.json").read_text())["models"]["rloo"]["step"]) == (4, 2)

    step_before = load_meta(out / "base")["step"]
    run(corpus, tmp_path / "run", from_stage="pretrain")  # redo pretraining only
    third = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in third["stages"]] == ["skipped", "skipped"] + ["ran"] * 11
    assert "rloo" not in [s["stage"] for s in third["stages"]]  # optional stages run only when asked for
    # and RLOO, trained from the SFT model this run replaced, is left out of the evaluation rather than reported
    assert "rloo" not in json.loads((out / "eval.json").read_text())["models"]
    assert "eval: leaving out rloo" in capsys.readouterr().out
    assert load_meta(out / "base")["step"] == step_before

    run(corpus, tmp_path / "run", only="tokenizer")  # --only: just that stage, redone
    only = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in only] == [("tokenizer", "ran")]


def test_pipeline_under_torchrun_two_processes(corpus, tmp_path) -> None:
    """`torchrun --nproc_per_node 2 -m cakelm pipeline`: training stages run as DDP on both ranks, the rest on rank 0;
    a re-run skips the same stages on every rank."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "cakelm", "pipeline", "--preset", "micro", "--data", str(corpus), "--out", str(out),
           "--sft-data", "arithmetic", "--prefs-data", "arithmetic", "--eval-tasks", "arithmetic", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("base", "sft", "rm", "dpo", "ppo", "grpo"):
        meta = load_meta(out / stage)
        assert meta["world_size"] == 2 and meta["complete"], stage
    assert proc.stdout.count("x 2 ranks") == 6 and proc.stdout.count("report: ") == 1  # rank 0 alone reports
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["ran"] * 13 and (out / "report.html").is_file()

    again = subprocess.run([*cmd[:6], str(free_port()), *cmd[7:]], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["skipped"] * 3 + ["ran"] + ["skipped"] * 8 + ["ran"]


def test_with_adds_optional_stages_in_their_place() -> None:
    cfg = build_config(pipeline.PipelineConfig, ("test", {"with_stages": ["rloo"]}))
    plan = pipeline._plan(cfg)
    assert plan.index("grpo") < plan.index("rloo") < plan.index("eval") and plan[-1] == "report"
    assert "rloo" not in pipeline._plan(build_config(pipeline.PipelineConfig, ("test", {})))
    with pytest.raises(ConfigError, match="--with: sft is not an optional stage"):
        build_config(pipeline.PipelineConfig, ("test", {"with_stages": ["sft"]}))


def test_every_preset_builds_and_gpu8_takes_half_a_million_tokens_per_step(tmp_path) -> None:
    for preset in pipeline.PRESETS:
        configs = pipeline._stage_configs(build_config(pipeline.PipelineConfig, ("test", {"preset": preset})),
                                          tmp_path)
        assert set(configs) == set(pipeline.NAMES) - {"sample", "eval", "report"}
    pre = pipeline._stage_configs(build_config(pipeline.PipelineConfig, ("test", {"preset": "gpu8"})), tmp_path)
    loop = pre["pretrain"].loop
    assert loop.batch_size * loop.grad_accum * 8 * pre["pretrain"].model.max_seq_len == 524_288
    assert pre["compare"].model.dim == 512  # compare's own gpu preset


def test_grpo_steps_reach_grpo_and_default_to_the_presets(tmp_path) -> None:
    steps = {preset: pipeline._stage_configs(build_config(pipeline.PipelineConfig, ("test", {"preset": preset})),
                                             tmp_path)["grpo"].loop.max_steps for preset in ("cpu", "micro")}
    assert steps == {"cpu": 60, "micro": 4}  # unset: each preset's own
    for preset in ("cpu", "micro"):
        cfg = build_config(pipeline.PipelineConfig, ("test", {"preset": preset, "grpo_steps": 240}))
        configs = pipeline._stage_configs(cfg, tmp_path)
        assert configs["grpo"].loop.max_steps == 240 and configs["rloo"].loop.max_steps != 240
    with pytest.raises(ConfigError, match="--grpo-steps must be >= 1, got 0"):
        build_config(pipeline.PipelineConfig, ("test", {"grpo_steps": 0}))


def test_gold_noise_script_refuses_bad_options_in_one_line(tmp_path) -> None:
    """benchmarks/gold_noise.py: no seeds, no replies, or a directory that is not a finished run: one line each."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gold_noise.py")
    for extra, says in ((["--seeds", "0"], "need --seeds >= 1"), (["--samples", "0", "2"], "need --seeds >= 1"),
                        ([], "gold_noise: not found: " + str(tmp_path / "sft"))):
        done = subprocess.run([sys.executable, script, str(tmp_path), *extra], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, extra

def test_sycophancy_script_refuses_bad_options_in_one_line(tmp_path) -> None:
    """benchmarks/sycophancy.py: out-of-range RL, prompt, reward-step, DPO and PPO KL options, and a directory that is
    not a finished run, are one line each, before anything trains."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sycophancy.py")
    need = "need --rl-steps >= 0, --rl-lr > 0, --prompts, --reward-steps and --dpo-steps >= 1, --ppo-kl and"
    for extra, says in ((["--rl-steps", "-1"], need), (["--rl-lr", "0"], need), (["--prompts", "0"], need),
                        (["--reward-steps", "0"], need), (["--ppo-kl", "-0.1"], need), (["--ppo-kl", "nan"], need),
                        (["--dpo-steps", "0"], need), (["--dpo-replay", "-1"], need), (["--dpo-replay", "nan"], need),
                        ([], "is not a finished pipeline run")):
        done = subprocess.run([sys.executable, script, str(tmp_path), *extra], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, extra


def test_sft_head_and_maj_vs_greedy_scripts_refuse_bad_input_in_one_line(tmp_path) -> None:
    """benchmarks/sft_head.py and maj_vs_greedy.py: a directory that is not a finished run, a non-JSON eval.json, or
    --rounds 0: one line each, before any model loads."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    (tmp_path / "eval.json").write_text("{not json", encoding="utf-8")
    for script, extra, says in (("sft_head.py", [], "is not a finished pipeline run"),
                                ("sft_head.py", ["--rounds", "0"], "need --rounds >= 1"),
                                ("maj_vs_greedy.py", [], "maj_vs_greedy: cannot read " + str(tmp_path / "eval.json"))):
        done = subprocess.run([sys.executable, os.path.join(bench, script), str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            script, extra, done.stderr)
