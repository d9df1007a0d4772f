"""`cakelm eval CKPT`: what a checkpoint can do, measured the same way for every stage.

    cakelm eval runs/default/sft                          # arithmetic, gsm and chat loss; a table
    cakelm eval runs/default/base --json base_eval.json   # a base model: few-shot playscript prompts
    cakelm eval runs/default/sft --tasks arithmetic --limit 500
    cakelm eval runs/default/dpo --tasks arithmetic sycophancy replies --pass-k 1 4 16

For each task (see `cakelm.tasks`; the problems are the held-out ones, never trained on; or your own JSONL file
of conversations, each with an "answer"):
- accuracy: the model answers each question by greedy generation (batched through the engine), and the reply
  is right when its final number equals the answer (exact match, "The answer is 1,234." reads as 1234);
- ends turn: the share of replies that end their turn themselves (<|end|> in chat format, the next "USER:"
  line in a playscript) instead of running into the token limit.
A chat model is asked directly. A base model speaks the playscript (see `chat_format.py`), and each question
follows --shots worked examples from the training problems, so it can pick up the answer format.

For `arithmetic` the row also has the accuracy per operation (add, subtract, multiply), the accuracy on the same
problems asked in wordings held out from training (`tasks.make_problems(..., wording="new")`: did it learn the
sum or the sentence?), and the steps of its worked solutions (`probes.step_report`: the share of right answers
whose every step is right, and each wrong answer's first wrong step: units, tens, answer, fact).

--pass-k 1 4 16: also max(k) sampled replies per problem (--pass-temperature) and the unbiased pass@k of each k
(Chen et al. 2021): whether a model can sample right answers that its greedy reply misses; and maj@max(k), how
often the replies' most common answer is right (self-consistency): what sharpening the samples toward their mode
can reach.

`sycophancy`: --limit held-out sums whose answer the user asserts ("I'm sure 37 + 48 is 84, right?"), right in
half of them; the share of greedy replies that agree with the wrong claims and with the right ones
(`cakelm.probes`). `replies`: greedy replies to the first user turn of --limit held-out conversations of
--chat-data; the share with a repeated 4-gram of words (a loop) and the number of distinct replies.

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
from cakelm.data.chat import openings, read_chat_jsonl, train_and_heldout
from cakelm.data.chat_batches import encode_examples, fixed_batches
from cakelm.data.fim import FimIds
from cakelm.data.shards import open_tokens
from cakelm.engine import Completion, Engine, SamplingParams
from cakelm.heldout import heldout_loss, infill_exact_match, infill_spans
from cakelm.model import Transformer
from cakelm.probes import agrees, mean, repetition, step_report, sycophancy_probes, sycophancy_rates
from cakelm.tasks import TASKS, is_correct, majority_vote, make_problems, pass_at_k
from cakelm.tokenizer import Tokenizer

EVALS = (*TASKS, "chat", "infill", "sycophancy", "replies")
OPERATIONS = {"+": "add", "-": "subtract", "*": "multiply"}  # arithmetic accuracy is also reported per operation


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
                            "pass@k for each k (Chen et al. 2021) and maj@max(k) (the replies' majority answer), "
                            "e.g. --pass-k 1 4 16; off by default")
    pass_temperature: float = opt(0.8, "sampling temperature of the pass@k replies")
    pass_limit: int = opt(0, "pass@k over the first this many problems only (0: all --limit of them)")

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in EVALS and not t.endswith(".jsonl")]
        if bad or not self.tasks:
            raise ConfigError(f"--tasks: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(EVALS)})")
        if self.limit < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.shots < 0:
            raise ConfigError("--limit, --max-new-tokens and --batch-size must be >= 1, --shots >= 0")
        if any(k < 1 or k > 256 for k in self.pass_k) or self.pass_temperature <= 0 or self.pass_limit < 0:
            raise ConfigError("--pass-k values must be in 1..256, --pass-temperature > 0 and --pass-limit >= 0")


def load_task(task: str, limit: int, wording: str = "train") -> list[tuple[list[Message], str, str | None]]:
    """(prompt messages, answer, problem key or None) triples: the held-out problems of a built-in task (asked in
    the training wordings or, `wording="new"`, in wordings held out from training), or the rows of a JSONL file:
    {"prompt": ..., "answer": ...} or messages ending on the question (a final assistant turn is dropped)."""
    if task in TASKS:
        return [([{"role": "user", "content": p.question}], p.answer, p.key)
                for p in make_problems(task, "eval", limit, wording=wording)]
    examples, _ = read_chat_jsonl(task, reply_required=False)
    out = []
    for ex in examples[:limit]:
        if ex.answer is None:
            raise CakeError(f'{ex.name}: an evaluation row needs an "answer" field')
        messages = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
        if messages[-1]["role"] != "user":
            raise CakeError(f"{ex.name}: an evaluation row must ask something: end on a user message")
        out.append((messages, ex.answer, None))
    return out


def prepare_prompts(engine: Engine, fmt: str, conversations: list[list[Message]], cfg: EvalConfig,
                    demo: list[Message] | None = None) -> tuple[list[int], list[list[int]], SamplingParams]:
    """Each conversation (after the few-shot `demo` turns, for a playscript model) rendered as a prompt that leaves
    room for the reply: (the indices of the conversations that fit the context, their prompts, greedy sampling
    parameters that stop where the format ends a turn)."""
    tok = engine.tok
    max_new = min(cfg.max_new_tokens, engine.context // 2)
    prompts, kept = [], []
    for i, messages in enumerate(conversations):
        try:
            fitted, _ = fit_history((demo or []) + messages, tok, fmt, engine.context - max_new)
        except CakeError:
            continue  # the question alone does not fit this model's context: counted as too long
        prompts.append(render_prompt(fitted, tok, fmt))
        kept.append(i)
    stop_ids, stop_strings = stop_rules(tok, fmt)
    return kept, prompts, SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_ids=stop_ids,
                                         stop_strings=stop_strings)


def greedy_replies(engine: Engine, fmt: str, conversations: list[list[Message]], cfg: EvalConfig, desc: str,
                   demo: list[Message] | None = None) -> tuple[list[int], list[Completion]]:
    """Greedy replies to each conversation, cfg.batch_size at a time: (the indices of the conversations that fit
    the context, their completions in that order)."""
    kept, prompts, params = prepare_prompts(engine, fmt, conversations, cfg, demo)
    done: list[Completion] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="q", dynamic_ncols=True, leave=False, disable=not cfg.progress)
    for i in range(0, len(prompts), cfg.batch_size):
        done += engine.generate(prompts[i:i + cfg.batch_size], params)  # in prompt order
        bar.update(len(prompts[i:i + cfg.batch_size]))
    bar.close()
    return kept, done


def _ended(c: Completion, tok: Tokenizer) -> bool:
    return c.finish_reason == "stop" and c.ids[-1] != tok.bos_id


def task_accuracy(engine: Engine, fmt: str, task: str, cfg: EvalConfig) -> dict[str, Any]:
    """Greedy answers to the held-out problems of `task`: accuracy, ends-turn share, a few examples; for
    arithmetic also the accuracy per operation, the steps of the worked solutions (`probes.step_report`) and the
    accuracy on the same problems asked in wordings held out from training."""
    tok = engine.tok
    problems = load_task(task, cfg.limit)
    shots = []
    if fmt == "playscript" and task in TASKS and cfg.shots:
        shots = make_problems(task, "train", cfg.shots, seed=cfg.seed + 1)
    demo = [m for p in shots for m in ({"role": "user", "content": p.question},
                                       {"role": "assistant", "content": p.solution})]
    kept, completions = greedy_replies(engine, fmt, [m for m, _, _ in problems], cfg, f"eval {Path(task).name}", demo)
    right = [is_correct(c.text, problems[i][1]) for i, c in zip(kept, completions)]
    examples = [{"question": problems[i][0][-1]["content"], "reply": c.text.strip(), "answer": problems[i][1],
                 "correct": ok} for i, c, ok in list(zip(kept, completions, right))[:5]]
    n = len(kept)
    out = {"n": n, "too_long": len(problems) - n, "accuracy": mean(right),
           "end_of_turn": mean([_ended(c, tok) for c in completions]),
           "reply_tokens": mean([len(c.ids) for c in completions]), "shots": len(shots), "examples": examples}
    if task == "arithmetic" and n:
        keys = [problems[i][2] for i in kept]
        out["by_op"] = {name: {"n": sum(op in k for k in keys), "accuracy": mean([ok for k, ok in zip(keys, right)
                                                                                  if op in k])}
                        for op, name in OPERATIONS.items()}
        out["steps"] = step_report([(k, c.text.strip(), ok) for k, c, ok in zip(keys, completions, right)])
        reworded = load_task(task, cfg.limit, wording="new")
        kept2, done2 = greedy_replies(engine, fmt, [m for m, _, _ in reworded], cfg, "eval new wordings", demo)
        out["new_wording"] = {"n": len(kept2), "accuracy": mean([is_correct(c.text, reworded[i][1])
                                                                 for i, c in zip(kept2, done2)]),
                              "end_of_turn": mean([_ended(c, tok) for c in done2]),
                              "examples": [{"question": reworded[i][0][-1]["content"], "reply": c.text.strip()}
                                           for i, c in list(zip(kept2, done2))[:3]]}
    if cfg.pass_k and n:
        sampled = kept[:cfg.pass_limit or None]
        _, prompts, params = prepare_prompts(engine, fmt, [problems[i][0] for i in sampled], cfg, demo)
        out["pass_at_k"], maj = sampled_pass_at_k(engine, prompts, [problems[i][1] for i in sampled], params, cfg)
        out["maj_at_k"] = {str(max(cfg.pass_k)): maj}
        out["pass_n"], out["pass_temperature"] = len(sampled), cfg.pass_temperature
    return out


def sycophancy(engine: Engine, fmt: str, cfg: EvalConfig) -> dict[str, Any]:
    """The sycophancy probe (`cakelm.probes`): cfg.limit held-out sums whose answer the user asserts, right in
    half of them; the share of replies agreeing with wrong claims and with right ones."""
    probes = sycophancy_probes(cfg.limit, cfg.seed)
    kept, done = greedy_replies(engine, fmt, [[{"role": "user", "content": p.question}] for p in probes], cfg,
                                "sycophancy")
    rates = sycophancy_rates([probes[i] for i in kept], [c.text for c in done])
    rates["agreed_wrong"] = [kept[j] for j in rates["agreed_wrong"]]  # as indices of all the probes, not the kept
    examples = [{"question": probes[i].question, "reply": c.text.strip(), "claim_is_right": probes[i].claim_is_right,
                 "agrees": agrees(c.text, probes[i].claim)} for i, c in list(zip(kept, done))[:6]]
    return {"n": len(kept), **rates, "examples": examples}


def chat_replies(engine: Engine, fmt: str, cfg: EvalConfig) -> dict[str, Any]:
    """Greedy replies to the first user turn of cfg.limit held-out conversations of cfg.chat_data: the share with
    a repeated 4-gram of words (a loop) and how many are distinct (`cakelm.probes.repetition`)."""
    _, examples, _ = train_and_heldout(cfg.chat_data, val_size=cfg.limit)
    firsts = openings(examples)
    kept, done = greedy_replies(engine, fmt, firsts, cfg, "chat replies")
    texts = [c.text.strip() for c in done]
    return {**repetition(texts), "data": cfg.chat_data,
            "examples": [{"prompt": firsts[i][-1]["content"], "reply": t} for i, t in list(zip(kept, texts))[:4]]}


def sampled_pass_at_k(engine: Engine, prompts: list[list[int]], answers: list[str], greedy: SamplingParams,
                      cfg: EvalConfig) -> tuple[dict[str, float], float]:
    """max(k) replies per problem at cfg.pass_temperature (each problem seeded on its own): the mean over the
    problems of the unbiased pass@k for each k in cfg.pass_k (`cakelm.tasks.pass_at_k`), and maj@max(k), the share
    of problems whose replies' most common final number is right (`cakelm.tasks.majority_vote`)."""
    samples = max(cfg.pass_k)
    params = SamplingParams(max_new_tokens=greedy.max_new_tokens, temperature=cfg.pass_temperature,
                            stop_ids=greedy.stop_ids, stop_strings=greedy.stop_strings)
    replies: list[list[str]] = [[] for _ in prompts]  # each problem's sampled replies
    per_batch = max(1, 4 * cfg.batch_size // samples)  # many replies to few prompts: larger batches pay (1.4x)
    bar = tqdm(total=len(prompts), desc=f"pass@k, {samples} samples each", unit="q", dynamic_ncols=True, leave=False,
               disable=not cfg.progress)
    for i in range(0, len(prompts), per_batch):
        batch = prompts[i:i + per_batch]
        seeds = [cfg.seed * 1_000_003 + i + j for j in range(len(batch))]
        for c in engine.generate(batch, params, n=samples, seeds=seeds):
            replies[i + c.prompt_index].append(c.text)
        bar.update(len(batch))
    bar.close()
    right = [sum(is_correct(t, a) for t in r) for r, a in zip(replies, answers)]
    votes = [majority_vote(r) for r in replies]
    maj = sum(v is not None and is_correct(v, a) for v, a in zip(votes, answers)) / len(answers)
    return {str(k): sum(pass_at_k(samples, c, k) for c in right) / len(right) for k in sorted(set(cfg.pass_k))}, maj


def chat_heldout_loss(model: Transformer, tok: Tokenizer, fmt: str, cfg: EvalConfig) -> dict[str, Any]:
    """Loss per assistant token on the held-out conversations of cfg.chat_data."""
    _, examples, _ = train_and_heldout(cfg.chat_data, val_size=cfg.limit)
    seqs, counts = encode_examples(examples, tok, fmt, model.cfg.max_seq_len + 1)
    # 32 conversations per forward whatever --batch-size: their full-vocabulary logits (32 x 257 x V) bound memory
    batches = fixed_batches(seqs, 32, tok.pad_id, True, model.cfg.max_seq_len)
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
        elif task == "sycophancy":
            out["sycophancy"] = sycophancy(engine, fmt, cfg)
        elif task == "replies":
            out["replies"] = chat_replies(engine, fmt, cfg)
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
                         + ("  " + ", ".join(f"pass@{k} {pct(v)}" for k, v in sorted(t["pass_at_k"].items(),
                                                                                   key=lambda kv: int(kv[0])))
                            if "pass_at_k" in t else "")
                         + "".join(f", maj@{k} {pct(v)}" for k, v in t.get("maj_at_k", {}).items()))
            if "by_op" in t:  # (eval.json is written with sorted keys: put them back in their order)
                ops = ", ".join(f"{op} {pct(t['by_op'][op]['accuracy'])}" for op in OPERATIONS.values()
                                if op in t["by_op"])
                st = t["steps"]
                wrong = ", ".join(f"{k} {v}" for k, v in sorted(st["first_wrong"].items(), key=lambda kv: -kv[1]))
                lines.append(f"{name:<12} {r['format']:<10} {'  per operation':<24} {t['n']:>5} {'':>9}  {ops}")
                lines.append(f"{name:<12} {r['format']:<10} {'  new wordings':<24} {t['new_wording']['n']:>5} "
                             f"{pct(t['new_wording']['accuracy']):>9} {pct(t['new_wording']['end_of_turn']):>10}")
                lines.append(f"{name:<12} {r['format']:<10} {'  steps':<24} {st['right']:>5} "
                             f"{pct(st['right_all_steps']):>9}  of right answers every step right; first wrong "
                             f"step of {st['wrong']} wrong: {wrong or '-'}")
        if r.get("rlhf"):
            h = r["rlhf"]
            lines.append(f"{name:<12} {r['format']:<10} {'gold / proxy / KL':<24} {h['n']:>5} {h['gold']:>9.3f}  "
                         f"proxy {h.get('proxy', float('nan')):.3f}, KL to SFT {h.get('kl', float('nan')):.2f} nats")
        if "sycophancy" in r:
            y = r["sycophancy"]
            lines.append(f"{name:<12} {r['format']:<10} {'sycophancy':<24} {y['n']:>5} {pct(y['accuracy']):>9}  "
                         f"agrees with wrong claims {pct(y['agree_wrong'])}, with right ones {pct(y['agree_right'])}")
        if "replies" in r:
            y = r["replies"]
            lines.append(f"{name:<12} {r['format']:<10} {'chat replies':<24} {y['n']:>5} {pct(y['repeated']):>9}  "
                         f"with a repeated 4-gram; {y['distinct']} distinct (held-out {y['data']})")
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
