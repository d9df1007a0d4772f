"""The inference engine: KV-cache generation for sampling, chat, serving and RL rollouts (one path for all).

- prefill: the prompts run through the model once, filling a preallocated `KVCache`; then one-token decode
  steps reuse it, so a step costs the same at token 10 and at token 1000.
- batching: prompts of different lengths are left-padded into one batch; the cache gives each row its own RoPE
  positions and a mask that hides the padding, so a row's tokens are exactly those it would get alone.
- n samples of one prompt share its prefill (the cache rows are copied after it).
- finished rows leave the batch (once a quarter of it has finished, its cache rows are dropped), so a batch
  whose replies end at different lengths stops paying for the ended ones; the rows left sample what they would
  have (`Engine._tokens`).
- sampling: greedy (temperature 0) or temperature / top-k / top-p with a seeded generator; stop token ids,
  stop strings (never emitted), and max_new_tokens. With `seeds` (one per prompt) every row draws from its own
  generator, so a completion depends on its seed alone, not on the other prompts in the batch: RL rollouts
  split over 2 ranks or 4 chunks sample what one batch would (up to rounding differences between batch shapes,
  which can flip a near-tie). It costs one small noise draw per row and token (a Python loop over the rows):
  nothing measurable on a 2-core CPU (`benchmarks/generate.py`: 16 prompts x 8 replies, 7,039 vs 6,896 sampled
  tokens/s); on a GPU each draw is a kernel launch of its own (not measured yet).
- streaming: `Engine.stream` yields text pieces as they become final: a multi-byte UTF-8 character split over
  tokens is held back until complete, and so is text that could still turn into a stop string. Stop strings are
  matched by an Aho-Corasick automaton (`StopMatcher`), so each new character costs amortised O(1) whatever the
  length of the reply and of the stop strings (checking every tail against every stop string cost O(L^2) per
  token for stop strings of L characters).
- log-probabilities of the sampled tokens on request (under the sampling temperature, before top-k/top-p),
  which RL needs (`SamplingParams.logprobs`, in `Completion.logprobs`).
- log-probabilities as the OpenAI API reports them (`SamplingParams.top_logprobs`, on each `StreamEvent`): the
  model's own distribution, log_softmax(logits) at temperature 1, whatever temperature, top-k and top-p the token
  was drawn with (vLLM's default too, `logprobs_mode=raw_logprobs`), with the k most likely tokens beside it; and
  `Engine.prompt_logprobs`, the same for every token of a prompt from one forward pass (lm-evaluation-harness's
  loglikelihood tasks score a continuation with it).

    engine = Engine(model, tokenizer)
    [c] = engine.generate([tokenizer.encode("ROMEO.", bos=True)], SamplingParams(max_new_tokens=50, seed=0))
    for event in engine.stream([prompt_ids], SamplingParams(temperature=0.7, stop_strings=("\\nUSER:",))):
        print(event.text, end="")
"""

from __future__ import annotations

