"""Generation speed: prefill tokens/s, decode tokens/s at batch 1 and 8, time to first token, and how the cost
of a decoded token grows with the text, for cakelm's engine and for Hugging Face `transformers.generate` on
the same weights (an export of the same model), each with and without a KV cache; and what RL rollouts' per-prompt
seeds cost (sampling 16 prompts x 8 replies with one random generator for the batch, or one per row, and with the
exponential race the engine sampled by before 2026-12-04, against its inverse transform now); and the same
decode with bf16 weights (what `cakelm serve --dtype auto` picks where bf16 matmuls are faster), with how far its
greedy tokens and log-probs stay from fp32's.

    python benchmarks/generate.py                      # the 10m preset (6 layers, width 384, context 256)
    python benchmarks/generate.py --preset tiny --new-tokens 64
    python benchmarks/generate.py --ckpt smollm2 --new-tokens 64 --repeats 2 --no-cache-rows 0
                                                       # a real model: SmolLM2-135M (imported on the fly)
    python benchmarks/generate.py --ckpt smollm2 --new-tokens 64 --repeats 3 --no-cache-rows 0 --bf16 1

Weights are random for a preset (speed does not depend on them); --ckpt times a checkpoint's own weights
(`smollm2` imports SmolLM2-135M-Instruct into a temporary directory first). Decoding is greedy and never stops
early, so every configuration generates exactly --new-tokens tokens. transformers is needed for its rows (the dev
extra). The memory-bandwidth bound is the fastest batch-1 decode any fp32 implementation can reach: every
decoded token reads all the weights once, so tokens/s <= measured read bandwidth / bytes of weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import unittest.mock
from collections.abc import Callable

import torch

import cakelm.engine as engine_module
from cakelm.checkpoint import load_model
from cakelm.common import peak_memory_mb
from cakelm.engine import Engine, SamplingParams
from cakelm.hf_compat import export_hf
from cakelm.model import PRESETS, ModelConfig, Transformer
from cakelm.tokenizer import Tokenizer


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def toy_tokenizer(vocab: int) -> Tokenizer:
    text = " ".join(f"{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676 % 26)}" for i in range(vocab * 4))
    return Tokenizer.train(iter([text] * 3), vocab_size=vocab, min_frequency=1)


def per_token_ms(engine: Engine, prompt: list[int], n: int, window: int) -> list[float]:
    """ms per decoded token over consecutive windows of the generation (flat = the prefix is not recomputed)."""
    stamps = []
    params = SamplingParams(max_new_tokens=n, temperature=0)
    for _ in engine.stream([prompt], params):
        stamps.append(time.perf_counter())
    return [1000 * (stamps[i + window] - stamps[i]) / window for i in range(0, len(stamps) - window, window)]


def race_sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: torch.Generator | None = None, noise_rows: tuple | None = None) -> torch.Tensor:
    """The engine's sampler until 2026-12-04, for comparison: the exponential race, argmax(p / E) with E ~ Exp(1)
    (V random numbers a row; exact, like the inverse transform that replaced it). One generator, temperature only."""
    assert top_k == 0 and top_p == 1.0 and noise_rows is None and not isinstance(generator, list)
    probs = (logits.float() / temperature).softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)


def seeds_cost(engine: Engine, prompts: list[list[int]], n: int, repeats: int) -> dict[str, float]:
    """Sampled tokens/s of 8 replies to each prompt, with one generator for the batch, with a generator per row
    (`seeds`), and with one generator and the exponential race the engine used before, medians of interleaved runs
    (no stop tokens: every row samples n tokens)."""
    params = SamplingParams(max_new_tokens=n, temperature=1.0, seed=0)
    variants = {"one": None, "per row": list(range(len(prompts))), "race": None}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def run(name: str, seeds: list[int] | None) -> None:
        # the engine looks sample_next up in its module at every step: swap it for the race's rows
        swap = (unittest.mock.patch.object(engine_module, "sample_next", race_sample_next) if name == "race"
                else contextlib.nullcontext())
        with swap:
            engine.generate(prompts, params, n=8, seeds=seeds)

    for name, seeds in variants.items():  # warm-up
        run(name, seeds)
    for _ in range(repeats):
        for name, seeds in variants.items():
            t = time.perf_counter()
            run(name, seeds)
            times[name].append(time.perf_counter() - t)
    tokens = len(prompts) * 8 * n
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def bf16_rows(engine: Engine, prompt: list[int], prompts8: list[list[int]], greedy: SamplingParams,
              repeats: int) -> list[tuple[str, str, str, str]]:
    """Batch-1 and batch-8 decode with bf16 weights against fp32, timed in interleaved rounds (medians), and the
    bf16 model's greedy tokens and log-probs against fp32's on the same 8 prompts."""
    import copy

    b16 = Engine(copy.deepcopy(engine.model).to(torch.bfloat16), engine.tok)
    times: dict[tuple[str, int], list[float]] = {}
    for e in (engine, b16):  # warm-up
        e.generate([prompt], greedy)
    for _ in range(repeats):
        for name, e in (("fp32", engine), ("bf16", b16)):
            for batch in (1, 8):
                t = time.perf_counter()
                e.generate([prompt] if batch == 1 else prompts8, greedy)
                times.setdefault((name, batch), []).append(time.perf_counter() - t)
    N = greedy.max_new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    agree = total = 0
    worst = 0.0
    for a, b in zip(engine.generate(prompts8, greedy), b16.generate(prompts8, greedy)):
        agree += next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), len(a.ids))
        total += len(a.ids)
        seq = prompts8[a.prompt_index] + a.ids
        lp32, lp16 = engine.prompt_logprobs(seq), b16.prompt_logprobs(seq)
        worst = max(worst, max(abs(x.logprob - y.logprob) for x, y in zip(lp32[1:], lp16[1:])))
    return [
        ("cakelm, bf16 weights", "decode, batch 1", f"{N / med['bf16', 1]:,.1f} tok/s",
         f"{med['fp32', 1] / med['bf16', 1]:.2f}x fp32 (interleaved)"),
        ("cakelm, bf16 weights", "decode, batch 8 (8 lengths)", f"{8 * N / med['bf16', 8]:,.1f} tok/s",
         f"{med['fp32', 8] / med['bf16', 8]:.2f}x fp32 (interleaved)"),
        ("bf16 vs fp32", "greedy tokens before the first difference", f"{agree}/{total}",
         f"max |log-prob diff| {worst:.3f} on fp32's tokens"),
    ]


def read_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes/s this machine streams from memory: the best of `repeats` sums over an fp32 tensor of `mb` MB
    (far larger than any cache), on torch's threads, as a decode step's matrix-vector products read weights."""
    x = torch.ones(mb * 2**20 // 4)
    return x.numel() * 4 / timed(lambda: x.sum(), repeats)


def load(ckpt: str, tmp: str) -> tuple[Transformer, Tokenizer, str]:
    """(model, tokenizer, label) of a checkpoint, or of SmolLM2 imported into `tmp` for `smollm2`."""
    if ckpt == "smollm2":
        from cakelm.stages import import_model

        ckpt = str(import_model.main(import_model.ImportConfig(src="smollm2", out=f"{tmp}/smollm2")))
    model, tok, meta = load_model(ckpt)
    return model, tok, f"{meta.get('source', {}).get('name') or ckpt}"


@torch.no_grad()
def no_cache_decode(model: Transformer, prompt: list[int], n: int) -> None:
    """Greedy decoding that recomputes the whole sequence for every token (what a cache-less generate does)."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="10m", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ckpt", default=None, help="time this checkpoint instead of a preset (smollm2: import it)")
    ap.add_argument("--no-cache-rows", type=int, default=1, help="1: also time decoding without a KV cache")
    ap.add_argument("--bf16", type=int, default=0, help="1: also time decoding with bf16 weights, interleaved with "
                                                         "fp32, and compare their greedy tokens and log-probs")
    args = ap.parse_args()

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    if args.ckpt:
        model, tok, label = load(args.ckpt, tmp.name)
        cfg = model.cfg
    else:
        tok = toy_tokenizer(args.vocab)
        cfg = ModelConfig(vocab_size=tok.vocab_size, **PRESETS[args.preset])
        model, label = Transformer(cfg).eval(), args.preset
    engine = Engine(model, tok)
    P, N = args.prompt_tokens, min(args.new_tokens, cfg.max_seq_len - args.prompt_tokens)
    prompt = torch.randint(10, cfg.vocab_size, (P,)).tolist()
    prompts8 = [torch.randint(10, cfg.vocab_size, (P - 3 * i,)).tolist() for i in range(8)]  # 8 different lengths
    greedy = SamplingParams(max_new_tokens=N, temperature=0)
    print(f"{label}: {model.num_params() / 1e6:.1f}M parameters, {cfg.n_layers} layers, width {cfg.dim}, "
          f"context {cfg.max_seq_len}; prompt {P} tokens, {N} new tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []

    long_prompt = torch.randint(10, cfg.vocab_size, (min(cfg.max_seq_len // 2, 512),)).tolist()
    one = SamplingParams(max_new_tokens=1, temperature=0)
    t_prefill = timed(lambda: engine.generate([long_prompt], one), args.repeats)
    rows.append(("cakelm", f"prefill ({len(long_prompt)} tokens) + first token", f"{len(long_prompt) / t_prefill:,.0f}"
                 " prompt tok/s", f"TTFT {1000 * t_prefill:.1f} ms"))
    t1 = timed(lambda: engine.generate([prompt], greedy), args.repeats)
    rows.append(("cakelm, KV cache", "decode, batch 1", f"{N / t1:,.1f} tok/s", f"{1000 * t1 / N:.2f} ms/token"))
    t8 = timed(lambda: engine.generate(prompts8, greedy), args.repeats)
    rows.append(("cakelm, KV cache", "decode, batch 8 (8 lengths)", f"{8 * N / t8:,.1f} tok/s",
                 f"{8 * t1 / t8:.1f}x batch 1"))
    if args.no_cache_rows:
        t_nc = timed(lambda: no_cache_decode(model, prompt, N), 1)
        rows.append(("cakelm, no cache", "decode, batch 1", f"{N / t_nc:,.1f} tok/s",
                     f"{1000 * t_nc / N:.2f} ms/token"))
    window = max(1, N // 4)
    flat = per_token_ms(engine, prompt, N, window)
    seeded = seeds_cost(engine, prompts8 * 2, N, args.repeats)

    hf_rows = []
    try:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            export_hf(model, tok, d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_id)
        ids1 = torch.tensor([prompt])
        with torch.no_grad():
            h1 = timed(lambda: hf.generate(ids1, **kw), args.repeats)
            left = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts8])
            mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts8])[:, None]).long()
            h8 = timed(lambda: hf.generate(left, attention_mask=mask, **kw), args.repeats)
            h_ttft = timed(lambda: hf.generate(torch.tensor([long_prompt]), **{**kw, "max_new_tokens": 1,
                                                                             "min_new_tokens": 1}), args.repeats)
        hf_rows = [
            (f"transformers {transformers.__version__}", f"prefill ({len(long_prompt)} tokens) + first token",
             f"{len(long_prompt) / h_ttft:,.0f} prompt tok/s", f"TTFT {1000 * h_ttft:.1f} ms"),
            ("transformers, KV cache", "decode, batch 1", f"{N / h1:,.1f} tok/s", f"{1000 * h1 / N:.2f} ms/token"),
            ("transformers, KV cache", "decode, batch 8 (8 lengths)", f"{8 * N / h8:,.1f} tok/s",
             f"{8 * h1 / h8:.1f}x batch 1"),
        ]
        if args.no_cache_rows:
            with torch.no_grad():
                h_nc = timed(lambda: hf.generate(ids1, use_cache=False, **kw), 1)
            hf_rows.append(("transformers, no cache", "decode, batch 1", f"{N / h_nc:,.1f} tok/s",
                            f"{1000 * h_nc / N:.2f} ms/token"))
    except ImportError:
        print("(transformers is not installed: its rows are skipped)")

    if args.bf16:
        rows += bf16_rows(engine, prompt, prompts8, greedy, args.repeats)

    w = [max(len(r[i]) for r in rows + hf_rows) for i in range(4)]
    for r in rows + hf_rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if hf_rows:
        print(f"cakelm vs transformers, batch-1 decode with caches: {h1 / t1:.2f}x; batch 8: {h8 / t8:.2f}x")
    print(f"cakelm ms/token by position (windows of {window} tokens): {', '.join(f'{x:.2f}' for x in flat)}")
    one, per_row, race = seeded["one"], seeded["per row"], seeded["race"]
    print(f"sampling 16 prompts x 8 replies (temperature 1): {one:,.0f} tok/s with one generator, {per_row:,.0f} with "
          f"one per row (per-prompt seeds, as RL rollouts): {per_row / one:.2f}x; the exponential race (the sampler "
          f"before 2026-12-04, one generator) {race:,.0f}: inverse transform {one / race:.2f}x")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head counts once
    bw = read_bandwidth()
    bound = bw / weight_bytes
    print(f"memory-bandwidth bound, batch 1: {weight_bytes / 1e6:.0f} MB of weights per token / {bw / 1e9:.1f} GB/s "
          f"measured read bandwidth = {bound:.1f} tok/s (cakelm reaches {N / t1 / bound:.0%} of it)")
    print(f"peak memory (RSS) {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
