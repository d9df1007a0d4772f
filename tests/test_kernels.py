"""The fused CPU kernels (cakelm/kernels.c) against the plain PyTorch code they replace: equal outputs and
gradients, RoPE bit for bit, the same numbers whatever the thread count, NaN passed through, a whole model equal
with them on and off, and a clean fallback when they cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from cakelm import kernels
from cakelm.model import KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, rope_cache, rotate
from tests.conftest import run_benchmark


@pytest.fixture(autouse=True)
def _need_kernels() -> None:
    if kernels.lib() is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail(f"a C compiler is here but the kernels did not build: {kernels.why()}")
        pytest.skip("no C compiler: the model runs its plain PyTorch path")
    kernels.set_enabled(True)


def plain(fn, *args):
    """fn(*args) with the fused kernels off."""
    kernels.set_enabled(False)
    try:
        return fn(*args)
    finally:
        kernels.set_enabled(True)


def forward_backward(fn, inputs: list[torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(g)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 64, 128), (1, 300, 96)])
def test_rms_norm_equals_plain(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data.normal_(1.0, 0.3)
    x, g = torch.randn(shape) * 3, torch.randn(shape)
    y_fused, (dx_fused,) = forward_backward(lambda x: norm(x), [x], g)
    dw_fused, norm.weight.grad = norm.weight.grad.clone(), None
    y_plain, (dx_plain,) = plain(forward_backward, lambda x: norm(x), [x], g)
    dw_plain = norm.weight.grad
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_fused, dx_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw_fused, dw_plain, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # generation's path (no autograd Function) gives the training path's numbers
        assert torch.equal(norm(x), y_fused)


def test_rms_norm_weight_grad_does_not_depend_on_threads() -> None:
    torch.manual_seed(1)
    x, w, g = torch.randn(4, 333, 64), torch.randn(64), torch.randn(4, 333, 64)
    threads = torch.get_num_threads()
    grads = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            grads.append(forward_backward(lambda x, w: kernels.rms_norm(x, w, 1e-5), [x, w], g)[1])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("B,T,H,D,packed", [(2, 9, 3, 6, False), (3, 64, 4, 32, False), (2, 17, 2, 8, True)])
def test_rope_is_apply_rope_bit_for_bit(B: int, T: int, H: int, D: int, packed: bool) -> None:
    torch.manual_seed(2)
    cfg = ModelConfig(dim=H * D, n_heads=H, max_seq_len=64)
    cos, sin = rope_cache(cfg, 64)
    if packed:  # per-row positions, as packed sequences restart them: tables (B, 1, T, D)
        pos = torch.randint(0, 64, (B, T))
        cos, sin = cos[pos][:, None], sin[pos][:, None]
    else:
        cos, sin = cos[:T], sin[:T]
    assert kernels.rope_applies(torch.empty(B, T, H, D), cos, sin)
    x = torch.randn(B, T, H, D)
    # the gradient as attention's backward gives it, a view of (B, T, H, D) memory, and as a (B, H, T, D) tensor
    for g in (torch.randn(B, T, H, D).transpose(1, 2), torch.randn(B, H, T, D)):
        y_fused, (dx_fused,) = forward_backward(lambda x: rotate(x, cos, sin), [x], g)
        y_plain, (dx_plain,) = forward_backward(lambda x: apply_rope(x.transpose(1, 2), cos, sin), [x], g)
        assert y_fused.shape == (B, H, T, D) and y_fused.transpose(1, 2).is_contiguous()  # nanoGPT's q layout
        assert torch.equal(y_fused, y_plain) and torch.equal(dx_fused, dx_plain)


def test_rope_takes_the_plain_path_for_layouts_it_does_not_fuse() -> None:
    cos, sin = rope_cache(ModelConfig(dim=32, n_heads=4), 16)
    x = torch.randn(2, 8, 4, 8)
    assert not kernels.rope_applies(x.transpose(0, 1).contiguous().transpose(0, 1), cos[:8], sin[:8])  # strided
    assert not kernels.rope_applies(x, cos[:7], sin[:7])  # tables of another length
    assert not kernels.rope_applies(x.double(), cos[:8].double(), sin[:8].double())  # float64
    assert torch.equal(rotate(x.double(), cos[:8].double(), sin[:8].double()),
                       apply_rope(x.double().transpose(1, 2), cos[:8].double(), sin[:8].double()))


@pytest.mark.parametrize("shape", [(5, 7), (4, 64, 384)])
def test_swiglu_equals_silu_times_up(shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    a, u, g = torch.randn(shape) * 4, torch.randn(shape), torch.randn(shape)
    a.view(-1)[:3] = torch.tensor([-100.0, 100.0, 0.0])  # exp overflows one way and underflows the other
    y_fused, grads_fused = forward_backward(kernels.swiglu, [a, u], g)
    y_plain, grads_plain = forward_backward(lambda a, u: F.silu(a) * u, [a, u], g)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)
    for fused, ref in zip(grads_fused, grads_plain):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 14), (4, 64, 768)])
def test_packed_swiglu_equals_silu_times_up_of_the_halves(shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    y, g = torch.randn(shape) * 4, torch.randn(*shape[:-1], shape[-1] // 2)
    y.view(-1)[:3] = torch.tensor([-100.0, 100.0, 0.0])  # exp overflows one way and underflows the other
    h_fused, (dy_fused,) = forward_backward(kernels.swiglu_packed, [y], g)
    h_plain, (dy_plain,) = forward_backward(lambda y: F.silu(y.chunk(2, -1)[0]) * y.chunk(2, -1)[1], [y], g)
    torch.testing.assert_close(h_fused, h_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dy_fused, dy_plain, rtol=1e-5, atol=1e-6)


def test_mlp_packs_gate_and_up_only_when_training_plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """One product for gate and up in float32 training; the two products otherwise (decoding, evaluation, bf16
    autocast, LoRA-wrapped layers), with the same output either way."""
    from cakelm.lora import LoraConfig, add_lora

    torch.manual_seed(6)
    model = Transformer(ModelConfig(vocab_size=31, dim=32, ffn_dim=64, n_layers=1, n_heads=2, max_seq_len=8))
    mlp, x = model.layers[0].mlp, torch.randn(2, 5, 32)
    calls = []
    packed = kernels.swiglu_packed
    monkeypatch.setattr(kernels, "swiglu_packed", lambda y: calls.append(tuple(y.shape)) or packed(y))
    y_train = mlp(x)
    assert calls == [(2, 5, 128)]
    with torch.no_grad():
        y_eval = mlp(x)
    assert len(calls) == 1
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):  # a bf16 product: the kernels take float32 only
        mlp(x)
    assert len(calls) == 1
    add_lora(model, LoraConfig(rank=2, targets=["gate_proj", "up_proj"]))
    model.layers[0].mlp(x).sum().backward()
    assert len(calls) == 1  # the adapters' own products: the plain path


@pytest.mark.parametrize("B,T,H,KV,D,per_row", [(2, 9, 3, 3, 6, False), (3, 64, 4, 2, 32, False),
                                                 (2, 17, 4, 1, 8, True)])
def test_qkv_rope_equals_rope_of_the_columns(B: int, T: int, H: int, KV: int, D: int, per_row: bool) -> None:
    """q, k and v from one packed product: q and k bit for bit the rotation of their columns, v the columns, and
    the product's gradient the three gradients side by side."""
    torch.manual_seed(7)
    cos, sin = rope_cache(ModelConfig(dim=H * D, n_heads=H, max_seq_len=64), 64)
    if per_row:
        pos = torch.randint(0, 64, (B, T))
        cos, sin = cos[pos][:, None], sin[pos][:, None]
    else:
        cos, sin = cos[:T], sin[:T]
    y = torch.randn(B, T, (H + 2 * KV) * D)
    # gradients as attention's backward gives them: views of (B, T, heads, D) memory, or (B, heads, T, D) tensors
    gs = [torch.randn(B, T, H, D).transpose(1, 2), torch.randn(B, KV, T, D), torch.randn(B, T, KV, D).transpose(1, 2)]

    def columns(y):
        q, k, v = y.split([H * D, KV * D, KV * D], -1)
        return (apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin),
                apply_rope(k.view(B, T, KV, D).transpose(1, 2), cos, sin), v.view(B, T, KV, D).transpose(1, 2))

    outs, grads = [], []
    for fn in (lambda y: kernels.qkv_rope(y, cos, sin, H, KV), columns):
        leaf = y.clone().requires_grad_(True)
        out = fn(leaf)
        torch.autograd.backward(out, gs)
        outs.append([t.detach() for t in out])
        grads.append(leaf.grad)
    assert [tuple(t.shape) for t in outs[0]] == [(B, H, T, D), (B, KV, T, D), (B, KV, T, D)]
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and torch.equal(*grads)