import codecs
import functools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cakelm.common import CakeError, seed_of
from cakelm.model import KVCache, Transformer
from cakelm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # generation ends after one of these tokens (kept in ids, not in text)
    stop_strings: tuple[str, ...] = ()  # generation ends when the text contains one (cut from the text)
    logprobs: bool = False  # Completion.logprobs: under the sampling temperature (what RL's importance ratios need)
    # None: off; k >= 0: every StreamEvent carries the token's log-prob under the raw distribution (temperature 1,
    # before top-k/top-p) and the k most likely tokens' (the OpenAI API's `logprobs`)
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CakeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1):  # also rejects NaN
            raise CakeError(f"need temperature >= 0, top_k >= 0 and top_p in (0, 1]; got {self.temperature}, "
                            f"{self.top_k}, {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise CakeError("stop strings must not be empty")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise CakeError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass
class Completion:
    """One generated sequence. `ids` includes a final stop token; `text` excludes stop tokens and strings."""

    prompt_index: int
    ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    logprobs: list[float] | None = None


@dataclass
class TokenLogprob:
    """A token's log-prob under the model's raw distribution (log_softmax of the logits, temperature 1) and the
    most likely tokens at its position, (id, log-prob) pairs, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StreamEvent:
    """One sampled token of one row. `text` is the text that became final with it (often "" while a character
    or a possible stop string is incomplete); `finish_reason` is set on the row's last event; `logprobs` with
    SamplingParams.top_logprobs."""

    row: int
    prompt_index: int
    text: str
    token_id: int
    finish_reason: str | None = None
    logprobs: TokenLogprob | None = None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                noise_rows: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample from softmax(logits / T)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2019). `generator` is one for the batch or one per row. Returns ids (B,).
    `noise_rows` = (N, rows): the B rows are rows (B,) of a batch of N that shares one generator; the uniform
    draws are made for all N and these rows' taken, so a batch that dropped its finished rows samples what it
    would have."""
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
    # Inverse transform sampling: one uniform u per row, the first token whose cumulative probability exceeds
    # u x (the row's total). One random number a row instead of V (the exponential race, argmax p_i / E_i, drew
    # V exponentials a row: 6 ms of every decode step at 128 x 2048 on a 2-core CPU, against 0.4 ms). A token of
    # probability 0 (cut by top-k/top-p) never comes first: its cumulative sum equals its predecessor's.
    probs = logits.softmax(dim=-1)
    f64 = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(f64).cumsum(dim=-1)  # (B, V), float64 so rounding never shifts a boundary visibly
    if isinstance(generator, Sequence):  # each row its own stream
        u = torch.cat([torch.rand(1, dtype=f64, device=logits.device, generator=g) for g in generator])
    elif noise_rows is not None:
        u = torch.rand(noise_rows[0], dtype=f64, device=logits.device, generator=generator)[noise_rows[1]]
    else:
        u = torch.rand(logits.size(0), dtype=f64, device=logits.device, generator=generator)
    total = cdf[:, -1]  # (B,)
    # A guard: u x total must stay below the total, which no token exceeds (torch's 53-bit uniforms keep it there
    # today; a rounding that reached it would otherwise return V)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)  # (B,)
    # A row without a distribution (NaN logits from a broken model, or +-inf from a temperature near 0) has a NaN
    # total and would get V, past the vocabulary: give it a valid id, as the engine's next forward needs one
    return ids.clamp_(max=cdf.size(-1) - 1)


def sampled_logprobs(logits: torch.Tensor, chosen: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (N,) of the `chosen` tokens (N,) under the distribution they were sampled from: softmax(logits /
    temperature), the plain softmax for greedy (temperature 0), before top-k/top-p (what RL's ratios need)."""
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row of logits (N, V): the log-prob of the `chosen` token (N,) and of the k most likely tokens, from one
    fp32 log_softmax, so a greedy token's log-prob equals the top entry's exactly (lm-evaluation-harness's
    is_greedy compares them with ==)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    if k > 0:
        values, ids = lp.topk(min(k, lp.size(-1)), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(t, p, top) for t, p, top in zip(chosen.tolist(), picked, tops)]


def score_prompt(head: torch.nn.Module, hidden: torch.Tensor, idx: torch.Tensor, top_k: int = 0, chunk: int = 512
                 ) -> list[TokenLogprob | None]:
    """Every token of idx (T,) scored from the hidden states (T, C) of the positions before it (None for the
    first): the output head `chunk` positions at a time, as Engine.prompt_logprobs documents."""
    out: list[TokenLogprob | None] = [None]
    for s in range(0, len(idx) - 1, chunk):  # position t predicts token t + 1
        e = min(s + chunk, len(idx) - 1)
        out += token_logprobs(head(hidden[s:e]), idx[s + 1:e + 1], top_k)
    return out


class StopMatcher:
    """Aho-Corasick automaton over stop strings (Aho & Corasick 1975): fed a text a character at a time, its state
    is the longest tail of the text that begins some stop string, and it says when a stop string ends.

    Nodes are the prefixes of the stop strings (0: the empty one): `goto` the trie's edges, `fail` the node of the
    longest proper suffix that is also a prefix, `depth` the prefix's length, `ends` the length of the longest
    stop string that is a suffix of the prefix (0: none). Each character costs amortised O(1) transitions (a
    failure link shortens the state, which grows by at most one per character)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.fail, self.depth, self.ends = [0], [0], [0]
        for s in stops:
            node = 0
            for ch in s:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = self.goto[node][ch] = len(self.goto)
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[node] + 1)
                    self.ends.append(0)
                node = nxt
            self.ends[node] = len(s)
        queue = deque(self.goto[0].values())  # breadth first: a node's failure target is shallower, so done
        while queue:
            node = queue.popleft()
            self.ends[node] = self.ends[node] or self.ends[self.fail[node]]
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0)
                queue.append(child)

    def feed(self, state: int, text: str) -> tuple[int, int | None, int]:
        """Advance from `state` over `text`: (the new state, where in `text` the earliest-starting stop string
        that ends in it starts (negative: it began before `text`) or None, transitions made)."""
        first, steps = None, 0
        for i, ch in enumerate(text):
            while True:
                steps += 1
                nxt = self.goto[state].get(ch)
                if nxt is not None or state == 0:
                    state = nxt or 0
                    break
                state = self.fail[state]
            if self.ends[state]:  # the longest stop string ending here starts earliest among those ending here
                start = i + 1 - self.ends[state]
                first = start if first is None else min(first, start)
        return state, first, steps


@functools.lru_cache(maxsize=16)
def _matcher(stops: tuple[str, ...]) -> StopMatcher:
    """One automaton per set of stop strings, shared by the rows of a batch (only their states differ)."""
    return StopMatcher(stops)


@dataclass
class RowText:
    """Text assembly for one output row: incremental UTF-8 decoding, stop strings, what was already emitted."""

    prompt_index: int
    stop_strings: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stop_state: int = 0  # the matcher's state after the text so far: its depth is the text held back
    stop_steps: int = 0  # automaton transitions made (linear in the text: tests check it)
    matcher: StopMatcher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.matcher = _matcher(tuple(self.stop_strings))

    def push(self, token: int, logprob: float, tok: Tokenizer, stop_ids: tuple[int, ...], last: bool) -> str:
        """Add a sampled token; return the text that became final."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        cut = False
        if token in stop_ids:
            self.finish = "stop"
        else:
            new = self.decoder.decode(tok.token_bytes(token))
            self.stop_state, first, steps = self.matcher.feed(self.stop_state, new)
            self.stop_steps += steps
            # When several stop strings end in the new text, the text is cut at the earliest start. None can
            # start in emitted text: text that could begin one is held back.
            self.text += new
            if first is not None:
                self.text, self.finish, cut = self.text[:len(self.text) - len(new) + first], "stop", True
        if self.finish is None and last:
            self.finish = "length"
        if self.finish is not None:
            if not cut:  # bytes of an unfinished character become U+FFFD (after a cut they lie beyond the text)
                self.text += self.decoder.decode(b"", final=True)
            safe = len(self.text)
        else:
            safe = len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string (no stop string has
        ended, so the automaton's state is one)."""
        return self.matcher.depth[self.stop_state]


class Engine:
    """Generation over one model and tokenizer, in static batches. It keeps no state between calls (each builds
    its own KV cache and rows), so threads may share one; `cakelm.batching` runs `cakelm serve`'s requests through
    one model in a continuous batch instead."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, drop_finished: bool = True) -> None:
        self.model, self.tok = model.eval(), tokenizer  # the tokenizer supplies the padding id and token bytes
        self.drop_finished = drop_finished  # finished rows leave the batch (False: computed to the end, ignored)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def check_prompts(self, prompts: Sequence[Sequence[int]], room: int = 1) -> None:
        """Every prompt has a token and leaves `room` tokens of the context free (0: a prompt only scored)."""
        if not prompts:
            raise CakeError("no prompts to generate from")
        for i, p in enumerate(prompts):
            if not room and not 0 < len(p) <= self.context:
                raise CakeError(f"prompt {i}: a prompt to score needs 1 to {self.context} tokens, got {len(p)}")
            if not p:
                raise CakeError(f"prompt {i} is empty: give at least one token (e.g. <|bos|>)")
            if len(p) > self.context - room:
                raise CakeError(f"prompt {i} is {len(p)} tokens but the model's context is {self.context}; "
                                "shorten it (at least one token must fit after it)")

    def limits(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[int]:
        """New tokens each prompt may get: max_new_tokens, cut to what fits in the context after it."""
        return [min(params.max_new_tokens, self.context - len(p)) for p in prompts]

    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[int], top_k: int = 0, chunk: int = 512) -> list[TokenLogprob | None]:
        """Every token of `ids` scored given the tokens before it (None for the first, which nothing predicts), with
        the top_k most likely tokens at each position: one forward pass over the whole sequence (which may fill the
        context), the output head `chunk` positions at a time (a (T, vocab) fp32 block is large for long prompts
        and big vocabularies). The raw distribution, as `SamplingParams.top_logprobs`."""
        self.check_prompts([ids], room=0)
        idx = torch.tensor(list(ids), device=self.device)
        return score_prompt(self.model.lm_head, self.model(idx[None], hidden=True)[0], idx, top_k, chunk)

    @torch.no_grad()  # on a generator, torch enters no_grad at every resume (callers may hold grad mode on)
    def _tokens(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
                seeds: Sequence[int] | None = None, finished: Sequence[bool] | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None, list[TokenLogprob] | None]]:
        """Yield (rows, next token ids (len(rows),), their logprobs or None, their raw log-probs with the top tokens
        or None) for every decode step, until the row with the most room has had its share. `rows` are the rows
        (of the B*n) still in the batch. `finished` (B*n,), updated by the caller between steps, says which rows
        are done: once a quarter of the batch is, those rows leave it (their cache rows, generators and noise), so
        the later steps compute only the rows still generating. A row's tokens do not change by it (its own
        generator, or the shared one's noise drawn for all B*n rows), up to rounding differences between batch
        shapes, which can flip a near-tie."""
        self.check_prompts(prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise CakeError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        longest = max(len(p) for p in prompts)
        steps = max(self.limits(prompts, params))
        pad = [longest - len(p) for p in prompts]
        cache = KVCache(self.model.cfg, len(prompts), longest + steps, self.device, self.dtype, pad)
        idx = torch.tensor([[self.tok.pad_id] * k + list(p) for k, p in zip(pad, prompts)], device=self.device)
        # prefill; the output head only at the last position, the one a token is sampled from (B, V)
        logits = self.model.lm_head(self.model(idx, kv_cache=cache, hidden=True)[:, -1])
        if n > 1:
            cache.repeat_rows(n)
            logits = logits.repeat_interleave(n, dim=0)  # (B*n, V)
        total = logits.size(0)
        rows = list(range(total))
        shared: tuple[int, torch.Tensor] | None = None  # (B*n, rows still in) once the shared-noise batch shrank
        gen: torch.Generator | list[torch.Generator]
        if seeds is not None:  # row (prompt p, sample k) draws from seed_of(seeds[p], k) alone
            gen = [torch.Generator(device=self.device).manual_seed(seed_of(s, k)) for s in seeds for k in range(n)]
        else:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        for step in range(steps):
            nxt = sample_next(logits, params.temperature, params.top_k, params.top_p, gen, shared)  # (len(rows),)
            lp = sampled_logprobs(logits, nxt, params.temperature) if params.logprobs else None
            top = token_logprobs(logits, nxt, params.top_logprobs) if params.top_logprobs is not None else None
            yield rows, nxt, lp, top
            if step == steps - 1:
                break
            if finished is not None:
                keep = [i for i, r in enumerate(rows) if not finished[r]]
                if not keep:
                    break
                if len(keep) <= 3 * len(rows) // 4:  # copying the cache costs a few steps: not for every row
                    sel = torch.tensor(keep, device=self.device)
                    cache.keep_rows(sel)
                    nxt, rows = nxt[sel], [rows[i] for i in keep]
                    if isinstance(gen, list):
                        gen = [gen[i] for i in keep]
                    else:
                        shared = (total, torch.tensor(rows, device=self.device))
            logits = self.model(nxt[:, None], kv_cache=cache)[:, -1]  # decode one token per row

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1,
               seeds: Sequence[int] | None = None) -> Iterator[StreamEvent]:
        """Generate n continuations of every prompt in one batch, yielding text as it becomes final.

        Rows are ordered prompt by prompt (row = prompt_index * n + sample). A row's last event carries its
        finish_reason; the generator ends when every row has finished. `seeds` (one per prompt) seed each
        prompt's rows on their own (params.seed is then not used)."""
        yield from self._events(self._rows(prompts, params, n), prompts, params, n, seeds)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """All completions (n per prompt, grouped by prompt) at once."""
        rows = self._rows(prompts, params, n)
        for _ in self._events(rows, prompts, params, n, seeds):
            pass
        return [Completion(row.prompt_index, row.ids, row.text, row.finish or "length",
                           len(prompts[row.prompt_index]), row.logprobs if params.logprobs else None)
                for row in rows]

    @staticmethod
    def _rows(prompts: Sequence[Sequence[int]], params: SamplingParams, n: int) -> list[RowText]:
        return [RowText(i // n, tuple(params.stop_strings)) for i in range(len(prompts) * n)]

    def _events(self, rows: list[RowText], prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
                seeds: Sequence[int] | None) -> Iterator[StreamEvent]:
        stop_ids = tuple(params.stop_ids)
        limit = [lim for lim in self.limits(prompts, params) for _ in range(n)]  # per row
        finished = [False] * len(rows)
        for live, nxt, lp, top in self._tokens(prompts, params, n, seeds, finished if self.drop_finished else None):
            ids, lps = nxt.tolist(), (lp.tolist() if lp is not None else [0.0] * len(live))
            for i, r in enumerate(live):
                row = rows[r]
                if row.finish is not None:
                    continue
                piece = row.push(ids[i], lps[i], self.tok, stop_ids, last=len(row.ids) + 1 == limit[r])
                finished[r] = row.finish is not None
                yield StreamEvent(r, row.prompt_index, piece, ids[i], row.finish, top[i] if top else None)
            if all(finished):
                return
