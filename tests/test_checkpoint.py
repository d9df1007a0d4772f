"""Checkpoints: round trip, tied weights stored once, interrupted saves detected, bad directories named."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cakelm.checkpoint import is_checkpoint, load_meta, load_model, save_checkpoint, tensors_digest
from cakelm.common import CakeError
from cakelm.model import Transformer
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config


def test_round_trip(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    m = Transformer(tiny_model_config(tie_embeddings=True))
    save_checkpoint(tmp_path / "c", m, tok, {"stage": "test", "step": 5, "note": "x"}, {"step": 5})
    assert is_checkpoint(tmp_path / "c")
    assert "lm_head.weight" not in load_file(tmp_path / "c" / "model.safetensors")  # tied: stored once
    m2, tok2, meta = load_model(tmp_path / "c")
    assert meta["note"] == "x" and meta["step"] == 5 and "code_version" in meta
    assert tok2.encode("the king") == tok.encode("the king")
    x = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m2(x))
    assert m2.lm_head.weight.data_ptr() == m2.embed.weight.data_ptr()


def test_interrupted_save_detected(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    save_checkpoint(tmp_path / "c", Transformer(tiny_model_config()), tok, {"stage": "t", "step": 5})
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["step"] = 6  # as if meta.json of step 6 landed but the weights of step 6 did not
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CakeError, match="weights are from step 5 but meta.json says step 6"):
        load_meta(tmp_path / "c")


def test_bad_directories(tmp_path, tok_dir) -> None:
    with pytest.raises(CakeError, match="checkpoint not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CakeError, match="not a cakelm checkpoint .missing model.safetensors"):
        load_model(tmp_path / "empty")
    tok = Tokenizer.load(tok_dir)
    save_checkpoint(tmp_path / "c", Transformer(tiny_model_config()), tok, {"stage": "t", "step": 1})
    (tmp_path / "c" / "meta.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CakeError, match="meta.json: not UTF-8"):
        load_model(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "meta.json").write_text('{"stage": "t", "step": 1}')
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "dim": 64}))
    with pytest.raises(CakeError, match="weights do not match config.json"):
        load_model(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(Exception, match="unknown option 'n_layer'"):
        load_model(tmp_path / "c")


def test_train_state_checked_against_weights(tmp_path, tok_dir) -> None:
    from cakelm.checkpoint import load_train_state

    tok = Tokenizer.load(tok_dir)
    m = Transformer(tiny_model_config())
    save_checkpoint(tmp_path / "c", m, tok, {"stage": "t", "step": 5}, {"optimizers": [], "tokens_seen": 1})
    assert load_train_state(tmp_path / "c")["step"] == 5
    torch.save({"step": 4, "optimizers": []}, tmp_path / "c" / "train_state.pt")  # a save cut off in between
    with pytest.raises(CakeError, match="train_state.pt is from step 4 but the weights are from step 5"):
        load_train_state(tmp_path / "c")
    (tmp_path / "c" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CakeError, match="train_state.pt: unreadable"):
        load_train_state(tmp_path / "c")
    save_checkpoint(tmp_path / "c", m, tok, {"stage": "t", "step": 6})  # saved without state: the stale one goes
    assert not (tmp_path / "c" / "train_state.pt").exists()
    # no temporary files or older versions left: the four names, the pointer and the one live version
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".ckpt-000002-step-6", ".lock", "config.json",
                                                                  "current", "meta.json", "model.safetensors",
                                                                  "tokenizer.json"]


def test_tensors_digest_ignores_the_header_order_and_sees_every_tensor(tmp_path) -> None:
    """safetensors writes the header's metadata in a hash map's order, which changes between processes: the same
    tensors saved twice made files with different sha256 (a DPO model retrained bit for bit). The digest of what
    the file holds is the same for both orders and changes with any tensor or metadata value."""
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    x, y = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_file(tensors, x, metadata={"step": "3", "format": "pt"})
    raw = x.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    # the same header, every key (the metadata's too) in the reverse order, padded to the same length
    flipped = {k: dict(reversed(v.items())) if k == "__metadata__" else v for k, v in reversed(header.items())}
    body = json.dumps(flipped, separators=(",", ":")).encode()
    assert len(body) <= n and body != raw[8:8 + len(body)]
    y.write_bytes(raw[:8] + body.ljust(n) + raw[8 + n:])
    assert all(torch.equal(load_file(y)[k], v) for k, v in tensors.items())  # a valid file of the same tensors
    assert hashlib.sha256(x.read_bytes()).digest() != hashlib.sha256(y.read_bytes()).digest()
    assert tensors_digest(x) == tensors_digest(y)
    save_file({**tensors, "b": torch.tensor([1.0, 1.0, 1.0, 2.0])}, y, metadata={"step": "3", "format": "pt"})
    assert tensors_digest(y) != tensors_digest(x)
    save_file(tensors, y, metadata={"step": "4", "format": "pt"})
    assert tensors_digest(y) != tensors_digest(x)
    # crafted files: a header longer than the file, a header that is not JSON: one-line errors
    y.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CakeError, match="not a safetensors file"):
        tensors_digest(y)
    y.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{{" + raw[8 + n:])
    with pytest.raises(CakeError, match="unreadable weights"):
        tensors_digest(y)
