"""SFT's loss with the output head at the scored (assistant) positions only, against the head at every position:
forward + backward time on a finished pipeline run's own SFT batches (interleaved in one process, the loss
compared), and peak memory of one batch at SmolLM2-135M's shape (vocabulary 49,152; random weights; each mode in
its own process, so its max RSS is its own).

    python benchmarks/sft_head.py runs/default              # time on the run's batches, then memory (~2 minutes)
    python benchmarks/sft_head.py runs/default --parts time --rounds 10

The "every position" path is what `heldout.chat_loss` did before it passed `only_at`: the head over (B, T, V),
then the loss of the scored tokens. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cakelm.checkpoint import load_model
from cakelm.common import hardware_info, keep_freed_memory, peak_memory_mb
from cakelm.data.chat import load_sources
from cakelm.data.chat_batches import ChatBatches, encode_sources
from cakelm.heldout import chat_logits, chat_loss
from cakelm.losses import IGNORE_INDEX, lm_loss
from cakelm.model import ModelConfig, Transformer


def sft_batches(run: Path, tok, seq_len: int, conversations: int, n: int) -> list[dict]:
    """The first n batches of `conversations` conversations each that the run's SFT stage would draw (its data,
    task size and seed), packed into rows of seq_len."""
    cfg = json.loads((run / "sft" / "meta.json").read_text())["config"]
    sources, _ = load_sources(cfg["data"], n * conversations, cfg["task_size"], cfg["val_fraction"], cfg["val_size"],
                              cfg["loop"]["seed"])
    train, _, counts = encode_sources(sources, tok, seq_len + 1)
    batches = ChatBatches(train, [c["weight"] for c in counts.values()], conversations, 1, 0, 1, cfg["loop"]["seed"],
                          True, seq_len, tok.pad_id)
    return [batches.get(step, 0) for step in range(n)]


def every_position(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return lm_loss(chat_logits(model, batch), batch["target"])[0]


def scored_only(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return chat_loss(model, batch)[0]


MODES = {"every position": every_position, "scored only": scored_only}


def time_part(run: Path, rounds: int) -> None:
    model, tok, _ = load_model(run / "base")
    model.train()
    batches = sft_batches(run, tok, model.cfg.max_seq_len, 48, 10)
    scored = sum(int((b["target"] != IGNORE_INDEX).sum()) for b in batches)
    total = sum(b["target"].numel() for b in batches)
    equal = all(torch.equal(every_position(model, b), scored_only(model, b)) for b in batches[:2])
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):  # interleaved, so both see the same machine speed
        for name, fn in MODES.items():
            for b in batches:
                model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                fn(model, b).backward()
                times[name].append(time.perf_counter() - t)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    print(f"time: {len(batches)} SFT batches of 48 conversations (rows of {model.cfg.max_seq_len}), "
          f"{scored / total:.1%} of positions scored; loss equal bit for bit: {equal}")
    print("  " + ", ".join(f"{name} {v:.1f} ms" for name, v in ms.items())
          + f" (forward + backward, median); speedup {ms['every position'] / ms['scored only']:.2f}x")


def memory_one(run: Path, mode: str) -> None:
    """One forward + backward at SmolLM2-135M's shape on one packed batch; prints a JSON line."""
    _, tok, _ = load_model(run / "base")
    seq_len = 512
    batch = sft_batches(run, tok, seq_len, 64, 1)[0]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                    max_seq_len=seq_len, tie_embeddings=True))
    t = time.perf_counter()
    loss = MODES[mode](model, batch)
    loss.backward()
    print(json.dumps({"mode": mode, "tokens": batch["target"].numel(),
                      "scored": int((batch["target"] != IGNORE_INDEX).sum()), "loss": loss.item(),
                      "seconds": time.perf_counter() - t, "peak_mb": peak_memory_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished `cakelm pipeline` run (its base model and SFT settings)")
    ap.add_argument("--parts", nargs="+", default=["time", "memory"], choices=("time", "memory"))
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of the timing")
    ap.add_argument("--memory-mode", choices=list(MODES), help=argparse.SUPPRESS)  # the child process of a part
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("sft_head: need --rounds >= 1")
    if not (args.run / "base" / "model.safetensors").is_file() or not (args.run / "sft" / "meta.json").is_file():
        raise SystemExit(f"sft_head: {args.run} is not a finished pipeline run (no base/ or sft/)")
    keep_freed_memory()  # as the training loop does on CPU
    if args.memory_mode:
        return memory_one(args.run, args.memory_mode)
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads")
    if "time" in args.parts:
        time_part(args.run, args.rounds)
    if "memory" in args.parts:
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, str(args.run), "--memory-mode", mode], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"memory: SmolLM2-135M's shape, one batch of {r['tokens']} tokens ({r['scored']} scored), "
                  f"{mode}: peak RSS {r['peak_mb'] / 1000:.2f} GB, forward + backward {r['seconds']:.1f} s, "
                  f"loss {r['loss']:.4f}")


if __name__ == "__main__":
    main()