def test_attention_packs_qkv_only_when_training_plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """One product for q, k and v (with Qwen2's biases) in float32 training; three otherwise (decoding with a KV
    cache, evaluation, bf16 autocast, Qwen3's q/k norms, LoRA-wrapped layers), with the same output either way."""
    from cakelm.lora import LoraConfig, add_lora

    torch.manual_seed(8)
    cfg = ModelConfig(vocab_size=31, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, qkv_bias=True, max_seq_len=8)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)
    attn, x = model.layers[0].attn, torch.randn(2, 5, 32)
    cos, sin = rope_cache(cfg, 5)
    calls = []
    packed = kernels.qkv_rope
    monkeypatch.setattr(kernels, "qkv_rope", lambda y, *a: calls.append(tuple(y.shape)) or packed(y, *a))
    y_train = attn(x, cos, sin)
    assert calls == [(2, 5, 64)]
    with torch.no_grad():
        y_eval = attn(x, cos, sin)
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):
        attn(x, cos, sin)
    assert len(calls) == 1
    cache = KVCache(cfg, batch_size=2, max_len=8, device="cpu")
    y_cached = attn(x, cos, sin, kv_cache=cache)  # gradients on, but a cache: decoding's separate products
    assert len(calls) == 1
    torch.testing.assert_close(y_cached.detach(), y_eval, rtol=1e-5, atol=1e-6)
    qk_norm = Transformer(ModelConfig(vocab_size=31, dim=32, n_layers=1, n_heads=4, qk_norm=True, max_seq_len=8))
    qk_norm.layers[0].attn(x, cos, sin)
    assert len(calls) == 1
    add_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    model.layers[0].attn(x, cos, sin).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("batch", [2, 64])
