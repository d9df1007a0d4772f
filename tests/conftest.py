"""Shared fixtures: a small synthetic corpus and a tokenizer/shard directory built from it once per session.

Everything is tiny (a few hundred KB of text, a 320-token vocabulary, 2-layer models) so the suite stays fast on
2 CPU cores; nothing touches the network (CAKELM_HOME points into a temporary directory)."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cakelm.config import build_config
from cakelm.model import ModelConfig
from cakelm.stages import data as data_stage
from cakelm.stages import tokenizer as tokenizer_stage

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS` in a fresh process, as a user runs it; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)


WORDS = ("the king queen lord lady love death night day sword crown heart blood fair foul sweet time "
         "speak hear see come go stay die live thou thee thy my your our what why how where when and but "
         "not no yes good ill man woman friend enemy house honour grace fortune heaven earth").split()


def make_corpus(folder: Path, n_docs: int = 12, words_per_doc: int = 3000, seed: int = 0) -> Path:
    """Write n_docs .txt files of seeded pseudo-English (speaker lines and verse)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 10):
            speaker = rng.choice(["KING.", "QUEEN.", "LORD.", "FOOL."])
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
            lines.append(f"{speaker}\n{line.capitalize()}{rng.choice('.,!?;')}\n")
        (folder / f"play_{d:02d}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n 2`, the default addopts) the workers share the cores: one torch thread each, and for
    the processes they start, instead of two OpenMP threads per worker spinning against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # a process the tests start (torchrun ranks, servers, stages) that dies of a native crash or an abort (a torchrun
    # rank once died of "terminate called without an active exception") prints every thread's Python stack to its
    # stderr, which the failing assertion shows
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKELM_HOME", str(tmp_path_factory.getbasetemp() / "cakelm_home"))
    # --loop.dtype auto probes the machine's speed; tests must not depend on what a timing picks (a test of the
    # probe itself deletes this)
    monkeypatch.setenv("CAKELM_AUTO_DTYPE", "fp32")
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """`cakelm data` + `cakelm tokenizer` output for the synthetic corpus (vocab 320)."""
    root = tmp_path_factory.mktemp("run")
    data_stage.main(build_config(data_stage.DataConfig, ("test", {"data": [str(corpus)], "out": str(root / "data"),
                                                                 "val_fraction": 0.2})))
    return tokenizer_stage.main(build_config(tokenizer_stage.TokenizerConfig, (
        "test", {"data": [str(root / "data")], "out": str(root / "tokenizer"), "vocab_size": 320})))


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(tok_dir):
    """The engine over a random tiny model (context 64) whose output head is scaled up, so greedy choices are
    decisive rather than near-ties."""
    from cakelm.engine import Engine
    from cakelm.model import Transformer
    from cakelm.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(tiny_model_config(max_seq_len=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return Engine(model, Tokenizer.load(tok_dir))


def tiny_checkpoint(out: Path, tok_dir: Path, stage: str, chat_format: str, end_scale: float = 1.0,
                    **model_kw) -> Path:
    """A random-init tiny model saved as a complete checkpoint of `stage` speaking `chat_format` (a stand-in for
    a pretrained or fine-tuned model in stage tests). end_scale > 1 scales the output row of <|end|>, so the
    model ends its turn often (a random model almost never does)."""
    from cakelm.checkpoint import save_checkpoint
    from cakelm.model import Transformer
    from cakelm.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(tiny_model_config(**model_kw))
    tok = Tokenizer.load(tok_dir)
    with torch.no_grad():
        model.lm_head.weight[tok.end_id] *= end_scale
    return save_checkpoint(out, model, tok, {"stage": stage, "step": 0, "complete": True, "chat_format": chat_format})


def tiny_reward_model(out: Path, chat: Path, seed: int = 1) -> Path:
    """A reward model checkpoint made from a chat checkpoint and a random scalar head (untrained: a stand-in
    whose scores vary with the reply, for stages that read a reward model)."""
    from cakelm.checkpoint import load_model, save_checkpoint
    from cakelm.rlhf import ScalarModel

    body, tok, _ = load_model(chat)
    torch.manual_seed(seed)
    rm = ScalarModel(body, head_std=1.0)
    return save_checkpoint(out, body, tok, {"stage": "reward", "step": 0, "complete": True, "chat_format": "chat"},
                           heads=rm.head_tensors())


PAIR_WORDS = ("king", "queen", "lord", "lady", "sword", "crown", "night", "day", "heart", "blood", "time", "house")


def toy_pairs(n: int) -> list[dict]:
    """A toy preference: the chosen reply names the prompt's topic in two words; the rejected one rambles about
    something else."""
    rows = []
    for i in range(n):
        w, other = PAIR_WORDS[i % len(PAIR_WORDS)], PAIR_WORDS[(i * 5 + 3) % len(PAIR_WORDS)]
        rows.append({"prompt": f"Tell me of the {w}, friend {i}.", "chosen": f"The {w}.",
                     "rejected": " ".join([f"and the {other} and the night"] * 2)})
    return rows


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preference directory (`cakelm prefs` layout) of 60 training and 12 held-out toy pairs."""
    folder = tmp_path_factory.mktemp("prefs")
    rows = toy_pairs(72)
    for name, part in (("train", rows[:60]), ("val", rows[60:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return folder


# Tests marked `slow` download packages with pip (deselected by default; CI runs them). Offline, such a test is
# skipped with the reason rather than failed: when one fails on "could not download PKG==VER", pip is asked once
# more for the same package, with one quick retry, and a connection error in its output means no network.
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Name or service not known",
                  "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeoutError",
                  "ProxyError", "Connection refused")


def offline_reason(exc: BaseException) -> str | None:
    """Why a download failed if it was the network (None: another failure, which stays a failure)."""
    import re

    from cakelm.common import CakeError

    found = re.search(r"could not download (\S+==\S+) with pip", str(exc)) if isinstance(exc, CakeError) else None
    return _probe_index(found.group(1)) if found else None


@functools.cache
def _probe_index(spec: str) -> str | None:
    """pip download SPEC once more, quickly: the connection error it prints, if any (once per package)."""
    import re
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "1",
                                   "--timeout", "5", "-d", tmp, spec], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return f"offline: pip download {spec} did not finish in 120 s"
    hit = next((e for e in NETWORK_ERRORS if e in proc.stderr), None)
    errno = re.search(r"\[Errno [^\]]*\][^'\")]*", proc.stderr)
    return f"offline: pip cannot reach the package index ({errno.group(0).strip() if errno else hit})" if hit else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and item.get_closest_marker("slow"):
        reason = offline_reason(call.excinfo.value)
        if reason:
            report.outcome, report.longrepr = "skipped", (str(item.path), item.location[1], f"Skipped: {reason}")


@contextmanager
def ctrl_c_at(monkeypatch: pytest.MonkeyPatch, source: type, step: int, micro: int | None = None) -> Iterator[None]:
    """Inside the block, a Ctrl-C (SIGINT) arrives while `source.get` loads step `step`'s batch (micro-batch
    `micro`, or any): the loop finishes nothing more, saves the steps before it, and stops (SystemExit)."""
    original = source.get

    def interrupted(self, s, m):
        if s == step and micro in (None, m):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, s, m)

    monkeypatch.setattr(source, "get", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(source, "get", original)


def assert_transformers_agrees(model, tok, hf_dir: Path, class_name: str, vocab: int = 320):
    """The export in hf_dir loads in `transformers` as class_name and gives the model's logits (within 2e-5) and
    its 20 greedy tokens (our engine against transformers' generate). Returns the transformers model."""
    import transformers

    from cakelm.engine import Engine, SamplingParams

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == class_name
    ids = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=2e-5)
    prompt = tok.encode("KING.\nThe", bos=True)
    ours = Engine(model, tok).generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))[0].ids
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert ours == theirs
    return hf
