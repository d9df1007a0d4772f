"""The `cakelm` command: help for every subcommand, and one-line errors (no tracebacks) for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cakelm.__main__ import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"cakelm {command}" in out and "--" in out


def test_top_level_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("argv, match", [
    (["pretrain", "--max-steps", "0"], "cakelm pretrain: error: max-steps must be >= 1, got 0"),
    (["pretrain", "--data", "nowhere"], "cakelm pretrain: error: tokenizer not found: nowhere/tokenizer.json"),
    (["tokenizer", "--data", "missing.txt"], "cakelm tokenizer: error: --data missing.txt: no such file"),
    (["sample", "no_ckpt"], "cakelm sample: error: checkpoint not found: no_ckpt"),
    (["pipeline", "--from", "pretrain", "--only", "sample"], "use --from or --only, not both"),
    (["tokenizer", "--vocab-size", "10", "--data", "CORPUS"], "vocab_size 10 is too small"),
])
def test_errors_are_one_line(argv, match, capsys, corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [str(corpus) if a == "CORPUS" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_argparse_rejects_unknown_and_out_of_choice(capsys) -> None:
    for argv in (["pretrain", "--max-stepz", "3"], ["pretrain", "--optim.name", "sgd"], ["pretrain", "--lr", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "cakelm", "data", "--data", str(tmp_path / "bad.jsonl"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cakelm data: error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)"
    assert not (tmp_path / "out").exists()  # nothing half-written
