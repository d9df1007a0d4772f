"""EleutherAI's lm-evaluation-harness (PyPI `lm_eval`, its `local-completions` model) drives `cakelm serve` on two
small tasks defined here, offline: a loglikelihood multiple-choice task and a generate-until task over JSONL files
made in the test. Its scores must equal the ones computed directly from our model: each choice's log-likelihood
from a plain forward pass (the training path, not the server's), accuracy from their argmax, and exact match from
the engine's greedy generations. The harness tokenizes through the server's /tokenize (its `auto` tokenizer
backend finds it), so no Hugging Face tokenizer or hub access is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cakelm.checkpoint import load_model
from cakelm.engine import Engine, SamplingParams
from cakelm.rlhf import sequence_logprobs
from cakelm.serve import ServeConfig, build_app
from tests.serving import make_chat_checkpoint, running

pytest.importorskip("lm_eval")

MC_DOCS = [("Who wears the crown", ["the king", "a fool", "the night"]),
           ("What is sweet", ["love", "death", "the sword"]),
           ("Where goes the lord", ["to the house", "to heaven", "to the earth"]),
           ("Why speak thee", ["for honour", "for grace", "for fortune"])]
GEN_PROMPTS = ["KING.\nGood", "QUEEN.\nMy lord", "FOOL.\nWhat", "LORD.\nThe night"]
CONTEXT = 128


HARNESS = """
import json
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

r = simple_evaluate(model="local-completions", model_args="{model_args}", tasks=["cakelm_toy_mc", "cakelm_toy_gen"],
                    task_manager=TaskManager(include_path="{tasks}", include_defaults=False), batch_size=4,
                    log_samples=True)
out = {{"results": r["results"]}}
for task, samples in r["samples"].items():  # per doc: the log-likelihood of each choice, or the generations
    samples = sorted(samples, key=lambda s: s["doc_id"])
    out[task] = [[float(x[0][0]) if task.endswith("mc") else x[0] for x in s["resps"]] for s in samples]
print(json.dumps(out))
"""


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-evaluation-harness asks for it: the tokens of context + continuation
    past those of the context alone, no BOS (its `add_bos_token` default)."""
    whole, n_ctx = tok.encode(context + continuation), len(tok.encode(context))
    ids = torch.tensor([whole])
    reply = torch.zeros_like(ids)
    reply[0, n_ctx:] = 1
    with torch.no_grad():
        return sequence_logprobs(model, ids, reply).item()


def write_tasks(folder: Path, mc_labels: list[int], gen_answers: list[str]) -> None:
    folder.mkdir()
    with open(folder / "mc.jsonl", "w") as f:
        for (q, choices), label in zip(MC_DOCS, mc_labels):
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for p, a in zip(GEN_PROMPTS, gen_answers):
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    # YAML is a superset of JSON: the configs are written with json.dumps, so every string is quoted exactly
    mc = {"task": "cakelm_toy_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": str(folder / "mc.jsonl")},
          "test_split": "train", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
          "doc_to_choice": "{{choices}}", "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}
    gen = {"task": "cakelm_toy_gen", "dataset_path": "json",
           "dataset_kwargs": {"data_files": str(folder / "gen.jsonl")}, "test_split": "train",
           "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}]}
    (folder / "toy_mc.yaml").write_text(json.dumps(mc, indent=1))
    (folder / "toy_gen.yaml").write_text(json.dumps(gen, indent=1))


def test_lm_eval_scores_equal_ours(tok_dir, tmp_path) -> None:
    ckpt = make_chat_checkpoint(tmp_path / "ckpt", tok_dir, max_seq_len=CONTEXT)
    model, tok, _ = load_model(ckpt)
    # what the model itself says: each choice's log-likelihood, and greedy continuations cut at "\n"
    ours = [[loglikelihood(model, tok, f"Question: {q}\nAnswer:", " " + c) for c in choices]
            for q, choices in MC_DOCS]
    best = [max(range(len(s)), key=s.__getitem__) for s in ours]
    assert all(sorted(s)[-1] - sorted(s)[-2] > 1e-3 for s in ours)  # no near-ties a rounding could flip
    labels = [b if i % 2 == 0 else (b + 1) % 3 for i, b in enumerate(best)]  # right on half the docs
    generated = [c.text for c in Engine(model, tok).generate(
        [tok.encode(p) for p in GEN_PROMPTS],
        SamplingParams(8, temperature=0, stop_ids=(tok.bos_id,), stop_strings=("\n", tok.template.end)))]
    answers = [g if i % 2 == 0 else g + " (not this)" for i, g in enumerate(generated)]
    write_tasks(tmp_path / "tasks", labels, answers)

    app = build_app(ServeConfig(dtype="fp32", ckpt=str(ckpt), model_name="tiny", max_tokens=64, device="cpu"))
    with running(app) as url:
        # lm_eval's Python API in a process of its own (its environment decides what the hub libraries may
        # reach); only our task folder is indexed, not the thousands of built-in tasks (seconds saved)
        script = HARNESS.format(model_args=f"model=tiny,base_url={url}/v1/completions,max_length={CONTEXT}",
                                tasks=str(tmp_path / "tasks"))
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": ""}
        proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["results"]["cakelm_toy_mc"]["acc,none"] == 0.5
    assert out["results"]["cakelm_toy_gen"]["exact_match,none"] == 0.5
    for scores, expected in zip(out["cakelm_toy_mc"], ours):  # every choice's score, not just the argmax
        assert scores == pytest.approx(expected, abs=1e-4)
    assert out["cakelm_toy_gen"] == [[g] for g in generated]
