"""RL rollouts: prompts -> completions through one generator interface -> the tensors a policy-gradient loss needs.

Every stage that samples replies from a policy (grpo, rloo, ppo, prefs, label, rlhf-round, and the RLHF
evaluation) asks a `Generator`; none builds an engine itself. `EngineGenerator`, the in-process KV-cache engine
over the policy's own weights, is the implementation and the reference for log-prob correctness:

    gen = EngineGenerator(model, tok)
    rollouts = gen.generate([r.messages for r in rows], params, n=8, seeds=[...])   # prompt i's: [i*8:(i+1)*8]
    batch = to_batch(rollouts, tok.pad_id)                                         # (N, T) tensors
    logp, entropy = completion_logprobs(model, batch["input"], batch["target"], temperature=1.0)

`completion_logprobs` is the training-side twin of the sampler's log-probs: same tokens, same temperature, so the
importance ratio exp(logp - old_logp) is 1 on the first pass (up to rounding; tested).

What another backend (vLLM or SGLang on GPUs, a batched server) must provide to be a `Generator`:
1. `generate(prompts, params, n, seeds)`: for each conversation (rendered in the model's chat format, which the
   backend must apply exactly as `chat_format.render_prompt` does, or be given `prompt_ids`), n completions
   ending on a stop token of `chat_format.stop_rules` or at `params.max_new_tokens`, returned as `Rollout`s with
   the prompt's token ids, the completion's token ids (its stop token included), the decoded text, whether it
   ended its turn, and the log-probability of every sampled token under softmax(logits / temperature) (before
   top-k / top-p, which rollouts do not use). `seeds` (one per prompt) make the draw reproducible and
   independent of how prompts are batched or split over ranks (up to the rounding differences between batch
   shapes, which can flip a near-tie).
2. `refresh()`: load the policy's current weights (every rollout phase of an RL stage calls it before sampling; a
   backend in another process receives a state dict or a shared-memory handle; the in-process engine reads the
   live module, so its refresh does nothing). Evaluations ask `scaffold.Run.generator` for one over the model
   they measure.
3. `exact_logprobs`: whether its log-probs equal the trainer's forward up to rounding. A backend with other
   kernels, another precision or stale weights breaks this: the trainer's log-probs of the same tokens differ
   from the sampler's, and the ratio pi_train / pi_sample is no longer 1 on the first pass. The RL stages then
   must (a) recompute old_logp with the trainer at rollout time (the clipped ratio is taken against it), and
   (b) weight each token's loss by the truncated importance ratio min(pi_train_old / pi_sampler, C) (TIS,
   Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; verl's and
   OpenRLHF's vLLM IS correction), C ~ 2. The engine's log-probs are exact, so neither is implemented yet:
   a backend that sets exact_logprobs = False is refused by `check_exact`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from tqdm import tqdm

from cakelm.chat_format import Message, render_prompt, stop_rules
from cakelm.common import CakeError, seed_of
from cakelm.engine import Engine, SamplingParams
from cakelm.losses import IGNORE_INDEX
from cakelm.model import Transformer
from cakelm.tokenizer import Tokenizer


@dataclass
class Rollout:
    """One sampled completion of prompt `prompt` (an index into the prompts given to `generate`)."""

    prompt: int
    prompt_ids: list[int]
    ids: list[int]  # the completion's tokens, its stop token included
    text: str
    ended: bool  # the reply ended its turn with its end-of-turn token (not the token limit, not a stray <|bos|>)
    logprobs: list[float]  # of each token in `ids`, under the sampling temperature


class Generator(Protocol):
    """prompts -> sampled completions with token ids and log-probs (see the module docstring)."""

    tok: Tokenizer
    exact_logprobs: bool

    def generate(self, prompts: Sequence[Sequence[Message]], params: SamplingParams, n: int = 1,
                 seeds: Sequence[int] | None = None, progress: str | None = None) -> list[Rollout]: ...

    def refresh(self) -> None: ...


class EngineGenerator:
    """The in-process engine (`cakelm.engine`) over `model`'s live weights, `chunk` completions at a time."""

    exact_logprobs = True

    def __init__(self, model: Transformer, tok: Tokenizer, chunk: int = 256) -> None:
        self.model, self.tok, self.chunk = model, tok, chunk

    def refresh(self) -> None:
        """Nothing to do: the engine reads the policy module itself, so it always has the latest weights."""

    def generate(self, prompts: Sequence[Sequence[Message]], params: SamplingParams, n: int = 1,
                 seeds: Sequence[int] | None = None, progress: str | None = None) -> list[Rollout]:
        """n completions of every prompt in chat format (grouped: prompt i's are rollouts[i*n:(i+1)*n]). Prompt i
        samples with seeds[i], or with seed_of(params.seed, i) when only params.seed is given: either way its
        completions do not depend on the chunking. With `progress`, a progress bar of that title counts them.
        The model is left in train mode if it was in it."""
        if params.stop_strings:
            raise CakeError("rollouts end on stop tokens only (a stop string would leave its tokens in the ids)")
        if seeds is None and params.seed is not None:
            seeds = [seed_of(params.seed, i) for i in range(len(prompts))]
        stop_ids, _ = stop_rules(self.tok, "chat")
        params = replace(params, stop_ids=stop_ids, logprobs=True)
        ids = [render_prompt(m, self.tok, "chat") for m in prompts]
        was_training = self.model.training
        engine = Engine(self.model, self.tok)  # switches the model to eval mode
        per_call = max(1, self.chunk // n)
        out: list[Rollout] = []
        bar = tqdm(total=len(ids) * n, desc=progress, unit="reply", dynamic_ncols=True, leave=False,
                   disable=progress is None)
        try:
            for start in range(0, len(ids), per_call):
                part = ids[start:start + per_call]
                part_seeds = None if seeds is None else seeds[start:start + per_call]
                for c in engine.generate(part, params, n=n, seeds=part_seeds):
                    ended = c.finish_reason == "stop" and c.ids[-1] == self.tok.end_id
                    out.append(Rollout(start + c.prompt_index, part[c.prompt_index], c.ids, c.text.strip(), ended,
                                       c.logprobs or []))
                bar.update(len(part) * n)
        finally:
            bar.close()
            self.model.train(was_training)
        return out


def check_exact(generator: Generator) -> None:
    """Refuse a generator whose log-probs differ from the trainer's (see the module docstring, item 3)."""
    if not generator.exact_logprobs:
        raise CakeError(f"{type(generator).__name__}: its log-probs differ from the trainer's; the RL stages do not "
                        "apply the importance-sampling correction such a backend needs yet")


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


HEAD_BUDGET = 2**24  # logits a training forward holds at once in completion_logprobs (64 MB in fp32)


def _logprobs(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of `target` (M,), entropy (M,)) from logits (M, V): log p = logit - logsumexp, one fp32 copy of the
    logits. The entropy carries no gradient."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)  # (M,)
    picked = logits.gather(-1, target[:, None]).squeeze(-1) - logz  # (M,)
    with torch.no_grad():
        entropy = logz - torch.softmax(logits, dim=-1).mul_(logits).sum(-1)  # H = log Z - sum_v p_v x_v
    return picked, entropy


def _head_logprobs(head: torch.nn.Module, h: torch.Tensor, target: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_logprobs` of the output head at hidden states h (M, C): a chunk that activation checkpointing recomputes."""
    return _logprobs(head(h), target, temperature)


def completion_logprobs(model: torch.nn.Module, inp: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token under softmax(logits / temperature), entropy of that distribution), both
    (N, T) in fp32 and 0 where target == IGNORE_INDEX. The entropy is a metric and carries no gradient.

    Memory: the output head is applied only at the M scored positions (the completions: `only_at`), and log p =
    logit - logsumexp, so the forward holds one (M, V) copy instead of log_softmax's several (N, T, V) ones. When
    training and M x V passes HEAD_BUDGET (a real vocabulary: 1,536 reply tokens x 49k = 302 MB per copy), the
    head runs on HEAD_BUDGET-sized row chunks, each recomputed in the backward pass instead of kept (activation
    checkpointing of the head, as Liger's fused linear cross-entropy does it): the same numbers (tested), a
    fraction of the logits' memory, one more head matmul per chunk."""
    scored = target != IGNORE_INDEX  # (N, T)
    picked_target = target[scored]  # (M,)
    body = getattr(model, "module", model)  # the Transformer inside a DDP wrapper
    rows = max(1, HEAD_BUDGET // body.cfg.vocab_size)
    if not (torch.is_grad_enabled() and len(picked_target) > rows):
        picked, ent = _logprobs(model(inp, only_at=scored), picked_target, temperature)  # (M, V) logits
    else:
        h = model(inp, only_at=scored, hidden=True)  # (M, C)
        parts = [torch.utils.checkpoint.checkpoint(_head_logprobs, body.lm_head, h[i:i + rows],
                                                   picked_target[i:i + rows], temperature, use_reentrant=False)
                 for i in range(0, len(picked_target), rows)]
        picked, ent = torch.cat([p for p, _ in parts]), torch.cat([e for _, e in parts])
    logp = torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device).masked_scatter(scored, picked)
    entropy = torch.zeros(scored.shape, dtype=ent.dtype, device=ent.device).masked_scatter(scored, ent)
    return logp, entropy


LOGITS_BUDGET = 2**26  # logits held at once by frozen_logprobs (256 MB in fp32; its temporaries are a few of these)


@torch.no_grad()
def frozen_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float, rows: int,
                    device: torch.device) -> torch.Tensor:
    """(N, T) log-probs of a batch's targets under a frozen model (the reference), on CPU: `rows` rows at a time, or
    fewer where (rows, T, vocabulary) logits would pass LOGITS_BUDGET (a real model's 49k-152k vocabulary: 64 rows
    of 160 tokens would be 2 GB per copy)."""
    N, T = batch["input"].shape
    vocab = model.cfg.vocab_size
    rows = max(1, min(rows, LOGITS_BUDGET // max(1, T * vocab)))
    out = []
    for i in range(0, N, rows):
        logp, _ = completion_logprobs(model, batch["input"][i:i + rows].to(device),
                                      batch["target"][i:i + rows].to(device), temperature)
        out.append(logp.cpu())
    return torch.cat(out)
