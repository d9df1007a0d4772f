"""Hugging Face parity: our export loads in `transformers` and computes the same logits and generations."""

from __future__ import annotations

import json

import pytest
import torch

from cakelm.checkpoint import load_model, save_checkpoint
from cakelm.common import CakeError
from cakelm.hf_compat import from_hf_state_dict, model_config_from_hf, to_hf_state_dict
from cakelm.model import Transformer
from cakelm.stages import export as export_stage
from cakelm.tokenizer import Tokenizer
from tests.conftest import assert_transformers_agrees, tiny_model_config

transformers = pytest.importorskip("transformers")


def _randomize(m: Transformer) -> Transformer:
    """Give norms non-trivial gains so a swapped norm would show up in the logits."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("tied, n_kv_heads", [(False, 2), (True, 4)])
def test_export_matches_transformers(tmp_path, tok_dir, tied: bool, n_kv_heads: int) -> None:
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = _randomize(Transformer(tiny_model_config(tie_embeddings=tied, n_kv_heads=n_kv_heads,
                                                     rope_theta=500.0, max_seq_len=64)))
    save_checkpoint(tmp_path / "ckpt", model, tok, {"stage": "test", "step": 0})
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "hf")))

    assert_transformers_agrees(model, tok, tmp_path / "hf", "LlamaForCausalLM")  # logits and greedy tokens

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("KING.\nThe crown", add_special_tokens=False) == tok.encode("KING.\nThe crown")
    assert hf_tok.pad_token == "<|pad|>" and hf_tok.eos_token == "<|end|>"


def test_state_dict_round_trip_and_config(tmp_path) -> None:
    model = _randomize(Transformer(tiny_model_config()))
    hf_sd = to_hf_state_dict(model)
    assert hf_sd["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)  # 2 KV heads x head dim 8
    back = from_hf_state_dict(hf_sd, model.cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_model_config_from_hf_refuses_unsupported() -> None:
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert model_config_from_hf(base).n_kv_heads == 2
    with pytest.raises(CakeError, match="unsupported architecture gpt2"):
        model_config_from_hf({**base, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CakeError, match="attention_bias"):
        model_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(CakeError, match="RoPE scaling yarn"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_export_refuses_bad_checkpoint(tmp_path) -> None:
    with pytest.raises(CakeError, match="checkpoint not found"):
        export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "nope"), out_dir=str(tmp_path / "hf")))


def test_exported_config_is_plain_json(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    save_checkpoint(tmp_path / "c", Transformer(tiny_model_config()), tok, {"stage": "t", "step": 3})
    model, _, meta = load_model(tmp_path / "c")
    assert meta["step"] == 3
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "c"), out_dir=str(tmp_path / "hf")))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 8
