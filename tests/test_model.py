"""Model: shapes, causal masking, KV-cache equivalence, config validation, init, FLOP count."""

from __future__ import annotations

import math

import pytest
import torch

from cakelm.config import ConfigError
from cakelm.model import PRESETS, KVCache, ModelConfig, Transformer, flops_per_token
from tests.conftest import BENCHMARKS, run_benchmark, tiny_model_config


def test_shapes_and_param_count() -> None:
    cfg = tiny_model_config()
    m = Transformer(cfg)
    logits = m(torch.randint(0, cfg.vocab_size, (3, 17)))
    assert logits.shape == (3, 17, cfg.vocab_size)
    D = cfg.dim
    per_layer = D * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + D * D + 3 * D * cfg.ffn_dim + 2 * D
    assert m.num_params() == 2 * cfg.vocab_size * D + cfg.n_layers * per_layer + D


def test_ffn_dim_and_kv_heads_defaults() -> None:
    cfg = ModelConfig(dim=384, n_heads=6)
    assert cfg.ffn_dim == 1024  # 8/3 * 384 = 1024 exactly
    assert cfg.n_kv_heads == 6
    assert ModelConfig(dim=256).ffn_dim == 672  # 682.7 rounded down to a multiple of 32
    assert ModelConfig(dim=128).ffn_dim == 320  # 341.3 -> 320: never more FLOPs than GPT-2's MLP
    assert ModelConfig(dim=576).ffn_dim == 1536  # SmolLM2-135M's own width
    assert ModelConfig(dim=8, n_heads=2).ffn_dim == 32  # never 0


def test_tied_embeddings_share_storage() -> None:
    m = Transformer(tiny_model_config(tie_embeddings=True))
    assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
    assert m.num_params() == Transformer(tiny_model_config()).num_params() - 320 * 32


def test_causal_masking() -> None:
    cfg = tiny_model_config()
    m = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % cfg.vocab_size  # change one token
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)  # the past cannot see the future
    assert (a[:, 12:] - b[:, 12:]).abs().amax() > 1e-4  # the change is visible from its position on


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_heads: int) -> None:
    cfg = tiny_model_config(n_kv_heads=n_kv_heads)
    m = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(cfg, 2, 24, "cpu")
        parts = [m(x[:, :10], kv_cache=cache), m(x[:, 10:15], kv_cache=cache)]  # prefill, then a chunk
        parts += [m(x[:, t:t + 1], kv_cache=cache) for t in range(15, 24)]  # then one token at a time
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_too_long_and_cache_overflow() -> None:
    cfg = tiny_model_config()
    m = Transformer(cfg)
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    cache = KVCache(cfg, 1, 4, "cpu")
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("bad, match", [
    (dict(dim=30, n_heads=4), "divisible"),
    (dict(n_heads=4, n_kv_heads=3), "multiple"),
    (dict(dim=12, n_heads=4), "even"),
    (dict(n_layers=0), "n_layers must be positive"),
])
def test_config_validation(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**bad)