def test_packed_products_keep_no_large_weight_copy_and_give_every_gradient(monkeypatch: pytest.MonkeyPatch,
                                                                          batch: int) -> None:
    """Packed, the forward saves for the backward no more than the separate products do, beyond copies of the
    packed weights no larger than their input (2 sequences of 8 tokens: fewer tokens than the 128 q/k/v and 256
    gate/up rows, so none; 64 sequences: 512 tokens, the concatenations); every weight and bias (Qwen2's q/k/v
    biases) gets the gradients of the separate products."""
    import cakelm.model as model_module

    torch.manual_seed(9)
    cfg = ModelConfig(vocab_size=31, dim=64, ffn_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True,
                      max_seq_len=8)
    model, idx = Transformer(cfg), torch.randint(0, 31, (batch, 8))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)
    params = {p.data_ptr() for p in model.parameters()}

    def run(pack: bool) -> tuple[int, dict[str, torch.Tensor]]:
        saved: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in params:
                saved[t.data_ptr()] = t.untyped_storage().nbytes()
            return t
        real = model_module.packs
        monkeypatch.setattr(model_module, "packs", lambda x, *layers: pack and real(x, *layers))
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = model(idx)
        logits.square().mean().backward()
        return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    qkv_rope = kernels.qkv_rope
    monkeypatch.setattr(kernels, "qkv_rope", lambda y, *a: calls.append(1) or qkv_rope(y, *a))
    saved_packed, grads_packed = run(True)
    assert len(calls) == 2  # one packed q/k/v product a layer
    saved_plain, grads_plain = run(False)
    copies = 0 if batch == 2 else cfg.n_layers * (128 + 256) * 64 * 4  # bytes of the concatenated weights
    assert saved_packed == saved_plain + copies
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_non_finite_values_come_out_non_finite() -> None:
    """A NaN must reach the loss (the loop refuses to save a non-finite one), not be hidden by a kernel."""
    x = torch.randn(2, 4, 16)
    x[0, 1, 3] = float("nan")
    assert torch.isnan(kernels.rms_norm(x, torch.ones(16), 1e-5)[0, 1]).all()
    assert torch.isnan(kernels.swiglu(x, torch.ones_like(x))[0, 1, 3])
    assert torch.isnan(kernels.swiglu_packed(torch.cat([x, torch.ones_like(x)], -1))[0, 1, 3])  # gate's half
    assert torch.isnan(kernels.swiglu_packed(torch.cat([torch.ones_like(x), x], -1))[0, 1, 3])  # up's half
    cos, sin = rope_cache(ModelConfig(dim=64, n_heads=4), 4)
    assert torch.isnan(rotate(x.view(2, 4, 1, 16), cos, sin)).any()
    q, k, v = kernels.qkv_rope(torch.cat([x, x, x], -1), cos, sin, 1, 1)  # a NaN in each of q's, k's, v's columns
    assert all(torch.isnan(t[0, 0, 1]).any() for t in (q, k, v))


