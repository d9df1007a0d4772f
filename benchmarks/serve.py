"""Serving under load: `cakelm serve` (continuous batching) answering several clients at once, against the same
requests sent one after another; time to first token on an idle and on a busy server; and a soak of a few hundred
requests with random disconnects and bad requests mixed in (rows leaked, memory, every request accounted for).

    python benchmarks/serve.py                          # SmolLM2-135M-Instruct (imported on the fly), 8 clients
    python benchmarks/serve.py --ckpt runs/default/sft --clients 8 --max-tokens 48 --soak 300 --dtype fp32

The server runs as its own process (`python -m cakelm serve`), as users run it; the clients are the official
`openai` client on threads of this one. Requests are chat completions, greedy, with different questions: first
each exactly --max-tokens long (vLLM's `ignore_eos`, as its serving benchmark does), then ending where the model
ends them (the aggregate counts the tokens generated, as the server reports them in `usage`). The busy server's
streams are plain completions of up to 1000 tokens (most do not end on their own while the newcomer's first token
is timed; the number running is printed when some did). Prints its numbers; nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch

from cakelm.common import hardware_info

QUESTIONS = ["What is 12 + 7?", "Write a haiku about rain.", "Name three colors.", "Who wrote Hamlet?",
             "Explain gravity briefly.", "Count to five.", "What is the capital of France?", "Say hello in Spanish.",
             "Give me a fun fact about cats.", "What is a prime number?", "Describe the sea.", "Why is the sky blue?",
             "Suggest a name for a dog.", "What do bees make?", "How many legs does a spider have?", "Tell a joke."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, slots: int, dtype: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cakelm", "serve", ckpt, "--port", str(port), "--max-concurrency",
                             str(slots), "--max-queued", "512", "--model-name", "m", "--dtype", dtype],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("the server did not start in 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask(client: openai.OpenAI, question: str, max_tokens: int, ignore_eos: bool = False) -> tuple[str, int]:
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": ignore_eos})
    return r.choices[0].message.content, r.usage.completion_tokens


def first_token_s(client: openai.OpenAI, question: str, max_tokens: int = 8) -> float:
    """Seconds from sending a streamed request to its first piece of content."""
    t = time.perf_counter()
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t
    return first if first is not None else float("nan")


def throughput(client: openai.OpenAI, clients: int, max_tokens: int, ignore_eos: bool) -> dict:
    """The same requests one after another, then all at once: tokens/s of each, and whether the outputs agree."""
    questions = QUESTIONS[:clients]
    t = time.perf_counter()
    alone = [ask(client, q, max_tokens, ignore_eos) for q in questions]
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        together = list(pool.map(lambda q: ask(client, q, max_tokens, ignore_eos), questions))
    t_conc = time.perf_counter() - t
    tokens = sum(n for _, n in alone)
    return {"tokens": tokens, "seq_tps": tokens / t_seq, "conc_tps": sum(n for _, n in together) / t_conc,
            "identical": [a for a, _ in alone] == [b for b, _ in together]}


def ttft(client: openai.OpenAI, url: str, streams: int, repeats: int) -> tuple[float, float]:
    """Median time to first token on the idle server, then while `streams` long streams generate."""
    idle = statistics.median(first_token_s(client, QUESTIONS[i % 16]) for i in range(repeats))
    stop = threading.Event()
    started = threading.Semaphore(0)

    def long_stream(i: int) -> None:
        s = client.completions.create(model="m", prompt=QUESTIONS[i], max_tokens=1000, temperature=0.8, seed=i,
                                      stream=True)
        for n, _ in enumerate(s):
            if n == 1:
                started.release()
            if stop.is_set():
                s.close()  # the server cancels the row
                return

    threads = [threading.Thread(target=long_stream, args=(i,), daemon=True) for i in range(streams)]
    for th in threads:
        th.start()
    for _ in threads:
        started.acquire(timeout=300)
    busy, running = [], []
    for i in range(repeats):
        running.append(httpx.get(url + "/health").json()["running"])
        busy.append(first_token_s(client, QUESTIONS[(i + 5) % 16]))
    stop.set()
    for th in threads:
        th.join(60)
    if min(running) != streams:
        print(f"(streams running while the busy TTFT was taken: {running})")
    return idle, statistics.median(busy)


def soak(url: str, pid: int, n: int, max_tokens: int, seed: int = 0) -> dict:
    """n requests from 16 threads: a third answered whole, a third streamed (half of them dropped midway), the rest
    dropped before the answer or bad (not JSON, n too large, a prompt beyond the context, a wrong Host)."""
    rng = random.Random(seed)
    kinds = rng.choices(["whole", "stream", "stream-drop", "drop", "bad"], weights=[3, 2, 2, 2, 1], k=n)
    port = int(url.rsplit(":", 1)[1])
    outcome: dict[str, int] = {}
    lock = threading.Lock()
    rss = [rss_mb(pid)]

    def count(key: str) -> None:
        with lock:
            outcome[key] = outcome.get(key, 0) + 1

    def one(i: int) -> None:
        kind = kinds[i]
        body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[i % 16]}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
        if kind == "whole":
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            count("whole: answered" if ok else f"whole: {r.status_code}")
        elif kind in ("stream", "stream-drop"):
            cut = rng.randint(1, 6) if kind == "stream-drop" else None
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=600) as r:
                lines = 0
                for line in r.iter_lines():
                    lines += line.startswith("data:")
                    if cut is not None and lines >= cut:
                        break  # leaving the block closes the connection
                    if line == "data: [DONE]":
                        count("stream: answered")
                if cut is not None:
                    count("stream: dropped")
        elif kind == "drop":  # a non-streamed request whose client hangs up at once
            data = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
                time.sleep(rng.random() * 0.5)
            count("dropped")
        else:
            bad = rng.choice([
                lambda: httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30,
                                   headers={"content-type": "application/json"}),
                lambda: httpx.post(url + "/v1/chat/completions", json={**body, "n": 99}, timeout=30),
                lambda: httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x " * 5000}, timeout=30),
                lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=30,
                                   headers={"host": "evil.example"}),
            ])
            r = bad()
            count("bad: refused" if 400 <= r.status_code < 500 else f"bad: {r.status_code}")
        if i % 50 == 49:
            with lock:
                rss.append(rss_mb(pid))

    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    for _ in range(100):  # dropped requests leave within a step; give the last ones a moment
        health = httpx.get(url + "/health").json()
        if health["running"] == health["queued"] == 0:
            break
        time.sleep(0.1)
    rss.append(rss_mb(pid))
    return {"outcome": outcome, "health": health, "rss": rss, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="smollm2", help="checkpoint to serve (smollm2: import it into a temp dir)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--soak", type=int, default=0, help="also run a soak of this many requests")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="the server's --dtype")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.ckpt
    if ckpt == "smollm2":
        ckpt = f"{tmp.name}/smollm2"
        subprocess.run([sys.executable, "-m", "cakelm", "import", "smollm2", ckpt], check=True,
                       stdout=subprocess.DEVNULL)
    port = free_port()
    # room for the TTFT test's clients plus one newcomer
    proc = start_server(ckpt, port, max(args.clients + 1, 16), args.dtype)
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        ask(client, "Hi", 4)  # warm-up
        dtype = httpx.get(url + "/health").json()["dtype"]
        cpu = hardware_info(torch.device("cpu"))["cpu"]
        print(f"{cpu}, {os.cpu_count()} CPUs; cakelm serve {args.ckpt} (--max-concurrency "
              f"{max(args.clients + 1, 16)}, --dtype {args.dtype}: {dtype}); {args.clients} clients, greedy chat, "
              f"max_tokens {args.max_tokens}")
        for ignore_eos in (True, False):
            tp = throughput(client, args.clients, args.max_tokens, ignore_eos)
            what = f"{args.max_tokens} tokens each (ignore_eos)" if ignore_eos else "replies ending where they end"
            print(f"{what}: one after another {tp['seq_tps']:.1f} tok/s; {args.clients} at once "
                  f"{tp['conc_tps']:.1f} tok/s = {tp['conc_tps'] / tp['seq_tps']:.2f}x ({tp['tokens']} tokens of "
                  f"{args.clients * args.max_tokens} at most; outputs identical: {tp['identical']})")
        idle, busy = ttft(client, url, args.clients, args.ttft_repeats)
        print(f"time to first token: idle {1000 * idle:.0f} ms, with {args.clients} streams running "
              f"{1000 * busy:.0f} ms = {busy / idle:.2f}x")
        if args.soak:
            s = soak(url, proc.pid, args.soak, args.max_tokens)
            print(f"soak: {args.soak} requests in {s['seconds']:.0f} s: {dict(sorted(s['outcome'].items()))}; after: "
                  f"running {s['health']['running']}, queued {s['health']['queued']}; server RSS MB every 50: "
                  f"{', '.join(f'{x:.0f}' for x in s['rss'])}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