def test_init_weights() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4)
    m = Transformer(cfg)
    assert torch.all(m.layers[0].attn_norm.weight == 1)
    assert abs(m.layers[0].attn.q.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    # a fresh model predicts close to uniform: its loss averaged over every target is ~ ln(vocab) (+ var/2 of
    # the logits, ~0.05 here). Not the loss of 128 random targets: their draw alone moves it by +-0.04.
    with torch.no_grad():
        logits = m(torch.randint(0, 512, (2, 64))).view(-1, 512)
    loss = (torch.logsumexp(logits, -1) - logits.mean(-1)).mean()
    assert abs(loss.item() - math.log(512)) < 0.1


def test_flops_per_token_hand_computed() -> None:
    cfg = ModelConfig(vocab_size=100, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=4)
    # matmul params: q 8x8, k 8x4, v 8x4, o 8x8 -> 192; mlp 3*8*16 = 384; head 8*100 = 800 -> 1376
    # attention: 12 * layers 1 * heads 2 * head_dim 4 * T 4 = 384
    assert flops_per_token(cfg) == 6 * 1376 + 384


def test_presets_build() -> None:
    for name, shape in PRESETS.items():
        cfg = ModelConfig(vocab_size=1024, **shape)
        assert cfg.dim % cfg.n_heads == 0, name
    assert 9e6 < Transformer(ModelConfig(vocab_size=65, **PRESETS["10m"])).num_params(exclude_embedding=True) < 12e6


def test_rmsnorm_matches_reference_and_gradcheck() -> None:
    from cakelm import kernels
    from cakelm.model import RMSNorm, _RMSNormFunction

    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    norm(x).backward(g)
    dx, dw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, w = None, norm.weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.rms_norm(x, (16,), w, 1e-5)
    ref.backward(g)
    torch.testing.assert_close(norm(x), ref)
    kernels.set_enabled(False)  # the plain path (no C compiler; tests/test_kernels.py checks the fused one)
    try:
        with torch.no_grad():  # generation's path skips the autograd.Function: the same bits
            assert torch.equal(norm(x), _RMSNormFunction.apply(x, norm.weight, 1e-5))
    finally:
        kernels.set_enabled(True)
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(dw, w.grad)
    xd = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (xd, wd))


def test_rope_is_the_rotation_of_halves_bit_for_bit() -> None:
    """apply_rope (x * cos + roll(x) * signed sin, tables of width D) gives the same bits and gradients as the
    rotation written on halves, [x1 cos - x2 sin, x2 cos + x1 sin] with tables of width D/2, and the same
    numbers as HF's rotate_half form."""
    from cakelm.model import apply_rope, rope_cache, rope_frequencies

    cfg = ModelConfig(vocab_size=64, dim=96, n_layers=1, n_heads=3, max_seq_len=16)  # head size 32
    cos, sin = rope_cache(cfg, 16)
    angles = torch.outer(torch.arange(16.0), rope_frequencies(cfg))  # (16, 16)
    assert cos.shape == sin.shape == (16, 32)
    assert torch.equal(cos, torch.cat([angles.cos()] * 2, -1)) and torch.equal(sin[:, 16:], angles.sin())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 32, requires_grad=True)
    g = torch.randn(2, 3, 16, 32)
    got = apply_rope(x, cos, sin)
    got.backward(g)
    dx, x.grad = x.grad.clone(), None
    x1, x2 = x.chunk(2, dim=-1)
    c, s = angles.cos(), angles.sin()
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    want.backward(g)
    assert torch.equal(got, want) and torch.equal(dx, x.grad)
    rotate_half = torch.cat([-x2, x1], dim=-1)
    torch.testing.assert_close(got, x * cos + rotate_half * torch.cat([s, s], -1))