def test_model_with_and_without_kernels_gives_the_same_logits_and_gradients() -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(cfg)
    idx = torch.randint(0, 97, (3, 20))
    segments = torch.tensor([[0] * 12 + [1] * 8, [0] * 20, [0] * 5 + [1] * 15])

    def run(**kw):
        model.zero_grad()
        logits = model(idx, **kw)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for kw in ({}, {"segments": segments}):
        fused, grads_fused = run(**kw)
        ref, grads_plain = plain(lambda kw=kw: run(**kw))
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        for name in grads_plain:
            torch.testing.assert_close(grads_fused[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_failed_build_falls_back_to_plain_pytorch(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CAKELM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    assert kernels.lib() is None
    assert "false failed on kernels.c" in kernels.why()
    assert "fused CPU kernels unavailable" in capsys.readouterr().err
    assert not kernels.applies(torch.ones(2))
    model = Transformer(ModelConfig(vocab_size=31, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    model(torch.randint(0, 31, (2, 8))).sum().backward()  # the plain path trains
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CAKELM_KERNELS", "0")
    assert kernels.lib() is None and kernels.why() == "CAKELM_KERNELS=0"


def test_build_is_cached_per_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    first = kernels.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert kernels.build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # found, not rebuilt
    monkeypatch.setattr(kernels, "_cpu_id", lambda: "model name: another CPU")
    other = kernels.build(tmp_path)
    assert other != first and other.exists()  # -march=native code is never handed to another CPU
    assert [p.name for p in other.parent.iterdir()] == ["libcakelm_kernels.so"]  # no temporary file left


def test_cross_entropy_equals_torch_with_ignored_rows() -> None:
    torch.manual_seed(5)
    x, t, g = torch.randn(300, 1000) * 4, torch.randint(0, 1000, (300,)), torch.rand(300)
    t[::7] = -100
    x[1, 5] = -float("inf")  # a masked-out logit
    fused, (dx_fused,) = forward_backward(lambda x: kernels.cross_entropy(x, t, -100), [x], g)
    ref, (dx_ref,) = forward_backward(lambda x: F.cross_entropy(x, t, ignore_index=-100, reduction="none"), [x], g)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_fused, dx_ref, rtol=1e-5, atol=1e-7)
    assert (fused[::7] == 0).all() and (dx_fused[::7] == 0).all()


def test_cross_entropy_leaves_what_it_does_not_fuse_to_torch() -> None:
    from cakelm.losses import token_nll

    x = torch.randn(4, 600)
    assert kernels.cross_entropy(torch.randn(4, 65), torch.zeros(4, dtype=torch.long), -100) is None  # small vocab
    assert kernels.cross_entropy(x, torch.tensor([0, 1, 600, 2]), -100) is None  # out of range: torch reports it
    with pytest.raises(IndexError):
        token_nll(x[None], torch.tensor([[0, 1, 600, 2]]))
    x[2, 7] = float("nan")
    assert torch.isnan(kernels.cross_entropy(x, torch.tensor([0, 1, 2, 3]), -100)[2])


def test_rms_norm_takes_a_strided_gain_and_an_empty_batch() -> None:
    x, w = torch.randn(3, 8), torch.randn(16)[::2]  # a gain with stride 2 (a view of another tensor)
    assert not w.is_contiguous()
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), ref)
    y, (dx, dw) = forward_backward(lambda x, w: kernels.rms_norm(x, w, 1e-5), [torch.randn(0, 8), w], torch.ones(0, 8))
    assert y.shape == (0, 8) and dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


def test_a_broken_cached_library_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    """A library file cut short (a full disk, a copied cache) is refused by the loader: plain PyTorch, one line."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "build", lambda cache=None: tmp_path / "libcakelm_kernels.so")
    (tmp_path / "libcakelm_kernels.so").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    assert kernels.lib() is None and "libcakelm_kernels.so" in kernels.why()
    assert capsys.readouterr().err.count("\n") == 1


def test_kernels_benchmark_times_every_op() -> None:
    """benchmarks/kernels.py: every op at a shape, a finite plain and fused time and their ratio."""
    done = run_benchmark("kernels.py", "--shapes", "a", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [r[1] for r in rows] == ["rms_norm", "rope", "swiglu", "cross_entropy"], done.stdout
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[4].endswith("x") for r in rows)
    bad = run_benchmark("kernels.py", "--repeats", "0", timeout=60)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
