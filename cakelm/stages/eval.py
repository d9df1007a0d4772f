"""`cakelm eval CKPT`: what a checkpoint can do, measured the same way for every stage.

    cakelm eval runs/default/sft                          # arithmetic, gsm and chat loss; a table
    cakelm eval runs/default/base --json base_eval.json   # a base model: few-shot playscript prompts
    cakelm eval runs/default/sft --tasks arithmetic --limit 500

For each task (see `cakelm.tasks`; the problems are the held-out ones, never trained on; or your own JSONL file
of conversations, each with an "answer"):
- accuracy: the model answers each question by greedy generation (batched through the engine), and the reply
  is right when its final number equals the answer (exact match, "The answer is 1,234." reads as 1234);
- ends turn: the share of replies that end their turn themselves (<|end|> in chat format, the next "USER:"
  line in a playscript) instead of running into the token limit.
A chat model is asked directly. A base model speaks the playscript (see `chat_format.py`), and each question
follows --shots worked examples from the training problems, so it can pick up the answer format.

--pass-k 1 4 16: also max(k) sampled replies per problem (--pass-temperature) and the unbiased pass@k of each k
(Chen et al. 2021): whether a model can sample right answers that its greedy reply misses.

`chat`: loss per assistant token (nats) on held-out conversations (the ones `cakelm sft` holds out), in the
format the model speaks.

`infill` (a model pretrained with --fim-rate): gaps of 1-3 tokens cut from the validation documents of
--infill-data (a `cakelm tokenizer` folder), each with up to 48 tokens before and 24 after; accuracy is the share
of greedy middles that are exactly the text cut out, "ends turn" the share that ended by themselves, and the
row adds the cut-out tokens' loss after the prompt with the suffix and after the prefix alone
(`cakelm.heldout.infill_exact_match`, `infill_nll`).

Prints a table; --json writes the results (with a few example replies per task).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cakelm.chat_format import Message, fit_history, format_of, render_prompt, stop_rules
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device, print0, seed_everything, write_json_atomic
from cakelm.config import ConfigError, opt
from cakelm.data.chat import read_chat_jsonl, train_and_heldout
from cakelm.data.chat_batches import encode_examples, fixed_batches
from cakelm.data.fim import FimIds
from cakelm.data.shards import open_tokens
from cakelm.engine import Engine, SamplingParams
from cakelm.heldout import heldout_loss, infill_exact_match, infill_spans
from cakelm.model import Transformer
from cakelm.tasks import TASKS, is_correct, make_problems, pass_at_k
from cakelm.tokenizer import Tokenizer

EVALS = (*TASKS, "chat", "infill")


@dataclass
class EvalConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    tasks: list[str] = opt(["arithmetic", "gsm", "chat"], "what to measure: " + ", ".join(EVALS) +
                           ", or a .jsonl file of conversations with an \"answer\" field")
    limit: int = opt(200, "held-out problems (or conversations, for chat) per task")
    shots: int = opt(3, "worked examples before each question when the model speaks the playscript")
    chat_data: str = opt("chitchat", "conversations for the chat loss (a chat source, as in `cakelm sft`)")
    infill_data: str = opt("runs/default/tokenizer", "infill: the `cakelm tokenizer` folder whose validation "
                           "documents the gaps are cut from")
    max_new_tokens: int = opt(96, "longest reply in tokens")
    batch_size: int = opt(32, "questions generated at once")
    playscript: bool | None = opt(None, "ask as a plain-text playscript (default: from the checkpoint)")
    json: str | None = opt(None, "also write the results to this JSON file")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = opt(0, "random seed (which few-shot examples are shown)")
    progress: bool = opt(True, "show a progress bar while generating")
    pass_k: list[int] = opt([], "also sample max(k) replies per problem at --pass-temperature and report the unbiased "
                            "pass@k for each k (Chen et al. 2021), e.g. --pass-k 1 4 16; off by default")
    pass_temperature: float = opt(0.8, "sampling temperature of the pass@k replies")

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in EVALS and not t.endswith(".jsonl")]
        if bad or not self.tasks:
            raise ConfigError(f"--tasks: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(EVALS)})")
        if self.limit < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.shots < 0:
            raise ConfigError("--limit, --max-new-tokens and --batch-size must be >= 1, --shots >= 0")
        if any(k < 1 or k > 256 for k in self.pass_k) or self.pass_temperature <= 0:
            raise ConfigError("--pass-k values must be in 1..256 and --pass-temperature > 0")


def load_task(task: str, limit: int) -> list[tuple[list[Message], str]]:
    """(prompt messages, answer) pairs: the held-out problems of a built-in task, or the rows of a JSONL file:
    {"prompt": ..., "answer": ...} or messages ending on the question (a final assistant turn is dropped)."""
    if task in TASKS:
        return [([{"role": "user", "content": p.question}], p.answer) for p in make_problems(task, "eval", limit)]
    examples, _ = read_chat_jsonl(task, reply_required=False)
    out = []
    for ex in examples[:limit]:
        if ex.answer is None:
            raise CakeError(f'{ex.name}: an evaluation row needs an "answer" field')
        messages = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
        if messages[-1]["role"] != "user":
            raise CakeError(f"{ex.name}: an evaluation row must ask something: end on a user message")
        out.append((messages, ex.answer))
    return out


def task_accuracy(engine: Engine, fmt: str, task: str, cfg: EvalConfig) -> dict[str, Any]:
    """Greedy answers to the held-out problems of `task`: accuracy, ends-turn share, a few examples."""
    tok = engine.tok
    problems = load_task(task, cfg.limit)
    shots = []
    if fmt == "playscript" and task in TASKS and cfg.shots:
        shots = make_problems(task, "train", cfg.shots, seed=cfg.seed + 1)
    demo = [m for p in shots for m in ({"role": "user", "content": p.question},
                                       {"role": "assistant", "content": p.solution})]
    max_new = min(cfg.max_new_tokens, engine.context // 2)
    prompts, kept = [], []
    for messages, answer in problems:
        try:
            fitted, _ = fit_history(demo + messages, tok, fmt, engine.context - max_new)
        except CakeError:
            continue  # the question alone does not fit this model's context: counted as too long
        prompts.append(render_prompt(fitted, tok, fmt))
        kept.append((messages[-1]["content"], answer))
    stop_ids, stop_strings = stop_rules(tok, fmt)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_ids=stop_ids, stop_strings=stop_strings)
    correct = ended = reply_tokens = 0
    examples: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts), desc=f"eval {Path(task).name}", unit="q", dynamic_ncols=True, leave=False,
               disable=not cfg.progress)
    for i in range(0, len(prompts), cfg.batch_size):
        completions = engine.generate(prompts[i:i + cfg.batch_size], params)
        bar.update(len(completions))
        for c in completions:
            question, answer = kept[i + c.prompt_index]
            ok = is_correct(c.text, answer)
            correct += ok
            ended += c.finish_reason == "stop" and c.ids[-1] != tok.bos_id
            reply_tokens += len(c.ids)
            if len(examples) < 5:
                examples.append({"question": question, "reply": c.text.strip(), "answer": answer, "correct": ok})
    bar.close()
    n = len(kept)
    out = {"n": n, "too_long": len(problems) - n, "accuracy": correct / n if n else float("nan"),
           "end_of_turn": ended / n if n else float("nan"), "reply_tokens": reply_tokens / n if n else float("nan"),
           "shots": len(shots), "examples": examples}
    if cfg.pass_k and n:
        out["pass_at_k"] = sampled_pass_at_k(engine, prompts, [a for _, a in kept], params, cfg)
    return out


def sampled_pass_at_k(engine: Engine, prompts: list[list[int]], answers: list[str], greedy: SamplingParams,
                      cfg: EvalConfig) -> dict[str, float]:
    """max(k) replies per problem at cfg.pass_temperature (each problem seeded on its own), and the mean over the
    problems of the unbiased pass@k for each k in cfg.pass_k (`cakelm.tasks.pass_at_k`)."""
    samples = max(cfg.pass_k)
    params = SamplingParams(max_new_tokens=greedy.max_new_tokens, temperature=cfg.pass_temperature,
                            stop_ids=greedy.stop_ids, stop_strings=greedy.stop_strings)
    right = [0] * len(prompts)
    per_batch = max(1, cfg.batch_size // samples)
    bar = tqdm(total=len(prompts), desc=f"pass@k, {samples} samples each", unit="q", dynamic_ncols=True, leave=False,
               disable=not cfg.progress)
    for i in range(0, len(prompts), per_batch):
        batch = prompts[i:i + per_batch]
        seeds = [cfg.seed * 1_000_003 + i + j for j in range(len(batch))]
        for c in engine.generate(batch, params, n=samples, seeds=seeds):
            right[i + c.prompt_index] += is_correct(c.text, answers[i + c.prompt_index])
        bar.update(len(batch))
    bar.close()
    return {str(k): sum(pass_at_k(samples, c, k) for c in right) / len(right) for k in sorted(set(cfg.pass_k))}


def chat_heldout_loss(model: Transformer, tok: Tokenizer, fmt: str, cfg: EvalConfig) -> dict[str, Any]:
    """Loss per assistant token on the held-out conversations of cfg.chat_data."""
    _, examples, _ = train_and_heldout(cfg.chat_data, val_size=cfg.limit)
    seqs, counts = encode_examples(examples, tok, fmt, model.cfg.max_seq_len + 1)
    batches = fixed_batches(seqs, cfg.batch_size, tok.pad_id, True, model.cfg.max_seq_len)
    total, n = heldout_loss(model, batches, model.lm_head.weight.device).tolist()
    n = int(n)
    return {"loss": total / n if n else float("nan"), "tokens": n, "conversations": counts["conversations"],
            "data": cfg.chat_data}


@torch.no_grad()
def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """All requested measurements of one checkpoint, as a dict (what --json writes)."""
    if not cfg.ckpt:
        raise CakeError("give a checkpoint directory: cakelm eval CKPT")
    seed_everything(cfg.seed)
    model, tok, meta = load_model(cfg.ckpt, pick_device(cfg.device))
    model.eval()
    fmt = format_of(meta, cfg.playscript)
    engine = Engine(model, tok)
    t0 = time.time()
    out: dict[str, Any] = {"ckpt": str(cfg.ckpt), "stage": meta.get("stage"), "step": meta.get("step"),
                           "format": fmt, "tasks": {}}
    for task in cfg.tasks:
        if task == "chat":
            out["chat"] = chat_heldout_loss(model, tok, fmt, cfg)
        elif task == "infill":
            fim = FimIds.of(tok)
            data_tok = Tokenizer.load(Path(cfg.infill_data) / "tokenizer.json")
            ours = tok.hf.get_vocab(with_added_tokens=True)
            if any(ours.get(t) != i for t, i in data_tok.hf.get_vocab(with_added_tokens=True).items()):
                raise CakeError(f"--infill-data {cfg.infill_data}: encoded with another tokenizer than {cfg.ckpt}'s")
            val = open_tokens(cfg.infill_data, "val", data_tok.vocab_size)
            room = engine.context - 16  # 4 special tokens, a middle of up to 3 tokens and its 8 spare
            spans = infill_spans(val, fim, cfg.limit, cfg.seed, before=min(48, room * 2 // 3), after=min(24, room // 3))
            r = infill_exact_match(engine, spans, fim, cfg.batch_size)
            out["tasks"]["infill"] = {"n": r["n"], "too_long": 0, "accuracy": r["exact_match"],
                                      "end_of_turn": r["ended"], **{k: v for k, v in r.items() if "nll" in k},
                                      "examples": r["examples"]}
        else:
            out["tasks"][task] = task_accuracy(engine, fmt, task, cfg)
    out["seconds"] = time.time() - t0
    return out


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"  # NaN: nothing was asked


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """A table with one row per (checkpoint, task): accuracy, ends turn, and the chat loss."""
    lines = [f"{'model':<12} {'format':<10} {'task':<24} {'n':>5} {'accuracy':>9} {'ends turn':>10}"]
    for name, r in results.items():
        for task, t in r["tasks"].items():
            label = task if task in TASKS else Path(task).name
            label = label if len(label) <= 24 else "..." + label[-21:]
            lines.append(f"{name:<12} {r['format']:<10} {label:<24} {t['n']:>5} {pct(t['accuracy']):>9} "
                         f"{pct(t['end_of_turn']):>10}" + (f"  ({t['too_long']} too long for the context)"
                                                            if t["too_long"] else "")
                         + (f"  (gap tokens: {t['nll_with_suffix']:.3f} nats with the suffix, "
                            f"{t['nll_left_to_right']:.3f} without)" if "nll_with_suffix" in t else "")
                         + ("  " + ", ".join(f"pass@{k} {pct(v)}" for k, v in t["pass_at_k"].items())
                            if "pass_at_k" in t else ""))
        if r.get("rlhf"):
            h = r["rlhf"]
            lines.append(f"{name:<12} {r['format']:<10} {'gold / proxy / KL':<24} {h['n']:>5} {h['gold']:>9.3f}  "
                         f"proxy {h.get('proxy', float('nan')):.3f}, KL to SFT {h.get('kl', float('nan')):.2f} nats")
        if "chat" in r:
            c = r["chat"]
            lines.append(f"{name:<12} {r['format']:<10} {'chat loss':<24} {c['conversations']:>5} "
                         f"{c['loss']:>9.3f}  (nats per assistant token, held-out {c['data']})")
    return "\n".join(lines)


def main(cfg: EvalConfig) -> Path | None:
    result = evaluate_checkpoint(cfg)
    print0(format_results({Path(cfg.ckpt).name or cfg.ckpt: result}))
    if cfg.json:
        write_json_atomic(cfg.json, result)
        print0(f"eval: results -> {cfg.json}")
        return Path(cfg.json)
    return None
