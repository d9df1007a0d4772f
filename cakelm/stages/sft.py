"""`cakelm sft`: supervised fine-tuning on conversations, so the model learns to play the assistant (the icing).

    cakelm sft                                           # runs/default/base -> runs/default/sft, default mixture
    cakelm sft --init runs/default/base --data my_chats.jsonl --out runs/mine/sft
    cakelm sft --data chitchat=0.3 arithmetic=0.5 gsm=0.2 --max-steps 600
    cakelm sft --resume                                  # continue an interrupted run exactly
    torchrun --nproc_per_node 2 -m cakelm sft            # DDP, as for pretraining

Starts from --init (any checkpoint: its model, tokenizer and context are inherited) and trains on a weighted
mixture of chat sources (see `cakelm.data.chat`): a source is drawn for each example with probability
proportional to its weight (`SRC=W`, default 1).
- Conversations are rendered in the chat format (`chat_format.py`). The loss covers only the assistant's
  tokens, each reply's <|end|> included, so the model learns what to say and when to stop; it is normalised
  by the number of those tokens in the whole step (all micro-batches, all ranks), so gradient accumulation
  and DDP do not change it.
- --loop.batch-size counts conversations. With --packing (the default) they are packed into rows of the
  context length with attention that stays inside each conversation: the same loss, less padding.
- --unlikelihood A adds A x the token-level unlikelihood of each reply's own earlier tokens (losses.py), a
  training-side answer to replies that loop; the logged `nll` and `unlikelihood` are per assistant token.
- --repeat-unlikelihood A (default 3) is the sequence-level form (Welleck et al. 2019, Sec. 5.2): every
  --repeat-every-th step (default 2) the model answers --repeat-prompts chat openings of the training
  conversations greedily (--repeat-tokens at most), and every token of a 4-gram of tokens that its reply already
  said is pushed down by A x -log(1 - p). It trains against the loops the model actually makes, not the data's
  own repeats; logged: `repeat_unlikelihood` (per assistant token of the chat batch) and `repeat_replies`, the
  share of those replies with a repeat. With tasks only in --data there is nothing to open from: it is off (said).
- Validation: loss per assistant token on held-out conversations of each source (held-out problems for tasks).

Writes a checkpoint whose meta.json says "chat_format": "chat", so `cakelm chat`, `serve` and `eval` use the
chat tokens. `cakelm eval` measures what SFT did (task accuracy, replies that end their turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.chat_format import Message, render_prompt
from cakelm.common import print0
from cakelm.config import ConfigError, nested, opt
from cakelm.data.chat import BUILTIN_CHAT, SFT_MIXTURE, VAL_FRACTION, load_sources, openings, saved_task_sizes
from cakelm.data.chat_batches import ChatBatches, encode_sources
from cakelm.engine import SamplingParams
from cakelm.heldout import chat_evaluator, chat_logits, chat_loss
from cakelm.loop import LoopConfig
from cakelm.lora import LoraConfig
from cakelm.losses import IGNORE_INDEX, lm_loss, repeated_ngram_tokens, target_unlikelihood, unlikelihood_loss
from cakelm.model import flops_per_token
from cakelm.optim import OptimConfig
from cakelm.rollout import EngineGenerator, to_batch
from cakelm.scaffold import start
from cakelm.tasks import TASKS

DEFAULT_DATA = SFT_MIXTURE


@dataclass
class SFTConfig:
    init: str = opt("runs/default/base", "checkpoint to fine-tune (its model, tokenizer and context are inherited)")
    data: list[str] = opt(DEFAULT_DATA, "chat sources, each SRC or SRC=WEIGHT: " + ", ".join(BUILTIN_CHAT) +
                          ", .jsonl files ({\"messages\"} or {\"prompt\", \"completion\"}), hf:NAME[:SPLIT]")
    out: str = opt("runs/default/sft", "checkpoint directory to write")
    resume: bool = opt(False, "continue the run saved in --out (exactly: same batches, optimizer state)")
    overwrite: bool = opt(False, "replace a checkpoint already in --out instead of refusing")
    packing: bool = opt(True, "pack several conversations per row (attention does not cross them; same loss)")
    task_size: int = opt(0, "training problems generated per task source (0 = about as many as the run draws)")
    val_size: int = opt(200, "held-out conversations per source for the validation loss")
    val_fraction: float = opt(VAL_FRACTION, "share of a file's (or chitchat's) conversations held out (at most "
                              "--val-size are used); `cakelm eval` holds out the same ones at the default")
    skip_bad_lines: bool = opt(False, "skip and count malformed JSONL lines instead of stopping at the first")
    unlikelihood: float = opt(0.0, "weight of token-level unlikelihood on each reply's own earlier tokens, against "
                              "replies that loop (Welleck et al. 2019; 0 = off)")
    repeat_unlikelihood: float = opt(3.0, "weight of sequence-level unlikelihood on the repeated 4-grams of the "
                                     "model's own greedy replies to chat openings (Welleck et al. 2019; 0 = off)")
    repeat_prompts: int = opt(8, "chat openings the model answers per step for --repeat-unlikelihood (per rank)")
    repeat_tokens: int = opt(64, "longest of those replies, in tokens")
    repeat_every: int = opt(2, "answer openings every this many steps (2: half the steps, as the paper mixes them)")
    # The defaults are the "cpu" preset: under 3 minutes on 2 CPU cores from the pipeline's base model; how it
    # was chosen is in the README.
    lora: LoraConfig = nested(LoraConfig, "LoRA: train low-rank adapters instead of every weight")
    optim: OptimConfig = nested(OptimConfig, name="muon", lr=1e-2, warmup_steps=20, schedule="wsd",
                                min_lr_ratio=0.0)
    loop: LoopConfig = nested(LoopConfig, max_steps=220, batch_size=48, eval_every=110, log_every=10)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data needs at least one source")
        if self.task_size < 0 or self.val_size < 1:
            raise ConfigError("--task-size must be >= 0 and --val-size >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("unlikelihood", "repeat_unlikelihood"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.repeat_prompts < 1 or self.repeat_tokens < 4 or self.repeat_every < 1:
            raise ConfigError("--repeat-prompts and --repeat-every must be >= 1 and --repeat-tokens >= 4 (a 4-gram "
                              "must fit)")


PRESETS = {
    "cpu": {},  # the defaults
    "micro": {"val_size": 32, "loop.max_steps": 20, "loop.batch_size": 16, "loop.eval_every": 0,
              "loop.log_every": 5, "optim.warmup_steps": 2},
}


class RepeatPenalty:
    """The chat batches, and in micro-batch 0 of every `every`-th step the model's own greedy replies to `per_step`
    chat openings: `repeat_input` (R, T) and `repeat_target` (R, T), which holds the reply tokens that belong to a
    repeated 4-gram of the reply (`losses.repeated_ngram_tokens`) and IGNORE_INDEX elsewhere. The openings come
    in a seeded order, this rank's share of each step's, and the replies are greedy: a batch is a function of
    (step, weights), so --resume stays exact."""

    def __init__(self, chat: ChatBatches, generator: EngineGenerator, prompts: list[list[Message]], per_step: int,
                 max_new: int, every: int, rank: int, world_size: int, seed: int, pad_id: int) -> None:
        self.chat, self.generator, self.prompts, self.per_step, self.every = chat, generator, prompts, per_step, every
        self.params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        self.global_batch = chat.global_batch

    def reads_model(self, step: int) -> bool:
        """Whether step `step` generates with the model (the loop gathers a sharded model's weights for it)."""
        return step % self.every == 0

    def get(self, step: int, micro: int) -> dict[str, Any]:
        batch = self.chat.get(step, micro)
        if micro or step % self.every:
            return batch
        start = (step // self.every * self.world_size + self.rank) * self.per_step
        rows = [self.prompts[self.order[(start + j) % len(self.order)]] for j in range(self.per_step)]
        rollouts = self.generator.generate(rows, self.params)
        rb = to_batch(rollouts, self.pad_id)
        target, looped = rb["target"], 0
        for i, r in enumerate(rollouts):
            marks = torch.tensor(repeated_ngram_tokens(list(r.ids)), dtype=torch.bool)
            looped += bool(marks.any())
            p = len(r.prompt_ids)  # the reply's tokens are the targets of positions p-1 .. p-2+len(ids)
            target[i, p - 1:p - 1 + len(r.ids)].masked_fill_(~marks, IGNORE_INDEX)
        batch.update(repeat_input=rb["input"], repeat_target=target,
                     repeat_replies=torch.tensor([float(looped), float(len(rollouts))]))
        return batch


def main(cfg: SFTConfig) -> Path:
    run = start("sft", cfg, needs_chat=False)
    if run is None:
        return Path(cfg.out)
    model, tok, info = run.model, run.tok, run.info
    assert model is not None
    seq_len = model.cfg.max_seq_len
    saved_sizes = saved_task_sizes(run.meta, "data", cfg.out) if run.resumed else None
    draws = cfg.loop.max_steps * cfg.loop.batch_size * cfg.loop.grad_accum * info.world_size
    sources, skipped = load_sources(cfg.data, draws, cfg.task_size, cfg.val_fraction, cfg.val_size, cfg.loop.seed,
                                    cfg.skip_bad_lines, task_sizes=saved_sizes)
    if skipped:
        print0(f"sft: skipped {skipped} bad lines (--skip-bad-lines)", info=info)
    train_seqs, val_seqs, counts = encode_sources(sources, tok, seq_len + 1)
    print0("sft: " + "; ".join(f"{s} (weight {c['weight']:g}): {c['sequences']:,} sequences, "
                               f"{c['target_tokens'] / max(c['sequences'], 1):.0f} target tokens each"
                               + (f", {c['truncated']} truncated" if c["truncated"] else "")
                               for s, c in counts.items()), info=info)
    batches = ChatBatches(train_seqs, [c["weight"] for c in counts.values()], cfg.loop.batch_size,
                          cfg.loop.grad_accum, info.rank, info.world_size, cfg.loop.seed, cfg.packing, seq_len,
                          tok.pad_id)
    if cfg.repeat_unlikelihood:
        prompts = [o for src, _, train_ex, _, _ in sources if src not in TASKS
                   for o in openings(train_ex)
                   if len(render_prompt(o, tok, "chat")) + cfg.repeat_tokens <= seq_len]
        if not prompts:  # tasks only: no chat replies to keep from looping, and their worked steps may repeat
            print0(f"sft: --repeat-unlikelihood {cfg.repeat_unlikelihood:g} is off: no chat source in --data to open "
                   f"conversations from (only tasks: {', '.join(TASKS)}), or none fits the context", info=info)
        else:
            batches = RepeatPenalty(batches, EngineGenerator(model, tok), prompts, cfg.repeat_prompts,
                                    cfg.repeat_tokens, cfg.repeat_every, info.rank, info.world_size, cfg.loop.seed,
                                    tok.pad_id)
    evaluate = chat_evaluator(val_seqs, tok.pad_id, cfg.loop.batch_size, cfg.packing, seq_len, run.device, info)
    run.announce(f"{batches.global_batch} conversations per step")

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        if cfg.unlikelihood:  # its negative candidates need the logits at every position
            logits = chat_logits(m, batch)
            nll = lm_loss(logits, batch["target"])[0]
            ul = unlikelihood_loss(logits, batch["target"], batch.get("segments"))
            loss, metrics = nll + cfg.unlikelihood * ul, {"nll": nll, "unlikelihood": ul}
        else:  # the output head at the assistant's tokens only
            nll = chat_loss(m, batch)[0]
            loss, metrics = nll, {}
        if "repeat_input" in batch:  # micro-batch 0 of a step with --repeat-unlikelihood
            marked = batch["repeat_target"] != IGNORE_INDEX  # the repeated tokens: the head runs there only
            rul = target_unlikelihood(m(batch["repeat_input"], only_at=marked), batch["repeat_target"][marked])
            loss = loss + cfg.repeat_unlikelihood * rul
            metrics.update(nll=nll, repeat_unlikelihood=rul, repeat_replies=batch["repeat_replies"])
        return loss, metrics

    metrics = run.train(model, batches, loss_fn, evaluate, meta={"data": counts, "skipped_lines": skipped},
                        flops_per_token=flops_per_token(model.cfg, seq_len))
    return run.done(f"train loss {metrics.get('loss', float('nan')):.3f}, val loss "
                    f"{metrics.get('val_loss', float('nan')):.3f}", metrics)


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of an SFT checkpoint."""
    return f"val loss {meta['metrics'].get('val_loss', float('nan')):.3f} (assistant tokens)"
