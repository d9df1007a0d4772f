"""Continuous batching: requests share the model's forward passes, joining and leaving at token boundaries.

`cakelm serve` runs every request through one `Batcher` (vLLM's, TGI's and llama.cpp's servers work this way):
a request that arrives while others generate joins their batch at the next token instead of waiting for them to
finish, and a row that finishes (or whose client goes away) frees its place for the next request at once.

    batcher = Batcher(engine, slots=8, max_queued=64).start()       # one scheduler thread
    request = batcher.submit([prompt_ids], SamplingParams(max_new_tokens=48), n=1, emit=events.put)
    ...  # events: StreamEvent per token (PromptScores first with echo_top), then DONE (or an exception)
    batcher.cancel(request)                                          # frees its rows before the next step

The scheduler (`Batcher.step`, one iteration; the thread calls it while there is work):
1. take the prompts admitted since the last step (admission happens in `submit` and when rows free up, under the
   lock: a prompt with n samples is given n free slots, first come first served);
2. drop the rows of cancelled requests;
3. prefill: the oldest admitted prompt runs its next chunk of at most `chunk` tokens (all of it with echo, whose
   scores come from that one forward pass), or, if it has not begun, it and the next prompts that fit in `chunk`
   tokens together run whole; when a prompt is in, its n rows sample their first token;
4. decode: every generating row takes one token, in one forward pass over the slots [0, highest busy slot].

Running streams keep flowing while a long prompt comes in: each step adds one chunk of it, then a token to
every stream. A newcomer's first token waits for at most the step in progress.

Invariant (between steps): each slot of the SlotKVCache is free or holds one row of one admitted prompt; a busy
slot's positions [0, length[slot]) hold exactly its prompt (or the part prefilled so far) and its sampled tokens
but the last, which is the input of its next decode step. A decode step feeds the slots that are not generating a
padding token at position length[slot], which the slot's next write overwrites, so they never see it.

Each row keeps its own sampling parameters, stop ids and strings, token limit and generator: a row's tokens
depend on its prompt, parameters and seed alone, not on the rows beside it (up to rounding differences between
batch shapes, which can flip a near-tie; the tests compare greedy and seeded outputs with those of the request
served alone). With a seed, row k of prompt p draws from seed_of(seed, p, k), except the first row, which draws
from the seed itself as `Engine.generate` does for a single row (so one seeded completion is the same in `serve`
and in `cakelm sample`, in the same dtype). In bf16 the rounding differences between batch shapes are larger, and
a greedy reply may change with the load.

`Batcher.generate(prompts, params, n, seeds)` runs the same scheduler in the calling thread, for bulk work
(`benchmarks/bulk.py` compares it with Engine.generate's static batches).
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cakelm.common import CakeError, seed_of
from cakelm.engine import (
    Completion,
    Engine,
    RowText,
    SamplingParams,
    StreamEvent,
    TokenLogprob,
    sample_next,
    sampled_logprobs,
    score_prompt,
    token_logprobs,
)
from cakelm.model import SlotKVCache

DONE = object()  # a request's last item: everything was delivered


class Busy(CakeError):
    """The batch is full and max_queued requests already wait."""


@dataclass
class PromptScores:
    """The log-probs of one prompt's tokens (with echo_top), delivered before any of its generated tokens."""

    prompt_index: int
    entries: list[TokenLogprob | None]


@dataclass
class Request:
    """One submitted request: n rows for each of its prompts. `state` goes queued -> running -> done (or queued
    -> done when cancelled while it waits); it and `pending` change under the batcher's lock."""

    prompts: list[list[int]]
    params: SamplingParams | None  # None: score the prompts only (needs echo_top)
    n: int
    emit: Callable[[Any], None]  # StreamEvent / PromptScores, then DONE or the exception that ended it
    echo_top: int | None = None  # score the prompts first, with this many top tokens per position
    seeds: list[int] | None = None  # one per prompt: row k of prompt p draws from seed_of(seeds[p], k)
    state: str = "queued"
    pending: int = 0  # prompts not finished
    cancelled: bool = False
    texts: dict[int, RowText] = field(default_factory=dict)  # row -> its tokens and text so far


@dataclass
class _Prompt:
    req: Request
    index: int
    limit: int  # tokens each of its rows may sample
    slots: list[int] = field(default_factory=list)
    filled: int = 0  # prompt tokens in the cache so far
    live: int = 0  # rows still generating

    @property
    def ids(self) -> list[int]:
        return self.req.prompts[self.index]


