"""Test helpers: a small checkpoint in chat format, a real uvicorn server on a free localhost port, and where
Debian's chromium is (for the Playwright tests)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from cakelm.checkpoint import save_checkpoint
from cakelm.model import Transformer
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright):
    """Debian's headless Chromium through Playwright, with nothing that reaches the network on its own."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def make_chat_checkpoint(out: Path, tok_dir: Path, max_seq_len: int = 128) -> Path:
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(max_seq_len=max_seq_len))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # decisive greedy choices
    return save_checkpoint(out, model, Tokenizer.load(tok_dir), {"stage": "test", "step": 0, "chat_format": "chat"})


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free localhost port for a server that binds it a moment later (torchrun's rendezvous, `cakelm label
    --port`). Drawn at random below the kernel's ephemeral range, so no other process's port-0 bind or outgoing
    connection can take it in that moment (a port-0 bind here would hand out exactly the ports those use), and
    never twice in one test session."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS's starts at 49152
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free localhost port below the ephemeral range")


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread; yield its base URL. The socket is bound here, to a port the kernel
    picks, and handed to uvicorn: no moment in which another process could take the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
