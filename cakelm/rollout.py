"""RL rollouts: prompts -> completions sampled through the engine -> the tensors a policy-gradient loss needs.

One path for every RL stage (GRPO now, PPO next): the prompts are rendered in the model's chat format, the
engine samples G completions of each (sharing the prompt's prefill) and keeps the log-probability of every
sampled token under the sampling temperature, and `to_batch` lays prompt + completion out as training rows
whose loss mask covers exactly the completion tokens (its <|end|> included, so ending the turn is learned).

    rows = prompts_of(examples)                                          # questions + reward fields
    rollouts = sample(model, tok, [r.messages for r in rows], params, n=8)
    batch = to_batch(rollouts, tok.pad_id)                               # (N, T) tensors
    logp, entropy = completion_logprobs(model, batch["input"], batch["target"], temperature=1.0)

`completion_logprobs` is the training-side twin of the engine's sampling log-probs: same tokens, same
temperature, so the importance ratio exp(logp - old_logp) is 1 on the first pass (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cakelm.chat_format import Message, render_prompt, stop_rules
from cakelm.common import CakeError
from cakelm.data.chat import Example
from cakelm.engine import Engine, SamplingParams
from cakelm.losses import IGNORE_INDEX
from cakelm.model import Transformer
from cakelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptRow:
    """A question to roll out: the conversation so far (ending on a user turn) and the fields rewards get
    (the task's `answer`, reasoning-gym's `task` and `entry`, a JSONL row's other keys)."""

    name: str
    messages: list[Message]
    fields: dict[str, Any]

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def source(self) -> str:
        """The source this prompt came from, by its name: chitchat/123 -> chitchat, arithmetic/train/3 ->
        arithmetic, /data/my.jsonl:12 -> my.jsonl, hf:org/set:train[3] -> hf:org/set:train."""
        if self.name.startswith("hf:"):
            return self.name.rsplit("[", 1)[0]
        path, sep, line = self.name.rpartition(":")
        if sep and line.isdigit():
            return Path(path).name
        return self.name.split("/")[0]


@dataclass
class Rollout:
    """One sampled completion of prompt `prompt` (an index into the prompts given to `sample`)."""

    prompt: int
    prompt_ids: list[int]
    ids: list[int]  # the completion's tokens, its stop token included
    text: str
    ended: bool  # the reply ended its turn with <|end|> (not the token limit, not a stray <|bos|>)
    logprobs: list[float]  # of each token in `ids`, under the sampling temperature


def prompts_of(examples: Sequence[Example]) -> list[PromptRow]:
    """Examples as questions: the messages up to the last user turn (a reply after it is dropped)."""
    rows = []
    for ex in examples:
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        fields = {**ex.fields, **({"answer": ex.answer} if ex.answer is not None else {})}
        rows.append(PromptRow(ex.name, ex.messages[:last_user + 1], fields))
    return rows


def sample(model: Transformer, tok: Tokenizer, prompts: Sequence[Sequence[Message]], params: SamplingParams,
           n: int = 1, chunk: int = 256, progress: str | None = None) -> list[Rollout]:
    """n completions of every prompt (grouped: prompt i's are rollouts[i*n:(i+1)*n]), in chat format, generated
    `chunk` completions at a time; with `progress`, a progress bar of that title counts them. The model is left in
    train mode if it was in it."""
    if params.stop_strings:
        raise CakeError("rollouts end on stop tokens only (a stop string would leave its tokens in the ids)")
    stop_ids, _ = stop_rules(tok, "chat")
    params = replace(params, stop_ids=stop_ids, logprobs=True)
    ids = [render_prompt(m, tok, "chat") for m in prompts]
    was_training = model.training
    engine = Engine(model, tok)  # switches the model to eval mode
    per_call = max(1, chunk // n)
    out: list[Rollout] = []
    bar = tqdm(total=len(ids) * n, desc=progress, unit="reply", dynamic_ncols=True, leave=False,
               disable=progress is None)
    try:
        for start in range(0, len(ids), per_call):
            part = ids[start:start + per_call]
            seed = None if params.seed is None else params.seed + start  # each chunk its own stream
            for c in engine.generate(part, replace(params, seed=seed), n=n):
                ended = c.finish_reason == "stop" and c.ids[-1] == tok.end_id
                out.append(Rollout(start + c.prompt_index, part[c.prompt_index], c.ids, c.text.strip(), ended,
                                   c.logprobs or []))
            bar.update(len(part) * n)
    finally:
        bar.close()
        model.train(was_training)
    return out


def to_batch(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Training rows of prompt + completion, right-padded. input/target (N, T) as in language modelling, with
    target = IGNORE_INDEX off the completion; old_logp (N, T) the sampling log-prob at each target position
    (0 elsewhere); mask (N, T) float, 1 on completion tokens."""
    T = max(len(r.prompt_ids) + len(r.ids) - 1 for r in rollouts)
    inp = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rollouts), T), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(len(rollouts), T)
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.ids
        p, n = len(r.prompt_ids), len(seq) - 1
        inp[i, :n] = torch.tensor(seq[:-1])
        # the logits at position t predict token t + 1: the completion's tokens are targets p-1 .. n-1
        tgt[i, p - 1:n] = torch.tensor(r.ids)
        old[i, p - 1:n] = torch.tensor(r.logprobs)
    return {"input": inp, "target": tgt, "old_logp": old, "mask": (tgt != IGNORE_INDEX).float()}


def completion_logprobs(model: torch.nn.Module, inp: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token under softmax(logits / temperature), entropy of that distribution), both
    (N, T) in fp32 and 0 where target == IGNORE_INDEX. The entropy is a metric and carries no gradient."""
    logits = model(inp).float() / temperature  # (N, T, V)
    logp_all = F.log_softmax(logits, dim=-1)
    scored = target != IGNORE_INDEX
    logp = logp_all.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * scored
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1) * scored
    return logp, entropy