@dataclass
class _Row:
    prompt: _Prompt
    sample: int
    slot: int
    text: RowText
    gen: torch.Generator | None
    token: int = -1  # the last sampled token: the input of the next decode step


class Batcher:
    """The scheduler over one engine's model: `slots` rows generate at once (each a slot of the KV cache), and
    up to `max_queued` requests wait for room; `submit` refuses more with `Busy`."""

    def __init__(self, engine: Engine, slots: int = 8, max_queued: int = 64, chunk: int = 256) -> None:
        if slots < 1 or max_queued < 0 or chunk < 1:
            raise CakeError(f"need slots >= 1, max_queued >= 0 and chunk >= 1 (got {slots}, {max_queued}, {chunk})")
        self.engine, self.model, self.tok = engine, engine.model, engine.tok
        self.slots, self.max_queued, self.chunk = slots, max_queued, chunk
        self.cache = SlotKVCache(self.model.cfg, slots, engine.device, engine.dtype)
        self.lock = threading.Condition()
        # under the lock: free slots (a heap: the lowest first, so decode steps stay narrow), prompts waiting for
        # slots (first come first served) and prompts given slots that the scheduler has not taken yet
        self.free = list(range(slots))
        self.waiting: deque[_Prompt] = deque()
        self.admitted: deque[_Prompt] = deque()
        self.running = self.queued = 0  # requests
        # the scheduler's own (one thread)
        self.prefilling: deque[_Prompt] = deque()
        self.decoding: dict[int, _Row] = {}  # slot -> row
        self.length = [0] * slots  # cache positions filled per slot
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Requests (any thread)

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None, n: int,
               emit: Callable[[Any], None], echo_top: int | None = None, seeds: Sequence[int] | None = None
               ) -> Request:
        """Queue a request (or start it at once when the batch has room); raises CakeError for prompts that do
        not fit and Busy when max_queued requests wait already. `seeds` (one per prompt) seed each prompt's rows
        as Engine.generate's do (params.seed is then not used)."""
        if params is None and echo_top is None:
            raise CakeError("a request without sampling parameters must ask for its prompts' scores")
        self.engine.check_prompts(prompts, room=0 if params is None else 1)
        limits = [0] * len(prompts) if params is None else self.engine.limits(prompts, params)
        if seeds is not None and len(seeds) != len(prompts):
            raise CakeError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not 1 <= n <= self.slots:
            raise CakeError(f"n = {n} samples need {n} rows; the batch has {self.slots} (--max-concurrency)")
        req = Request([list(p) for p in prompts], params, n, emit, echo_top,
                      None if seeds is None else list(seeds), pending=len(prompts))
        with self.lock:
            if (self.waiting or len(self.free) < n) and self.queued >= self.max_queued:
                raise Busy(f"the server is busy: {self.running} requests are generating and {self.queued} waiting, "
                           f"the most it takes (--max-concurrency {self.slots} rows, --max-queued "
                           f"{self.max_queued}); retry later")
            self.queued += 1
            self.waiting.extend(_Prompt(req, i, lim) for i, lim in enumerate(limits))
            self._admit()
            self.lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request: its waiting prompts leave the queue now, its rows before the next decode step."""
        with self.lock:
            if req.state == "done":
                return
            req.cancelled = True
            kept = deque(p for p in self.waiting if p.req is not req)
            req.pending -= len(self.waiting) - len(kept)
            self.waiting = kept
            self._settle(req)
            self.lock.notify_all()

    def counts(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        with self.lock:
            return self.running, self.queued

    def start(self) -> Batcher:
        """Run the scheduler on a daemon thread of its own."""
        self.thread = threading.Thread(target=self._serve_forever, name="cakelm-batcher", daemon=True)
        self.thread.start()
        return self

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """All completions (n per prompt, grouped by prompt), generated in the calling thread, as
        Engine.generate returns them: for bulk work, where a finished row's slot takes the next prompt at once
        instead of idling until the longest row of a static batch is done. Not while the scheduler thread runs."""
        if self.thread is not None:
            raise CakeError("Batcher.generate runs the scheduler itself: not on a started batcher")
        errors: list[Exception] = []
        req = self.submit(prompts, params, n, lambda item: errors.append(item) if isinstance(item, Exception)
                          else None, seeds=seeds)
        while self.step():
            pass
        if errors:
            raise errors[0]
        return [Completion(r // n, t.ids, t.text, t.finish or "length", len(prompts[r // n]),
                           t.logprobs if params.logprobs else None)
                for r, t in sorted(req.texts.items())]

    def _serve_forever(self) -> None:
        while True:
            with self.lock:
                while not (self.admitted or self.prefilling or self.decoding):
                    self.lock.wait()
            self.step()

    # ------------------------------------------------------------------------------------------------------------
    # Admission and release (under the lock)

    def _admit(self) -> None:
        while self.waiting and len(self.free) >= self.waiting[0].req.n:
            p = self.waiting.popleft()
            p.slots = [heapq.heappop(self.free) for _ in range(p.req.n)]
            self.admitted.append(p)
            if p.req.state == "queued":
                p.req.state = "running"
                self.queued -= 1
                self.running += 1

    def _settle(self, req: Request) -> bool:
        """Mark a request done when none of its prompts is left; True if that happened now."""
        if req.pending or req.state == "done":
            return False
        self.running -= req.state == "running"
        self.queued -= req.state == "queued"
        req.state = "done"
        return True

    def _release(self, p: _Prompt, slots: list[int]) -> None:
        """Give back a prompt's slots; when it was its request's last prompt, the request is done."""
        for s in slots:
            self.length[s] = 0
        with self.lock:
            for s in slots:
                heapq.heappush(self.free, s)
            finished = False
            if p.live == 0:
                p.req.pending -= 1
                finished = self._settle(p.req)
            self._admit()
        if finished and not p.req.cancelled:
            p.req.emit(DONE)

    # ------------------------------------------------------------------------------------------------------------
    # The scheduler (one thread)

    def step(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do."""
        with self.lock:
            self.prefilling.extend(self.admitted)
            self.admitted.clear()
        for p in [p for p in self.prefilling if p.req.cancelled]:
            self.prefilling.remove(p)
            self._release(p, p.slots)
        for row in [r for r in self.decoding.values() if r.prompt.req.cancelled]:
            self._finish(row)
        if not (self.prefilling or self.decoding):
            return False
        try:
            if self.prefilling:
                group = self._prefill_group()
                self._prefill(group[0]) if len(group) == 1 else self._prefill_together(group)
            if self.decoding:
                self._decode()
        except Exception as e:  # a failed forward pass fails the requests in it; the scheduler carries on
            self._fail(e)
        return True

    def _prefill_group(self) -> list[_Prompt]:
        """The prompts to prefill in this step: the oldest one's next chunk, or, when it has not begun, it and the
        next whole prompts that fit with it in `chunk` padded tokens (echo's prompts run alone: their scores must
        be those of Engine.prompt_logprobs's own forward pass)."""
        head = self.prefilling[0]
        if head.filled or head.req.echo_top is not None:
            return [head]
        group: list[_Prompt] = []
        longest = 0
        for p in self.prefilling:
            if p.filled or p.req.echo_top is not None:
                continue
            if group and (len(group) + 1) * max(longest, len(p.ids)) > self.chunk:
                break
            group.append(p)
            longest = max(longest, len(p.ids))
        return group

    @torch.no_grad()
    def _prefill(self, p: _Prompt) -> None:
        """One prompt's next chunk (all of it with echo)."""
        ids, first = p.ids, p.slots[0]
        if p.filled == 0:
            self.cache.reserve(len(ids) + p.limit)
        T = len(ids) - p.filled if p.req.echo_top is not None else min(self.chunk, len(ids) - p.filled)
        idx = torch.tensor(ids[p.filled:p.filled + T], device=self.engine.device)[None]  # (1, T)
        hidden = self.model(idx, kv_cache=self.cache.view([first], [p.filled]), hidden=True)[0]  # (T, C)
        p.filled += T
        self.length[first] = p.filled
        if p.filled < len(ids):
            return
        self.prefilling.remove(p)
        if p.req.echo_top is not None and not p.req.cancelled:  # the whole prompt ran in this one pass
            full = torch.tensor(ids, device=self.engine.device)
            p.req.emit(PromptScores(p.index, score_prompt(self.model.lm_head, hidden, full, p.req.echo_top)))
        self._start(p, self.model.lm_head(hidden[-1:]))

    @torch.no_grad()
    def _prefill_together(self, group: list[_Prompt]) -> None:
        """Whole prompts in one forward pass, right-padded to the longest (see SlotView)."""
        T = max(len(p.ids) for p in group)
        self.cache.reserve(max(len(p.ids) + p.limit for p in group))
        idx = torch.tensor([p.ids + [self.tok.pad_id] * (T - len(p.ids)) for p in group], device=self.engine.device)
        hidden = self.model(idx, kv_cache=self.cache.view([p.slots[0] for p in group], [0] * len(group)),
                            hidden=True)  # (B, T, C)
        ends = torch.tensor([len(p.ids) - 1 for p in group], device=self.engine.device)
        logits = self.model.lm_head(hidden[torch.arange(len(group)), ends])  # (B, V): each prompt's last position
        for i, p in enumerate(group):
            p.filled = self.length[p.slots[0]] = len(p.ids)
            self.prefilling.remove(p)
            self._start(p, logits[i:i + 1])

    def _start(self, p: _Prompt, logits: torch.Tensor) -> None:
        """A prompt is in: its n rows begin, each sampling its first token from the prompt's logits (1, V)."""
        params = p.req.params
        if params is None:  # scored only
            self._release(p, p.slots)
            return
        first = p.slots[0]
        rows = []
        p.live = len(p.slots)
        for k, slot in enumerate(p.slots):
            if k:  # sample k continues sample 0's prefill
                self.cache.copy_slot(first, slot, len(p.ids))
                self.length[slot] = len(p.ids)
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device=self.engine.device)
                if p.req.seeds is not None:
                    gen.manual_seed(seed_of(p.req.seeds[p.index], k))
                elif params.seed is None:
                    gen.seed()
                else:  # the first row as Engine draws one row, from the seed itself
                    gen.manual_seed(params.seed if p.index == k == 0 else seed_of(params.seed, p.index, k))
            row = _Row(p, k, slot, RowText(p.index, tuple(params.stop_strings)), gen)
            p.req.texts[p.index * p.req.n + k] = row.text
            self.decoding[slot] = row
            rows.append(row)
        self._sample(rows, logits.expand(len(rows), -1))

    @torch.no_grad()
    def _decode(self) -> None:
        busy = sorted(self.decoding)
        width = busy[-1] + 1
        tokens = [self.tok.pad_id] * width
        for s in busy:
            tokens[s] = self.decoding[s].token
        idx = torch.tensor(tokens, device=self.engine.device)[:, None]  # (width, 1)
        view = self.cache.view(list(range(width)), self.length[:width])
        hidden = self.model(idx, kv_cache=view, hidden=True)[:, -1]  # (width, C)
        logits = self.model.lm_head(hidden[busy] if len(busy) < width else hidden)  # (rows, V)
        for s in busy:
            self.length[s] += 1
        self._sample([self.decoding[s] for s in busy], logits)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Draw each row's next token from its logits (rows, V), deliver it, and free the rows that are done.
        Rows sharing a request's parameters are sampled together (one vectorised draw, each from its own
        generator)."""
        by_params: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_params.setdefault(id(row.prompt.req.params), []).append(i)
        for idx in by_params.values():
            params = rows[idx[0]].prompt.req.params
            assert params is not None
            lg = logits[idx]  # (r, V)
            gens = [rows[i].gen for i in idx] if params.temperature > 0 else None
            nxt = sample_next(lg, params.temperature, params.top_k, params.top_p, gens)  # (r,)
            lps = sampled_logprobs(lg, nxt, params.temperature).tolist() if params.logprobs else [0.0] * len(idx)
            tops = token_logprobs(lg, nxt, params.top_logprobs) if params.top_logprobs is not None else None
            stop_ids = tuple(params.stop_ids)
            for j, (i, token) in enumerate(zip(idx, nxt.tolist())):
                row = rows[i]
                req = row.prompt.req
                piece = row.text.push(token, lps[j], self.tok, stop_ids, len(row.text.ids) + 1 == row.prompt.limit)
                row.token = token
                if not req.cancelled:
                    req.emit(StreamEvent(row.prompt.index * req.n + row.sample, row.prompt.index, piece, token,
                                         row.text.finish, tops[j] if tops else None))
                if row.text.finish is not None:
                    self._finish(row)

    def _finish(self, row: _Row) -> None:
        del self.decoding[row.slot]
        row.prompt.live -= 1
        self._release(row.prompt, [row.slot])

    def _fail(self, error: Exception) -> None:
        """Every request with a prompt or row in the batch gets the error and ends."""
        hit = {id(p.req): p.req for p in self.prefilling} | {id(r.prompt.req): r.prompt.req
                                                              for r in self.decoding.values()}
        for req in hit.values():
            if not req.cancelled:
                req.emit(error)
            self.cancel(req)
        for p in list(self.prefilling):
            self.prefilling.remove(p)
            self._release(p, p.slots)
        for row in list(self.decoding.values()):
            self._finish(row)
