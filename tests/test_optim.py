"""Optimizer construction: decay groups, Muon split, fused AdamW equals the reference, schedule application."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from cakelm.model import Transformer
from cakelm.optim import Muon, OptimConfig, build_optimizers, set_lr, zeropower_newton_schulz
from tests.conftest import tiny_model_config

CPU = torch.device("cpu")


def _names(model, opt, group) -> set[str]:
    ids = {id(p) for p in opt.param_groups[group]["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_adamw_groups() -> None:
    model = Transformer(tiny_model_config())
    (opt,) = build_optimizers(model, OptimConfig(weight_decay=0.1), CPU)
    decay, no_decay = _names(model, opt, 0), _names(model, opt, 1)
    assert all(n.endswith("norm.weight") for n in no_decay) and len(no_decay) == 2 * 2 + 1
    assert {"embed.weight", "lm_head.weight", "layers.0.attn.q.weight"} <= decay
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_tied_weights_optimised_once() -> None:
    model = Transformer(tiny_model_config(tie_embeddings=True))
    (opt,) = build_optimizers(model, OptimConfig(), CPU)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_muon_takes_block_matrices_only() -> None:
    model = Transformer(tiny_model_config())
    adamw, muon = build_optimizers(model, OptimConfig(name="muon"), CPU)
    assert isinstance(muon, Muon) and muon.param_groups[0]["ns_dtype"] == torch.float32
    muon_names = _names(model, muon, 0)
    assert muon_names == {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers.")}
    assert "embed.weight" in _names(model, adamw, 0) and "lm_head.weight" in _names(model, adamw, 0)
    loss = model(torch.randint(0, 320, (2, 8))).square().mean()
    loss.backward()
    before = model.layers[0].attn.o.weight.detach().clone()
    for o in (adamw, muon):
        o.step()
    assert not torch.equal(before, model.layers[0].attn.o.weight)


def test_fused_adamw_matches_reference() -> None:
    torch.manual_seed(0)
    a, b = Transformer(tiny_model_config()), Transformer(tiny_model_config())
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2)
    (oa,) = build_optimizers(a, cfg, CPU)
    ob = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                            {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                           lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 320, (2, 16))
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            m(x).logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)


def test_set_lr() -> None:
    model = Transformer(tiny_model_config())
    opts = build_optimizers(model, OptimConfig(lr=2e-3, name="muon"), CPU)
    assert set_lr(opts, 0.5) == 1e-3
    assert all(g["lr"] == 1e-3 for o in opts for g in o.param_groups)


def test_muon_matches_torch_muon() -> None:
    """In bf16 our Muon takes exactly torch.optim.Muon's steps; in fp32 (the CPU default) nearly the same."""
    torch.manual_seed(0)
    ws = [torch.randn(24, 40), torch.randn(40, 24)]
    ref = [w.clone().requires_grad_() for w in ws]
    ours16 = [w.clone().requires_grad_() for w in ws]
    ours32 = [w.clone().requires_grad_() for w in ws]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    opts = [torch.optim.Muon(ref, adjust_lr_fn="match_rms_adamw", **kw), Muon(ours16, ns_dtype=torch.bfloat16, **kw),
            Muon(ours32, **kw)]
    for _ in range(4):
        grads = [torch.randn_like(w) for w in ws]
        for params, o in zip((ref, ours16, ours32), opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for r, a, b in zip(ref, ours16, ours32):
        assert torch.equal(r, a)
        torch.testing.assert_close(r, b, rtol=0, atol=2e-3)


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    x = zeropower_newton_schulz(torch.randn(32, 96))
    s = torch.linalg.svdvals(x)
    assert 0.5 < s.min() and s.max() < 1.5  # Muon's iteration lands near 1, not exactly on it
    assert zeropower_newton_schulz(torch.randn(96, 32)).shape == (96, 32)


def test_batched_newton_schulz_is_each_matrix_own_iteration() -> None:
    """N matrices of one shape in one batched call: each normalised on its own, the numbers of N separate calls bit
    for bit (wide and tall)."""
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16), (24, 24)):
        gs = [torch.randn(shape) * scale for scale in (1e-3, 1.0, 50.0)]
        batched = zeropower_newton_schulz(torch.stack(gs))
        assert batched.shape == (3, *shape)
        for g, x in zip(gs, batched.unbind()):
            assert torch.equal(x, zeropower_newton_schulz(g))


def test_muon_step_over_mixed_shapes_equals_one_matrix_at_a_time() -> None:
    """Muon batches the Newton-Schulz of same-shape matrices; its step equals the per-matrix update rule written
    out here (Nesterov momentum, orthogonalised, decoupled decay, 0.2 sqrt(max dim) scale), bit for bit."""
    torch.manual_seed(0)
    shapes = [(24, 24), (40, 24), (24, 40), (24, 24), (40, 24), (8, 56)]
    ws = [torch.randn(s) for s in shapes]
    ours = [w.clone().requires_grad_() for w in ws]
    ref = [w.clone() for w in ws]
    bufs = [torch.zeros_like(w) for w in ws]
    lr, wd, mom = 0.02, 0.1, 0.95
    opt = Muon(ours, lr=lr, weight_decay=wd, momentum=mom)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in ws]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for w, g, buf in zip(ref, grads, bufs):
            buf.lerp_(g, 1 - mom)
            update = zeropower_newton_schulz(g.lerp(buf, mom))
            w.mul_(1 - lr * wd).add_(update, alpha=-lr * 0.2 * max(w.shape) ** 0.5)
    for p, w in zip(ours, ref):
        assert torch.equal(p.detach(), w)


def test_muon_batching_benchmark_refuses_bad_rounds_in_one_line() -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "muon_batching.py"
    done = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == "muon_batching: need --rounds >= 1"
