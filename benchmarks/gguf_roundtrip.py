"""GGUF export round trip: a checkpoint written with `cakelm export --to gguf` in each dtype and read back with
`cakelm import`'s reader: file size, write time, how far the re-imported model's logits are from the original's,
and whether its tokenizer and chat template give the same ids.

    python benchmarks/gguf_roundtrip.py --ckpt runs/smollm2          # SmolLM2-135M as `cakelm import smollm2` gives it

The logits are compared on one random 64-token sequence (fp32, the original's largest logit printed beside them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cakelm.chat_format import render_prompt
from cakelm.checkpoint import load_model
from cakelm.common import hardware_info
from cakelm.hf_compat import GGUF_DTYPES, read_gguf, write_gguf
from cakelm.model import Transformer

TEXT = "Hello, world! 1234 apples; it's 3.14 -- ça va?\n\n\tDone."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a checkpoint of the Llama architecture")
    ap.add_argument("--dtypes", nargs="+", default=list(GGUF_DTYPES), choices=GGUF_DTYPES)
    args = ap.parse_args()
    print(f"{hardware_info(torch.device('cpu'))['cpu']}; {args.ckpt}")
    model, tok, _ = load_model(args.ckpt)
    torch.manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 64))
    with torch.no_grad():
        ref = model(ids)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            t = time.perf_counter()
            path = write_gguf(model, tok, Path(tmp) / f"m.{dtype}.gguf", dtype)
            seconds = time.perf_counter() - t
            cfg, sd, tok2, _ = read_gguf(path)
            back = Transformer(cfg).eval()
            back.load_state_dict(sd)
            with torch.no_grad():
                diff = (back(ids) - ref).abs().max().item()
            same = tok2.encode(TEXT) == tok.encode(TEXT) and \
                render_prompt(CHAT, tok2, "chat") == render_prompt(CHAT, tok, "chat")
            print(f"{dtype:5} {path.stat().st_size / 1e6:7.1f} MB  written in {seconds:4.1f} s  max |logit diff| "
                  f"{diff:.4f} (logits up to {ref.abs().max().item():.1f})  same config {cfg == model.cfg}, same "
                  f"token ids and chat prompts {same}")


if __name__ == "__main__":
    main()