def test_block_ablation_benchmark_times_every_variant_and_refuses_bad_ones() -> None:
    """benchmarks/block_ablation.py (where our step loses time against GPT-2 blocks): one round of one step of each
    variant prints a finite time and ratio for it and the reference; an unknown variant is a one-line refusal."""
    variants = ["ours", "plain", "unpacked", "qkv3", "layernorm", "no-rope", "gelu-mlp", "ffn384"]
    done = run_benchmark("block_ablation.py", "--variants", *variants, "--rounds", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[3:] if line.strip()}
    assert set(rows) == {*variants, "reference"}, done.stdout
    assert all(math.isfinite(float(ms)) and float(ms) > 0 and ratio.endswith("x") for ms, ratio in rows.values())
    assert "our GPT-2-architecture reference" in done.stdout
    bad = run_benchmark("block_ablation.py", "--variants", "ours", "swish", timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "swish" in bad.stderr


def test_block_ablation_variants_replace_the_piece_they_name() -> None:
    import sys
    sys.path.insert(0, str(BENCHMARKS))
    from block_ablation import GeluMLP, build_variant
    s = dict(n_layers=2, n_heads=2, dim=32, max_seq_len=16, vocab=50)
    assert all(isinstance(b.attn_norm, torch.nn.LayerNorm) for b in build_variant("layernorm", s).layers)
    assert all(isinstance(b.mlp, GeluMLP) for b in build_variant("gelu-mlp", s).layers)
    assert build_variant("ffn40", s).cfg.ffn_dim == 40 and build_variant("ours", s).cfg.ffn_dim == 64  # 85.3 -> 64


def test_block_ablation_contexts_change_what_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """no-rope skips the rotation on both of Attention's paths (packed in training, separate products under
    no_grad): the logits of a model whose RoPE tables are the identity; unpacked and qkv3 turn packing off."""
    import sys
    sys.path.insert(0, str(BENCHMARKS))
    from block_ablation import build_variant, variant_context

    from cakelm import kernels
    s = dict(n_layers=2, n_heads=2, dim=32, max_seq_len=16, vocab=50)
    model, idx = build_variant("ours", s), torch.randint(0, 50, (2, 16))
    identity = build_variant("ours", s)
    identity.cos.fill_(1.0)
    identity.sin.zero_()
    with variant_context("no-rope"):
        got_train = model(idx)
        with torch.no_grad():
            got_nograd = model(idx)
    want = identity(idx).detach()
    assert not torch.allclose(model(idx).detach(), want, atol=1e-4)  # RoPE does change the logits
    for got in (got_train.detach(), got_nograd):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kernels.lib() is None:
        return
    calls = []
    for name in ("qkv_rope", "swiglu_packed"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda y, *a, name=name, real=real: calls.append(name) or real(y, *a))
    for variant, want_calls in (("ours", ["qkv_rope", "swiglu_packed"] * 2), ("unpacked", []),
                                ("qkv3", ["swiglu_packed"] * 2)):
        calls.clear()
        with variant_context(variant):
            model(idx)
        assert calls == want_calls, variant


def test_matmul_shapes_benchmark_times_every_layout_at_equal_flops() -> None:
    """benchmarks/matmul_shapes.py: every layout, the same GFLOP (ffn_dim at 8/3 x width: 1,024 at (b)), a ratio."""
    done = run_benchmark("matmul_shapes.py", "--shape", "b", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["ours", "gpt2", "qkv-packed", "gate-up-packed", "both-packed"], done.stdout
    assert len({r[1] for r in rows}) == 1 and float(rows[0][1]) > 0  # equal FLOPs
    assert all(float(r[2]) > 0 and r[4].endswith("x") for r in rows)
    bad = run_benchmark("matmul_shapes.py", "--rounds", "0", timeout=60)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_step_profile_benchmark_sorts_each_step_into_kinds() -> None:
    """benchmarks/step_profile.py: each kind of work of one profiled step of ours and of the GPT-2 reference; RoPE
    only in ours, products, attention and the optimizer in both, the kinds adding up to the total."""
    done = run_benchmark("step_profile.py", "--shape", "a", "--steps", "1", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "our GPT-2-architecture reference" in lines[1]
    start = next(i for i, line in enumerate(lines) if line.startswith("kind"))
    rows = {line[:18].strip(): [float(v.rstrip("%")) for v in line[18:].split()] for line in lines[start + 1:-1]}
    assert list(rows) == ["matrix products", "attention", "normalisation", "activation", "RoPE", "loss",
                          "clip + optimizer", "other", "total"], done.stdout
    for kind in ("matrix products", "attention", "activation", "clip + optimizer"):
        assert rows[kind][0] > 0 and rows[kind][2] > 0, kind
    assert rows["RoPE"][0] > 0 and rows["RoPE"][2] == 0  # GPT-2 has learned positions, no rotation
    for col in (0, 2):
        assert abs(sum(r[col] for k, r in rows.items() if k != "total") - rows["total"][col]) < 0.05
    assert lines[-1].startswith("reference / ours:") and "at most" in lines[-1]
    bad = run_benchmark("step_profile.py", "--steps", "-1", timeout=60)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
