"""Text generation with a KV cache: prefill the prompt once, then decode one token per step.

This is the single-sequence core that `cakelm sample` uses; batching, streaming text and log-probabilities grow
here (one generation path for sampling, chat, serving and RL rollouts).

    for token_id in generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=50, seed=0):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cakelm.common import CakeError
from cakelm.model import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample from softmax(logits / T)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2019). Returns ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids after `prompt`, stopping after a token in `stop_ids`.

    The prompt plus the new tokens must fit the context: a prompt that does not leave room for one new token is
    an error, and `max_new_tokens` is cut to what fits."""
    ctx = model.cfg.max_seq_len
    if not prompt:
        raise CakeError("empty prompt: give at least one token (e.g. <|bos|>)")
    if len(prompt) >= ctx:
        raise CakeError(f"prompt is {len(prompt)} tokens but the model's context is {ctx}; shorten it")
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    max_new_tokens = min(max_new_tokens, ctx - len(prompt))
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, device, model.lm_head.weight.dtype)
    logits = model(torch.tensor([list(prompt)], device=device), kv_cache=cache)[:, -1]  # prefill: (1, V)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        tok = int(nxt.item())
        yield tok
        if tok in stop_ids or i == max_new_tokens - 1:
            return
        logits = model(nxt.view(1, 1), kv_cache=cache)[:, -1]  # decode one token
