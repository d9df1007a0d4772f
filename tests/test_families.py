"""Model families (issue 17, item 1): Llama 3.x RoPE scaling, Qwen2/2.5 (q/k/v biases, tied or untied), Qwen3 (q/k
norms, a head size that is not dim / heads) and Mistral are a few config fields of our one Transformer. Checked
against `transformers` itself: its randomly initialised models, read into ours, give the same logits, and ours,
exported, load as the family's class and give the same logits and greedy tokens. Other families and options are
refused with one line naming them."""

from __future__ import annotations

import pytest
import torch

from cakelm.checkpoint import save_checkpoint
from cakelm.common import CakeError
from cakelm.hf_compat import from_hf_state_dict, model_config_from_hf, read_hf_dir
from cakelm.model import Transformer, rope_frequencies
from cakelm.stages import export as export_stage
from cakelm.tokenizer import Tokenizer
from tests.conftest import assert_transformers_agrees

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen2-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),  # 4 heads x 16 = 64, not the width 32
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
}


def hf_model(name: str):
    """A randomly initialised transformers model of the family, with biases and norm gains that are not 0 and 1
    (so a missing or swapped one shows in the logits)."""
    config_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SHAPE, **extra)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_transformers_models_read_into_ours_give_the_same_logits(name: str) -> None:
    hf = hf_model(name)
    cfg = model_config_from_hf(hf.config.to_dict())
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    ids = torch.randint(0, 320, (2, 48))  # past the llama3 original context of 16: the scaled frequencies matter
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=2e-5)
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.head_dim) == (name.startswith("qwen2"), name == "qwen3",
                                                        16 if name == "qwen3" else 8)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])
def test_our_export_loads_as_the_family_and_generates_the_same(tmp_path, tok_dir, name: str) -> None:
    hf = hf_model(name)
    cfg = model_config_from_hf(hf.config.to_dict())
    model = Transformer(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    tok = Tokenizer.load(tok_dir)
    save_checkpoint(tmp_path / "ckpt", model, tok, {"stage": "test", "step": 0})
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "hf")))
    assert_transformers_agrees(model, tok, tmp_path / "hf", type(hf).__name__)  # logits and greedy tokens
    # and `cakelm import` of the exported directory gives the same model back
    cfg2, sd, _, _ = read_hf_dir(tmp_path / "hf")
    assert cfg2 == cfg and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_llama3_frequencies_by_hand() -> None:
    """Factor 8, original context 16, low/high 1/4: a wavelength above 16 is divided by 8, below 4 kept, and in
    between mixed by smooth = (16 / wavelength - 1) / 3 (Meta's apply_scaling)."""
    import math

    from tests.conftest import tiny_model_config

    cfg = tiny_model_config(n_heads=1, n_kv_heads=1, dim=8, rope_theta=10.0, rope_scale=8.0, rope_low_freq=1.0,
                            rope_high_freq=4.0, rope_original_context=16)
    plain = [10.0 ** (-2 * i / 8) for i in range(4)]  # 1, 0.562, 0.316, 0.178: wavelengths 6.3, 11.2, 19.9, 35.3
    want = []
    for f in plain:
        wavelen = 2 * math.pi / f
        if wavelen > 16:
            want.append(f / 8)
        elif wavelen < 4:
            want.append(f)
        else:
            s = (16 / wavelen - 1) / 3
            want.append((1 - s) * f / 8 + s * f)
    assert rope_frequencies(cfg).tolist() == pytest.approx(want, rel=1e-6)
    assert want[2] == pytest.approx(plain[2] / 8) and want[0] != pytest.approx(plain[0])


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unsupported architecture gemma"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding-window"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act gelu"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling yarn"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"model_type": "llama", "head_dim": 16}, "head_dim"),
    ({"model_type": "llama", "rope_parameters": {**LLAMA3_ROPE, "factor": float("nan")}}, "rope_scale"),
    ({"model_type": "llama", "rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
])
def test_what_we_cannot_express_is_refused_in_one_line(change: dict, message: str) -> None:
    with pytest.raises(CakeError, match=message):
        model_config_from_hf({**SHAPE, **change})
