"""`cakelm chat`: one-shot answers, the interactive loop (/reset, /quit), history trimmed to the context."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from cakelm.checkpoint import load_model
from cakelm.engine import Engine
from cakelm.stages.chat import Chat, ChatConfig
from tests.serving import make_chat_checkpoint


def test_one_shot_and_repl(tok_dir, tmp_path) -> None:
    ckpt = make_chat_checkpoint(tmp_path / "c", tok_dir)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "cakelm", "chat", str(ckpt), "-p", "Hail!", "--temperature", "0",
                          "--max-new-tokens", "10"], capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() and "you>" not in one.stdout
    repl = subprocess.run([sys.executable, "-m", "cakelm", "chat", str(ckpt), "--temperature", "0",
                           "--max-new-tokens", "10"], input="Hail!\n/reset\n/bogus\nHail!\n/quit\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert repl.returncode == 0, repl.stderr
    out = repl.stdout
    assert "chat format" in out and "[conversation cleared]" in out and "[unknown command /bogus" in out
    assert out.count("assistant> ") == 2
    # greedy and a reset in between: both answers are the one-shot answer
    answers = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert answers[0] == answers[1] == one.stdout.strip()


def test_history_is_trimmed_with_a_notice(tok_dir, tmp_path, capsys) -> None:
    ckpt = make_chat_checkpoint(tmp_path / "c", tok_dir, max_seq_len=96)
    model, tok, _ = load_model(ckpt)
    chat = Chat(Engine(model, tok), "chat", ChatConfig(ckpt=str(ckpt), temperature=0, max_new_tokens=16,
                                                       system="Be kind."))
    for i in range(6):
        chat.reply(f"message number {i} " + "word " * 6, out=io.StringIO())
    err = capsys.readouterr().err
    assert "[dropped the" in err and "96-token context" in err
    assert chat.history[0]["role"] == "user" and chat.history[-1]["role"] == "assistant"
    assert chat.history[-2]["content"].startswith("message number 5")
    long = chat.reply  # a single message longer than the context is an error, not a crash
    try:
        long("word " * 200, out=io.StringIO())
    except Exception as e:
        assert "fit in the context" in str(e)
    else:
        raise AssertionError("expected an error")
