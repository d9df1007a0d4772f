"""`cakelm sample CKPT`: print continuations of a prompt from any checkpoint.

    cakelm sample runs/default/base --prompt "ROMEO." --num-samples 3 --temperature 0.8
    cakelm sample runs/fim/base --prefix "ROMEO.\nO, " --suffix " of the night." --temperature 0   # fill the middle

The prompt is encoded after <|bos|> (the start of a document), so an empty prompt samples a fresh document.
Generation stops at the model's next <|bos|> (it started another document) or after --max-new-tokens.
With --prefix/--suffix (a model pretrained with --fim-rate) the model writes what goes between them
(cakelm.data.fim.infill_prompt), and each sample is printed and returned as prefix + middle + suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

from cakelm.checkpoint import load_model
from cakelm.common import pick_device
from cakelm.config import ConfigError, opt
from cakelm.data.fim import FimIds, infill_prompt
from cakelm.engine import Engine, SamplingParams


@dataclass
class SampleConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    prompt: str = opt("", "text to continue (empty: start a new document)", alias="-p")
    num_samples: int = opt(1, "number of continuations")
    max_new_tokens: int = opt(200, "tokens to generate per sample (cut to what fits the context)")
    temperature: float = opt(0.8, "sampling temperature (0 = greedy)")
    top_k: int = opt(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = opt(1.0, "nucleus sampling: smallest set of tokens with this total probability")
    seed: int | None = opt(None, "random seed (sample i uses seed + i)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))
    prefix: str = opt("", "fill in the middle: the text before the gap (a model pretrained with --fim-rate)")
    suffix: str = opt("", "fill in the middle: the text after the gap")

    def __post_init__(self) -> None:
        if (self.prefix or self.suffix) and self.prompt:
            raise ConfigError("--prompt continues a text; --prefix/--suffix fill a gap: give one or the other")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ConfigError("--num-samples and --max-new-tokens must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")


def main(cfg: SampleConfig, echo: bool = True) -> list[str]:
    """Generate the samples; print them (prompt included) when `echo`; return the generated texts."""
    model, tok, _ = load_model(cfg.ckpt, pick_device(cfg.device))
    engine = Engine(model, tok)
    fill = bool(cfg.prefix or cfg.suffix)
    head, tail = (cfg.prefix, cfg.suffix) if fill else (cfg.prompt, "")
    prompt, stops = tok.encode(cfg.prompt, bos=True), (tok.bos_id,)
    if fill:  # a middle ends where the model starts a new document (or, wrongly, opens another FIM part)
        fim = FimIds.of(tok)
        prompt, stops = infill_prompt(tok, cfg.prefix, cfg.suffix), (tok.bos_id, fim.prefix, fim.suffix, fim.middle)
    texts = []
    for i in range(cfg.num_samples):  # one at a time, so each can stream to the terminal
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                None if cfg.seed is None else cfg.seed + i, stop_ids=stops)
        if echo:
            print(("" if i == 0 else "\n" + "-" * 60 + "\n") + head, end="", flush=True)
        text = ""
        for ev in engine.stream([prompt], params):
            text += ev.text
            if echo:
                print(ev.text, end="", flush=True)
        if echo and tail:
            print(tail, end="", flush=True)
        texts.append(head + text + tail if fill else text)
    if echo:
        print()
    return texts
