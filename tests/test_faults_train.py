"""Fault injection for training and its files (issue 22): a non-finite step never reaches a checkpoint, a crafted
train_state.pt runs nothing, a save cut off at any file operation leaves the old checkpoint or the new one (and
--resume then ends bit-exactly where the uninterrupted run does), truncated token shards are refused, and outputs
honour the umask."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import cakelm.checkpoint as checkpoint
import cakelm.scaffold as scaffold
from cakelm.checkpoint import is_checkpoint, load_heads, load_meta, load_model, load_train_state, save_checkpoint
from cakelm.common import CakeError, DistInfo, write_json_atomic
from cakelm.data.shards import open_shard
from cakelm.hf_compat import export_hf
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.losses import lm_loss
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config
from tests.test_loop import run_pretrain

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread is faster, and immune to OpenMP thrashing on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strict_json(text: str | bytes) -> Any:
    """Parsed as strict JSON: a bare NaN or Infinity (which Python's json would accept) fails."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def strict_rows(path: Path) -> list[dict[str, Any]]:
    return [strict_json(line) for line in path.read_text().splitlines()]


def finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in sd.values())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps (the loop itself, on a tiny model and toy batches)


class ToyBatches:
    """Seeded random token rows; `poison` names (step, micro) pairs whose loss the loss function makes NaN, and
    `flip` a step whose batch loading corrupts a weight (as a bit flip in memory would)."""

    def __init__(self, poison: set[tuple[int, int]] = frozenset(), flip: tuple[int, torch.nn.Module] | None = None
                 ) -> None:
        self.poison, self.flip = poison, flip

    def get(self, step: int, micro: int) -> dict[str, Any]:
        if self.flip is not None and self.flip[0] == step:
            with torch.no_grad():
                self.flip[1].embed.weight[3, 5] = float("inf")
        g = torch.Generator().manual_seed(1000 * step + micro)
        xy = torch.randint(0, 320, (2, 17), generator=g)
        return {"input": xy[:, :-1], "target": xy[:, 1:], "n": 32, "poison": (step, micro) in self.poison}


def toy_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_sum, _ = lm_loss(model(batch["input"]), batch["target"])
    return (loss_sum * float("nan") if batch["poison"] else loss_sum), {}


def toy_run(out: Path, tok: Tokenizer, batches: ToyBatches | None = None, steps: int = 6, max_skipped: int = 5,
            model: Transformer | None = None, resume: bool = False, snapshot: int = 0,
            saver: Callable[..., Path] = save_checkpoint) -> tuple[Transformer, list[tuple]]:
    """loop.train saving real checkpoints in `out` every step; returns the model and (step, weights, final) per
    save. `resume` continues the checkpoint in `out` the way the scaffold does; `snapshot`: copy `out` to
    OUT-at-STEP right after that step's save."""
    torch.manual_seed(0)
    if model is None:
        model = load_model(out)[0].train() if resume else Transformer(tiny_model_config())
    saves: list[tuple] = []

    def save(step: int, metrics: dict, state: dict, final: bool) -> None:
        saver(out, model, tok, {"stage": "toy", "step": step, "complete": final}, state)
        saves.append((step, {k: v.clone() for k, v in model.state_dict().items()}, final))
        if step == snapshot:
            shutil.copytree(out, out.with_name(f"{out.name}-at{step}"), symlinks=True)

    cfg = LoopConfig(max_steps=steps, batch_size=2, grad_accum=2, eval_every=0, log_every=1, save_every=1,
                     device="cpu", progress=False, max_skipped=max_skipped)
    train(model, cfg, OptimConfig(warmup_steps=0), LoopContext(torch.device("cpu"), DistInfo(), out),
          batches or ToyBatches(), toy_loss, None, save, load_train_state(out) if resume else None)
    return model, saves


