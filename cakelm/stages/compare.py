"""`cakelm compare`: the Transformer against an LSTM of the same size, on the same tokens.

    cakelm compare                       # CPU preset (~75 s on 2 cores): runs/default/tokenizer -> runs/default/compare
    cakelm compare --preset micro --data RUN/tokenizer --out /tmp/compare
    cakelm compare --preset gpu --data runs/gpu/tokenizer     # -> runs/gpu/compare, next to the data

The seed of the whole story: a recurrent network must process position n after positions 1..n-1, while
attention computes all positions at once (Vaswani et al. 2017, "Attention Is All You Need", section 4). This
stage trains an LSTM language model (`cakelm.rnn`) and the Transformer (`cakelm.model`), sized to the same
parameter count, on the same batches with the same optimizer, and measures

  (a) speed: training step time and tokens/s as the context grows, at equal tokens per step (the shared loop's
      own step time, the fastest of a few steps after one warm-up step);
  (b) quality per second: validation bits per byte (pretrain's evaluation) against training wall-clock, each
      model trained for the same time budget (its step count is the budget over its step time measured in (a),
      so each gets a complete learning-rate schedule; evaluation time is not counted);
  (c) use of long context: validation loss by token position after training.

Writes --out/compare.json (every number, and a short reading generated from them), speed.png, bpb_time.png
and loss_position.png, the two runs' metrics.jsonl in --out/transformer and --out/lstm, and meta.json (stage,
config, complete, headline metrics) like every stage. On a CPU with few cores the Transformer's parallelism
barely pays; the reading says so, and a GPU run shows the bigger picture.

Without --out the results go next to the data (RUN/tokenizer -> RUN/compare, where the run's report reads them).
Results already in --out are replaced only by the same comparison run again (same options); those of other
options (another preset, say) are kept unless --overwrite is given, and a folder holding another stage's output
or a checkpoint is never written into.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cakelm.checkpoint import is_checkpoint
from cakelm.common import (
    CakeError,
    DistInfo,
    code_version,
    hardware_info,
    pick_device,
    pick_dtype,
    print0,
    read_json,
    seed_everything,
    write_json_atomic,
)
from cakelm.config import ConfigError, describe_differences, differing, nested, opt, to_dict
from cakelm.data.shards import TokenBatches, eval_batches, open_tokens
from cakelm.heldout import shard_evaluator
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import bits_per_byte, lm_loss, token_nll
from cakelm.model import ModelConfig, Transformer
from cakelm.optim import OptimConfig
from cakelm.rnn import LSTMLM, lstm_for_params
from cakelm.tokenizer import Tokenizer

NAMES = ("transformer", "lstm")


@dataclass
class CompareConfig:
    data: str = opt("runs/default/tokenizer", "directory written by `cakelm tokenizer` (tokenizer + token shards)")
    out: str = opt("", "output directory (compare.json and plots); default: `compare` next to --data's directory "
                   "(runs/default/tokenizer -> runs/default/compare)")
    overwrite: bool = opt(False, "replace results in --out that were made with other options")
    # The Transformer's shape; its max_seq_len is the training context of the quality race (b) and (c).
    model: ModelConfig = nested(ModelConfig, "the Transformer's shape (the LSTM is sized to match it)")
    lstm_layers: int = opt(2, "LSTM layers (its width is chosen to match the Transformer's parameter count)")
    contexts: list[int] = opt([64, 128, 256, 512, 1024], "context lengths of the speed test (a)")
    tokens_per_step: int = opt(4096, "tokens per optimizer step everywhere (batch = tokens / context)")
    timing_steps: int = opt(2, "timed steps per model and context, after one untimed warm-up step")
    budget_s: float = opt(20.0, "training seconds per model in the quality race (b)")
    min_steps: int = opt(10, "train at least this many steps whatever the budget")
    eval_points: int = opt(6, "validation evaluations per training run (plus one before training)")
    eval_tokens: int = opt(16384, "validation tokens per evaluation (the same windows for both models)")
    optim: OptimConfig = nested(OptimConfig, "optimizer for both models", name="adamw", lr=3e-3, warmup_steps=10)
    dtype: str = opt("auto", "autocast dtype: auto = bf16 on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    device: str = opt("auto", "device", alias="--device", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = opt(1337, "random seed (init of both models, data order)", alias="--seed")
    progress: bool = opt(True, "show progress bars while training")

    def __post_init__(self) -> None:
        if not self.out:
            self.out = str(Path(self.data).parent / "compare")
        if not self.contexts or min(self.contexts) < 2:
            raise ConfigError(f"--contexts must be context lengths >= 2, got {self.contexts}")
        if self.tokens_per_step < max(self.contexts + [self.model.max_seq_len]):
            raise ConfigError(f"--tokens-per-step ({self.tokens_per_step}) must be at least the longest context")
        if self.lstm_layers < 1 or self.timing_steps < 1 or self.min_steps < 1 or self.eval_points < 1:
            raise ConfigError("--lstm-layers, --timing-steps, --min-steps and --eval-points must be >= 1")
        if not self.budget_s > 0 or self.eval_tokens < 0:
            raise ConfigError("--budget-s must be > 0 and --eval-tokens >= 0")


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults: the tiny Transformer (1.4M parameters with a 2k vocab), ~75 s on 2 cores
    # Seconds, for tests and smoke runs.
    "micro": {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.max_seq_len": 64,
              "contexts": [16, 64], "tokens_per_step": 512, "timing_steps": 1, "budget_s": 1.5, "min_steps": 4,
              "eval_points": 2, "eval_tokens": 2048},
    # One GPU: a ~25M non-embedding Transformer, contexts up to 4096.
    "gpu": {"model.dim": 512, "model.n_layers": 8, "model.n_heads": 8, "model.max_seq_len": 1024,
            "contexts": [128, 256, 512, 1024, 2048, 4096], "tokens_per_step": 65536, "timing_steps": 5,
            "budget_s": 120.0, "eval_points": 10, "eval_tokens": 262144, "optim.lr": 1e-3},
}


SAME_RUN_IGNORES = ("out", "overwrite", "progress")  # options that do not change the numbers


def check_out(cfg: CompareConfig) -> None:
    """Refuse to write where results would be lost (see the module docstring); before any work is done."""
    out = Path(cfg.out)
    if is_checkpoint(out):
        raise CakeError(f"{out} is a checkpoint directory; choose another --out for the comparison")
    if out.exists() and not out.is_dir():
        raise CakeError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    meta = read_json(out / "meta.json", "compare metadata") if (out / "meta.json").is_file() else {}
    stage = meta.get("stage") if isinstance(meta, dict) else None
    if stage not in (None, "compare"):
        raise CakeError(f"{out} holds the output of `cakelm {stage}`; choose another --out for the comparison")
    if stage is None:
        if not cfg.overwrite:
            raise CakeError(f"{out} is not empty and holds no comparison; choose another --out, or pass --overwrite "
                            "to write into it")
        return
    saved, now = meta.get("config") or {}, to_dict(cfg)
    diff = differing(saved, now, SAME_RUN_IGNORES)
    if diff and not cfg.overwrite:
        raise CakeError(f"{out} holds a comparison made with other options: "
                        f"{describe_differences(diff, saved, now)}; pass --out to write this one elsewhere, or "
                        "--overwrite to replace it")
    print0(f"compare: replacing the comparison in {out}" + (" (other options: --overwrite)" if diff else
                                                              " (made with the same options)"))


def build_models(cfg: CompareConfig, vocab_size: int, max_len: int, device: torch.device) -> dict[str, nn.Module]:
    """Both models, freshly initialised from the seed: the Transformer (context max_len, which does not change
    its parameters) and the LSTM whose parameter count is closest to it."""
    seed_everything(cfg.seed)
    tf = Transformer(replace(cfg.model, vocab_size=vocab_size, max_seq_len=max_len))
    seed_everything(cfg.seed)
    lstm = LSTMLM(lstm_for_params(tf.num_params(), vocab_size, cfg.lstm_layers))
    return {"transformer": tf.to(device), "lstm": lstm.to(device)}


def _loss_fn(m: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    loss_sum, _ = lm_loss(m(batch["input"]), batch["target"])
    return loss_sum, {}


def _no_save(step: int, metrics: dict, train_state: dict, final: bool) -> None:
    """compare keeps numbers, not checkpoints."""


def _loop(cfg: CompareConfig, batch_size: int, max_steps: int, eval_every: int, log_every: int,
          progress: bool) -> LoopConfig:
    # both models race in one dtype: `auto` is bf16 on CUDA and fp32 elsewhere here (the loop's CPU probe would time
    # each model on its own and could pick differently for the two)
    dtype = cfg.dtype if cfg.dtype != "auto" else \
        "bf16" if pick_dtype("auto", pick_device(cfg.device)) == torch.bfloat16 else "fp32"
    return LoopConfig(max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, eval_tokens=cfg.eval_tokens,
                      log_every=log_every, device=cfg.device, dtype=dtype, seed=cfg.seed, progress=progress)


def speed_test(cfg: CompareConfig, tokens: np.ndarray, vocab_size: int, contexts: list[int], device: torch.device
               ) -> list[dict[str, Any]]:
    """(a): per context, each model's training step time (ms) and tokens/s at cfg.tokens_per_step tokens per
    step, measured by the shared loop itself (log_every=1: one metrics row per step). The first, warm-up, step
    is dropped and the fastest of the rest kept, as `timeit` does: other work on a shared machine only ever
    slows a step down, so the minimum is the best estimate of what the hardware does."""
    rows = []
    for T in contexts:
        B = cfg.tokens_per_step // T
        batches = TokenBatches(tokens, T, B, seed=cfg.seed)
        row: dict[str, Any] = {"context": T, "batch_size": B, "tokens_per_step": B * T}
        for name, model in build_models(cfg, vocab_size, max(contexts), device).items():
            with tempfile.TemporaryDirectory() as tmp:
                train(model, _loop(cfg, B, cfg.timing_steps + 1, 0, 1, False), cfg.optim,
                      LoopContext(device, DistInfo(), Path(tmp)), batches, _loss_fn, None, _no_save)
                lines = (Path(tmp) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            ms = min(json.loads(line)["ms_per_step"] for line in lines[1:])
            row[name] = {"ms_per_step": ms, "tok_per_s": B * T / (ms / 1000)}
        rows.append(row)
        print0(f"compare: context {T:>5} x batch {B:<4} transformer {row['transformer']['ms_per_step']:7.1f} ms/step "
               f"{row['transformer']['tok_per_s']:>9,.0f} tok/s | lstm {row['lstm']['ms_per_step']:7.1f} ms/step "
               f"{row['lstm']['tok_per_s']:>9,.0f} tok/s")
    return rows


class _Recorded:
    """The batches of a TokenBatches, each one's digest noted as it is handed to the loop."""

    def __init__(self, batches: TokenBatches) -> None:
        self.batches, self.seen = batches, []

    def get(self, step: int, micro: int) -> dict:
        b = self.batches.get(step, micro)
        self.seen.append(hashlib.sha1(b["input"].numpy().tobytes()).hexdigest()[:12])
        return b


