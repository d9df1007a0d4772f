"""SentencePiece-style BPE vocabularies (issue 17, item 2): Llama 2 / TinyLlama / Mistral tokenizer.json files and
GGUF vocabularies of type "llama" encode and decode exactly as `transformers` does, on Unicode text and on id
sequences that cut a character; token_bytes keep the "▁" a token adds, so a reply continues its prompt without a
space lost or added (the rule in cakelm/tokenizer.py's docstring); a tiny random Llama with such a vocabulary
imports, generates as transformers does, streams its text and exports. Other kinds of vocabulary are refused with
one line naming them. Everything is built here with `tokenizers` (no downloads)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from cakelm.__main__ import main as cli
from cakelm.chat_format import Reply, render_prompt, stop_rules
from cakelm.checkpoint import load_model
from cakelm.common import CakeError
from cakelm.engine import Engine, RowText, SamplingParams
from cakelm.hf_compat import add_model_keys, gguf_tensors
from cakelm.model import Transformer
from cakelm.stages import export as export_stage
from cakelm.tokenizer import BYTE_LEVEL, SENTENCEPIECE, ChatTemplate, Tokenizer, _merges_from_scores, vocab_kind
from tests.conftest import tiny_model_config
from tests.test_import import finish_gguf

transformers = pytest.importorskip("transformers")

TRAIN = ["The quick brown fox jumps over the lazy dog.", "the king and the queen, the lord and the lady",
         "東京は日本の首都です。こんにちは、世界。", "café naïve résumé déjà vu", "Hello world, hello there!",
         "line one\nline two\n\n", "numbers 12 345 6789", "emoji 😀 party 🎉"] * 30
# Unicode the vocabulary has pieces for and Unicode it spells in byte tokens (Korean, 🦀, Ω are not in TRAIN)
TEXTS = ["Hello world", "  two leading, two trailing  ", "multiple   inner    spaces", "line one\nline two\n\n",
         "\nstarts with a newline", "東京は日本の首都です。", "絵文字 😀🎉 and an unseen 🦀", "한국어 텍스트", "Ω≈ç√",
         "e\u0301 a\u0308 n\u0303 (combining) vs é ä ñ", "Z\u0336\u0321a\u0337lgo", "tab\there\r\nwindows",
         "\u3000全角スペース", "zero\u200bwidth", "ends with a space ", " ", "", "\n", "mixed 日本語 and English 123",
         "the king", " the king"]
ZEPHYR_JINJA = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                "+ eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SP_TEMPLATE = ChatTemplate(bos="<s>", pad="</s>", end="</s>")
N_BYTES = 256


def sp_tokenizer(legacy: bool = True) -> HFTokenizer:
    """A Llama-2-style tokenizer: ids 0-2 <unk> <s> </s>, 3-258 the byte tokens <0x00>..<0xFF>, then BPE pieces
    with "▁" for a space, trained here, and the pipeline of transformers' LlamaConverter: legacy = its
    Prepend("▁") + Replace(" ", "▁") normalizer (Llama 2's, TinyLlama's and Mistral's tokenizer.json), else its
    Metaspace(prepend_scheme="first") pre-tokenizer (what transformers 5 builds); Llama's decoder; bos added by a
    TemplateProcessing post-processor."""
    trainer_tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # train with words split at spaces, as SentencePiece does: merges never cross a "▁" in the middle
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTES)] + pieces
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    if legacy:
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return hf


@pytest.fixture(scope="module", params=["legacy", "metaspace"])
def sp_dir(request, tmp_path_factory) -> Path:
    """tokenizer.json + tokenizer_config.json of a SentencePiece-style vocabulary (both pipelines)."""
    d = tmp_path_factory.mktemp(f"sp-{request.param}")
    sp_tokenizer(legacy=request.param == "legacy").save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False}))
    return d


def ours(d: Path) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_file(str(d / "tokenizer.json")), SP_TEMPLATE)


def theirs(d: Path):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def test_token_bytes_spell_spaces_and_bytes(sp_dir) -> None:
    tok = ours(sp_dir)
    assert tok.kind == SENTENCEPIECE and tok.special_tokens == {"<unk>", "<s>", "</s>"}
    the, newline = tok.hf.token_to_id("▁the"), tok.hf.token_to_id("<0x0A>")
    assert the is not None and tok.token_bytes(the) == b" the" and tok.token_bytes(newline) == b"\n"
    assert tok.token_bytes(3 + 0xE3) == b"\xe3"  # half a character: a byte, not text
    assert [tok.token_bytes(i) for i in (0, 1, 2, tok.vocab_size, -1)] == [b""] * 5
    assert tok.bytes_per_token()[the] == 4 and tok.bytes_per_token()[tok.bos_id] == 0


def test_encode_and_decode_match_transformers(sp_dir) -> None:
    tok, hf = ours(sp_dir), theirs(sp_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.encode(text, bos=True) == hf.encode(text) == [1, *ids]  # the bos its post-processor adds
        if not (text.startswith(" ") and "metaspace" in sp_dir.name):  # Metaspace merges a leading space into
            assert tok.decode(ids) == text  # its own "▁" (so does transformers): that one space is lost
        # the text of the tokens after earlier text: one leading space more than decode's, nothing else
        joined = b"".join(map(tok.token_bytes, ids)).decode("utf-8")
        assert joined == (" " + tok.decode(ids) if ids else ""), text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    byte_spelled = tok.encode("🦀")
    assert [tok.hf.id_to_token(i) for i in byte_spelled][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    # special-token names in text stay text (cakelm's rule); transformers does the same when asked to
    assert 1 not in tok.encode("<s> hi </s>")
    hf.split_special_tokens = True
    assert tok.encode("<s> hi </s>") == hf.encode("<s> hi </s>", add_special_tokens=False)


def test_decode_of_cut_characters_and_random_ids_matches_transformers(sp_dir) -> None:
    """Byte tokens that do not make whole characters become U+FFFD as transformers writes them (one per byte of
    the run), with or without specials, and any id sequence decodes as transformers decodes it."""
    tok, hf = ours(sp_dir), theirs(sp_dir)
    b = {x: 3 + x for x in range(N_BYTES)}
    the = tok.hf.token_to_id("▁the")
    cases = [[b[0xF0], b[0x9F]], [b[0x0A], b[0xE3], b[0x81]], [the, b[0xE3], b[0x81], the], [b[0xE3], 1, b[0x81]],
             [b[0xF0], b[0x9F], b[0x98], b[0x80]], [b[0x20], the], [1, the, 2], [b[0x80]], [the, 2, b[0xE6]],
             [the, 10**6, b[0x41]]]  # an id past the vocabulary (a padded embedding's row) carries no text
    for ids in cases:
        for skip in (False, True):
            assert tok.decode(ids, skip_special=skip) == hf.decode([i for i in ids if i < tok.vocab_size],
                                                                   skip_special_tokens=skip), ids
    assert tok.decode([b[0xF0], b[0x9F]]) == "\ufffd\ufffd" and tok.decode([the, b[0xE3]]) == "the\ufffd"
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        skip = rng.random() < 0.5
        assert tok.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_lone_surrogates_are_a_clear_error(sp_dir, tok_dir) -> None:
    """transformers raises a bare TypeError ("TextEncodeInput must be ..."); cakelm says what is wrong."""
    with pytest.raises(TypeError):
        theirs(sp_dir).encode("a\ud800b")
    for tok in (ours(sp_dir), Tokenizer.load(tok_dir)):
        with pytest.raises(CakeError, match=r"lone surrogate \(U\+D800 at character 1\)"):
            tok.encode("a\ud800b")
        with pytest.raises(CakeError, match="lone surrogate"):
            tok.encode_batch(["fine", "a\ud800b"])


def test_a_reply_continues_its_prompt_without_losing_or_adding_a_space(sp_dir) -> None:
    """The decode rule: decode(prompt) + the reply's streamed text == decode(prompt + reply), for every cut of a
    text into prompt and reply; the engine's row text (which streams) is the reply tokens' bytes, and Reply shows
    the reply decoded on its own, stripped."""
    tok = ours(sp_dir)
    for text in ("Hello world, hello there!\nline two 😀 東京", "the king  and\n\nthe queen 🦀"):
        ids = tok.encode(text)
        for cut in range(1, len(ids)):
            prompt, reply = ids[:cut], ids[cut:]
            row, pieces = RowText(0, ()), []
            for k, t in enumerate(reply):
                pieces.append(row.push(t, 0.0, tok, (), last=k == len(reply) - 1))
            assert "".join(pieces) == row.text == b"".join(map(tok.token_bytes, reply)).decode("utf-8", "replace")
            if not tok.decode(prompt).endswith("\ufffd"):  # (a cut inside a character is not text on either side)
                assert tok.decode(prompt) + row.text == tok.decode(ids) == text, cut
                shown = Reply()
                for p in pieces:
                    shown.add(p)
                assert shown.final == tok.decode(reply).strip()


def test_other_vocabularies_are_refused_with_one_line(sp_dir, tok_dir, tmp_path, capsys) -> None:
    assert vocab_kind(Tokenizer.load(tok_dir).hf) == BYTE_LEVEL and vocab_kind(ours(sp_dir).hf) == SENTENCEPIECE
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    unigram = HFTokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], unk_id=0))
    unigram.decoder = decoders.Metaspace()
    no_bytes, strip_each = sp_tokenizer(), sp_tokenizer()
    no_bytes.decoder = decoders.Metaspace()  # "<0x0A>" would be text, not a byte
    strip_each.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                            decoders.Strip(" ", 1, 0), decoders.Fuse()])  # strips every token
    for hf, named in [(wordpiece, "a WordPiece model with the decoder WordPiece"),
                      (unigram, "a Unigram model with the decoder Metaspace"),
                      (no_bytes, "a BPE model with the decoder Metaspace"),
                      (strip_each, "a BPE model with the decoder Replace \\+ ByteFallback \\+ Strip \\+ Fuse")]:
        with pytest.raises(CakeError, match=f"unsupported tokenizer: {named} "):
            Tokenizer(hf, SP_TEMPLATE)
    # `cakelm import` of a model directory with such a tokenizer.json: one line naming the file and the kind
    src = hf_llama_dir(tmp_path / "hf", sp_dir)
    wordpiece.save(str(src / "tokenizer.json"))
    capsys.readouterr()
    assert cli(["import", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.json: unsupported tokenizer: a WordPiece model" in err, err


# ----------------------------------------------------------------------------------------------------------------
# A tiny random Llama with a SentencePiece vocabulary, from a transformers directory and from a GGUF file


def hf_llama_dir(out: Path, sp_dir: Path):
    """A tiny random transformers LlamaForCausalLM saved with the SentencePiece tokenizer of `sp_dir` and a
    Zephyr-style chat template ("<|user|>" headers are plain text in this vocabulary, "</s>" ends a turn)."""
    vocab = HFTokenizer.from_file(str(sp_dir / "tokenizer.json")).get_vocab_size()
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=500.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # decisive greedy choices, not near-ties
        hf.lm_head.weight[3 + 0x80:3 + N_BYTES] = 0  # logit 0: no lone UTF-8 lead or continuation bytes in replies
        spaced = [i for t, i in HFTokenizer.from_file(str(sp_dir / "tokenizer.json")).get_vocab().items()
                  if t.startswith("▁")]
        hf.lm_head.weight[spaced] *= 3  # replies with spaces in them, and one in front
    hf.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((sp_dir / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "chat_template": ZEPHYR_JINJA}))
    return out


def test_hf_directory_imports_generates_streams_and_exports(sp_dir, tmp_path, capsys) -> None:
    src = hf_llama_dir(tmp_path / "hf", sp_dir)
    assert cli(["import", str(src), str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
    model, tok, meta = load_model(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert tok.kind == SENTENCEPIECE and meta["chat_format"] == "chat" and tok.template.end == "</s>"
    assert [tok.encode(t) for t in TEXTS] == [hf_tok.encode(t, add_special_tokens=False) for t in TEXTS]
    prompt = tok.encode("the king and the queen", bos=True)
    n = 24
    out = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=n, temperature=0))[0]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.ids == expected
    # the engine's text continues the prompt: transformers' text of prompt + reply, after the prompt's text
    streamed = "".join(e.text for e in Engine(model, tok).stream([prompt], SamplingParams(max_new_tokens=n,
                                                                                          temperature=0)))
    assert streamed == out.text == b"".join(map(tok.token_bytes, out.ids)).decode("utf-8", "replace")
    assert "\ufffd" not in out.text and out.text.startswith(" ") and out.text.count(" ") > n // 4
    assert hf_tok.decode(prompt + out.ids) == hf_tok.decode(prompt) + out.text
    assert hf_tok.decode(out.ids) == out.text.removeprefix(" ")  # on its own, it loses its leading space
    # a chat reply: the template's prompt, generation stops at </s>, Reply shows the reply decoded on its own
    msgs = [{"role": "user", "content": "Hello world"}]
    chat_prompt = render_prompt(msgs, tok, "chat")
    stop_ids, _ = stop_rules(tok, "chat")
    reply = Engine(model, tok).generate([chat_prompt], SamplingParams(max_new_tokens=n, temperature=0,
                                                                      stop_ids=stop_ids))[0]
    shown = Reply()
    shown.add(reply.text)
    assert shown.final == hf_tok.decode(reply.ids, skip_special_tokens=True).strip()
    # export: transformers loads our tokenizer.json and gets the same ids and text
    export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "out")))
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        ids = tok.encode(text)
        assert again.encode(text, add_special_tokens=False) == ids and again.decode(ids) == tok.decode(ids)
    with pytest.raises(CakeError, match="GGUF export writes byte-level BPE vocabularies; this model's is "
                                        "sentencepiece-style"):  # (not written yet: said so, nothing written)
        export_stage.main(export_stage.ExportConfig(ckpt=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "m.gguf"),
                                                    to="gguf"))
    assert not (tmp_path / "m.gguf").exists()


def write_sp_gguf(path: Path, hf: HFTokenizer, model: Transformer, merges: bool) -> Path:
    """A GGUF file with a SentencePiece vocabulary ("llama") as llama.cpp's converter writes one: pieces, scores
    (0 for specials and bytes, better for earlier merges), token types (2 unknown, 3 control, 6 byte, 1 normal;
    one extra user-defined token, type 4) and, if `merges`, the merges (else readers recover them from the
    scores)."""
    state = json.loads(hf.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get) + ["<|user|>"]
    rank = {"".join(m.split(" ") if isinstance(m, str) else m): i for i, m in enumerate(state["merges"])}
    scores = [0.0 if i < 3 + N_BYTES else -float(rank.get(t, 10**4 + i)) for i, t in enumerate(tokens)]
    types = [2, 3, 3] + [6] * N_BYTES + [1] * (len(tokens) - 3 - N_BYTES - 1) + [4]
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-sp")
    add_model_keys(w, replace(cfg, vocab_size=len(tokens)))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if merges:
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(ZEPHYR_JINJA)
    for name, a in gguf_tensors(model):
        w.add_tensor(name, a)
    return finish_gguf(w, path)


def test_merges_recovered_from_scores_are_transformers_own() -> None:
    """Without merges in the file, the merges come from the scores in transformers' order, ties included (scores
    rounded to a few values make many: then the order of the pieces' lengths and ids decides)."""
    from transformers.tokenization_utils_base import generate_merges

    state = json.loads(sp_tokenizer().to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    rng = random.Random(0)
    for scores in ([-float(i) for i in range(len(tokens))], [float(rng.randint(-3, 0)) for _ in tokens]):
        expected = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
        assert _merges_from_scores(tokens, scores) == expected and len(expected) > 100


@pytest.mark.parametrize("merges", [True, False], ids=["merges", "scores-only"])
def test_gguf_llama_vocabulary_matches_transformers(merges: bool, tmp_path, capsys) -> None:
    """A "llama" GGUF vocabulary is built as transformers' GGUF loader builds it: the same ids (merges from the
    file, or recovered from the scores), the same text, a user-defined token matched whole; the imported model
    computes transformers' logits."""
    torch.manual_seed(0)
    hf_sp = sp_tokenizer()
    model = Transformer(tiny_model_config(vocab_size=hf_sp.get_vocab_size() + 1, max_seq_len=128)).eval()
    path = write_sp_gguf(tmp_path / "sp.gguf", hf_sp, model, merges)
    assert cli(["import", str(path), str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
    ours_model, tok, meta = load_model(tmp_path / "ckpt")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.kind == SENTENCEPIECE and meta["chat_format"] == "chat" and tok.vocab_size == len(hf_tok)
    for text in [*TEXTS, "x <|user|> y", "<|user|>\nhi"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tok.decode(ids), text
    assert tok.encode("<|user|>") == [tok.vocab_size - 1]
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 10))]
        assert tok.decode(ids) == hf_tok.decode(ids) and tok.decode(ids, True) == hf_tok.decode(ids, True), ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours_model(ids), rtol=0, atol=1e-5)