def test_nan_micro_batch_is_skipped_counted_and_logged(tmp_path, tok_dir, capsys) -> None:
    tok = Tokenizer.load(tok_dir)
    # NaN at micro-batch 1 of step index 2 (the 3rd step) and at step index 4: never two in a row, so even
    # max_skipped=1 lets the run finish
    model, saves = toy_run(tmp_path / "c", tok, ToyBatches({(2, 1), (4, 0)}), max_skipped=1, snapshot=2)
    assert [s for s, _, _ in saves] == [1, 2, 3, 4, 5, 6] and saves[-1][2] is True
    assert all(finite(w) for _, w, _ in saves)
    weights = {s: w for s, w, _ in saves}
    assert same(weights[3], weights[2]) and same(weights[5], weights[4])  # the skipped updates left no trace
    assert not same(weights[4], weights[3]) and not same(weights[6], weights[5])  # the others applied
    rows = strict_rows(tmp_path / "c" / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 1, 0]
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None and rows[3]["loss"] > 0
    err = capsys.readouterr().err
    assert "step 3: non-finite loss in micro-batch 1; update skipped (1 in a row" in err
    assert "step 5: non-finite loss in micro-batch 0;" in err
    _, _, meta = load_model(tmp_path / "c")
    assert meta["step"] == 6 and finite(load_file(tmp_path / "c" / "model.safetensors"))

    # resuming from the checkpoint before the skipped step replays the skip and ends on the same weights
    resumed, _ = toy_run(tmp_path / "c-at2", tok, ToyBatches({(2, 1), (4, 0)}), max_skipped=1, resume=True)
    assert same(resumed.state_dict(), model.state_dict())
    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "ms_per_step")} for r in rows]

    assert untimed(strict_rows(tmp_path / "c-at2" / "metrics.jsonl")) == untimed(rows)  # the same log, skips too