def train_for_budget(cfg: CompareConfig, model: nn.Module, batches: TokenBatches, evaluate: Any, max_steps: int,
                     device: torch.device, out: Path) -> dict[str, Any]:
    """(b): train `model` for max_steps on the shared loop, evaluating eval_points times along the way. Returns
    the bits-per-byte curve against training wall-clock (evaluation time excluded) and tokens, and a short
    digest of every batch the model was given (so a test can check both models saw the same data)."""
    recorded = _Recorded(batches)
    seen = recorded.seen
    curve: list[dict[str, float]] = []
    clock = {"train_s": 0.0, "since": 0.0}

    def timed_evaluate(m: nn.Module) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock["train_s"] += time.perf_counter() - clock["since"]
        val = evaluate(m)
        step = len(seen) // batches.grad_accum
        curve.append({"seconds": clock["train_s"], "step": step, "tokens": step * batches.rows_per_step *
                      batches.seq_len, **val})
        clock["since"] = time.perf_counter()
        return val

    model.eval()
    with torch.no_grad():
        curve.append({"seconds": 0.0, "step": 0, "tokens": 0, **evaluate(model)})  # the untrained model
    model.train()
    loop = _loop(cfg, batches.batch_size, max_steps, -(-max_steps // cfg.eval_points),
                 max(1, min(10, max_steps // 10)), cfg.progress)
    clock["since"] = time.perf_counter()
    train(model, loop, cfg.optim, LoopContext(device, DistInfo(), out), recorded, _loss_fn, timed_evaluate, _no_save)
    last = curve[-1]
    return {"steps": last["step"], "tokens": last["tokens"], "seconds": last["seconds"], "final_bpb": last["val_bpb"],
            "final_loss": last["val_loss"], "curve": curve, "batches": seen}


@torch.no_grad()
def loss_by_position(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
                     device: torch.device) -> list[float]:
    """(c): mean validation loss (nats) at each position 0..seq_len-1 of a window (position 0 predicts the 2nd
    token from the 1st alone; position seq_len-1 sees seq_len tokens of context)."""
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64, device=device)
    rows = 0
    for b in eval_batches(tokens, seq_len, batch_size, max_tokens):
        nll = token_nll(model(b["input"].to(device)), b["target"].to(device))  # (B, T)
        total += nll.sum(0).double()
        rows += nll.size(0)
    model.train()
    return (total / max(rows, 1)).tolist()


def unigram_bpb(train_tokens: np.ndarray, val_tokens: np.ndarray, tok: Tokenizer, seq_len: int, max_tokens: int
                ) -> float:
    """The reference a context-free model sets: bits per byte when every validation token (of the windows the
    models are evaluated on) is predicted by its frequency in the training tokens (add-one smoothed), counted
    as `heldout.shard_evaluator` counts (nats over tokens that carry text, over their bytes). A model near this
    number has learnt token frequencies and little else."""
    counts = np.bincount(np.asarray(train_tokens), minlength=tok.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())  # (V,)
    targets = np.concatenate([b["target"].numpy().ravel() for b in eval_batches(val_tokens, seq_len, 64, max_tokens)])
    nbytes = tok.bytes_per_token()[targets]
    return bits_per_byte(float(-(logp[targets] * (nbytes > 0)).sum()), int(nbytes.sum()))


def _span_mean(values: list[float], lo: int, hi: int) -> float:
    return float(np.mean(values[lo:hi]))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The handful of numbers the reading is made of, from the full result."""
    speed, tr, pos = result["speed"], result["training"], result["loss_by_position"]
    T = len(pos["transformer"])
    early, late = (0, min(8, T)), (T // 2, T)
    tok_min = min(tr[n]["tokens"] for n in NAMES)
    s: dict[str, Any] = {
        "param_diff_pct": 100 * (result["models"]["lstm"]["params"] / result["models"]["transformer"]["params"] - 1),
        # Transformer tokens/s over LSTM tokens/s at each context (keys are strings, as JSON keeps them)
        "speed_ratio": {str(r["context"]): r["transformer"]["tok_per_s"] / r["lstm"]["tok_per_s"] for r in speed},
        "early_positions": [early[0] + 1, early[1]], "late_positions": [late[0] + 1, late[1]],
        "equal_tokens": tok_min,
    }
    for n in NAMES:
        first, last = speed[0][n]["tok_per_s"], speed[-1][n]["tok_per_s"]
        curve = tr[n]["curve"]
        s[n] = {"tok_per_s_first": first, "tok_per_s_last": last, "tok_per_s_change_pct": 100 * (last / first - 1),
                "final_bpb": tr[n]["final_bpb"], "steps": tr[n]["steps"], "tokens": tr[n]["tokens"],
                "seconds": tr[n]["seconds"],
                # bpb of each model after the same number of tokens (the fewer of the two runs saw)
                "bpb_at_equal_tokens": float(np.interp(tok_min, [p["tokens"] for p in curve],
                                                       [p["val_bpb"] for p in curve])),
                "loss_early": _span_mean(pos[n], *early), "loss_late": _span_mean(pos[n], *late)}
        s[n]["context_gain"] = s[n]["loss_early"] - s[n]["loss_late"]
    return s


def _better(a: float, b: float, what: str) -> str:
    """'the LSTM is better by 0.123 bits/byte (4.5% below the Transformer)' for two lower-is-better numbers,
    a the Transformer's and b the LSTM's."""
    if abs(a - b) < 1e-9:
        return f"the two are level at {a:.3f} {what}"
    winner, loser = ("Transformer", "LSTM") if a < b else ("LSTM", "Transformer")
    lo, hi = min(a, b), max(a, b)
    return f"the {winner} is better by {hi - lo:.3f} {what} ({100 * (hi - lo) / hi:.1f}% below the {loser})"


def reading(result: dict[str, Any]) -> str:
    """A short, honest reading of the measured numbers (generated from them, so it says what this run found)."""
    s, m, hw, tr = result["summary"], result["models"], result["hardware"], result["training"]
    tf, ls = s["transformer"], s["lstm"]
    speed = result["speed"]  # sorted by context
    c0, c1 = speed[0]["context"], speed[-1]["context"]
    faster = [r["context"] for r in speed if r["transformer"]["tok_per_s"] > r["lstm"]["tok_per_s"]]
    if len(faster) == len(speed):
        who = "The Transformer trains faster at every context measured"
    elif not faster:
        who = "The LSTM trains faster at every context measured"
    else:
        who = f"The Transformer is faster at context {', '.join(map(str, faster))} and the LSTM at the others"
    at_time = _better(tf["final_bpb"], ls["final_bpb"], "bits/byte")
    at_tokens = _better(tf["bpb_at_equal_tokens"], ls["bpb_at_equal_tokens"], "bits/byte")
    if max(tf["context_gain"], ls["context_gain"]) < 0.05:
        gains = "neither model makes much use of the far context yet (both gain under 0.05 nats/token)"
    elif tf["context_gain"] > ls["context_gain"]:
        gains = "the Transformer gains more from the far context"
    else:
        gains = "the LSTM gains at least as much from the far context in this run"
    uni = tr["unigram_bpb"]
    # within 0.15 bits/byte of the frequency-only model: say that the race only shows the start of learning
    near = [name for name, v in (("Transformer", tf["final_bpb"]), ("LSTM", ls["final_bpb"])) if v > uni - 0.15]
    early_note = ""
    if near:
        early_note = (f"; {' and '.join(near)} {'are' if len(near) > 1 else 'is'} still within 0.15 of that, having "
                      "learnt little beyond token frequencies in this budget, so the race shows the start of "
                      "training only (a longer --budget-s shows more)")
    paras = [
        f"Transformer ({m['transformer']['params']:,} parameters: {m['transformer']['n_layers']} layers, width "
        f"{m['transformer']['dim']}) against an LSTM ({m['lstm']['params']:,} parameters: {m['lstm']['n_layers']} "
        f"layers, hidden {m['lstm']['hidden']}; {s['param_diff_pct']:+.1f}% parameters), same tokenizer, same "
        f"batches, same optimizer.",
        f"Speed at {result['config']['tokens_per_step']:,} tokens per step: at context {c0} the Transformer trains "
        f"at {speed[0]['transformer']['tok_per_s']:,.0f} tokens/s and the LSTM at "
        f"{speed[0]['lstm']['tok_per_s']:,.0f}; at context {c1}, "
        f"{speed[-1]['transformer']['tok_per_s']:,.0f} and {speed[-1]['lstm']['tok_per_s']:,.0f}."
        f" From context {c0} to {c1} the Transformer's throughput changes by {tf['tok_per_s_change_pct']:+.0f}% "
        f"(its attention work per token grows with the context, the rest of its work does not) and the LSTM's by "
        f"{ls['tok_per_s_change_pct']:+.0f}% (the same tokens come in fewer, longer sequences: more steps one after "
        f"another, each on fewer rows). {who}.",
        f"Quality at equal time ({result['config']['budget_s']:g} s budget each, context {tr['seq_len']}): the "
        f"Transformer reached {tf['final_bpb']:.3f} validation bits per byte in {tf['steps']} steps "
        f"({tf['tokens']:,} tokens, {tf['seconds']:.1f} s), the LSTM {ls['final_bpb']:.3f} in {ls['steps']} steps "
        f"({ls['tokens']:,} tokens, {ls['seconds']:.1f} s): {at_time}. After the same {s['equal_tokens']:,} "
        f"tokens: {at_tokens}. For reference, predicting each token from its frequency alone scores "
        f"{uni:.3f}{early_note}.",
        f"Use of context: from positions {s['early_positions'][0]}-{s['early_positions'][1]} to positions "
        f"{s['late_positions'][0]}-{s['late_positions'][1]} the Transformer's validation loss falls by "
        f"{tf['context_gain']:.2f} nats/token ({tf['loss_early']:.2f} -> {tf['loss_late']:.2f}) and the LSTM's by "
        f"{ls['context_gain']:.2f} ({ls['loss_early']:.2f} -> {ls['loss_late']:.2f}): {gains}.",
    ]
    if hw["device"] == "cuda":
        paras.append(f"Measured on a GPU ({hw['gpu']}, torch {hw['torch']}), where attention's all-positions-at-once "
                     "matrix products keep thousands of cores busy while the LSTM still takes one step per position.")
    else:
        lstm_cost = ("with this few cores there is little idle hardware for attention's all-positions-at-once "
                     "matrix products to fill, so running positions one after another cost it little here"
                     if ls["tok_per_s_change_pct"] > -30 else
                     "even with this few cores, running positions one after another cost it much of its speed")
        paras.append(f"Measured on {hw['device'].upper()} ({hw['cpu']}, {hw['cpu_cores']} cores, {hw['torch_threads']} "
                     f"torch threads, torch {hw['torch']}). From context {c0} to {c1} the LSTM's sequential steps "
                     f"became {c1 // c0}x more numerous and {c1 // c0}x narrower and its throughput changed by "
                     f"{ls['tok_per_s_change_pct']:+.0f}%: {lstm_cost}. On a GPU, with "
                     "thousands of cores, the balance is expected to tip much further towards the Transformer; this "
                     "run did not measure that: run `cakelm compare --preset gpu` on a GPU.")
    return "\n\n".join(paras)


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """speed.png, bpb_time.png and loss_position.png in `out` (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"transformer": "tab:blue", "lstm": "tab:orange"}
    labels = {"transformer": "Transformer", "lstm": "LSTM"}
    speed, tr = result["speed"], result["training"]
    ctx = [r["context"] for r in speed]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n in NAMES:
        a.plot(ctx, [r[n]["tok_per_s"] for r in speed], "o-", color=colors[n], label=labels[n])
        b.plot(ctx, [r[n]["ms_per_step"] for r in speed], "o-", color=colors[n], label=labels[n])
    for ax, ylabel in ((a, "training tokens / s"), (b, "ms per step")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [str(c) for c in ctx])
        ax.set_xlabel(f"context (tokens; {result['config']['tokens_per_step']:,} tokens per step)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle("(a) training speed as the context grows")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=100)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n in NAMES:
        curve = tr[n]["curve"]
        a.plot([p["seconds"] for p in curve], [p["val_bpb"] for p in curve], "o-", color=colors[n], label=labels[n])
        b.plot([p["tokens"] for p in curve], [p["val_bpb"] for p in curve], "o-", color=colors[n], label=labels[n])
    a.set_xlabel("training wall-clock (s)")
    b.set_xlabel("training tokens")
    b.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 100k, not 100000
    for ax in (a, b):
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        # the untrained models sit far above; keep the part of the curves where they race
        later = [p["val_bpb"] for n in NAMES for p in tr[n]["curve"][1:]] + [tr["unigram_bpb"]]
        ax.set_ylim(min(later) - 0.05, max(later) + 0.1)
        ax.axhline(tr["unigram_bpb"], color="gray", ls="--", lw=1, label="token frequencies alone")
    a.legend()
    fig.suptitle(f"(b) validation bits per byte at equal time ({result['config']['budget_s']:g} s each)")
    fig.tight_layout()
    fig.savefig(out / "bpb_time.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for n in NAMES:
        # mean over power-of-two buckets of positions (1, 2, 3-4, 5-8, ...): single positions are noisy
        pos = np.asarray(result["loss_by_position"][n])
        edges = [0] + [2 ** k for k in range(int(np.log2(len(pos))) + 1) if 2 ** k < len(pos)] + [len(pos)]
        x = [np.sqrt((lo + 1) * hi) for lo, hi in zip(edges, edges[1:])]
        ax.plot(x, [pos[lo:hi].mean() for lo, hi in zip(edges, edges[1:])], "o-", color=colors[n], label=labels[n])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, not 2^k
    ax.set_xlabel("token position in the window (tokens of context seen)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("(c) loss by position: how much each model gains from more context")
    fig.tight_layout()
    fig.savefig(out / "loss_position.png", dpi=100)
    plt.close(fig)
    return ["speed.png", "bpb_time.png", "loss_position.png"]


def main(cfg: CompareConfig) -> Path:
    t0 = time.time()
    check_out(cfg)
    device = pick_device(cfg.device)
    data, out = Path(cfg.data), Path(cfg.out)
    tok = Tokenizer.load(data / "tokenizer.json")
    train_tokens = open_tokens(data, "train", tok.vocab_size)
    val_tokens = open_tokens(data, "val", tok.vocab_size)
    seq_len = cfg.model.max_seq_len
    if len(val_tokens) <= seq_len:
        raise CakeError(f"{data}: {len(val_tokens)} validation tokens, fewer than one window of {seq_len + 1}")
    contexts = sorted(set(cfg.contexts) | {seq_len})  # the race's own context is always timed
    out.mkdir(parents=True, exist_ok=True)

    models = build_models(cfg, tok.vocab_size, seq_len, device)
    tf, lstm = models["transformer"], models["lstm"]
    print0(f"compare: Transformer {tf.num_params():,} parameters vs LSTM {lstm.num_params():,} "
           f"(hidden {lstm.cfg.hidden}, {lstm.cfg.n_layers} layers) on {device}")

    # (a) speed
    speed = speed_test(cfg, train_tokens, tok.vocab_size, contexts, device)

    # (b) the race: same batches (one TokenBatches, one seed), same time budget, steps from (a)'s step time
    B = cfg.tokens_per_step // seq_len
    batches = TokenBatches(train_tokens, seq_len, B, seed=cfg.seed)
    race_loop = _loop(cfg, B, 1, 0, 1, False)
    evaluate = shard_evaluator(val_tokens, tok, seq_len, race_loop.batch_size, race_loop.eval_tokens, device,
                               DistInfo())
    step_ms = {n: next(r[n]["ms_per_step"] for r in speed if r["context"] == seq_len) for n in NAMES}
    training: dict[str, Any] = {"seq_len": seq_len, "batch_size": B}
    for name, model in models.items():
        steps = max(cfg.min_steps, int(cfg.budget_s * 1000 / step_ms[name]))
        print0(f"compare: training the {name} for {steps} steps (~{cfg.budget_s:g} s at {step_ms[name]:.0f} ms/step)")
        training[name] = train_for_budget(cfg, model, batches, evaluate, steps, device, out / name)

    # (c) loss by position, on 4x the validation windows of an evaluation (each position is one token per window)
    by_pos = {n: loss_by_position(m, val_tokens, seq_len, B, 4 * cfg.eval_tokens, device) for n, m in models.items()}

    mcfg = tf.cfg
    training["unigram_bpb"] = unigram_bpb(train_tokens, val_tokens, tok, seq_len, cfg.eval_tokens)
    result: dict[str, Any] = {
        "config": to_dict(cfg), "code_version": code_version(), "hardware": hardware_info(device),
        "models": {"transformer": {"params": tf.num_params(), "n_layers": mcfg.n_layers, "dim": mcfg.dim,
                                   "n_heads": mcfg.n_heads, "vocab_size": mcfg.vocab_size},
                   "lstm": {"params": lstm.num_params(), "n_layers": lstm.cfg.n_layers, "hidden": lstm.cfg.hidden,
                            "vocab_size": lstm.cfg.vocab_size}},
        "speed": speed, "training": training, "loss_by_position": by_pos,
    }
    result["summary"] = summarize(result)
    result["reading"] = reading(result)
    result["plots"] = plot(result, out)
    result["seconds"] = time.time() - t0
    write_json_atomic(out / "compare.json", result)
    # meta.json as every stage writes it, so the pipeline can tell a finished, same-config compare and skip it
    sm = result["summary"]
    write_json_atomic(out / "meta.json", {"stage": "compare", "complete": True, "config": to_dict(cfg),
                                          "code_version": result["code_version"], "metrics": {
                                              "transformer_bpb": sm["transformer"]["final_bpb"],
                                              "lstm_bpb": sm["lstm"]["final_bpb"],
                                              "speed_ratio": {str(k): v for k, v in sm["speed_ratio"].items()}}})
    print0("\n" + result["reading"] + "\n")
    print0(f"compare: -> {out / 'compare.json'} and {', '.join(result['plots'])} ({result['seconds']:.0f}s)")
    return out


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of `cakelm compare`."""
    m = meta["metrics"]
    return (f"val bpb at equal time: Transformer {m.get('transformer_bpb', float('nan')):.3f}, LSTM "
            f"{m.get('lstm_bpb', float('nan')):.3f}")
