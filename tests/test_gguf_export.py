"""GGUF export (issue 17, item 4): `cakelm export CKPT --to gguf OUT.gguf --dtype f32|f16|bf16|q8_0` writes a
llama.cpp file that two independent readers load: `transformers` (its GGUF loader, from PyPI `gguf`) gives our
logits, and `cakelm import` gives back the model, its tokenizer (the same ids for the same text) and its chat
template. Lower precisions stay within stated tolerances of fp32."""

from __future__ import annotations

import pytest
import torch

from cakelm.chat_format import render_prompt
from cakelm.checkpoint import load_model, save_checkpoint
from cakelm.common import CakeError
from cakelm.hf_compat import read_gguf, write_gguf
from cakelm.model import Transformer
from cakelm.stages import export as export_stage
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config

TEXTS = ["KING.\nThe crown, my lord: 1234 men!", "  What's  this?\n\n\tIt is 3.14 — ça va 🙂", "I'll've we'd"]
# how far a lower-precision file's logits may be from fp32's, for this model (logits of magnitude ~1-3): f16 and
# bf16 round every weight to 11 / 8 significant bits, q8_0 to 8-bit integers per block of 32
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def ckpt(tok_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(max_seq_len=64, rope_theta=500.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return save_checkpoint(tmp_path_factory.mktemp("gguf") / "ckpt", model, Tokenizer.load(tok_dir),
                           {"stage": "sft", "step": 0, "chat_format": "chat"})


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_export_reads_back_as_the_model(ckpt, tmp_path, dtype: str) -> None:
    out = export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(tmp_path / "m.gguf"), to="gguf",
                                                      dtype=dtype))
    model, tok, _ = load_model(ckpt)
    cfg, sd, tok2, info = read_gguf(out)
    assert cfg == model.cfg and info["tensor_types"] == sorted({"F32", dtype.upper()})
    back = Transformer(cfg).eval()
    back.load_state_dict(sd)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        want, got = model(ids), back(ids)
    assert (got - want).abs().max().item() <= TOLERANCE[dtype]
    if dtype == "f32":
        assert torch.equal(got, want)
    for text in TEXTS:  # the tokenizer inside splits and merges text as ours does
        assert tok2.encode(text) == tok.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hail!"}]
    assert render_prompt(chat, tok2, "chat") == render_prompt(chat, tok, "chat")  # the chat template inside
    assert tok2.end_id == tok.end_id and tok2.bos_id == tok.bos_id


def test_transformers_reads_our_gguf(ckpt, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    write_gguf(*load_model(ckpt)[:2], tmp_path / "m.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    model, _, _ = load_model(ckpt)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_refusals(ckpt, tmp_path) -> None:
    target = tmp_path / "m.gguf"
    export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(target), to="gguf"))
    with pytest.raises(CakeError, match="--overwrite"):
        export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(target), to="gguf"))
    with pytest.raises(CakeError, match="outside the checkpoint"):
        export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(ckpt / "m.gguf"), to="gguf"))
    with pytest.raises(CakeError, match="is a directory"):
        export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(tmp_path), to="gguf"))
    llama3 = Transformer(tiny_model_config(rope_scale=8.0))
    with pytest.raises(CakeError, match="RoPE scaling"):
        write_gguf(llama3, load_model(ckpt)[1], tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


# Families llama.cpp names as architectures of their own. transformers' GGUF reader takes a qwen3 head size from
# Qwen3Config's default (128; it does not read attention.key_length), so the qwen3 model has 128-wide heads, as
# the real Qwen3 models do.
FAMILIES = {"llama-wide-heads": dict(head_dim=16), "qwen2": dict(qkv_bias=True),
            "qwen2-tied": dict(qkv_bias=True, tie_embeddings=True), "qwen3": dict(qk_norm=True, head_dim=128)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_export_as_their_llama_cpp_architecture(tok_dir, tmp_path, family: str) -> None:
    """A Qwen2 (q/k/v biases, tied or not) or Qwen3 (q/k norms) model is written as llama.cpp's qwen2 / qwen3
    architecture (its q/k rows not permuted: llama.cpp rotates qwen heads by halves, as HF does). transformers
    loads it as the family's class with our logits, and `cakelm import` reads back the same model."""
    transformers = pytest.importorskip("transformers")
    import gguf

    torch.manual_seed(0)
    model = Transformer(tiny_model_config(**FAMILIES[family])).eval()
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a missing or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    write_gguf(model, Tokenizer.load(tok_dir), tmp_path / "m.gguf", "f32")
    arch = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.architecture"].contents()
    assert arch == family.split("-")[0]
    cfg, sd, _, _ = read_gguf(tmp_path / "m.gguf")
    back = Transformer(cfg).eval()
    back.load_state_dict(sd)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM"}[arch]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = model(ids)
        assert cfg == model.cfg and torch.equal(back(ids), want)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-5)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(ckpt, tmp_path, monkeypatch) -> None:
    """A crash while the tensors are written (here: the writer raises) leaves an existing export as it was, even
    with --overwrite, and no temporary file beside it."""
    import gguf

    target = tmp_path / "m.gguf"
    export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(target), to="gguf"))
    before = target.read_bytes()

    def crash(self, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_stage.main(export_stage.ExportConfig(ckpt=str(ckpt), out_dir=str(target), to="gguf", dtype="q8_0",
                                                    overwrite=True))
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