def test_too_many_non_finite_steps_stop_without_saving(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    with pytest.raises(CakeError, match=r"step 5: 3 step\(s\) in a row with a non-finite loss .*micro-batch 0.*"
                                        r"stopped without saving") as e:
        toy_run(tmp_path / "c", tok, ToyBatches({(2, 0), (3, 0), (4, 0), (4, 1)}), max_skipped=2)
    assert "\n" not in str(e.value)
    assert load_meta(tmp_path / "c")["step"] == 4  # steps 3 and 4 were skipped and saved; 5 stopped the run
    assert finite(load_file(tmp_path / "c" / "model.safetensors"))
    # max_skipped=0: the first non-finite step stops the run; nothing after step 2 is saved
    with pytest.raises(CakeError, match=r"step 3: 1 step\(s\) in a row"):
        toy_run(tmp_path / "d", tok, ToyBatches({(2, 1)}), max_skipped=0)
    assert load_meta(tmp_path / "d")["step"] == 2


def test_non_finite_weights_are_never_saved(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    with pytest.raises(CakeError, match=r"step 4: parameter embed.weight holds NaN or inf; not saving it"):
        toy_run(tmp_path / "c", tok, ToyBatches(flip=(3, model)), max_skipped=10, model=model)
    assert load_meta(tmp_path / "c")["step"] == 3 and finite(load_file(tmp_path / "c" / "model.safetensors"))


def test_huge_learning_rate_stops_and_keeps_the_last_finite_checkpoint(tok_dir, tmp_path, monkeypatch) -> None:
    """The issue's `--lr 1e6`: the run used to finish with every weight NaN and `complete: true`."""
    saved_meta: list[bytes] = []
    real_save = scaffold.save_checkpoint

    def recording_save(out, *a, **kw):
        path = real_save(out, *a, **kw)
        saved_meta.append((Path(out) / "meta.json").read_bytes())
        return path

    monkeypatch.setattr(scaffold, "save_checkpoint", recording_save)
    out = tmp_path / "base"
    with pytest.raises(CakeError, match="in a row with a non-finite loss or gradient norm"):
        run_pretrain(tok_dir, out, **{"loop.max_steps": 30, "loop.save_every": 4, "optim.lr": 1e6})
    assert saved_meta and (out / "meta.json").read_bytes() == saved_meta[-1]  # nothing written after the last save
    meta = strict_json(saved_meta[-1])  # the metrics of skipped step 4 are null in meta.json too
    assert meta["complete"] is False and meta["step"] == 4 and meta["metrics"]["loss"] is None
    assert finite(load_file(out / "model.safetensors"))
    rows = strict_rows(out / "metrics.jsonl")
    assert any(r["skipped"] for r in rows) and any(r["grad_norm"] is None for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# Safe loading


class RunsCode:
    """Unpickling this runs `touch MARKER` (what a crafted train_state.pt does under weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_train_state_runs_nothing(tok_dir, tmp_path) -> None:
    out = run_pretrain(tok_dir, tmp_path / "base", **{"loop.max_steps": 4, "loop.save_every": 2})
    load_train_state(out)  # the loop's own state (AdamW, RNG, log window) loads as plain data
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "x": RunsCode(marker)}, out / "train_state.pt")
    with pytest.raises(CakeError, match=r"train_state.pt: unreadable, or holds more than tensors and plain data "
                                        r"\(refused without running it: .*GLOBAL posix.system") as e:
        load_train_state(out)
    assert "\n" not in str(e.value)
    with pytest.raises(CakeError, match="refused without running it"):  # --resume (the step check comes later)
        run_pretrain(tok_dir, out, **{"loop.max_steps": 6, "loop.save_every": 2}, resume=True)
    assert not marker.exists()


def test_muon_train_state_loads_as_plain_data(tok_dir, tmp_path) -> None:
    out = run_pretrain(tok_dir, tmp_path / "m", **{"loop.max_steps": 2, "optim.name": "muon"})
    state = load_train_state(out)
    assert state["optimizers"][1]["param_groups"][0]["ns_dtype"] == torch.float32  # Muon's group


# ---------------------------------------------------------------------------------------------------------------
# Crash-consistent saves: a failure injected at each file operation of a save


class Crash(Exception):
    pass


class Faults:
    """Counts the file operations a save performs and fails the k-th (k = 0: never)."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def wrap(self, fn):
        def faulty(*a, **kw):
            self.calls += 1
            if self.calls == self.k:
                raise Crash(f"injected at call {self.k} ({getattr(fn, '__name__', fn)})")
            return fn(*a, **kw)
        return faulty

    def arm(self, mp: pytest.MonkeyPatch) -> None:
        for name in ("replace", "rename", "symlink", "link", "mkdir", "unlink", "fsync", "rmdir"):
            mp.setattr(os, name, self.wrap(getattr(os, name)))
        mp.setattr(shutil, "rmtree", self.wrap(shutil.rmtree))
        mp.setattr(torch, "save", self.wrap(torch.save))
        mp.setattr(checkpoint, "save_file", self.wrap(checkpoint.save_file))
        mp.setattr(pathlib.Path, "write_text", self.wrap(pathlib.Path.write_text))


@pytest.fixture
def fast_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync as a no-op and no `git` call per save: the same operations, counted the same, in a fraction of the
    time (what is tested is the state a crash leaves to the next process, not the durability of the disk)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(checkpoint, "code_version", lambda: "test")


def save_with_fault(k: int, *args: Any, **kw: Any) -> bool:
    """save_checkpoint(*args) with the k-th file operation failing; whether the save got that far (False: it
    made fewer than k operations, so every point has been tried)."""
    faults = Faults(k)
    with pytest.MonkeyPatch.context() as mp:
        faults.arm(mp)
        try:
            save_checkpoint(*args, **kw)
        except Crash:
            pass
    return faults.calls >= k


def reads_as(ckpt: Path, versions: dict[str, tuple[int, dict, bool, bool]]) -> str:
    """Which of `versions` (name -> (step, weights, has train state, has heads)) the directory reads as, checking
    that every file a reader opens agrees with it."""
    assert is_checkpoint(ckpt)
    model, _, meta = load_model(ckpt)
    match = [n for n, (step, w, _, _) in versions.items() if meta["step"] == step and same(model.state_dict(), w)]
    assert len(match) == 1, (meta["step"], list(versions))
    step, _, has_state, has_heads = versions[match[0]]
    assert (ckpt / "train_state.pt").is_file() == has_state and (ckpt / "heads.safetensors").is_file() == has_heads
    if has_state:
        assert load_train_state(ckpt)["step"] == step
    if has_heads:
        assert set(load_heads(ckpt)) == {"head.weight"}
    return match[0]


def tidy(ckpt: Path) -> list[str]:
    """The hidden entries of a checkpoint directory: exactly one version after a completed save."""
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".") and p.name != checkpoint.LOCK)


@pytest.mark.parametrize("layout", ["versioned", "plain"])
def test_save_cut_off_at_every_file_operation(tmp_path, tok_dir, layout: str, fast_disk) -> None:
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    old, new = Transformer(tiny_model_config()), Transformer(tiny_model_config())
    heads = {"head.weight": torch.ones(3)}
    # each version has a file the other lacks: both must appear and disappear with the switch
    versions = {"old": (5, old.state_dict(), False, True), "new": (10, new.state_dict(), True, False)}
    template = tmp_path / "template"
    save_checkpoint(template, old, tok, {"stage": "t", "step": 5}, heads=heads)
    outcomes, k = [], 1
    while True:
        ckpt = tmp_path / f"c{k}"
        if layout == "versioned":
            shutil.copytree(template, ckpt, symlinks=True)
        else:  # what the old code wrote: the files themselves in the directory
            ckpt.mkdir()
            for f in template.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy(f, ckpt / f.name)
        (ckpt / "metrics.jsonl").write_text('{"step": 5}\n')
        failed = save_with_fault(k, ckpt, new, tok, {"stage": "t", "step": 10}, {"tokens_seen": 2})
        outcomes.append(reads_as(ckpt, versions))
        save_checkpoint(ckpt, new, tok, {"stage": "t", "step": 10}, {"tokens_seen": 2})  # the next save recovers
        assert reads_as(ckpt, versions) == "new"
        assert len(tidy(ckpt)) == 1 and tidy(ckpt)[0].startswith(".ckpt-")  # no leftovers
        assert (ckpt / "metrics.jsonl").read_text() == '{"step": 5}\n'  # the run's other files are left alone
        assert (ckpt / "model.safetensors").is_symlink() and not (ckpt / "heads.safetensors").is_symlink()
        shutil.rmtree(ckpt)
        if not failed:
            break
        k += 1
    # a failure anywhere before the switch leaves the old checkpoint, anywhere after it the new one: never a mix
    assert k > 15 and outcomes[0] == "old" and outcomes[-1] == "new"
    first_new = outcomes.index("new")
    assert outcomes[first_new:] == ["new"] * (len(outcomes) - first_new)


def test_keep_versions(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    m = Transformer(tiny_model_config())
    for step in (1, 2, 3, 3):  # the same step saved twice gets its own version
        save_checkpoint(tmp_path / "c", m, tok, {"stage": "t", "step": step}, keep=2)
    assert tidy(tmp_path / "c") == [".ckpt-000003-step-3", ".ckpt-000004-step-3"]
    assert os.readlink(tmp_path / "c" / "current") == ".ckpt-000004-step-3"
    save_checkpoint(tmp_path / "c", m, tok, {"stage": "t", "step": 4})
    assert tidy(tmp_path / "c") == [".ckpt-000005-step-4"] and load_meta(tmp_path / "c")["step"] == 4


def test_resume_after_a_save_cut_off_anywhere_is_exact(tok_dir, tmp_path, fast_disk) -> None:
    """A run crashes inside its step-4 save, at each file operation in turn; resuming then continues from the
    newest complete checkpoint (step 3 or 4) and ends on the uninterrupted run's weights, bit for bit."""
    tok = Tokenizer.load(tok_dir)
    full = toy_run(tmp_path / "full", tok)[0].state_dict()
    out = tmp_path / "run"
    captured: dict[str, Any] = {}

    def capture(path, model, tok, meta, train_state=None, heads=None):
        if meta["step"] == 4 and not captured:  # the directory as the save found it, and the save's arguments
            shutil.copytree(out, tmp_path / "before4", symlinks=True)
            captured.update(args=(copy.deepcopy(model), tok, copy.deepcopy(meta), copy.deepcopy(train_state)))
        return checkpoint.save_checkpoint(path, model, tok, meta, train_state, heads)

    toy_run(out, tok, saver=capture)
    resumed_from, k = set(), 1
    while True:
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "before4", out, symlinks=True)
        crashed = save_with_fault(k, out, *captured["args"])
        resumed_from.add(load_meta(out)["step"])
        resumed = toy_run(out, tok, resume=True, saver=lambda *a: None)[0]  # where it ends is what counts here
        assert same(resumed.state_dict(), full), f"crash at file operation {k}"
        if not crashed:
            break
        k += 1
    assert resumed_from == {3, 4} and k > 15


def test_readers_take_every_file_from_one_version(tmp_path, tok_dir) -> None:
    """A reader resolves `current` once: files opened after a newer save switched in still come from the version
    it started with (what `serve` or `eval` reading a checkpoint that training is saving into relies on)."""
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    a, b = Transformer(tiny_model_config()), Transformer(tiny_model_config())
    ckpt = tmp_path / "c"
    save_checkpoint(ckpt, a, tok, {"stage": "t", "step": 1})
    live = checkpoint.snapshot(ckpt)
    save_checkpoint(ckpt, b, tok, {"stage": "t", "step": 2}, keep=2)  # switched in while the reader is at work
    model, _, meta = load_model(live)
    assert meta["step"] == 1 and same(model.state_dict(), a.state_dict())
    assert load_meta(ckpt)["step"] == 2


def test_one_save_at_a_time_and_meta_updates_are_saves(tmp_path, tok_dir) -> None:
    import fcntl

    tok = Tokenizer.load(tok_dir)
    m = Transformer(tiny_model_config())
    ckpt = tmp_path / "c"
    save_checkpoint(ckpt, m, tok, {"stage": "t", "step": 1})
    with open(ckpt / checkpoint.LOCK, "a") as held:  # another process in the middle of a save
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CakeError, match="another process is saving a checkpoint there"):
            save_checkpoint(ckpt, m, tok, {"stage": "t", "step": 2})
    assert load_meta(ckpt)["step"] == 1 and tidy(ckpt) == [".ckpt-000001-step-1"]
    checkpoint.update_meta(ckpt, rlhf_round=3)  # e.g. `cakelm rlhf-round` marking its policy
    assert (ckpt / "meta.json").is_symlink() and load_meta(ckpt)["rlhf_round"] == 3
    assert tidy(ckpt) == [".ckpt-000002-step-1"] and same(load_model(ckpt)[0].state_dict(), m.state_dict())


def test_a_copy_without_the_data_is_an_error_not_a_fresh_start(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    ckpt = tmp_path / "c"
    save_checkpoint(ckpt, Transformer(tiny_model_config()), tok, {"stage": "t", "step": 1}, {"tokens_seen": 0})
    copy_ = tmp_path / "copy"
    copy_.mkdir()
    for p in ckpt.iterdir():  # `cp -P c/* copy/`: the shell's * leaves out the hidden version directory
        if not p.name.startswith("."):
            os.symlink(os.readlink(p), copy_ / p.name)
    for fn in (load_model, lambda p: checkpoint.resume_point(p, True, False, 10, {})):
        with pytest.raises(CakeError, match=r"its data is missing \(current -> .ckpt-000001-step-1.*cp -a") as e:
            fn(copy_)
        assert "\n" not in str(e.value)
    (tmp_path / "mine" / "current").mkdir(parents=True)  # a folder of the user's that happens to be named so
    (tmp_path / "mine" / "current" / "notes.txt").write_text("mine")
    with pytest.raises(CakeError, match="current is not a checkpoint version"):
        save_checkpoint(tmp_path / "mine", Transformer(tiny_model_config()), tok, {"stage": "t", "step": 1})
    assert (tmp_path / "mine" / "current" / "notes.txt").read_text() == "mine"


def test_config_json_is_checked_against_the_weights_before_allocating(tmp_path, tok_dir) -> None:
    tok = Tokenizer.load(tok_dir)
    ckpt = save_checkpoint(tmp_path / "c", Transformer(tiny_model_config()), tok, {"stage": "t", "step": 1})
    cfg = json.loads((ckpt / "config.json").read_text())
    for change, message in (({"n_layers": 10**9}, "n_layers is 1000000000 but the file's tensors hold 2 layers"),
                            ({"dim": 2**20, "n_heads": 2**10}, r"embed.weight: config.json makes \(320, 1048576\)")):
        (checkpoint.snapshot(ckpt) / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CakeError, match=message):  # a one-line error, not 4 TB of zeros or a billion modules
            load_model(ckpt)


# ---------------------------------------------------------------------------------------------------------------
# Token shards and file modes


def test_truncated_shard_is_refused(tok_dir, tmp_path) -> None:
    data = tmp_path / "tokenizer"
    shutil.copytree(tok_dir, data)
    vocab = Tokenizer.load(data / "tokenizer.json").vocab_size
    whole = (data / "train.bin").read_bytes()
    assert len(open_shard(data / "train.bin", vocab)) == len(whole) // 2  # intact: as recorded
    (data / "train.bin").write_bytes(whole[:-1])  # used to be a numpy traceback
    with pytest.raises(CakeError, match=rf"train.bin: {len(whole) - 1} bytes is not a whole number of uint16 "
                                        r"tokens \(the file was cut short\?\)") as e:
        open_shard(data / "train.bin", vocab)
    assert "\n" not in str(e.value)
    (data / "train.bin").write_bytes(whole[:-2])  # used to train silently on a shorter corpus
    with pytest.raises(CakeError, match=rf"train.bin: {len(whole) // 2 - 1:,} tokens on disk but "
                                        rf"{len(whole) // 2:,} recorded"):
        run_pretrain(data, tmp_path / "base", **{"loop.max_steps": 2})
    assert not (tmp_path / "base").exists()
    with pytest.raises(CakeError, match="1 tokens on disk but 2 recorded"):  # an explicit count, no meta.json
        (tmp_path / "s.bin").write_bytes(b"\0\0")
        open_shard(tmp_path / "s.bin", vocab, tokens=2)


def test_outputs_honour_the_umask(tok_dir, tmp_path) -> None:
    """Files written through temporary files used to come out 0600 whatever the umask."""
    previous = os.umask(0o022)
    try:
        out = run_pretrain(tok_dir, tmp_path / "base", **{"loop.max_steps": 2})
        model, tok, _ = load_model(out)
        export_hf(model, tok, tmp_path / "hf")
        os.umask(0o027)
        write_json_atomic(tmp_path / "other.json", {})
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "meta.json", "metrics.jsonl", "tokenizer.json", "config.json",
                 "train_state.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((out / "current").stat().st_mode) == 0o755  # the version directory
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o644, f"export: {name}"
    assert stat.S_IMODE((tmp_path / "other.json").stat().st_mode) == 0o640


DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from cakelm.common import init_distributed
from cakelm.checkpoint import save_checkpoint
from cakelm.loop import LoopConfig, LoopContext, train
from cakelm.model import Transformer
from cakelm.optim import OptimConfig
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config
from tests.test_faults_train import ToyBatches, toy_loss

info, device = init_distributed("cpu")
out, tok = Path(sys.argv[1]), Tokenizer.load(sys.argv[2])
torch.manual_seed(0)
model = Transformer(tiny_model_config())
toy = ToyBatches({(2, 1)})


class RankRows:  # rank r's only micro-batch is micro-batch r of the one-process run
    def get(self, step, micro):
        return toy.get(step, info.rank)


def save(step, metrics, state, final):
    save_checkpoint(out, model, tok, {"stage": "toy", "step": step, "complete": final}, state)


cfg = LoopConfig(max_steps=5, batch_size=2, grad_accum=1, eval_every=0, log_every=1, save_every=1, device="cpu",
                 progress=False, max_skipped=1)
train(model, cfg, OptimConfig(warmup_steps=0, eps=1e-3), LoopContext(device, info, out), RankRows(), toy_loss,
      None, save)
"""


def test_ddp_ranks_agree_to_skip(tok_dir, tmp_path) -> None:
    """A NaN in rank 1's micro-batch: both ranks skip the step (no deadlock, no diverging replicas) and the run
    ends where the one-process run with the NaN in the same micro-batch of the global batch ends."""
    from tests.serving import free_port

    (tmp_path / "script.py").write_text(DDP_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "script.py"), str(tmp_path / "ddp"), str(tok_dir / "tokenizer.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss in micro-batch 0 on rank 1; update skipped" in proc.stderr
    assert [r["skipped"] for r in strict_rows(tmp_path / "ddp" / "metrics.jsonl")] == [0, 0, 1, 0, 0]

    torch.manual_seed(0)
    one = Transformer(tiny_model_config())
    cfg = LoopConfig(max_steps=5, batch_size=2, grad_accum=2, eval_every=0, log_every=1, device="cpu",
                     progress=False, max_skipped=1)
    train(one, cfg, OptimConfig(warmup_steps=0, eps=1e-3), LoopContext(torch.device("cpu"), DistInfo(),
          tmp_path / "one"), ToyBatches({(2, 1)}), toy_loss, None, lambda *a: None)
    ddp = load_model(tmp_path / "ddp")[0].state_dict()
    for k, v in one.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
