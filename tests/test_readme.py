"""The README cannot drift from the program: every command line it shows is checked against the real parsers.

The same goes for docs/results.md (the measured runs the README summarises), read after the README: its commands
may read what the README's wrote. From README.md's fenced code blocks (bash blocks: every line; transcripts: the
lines after a `$ ` prompt), each
`cakelm ...`, `python -m cakelm ...`, `torchrun ... -m cakelm ...` and `python benchmarks/NAME.py ...` line:
- a cakelm command is parsed by `cakelm`'s own argparse parser and its config is built (`__main__.config_of`, the
  code `cakelm` runs before a stage starts): unknown options, bad choices, wrong types and failed option checks
  fail the test, naming the README line;
- a benchmark script must exist, and its argparse parser (captured as the script builds it) must accept the line;
- every path under `runs/` that a cakelm command reads (any option or positional that is not its output: `out`,
  `out_dir`, `json`), its defaults included, must be written by an earlier command shown in the README: that
  command's output, or a path inside it (`cakelm pipeline` writes the whole run directory). Benchmark arguments under
  `runs/` are checked the same way.
Not checked: files outside `runs/` (the reader's own data: `my_prompts.jsonl`, `notes/`, a GGUF file); whether an
earlier command would succeed; what a transcript prints.
Inline code spans (`cakelm eval CKPT` in a sentence) are often fragments, so only their words are checked: the
command or script exists and every `--option` they name is one of its options.
The README's test command is the one CI runs (.ci/run), and it runs the `slow` tests pyproject deselects by default.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cakelm.__main__ import COMMANDS, build_parser, canonical, config_of
from cakelm.config import add_arguments, flatten, to_dict

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ["README.md", "docs/results.md"]  # checked in this order: a later file may read what an earlier one wrote
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
OUTPUT_FIELDS = ("out", "out_dir", "json")  # a command's outputs; every other path it names is an input


@dataclass
class Command:
    line: int  # in `file`
    text: str  # as shown
    program: str  # "cakelm", or the benchmark script's path
    argv: list[str]  # after the program
    fenced: bool  # in a code block (a whole command) or an inline span (maybe a fragment)
    file: str = "README.md"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _commands(text: str, line: int, fenced: bool, file: str) -> list[Command]:
    """The cakelm and benchmark commands in one shell line (several with `&&`)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    out, segment = [], []
    for w in [*words, "&&"]:
        if w not in ("&&", "||", ";", "|"):
            segment.append(w)
            continue
        while segment and re.fullmatch(r"[A-Z_]+=\S*", segment[0]):  # VAR=value before the program
            segment.pop(0)
        if segment[:1] == ["cakelm"]:
            out.append(Command(line, text, "cakelm", segment[1:], fenced, file))
        elif segment[:1] == ["torchrun"] or segment[:3] in (["python", "-m", "cakelm"], ["python3", "-m", "cakelm"]):
            at = next((i for i in range(len(segment) - 1) if segment[i:i + 2] == ["-m", "cakelm"]), None)
            if at is not None:
                out.append(Command(line, text, "cakelm", segment[at + 2:], fenced, file))
        elif segment[:1] in (["python"], ["python3"]) and segment[1:2] and segment[1].startswith("benchmarks/"):
            out.append(Command(line, text, segment[1], segment[2:], fenced, file))
        segment = []
    return out


def readme_commands(readme: str, file: str = "README.md") -> list[Command]:
    """Every command line of a markdown file (the README's text, named `file`), in order (module docstring)."""
    found: list[Command] = []
    lines = readme.splitlines()
    block: str | None = None  # the info string of the fenced block we are in
    i = 0
    while i < len(lines):
        raw, number = lines[i], i + 1
        i += 1
        if raw.startswith("```"):
            block = raw[3:].strip() if block is None else None
            continue
        if block is None:  # prose: inline code spans
            for span in re.findall(r"`([^`]+)`", raw):
                found += _commands(span, number, fenced=False, file=file)
            continue
        text = raw.strip()
        prompt = text.startswith("$ ")
        if not (prompt or block in SHELL_BLOCKS):
            continue  # a transcript's output, a listing, Python
        text = text.removeprefix("$ ")
        while text.endswith("\\") and i < len(lines):  # continued on the next line
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        found += _commands(text, number, fenced=True, file=file)
    return found


COMMAND_LINES = [c for f in DOCS for c in readme_commands((ROOT / f).read_text(encoding="utf-8"), f)]
FENCED = [c for c in COMMAND_LINES if c.fenced]
INLINE = [c for c in COMMAND_LINES if not c.fenced]


def test_the_readme_shows_commands() -> None:
    # the extraction itself works: the set-up line, a torchrun line, a continued line and a transcript's prompt line
    texts = [c.text for c in FENCED]
    assert sum(c.program == "cakelm" for c in FENCED) >= 50
    assert sum(c.file == "docs/results.md" for c in COMMAND_LINES) >= 10  # the measured runs are read too
    assert any(t.startswith("pip install") and "cakelm pipeline" in t for t in texts)
    assert any(t.startswith("torchrun") for t in texts) and any(c.argv[:1] == ["chat"] for c in FENCED)
    assert any(c.argv[:1] == ["sft"] and "--init" in c.argv and "--max-steps" in c.argv for c in FENCED)


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def benchmark_parser(script: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser a benchmark script builds (run as __main__ up to its parse_args, which is not run)."""
    path = ROOT / script

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(sys, "argv", [str(path)])
        with pytest.raises(_Parsed) as got:
            runpy.run_path(str(path), run_name="__main__")
    return got.value.parser


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: Command, capsys) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{what}\n  does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")


def _paths(value) -> list[str]:
    """The `runs/...` paths in an option value (a path, a list, SRC=WEIGHT mixtures)."""
    values = value if isinstance(value, list) else [value]
    return [v.split("=", 1)[0] for v in values if isinstance(v, str) and v.startswith("runs/")]


def _io(c: Command, capsys, monkeypatch) -> tuple[list[str], list[str]]:
    """Parse the command as the program would and return (the runs/ paths it reads, those it writes)."""
    if c.program != "cakelm":
        if not (ROOT / c.program).is_file():
            pytest.fail(f"{c}\n  no such benchmark script")
        ns = _parse(benchmark_parser(c.program, monkeypatch), c.argv, c, capsys)
        return [p for v in vars(ns).values() for p in _paths(v)], []
    ns = _parse(build_parser(), canonical(c.argv), c, capsys)
    try:
        cfg = config_of(COMMANDS[ns.command], ns)
    except Exception as e:  # ConfigError, CakeError: the checks a stage's options get before it starts
        pytest.fail(f"{c}\n  is refused: {e}")
    reads, writes = [], []
    for key, value in flatten(to_dict(cfg)).items():
        (writes if key.rsplit(".", 1)[-1] in OUTPUT_FIELDS else reads).extend(_paths(value))
    return reads, writes


def _inside(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


def check_fenced(commands: list[Command], capsys, monkeypatch) -> list[str]:
    """What is wrong with each whole command line, in README order (empty: nothing)."""
    written: list[str] = []
    problems = []
    for c in commands:
        try:
            reads, writes = _io(c, capsys, monkeypatch)
        except pytest.fail.Exception as e:
            problems.append(str(e))
            continue
        missing = [p for p in reads if not any(_inside(p, w) for w in written)]
        if missing:
            problems.append(f"{c}\n  reads {', '.join(missing)}, which no earlier command writes "
                            "(README.md, then docs/results.md)")
        written += writes
    return problems


def test_every_fenced_command_parses_and_reads_what_an_earlier_one_wrote(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths of the README must not meet this checkout's files
    problems = check_fenced(FENCED, capsys, monkeypatch)
    assert not problems, "\n".join(problems)


def test_the_check_finds_drift(tmp_path, monkeypatch, capsys) -> None:
    """A README that has drifted in each way the check looks for gets one problem per bad line, naming it."""
    monkeypatch.chdir(tmp_path)
    drifted = "\n".join([
        "```bash",
        "cakelm pipeline --preset micro --out runs/a",  # 2: fine, writes runs/a
        "cakelm sft --init runs/a/base --out runs/a/sft2 \\",  # 3-4: fine (a continued line)
        "    --max-steps 5",
        "cakelm sft --init runs/b/base --out runs/b/sft",  # 5: runs/b was never written
        "cakelm pretrain --max-stepz 3",  # 6: unknown option
        "cakelm pretrain --optim.name sgd",  # 7: bad choice
        "cakelm pretrain --lr fast",  # 8: wrong type
        "cakelm pretrain --max-steps 0",  # 9: refused by the option checks
        "cakelm frobnicate",  # 10: no such command
        "python benchmarks/recipes.py sft --init runs/a/sft2 --limitt 5",  # 11: unknown benchmark option
        "python benchmarks/nope.py",  # 12: no such script
        "```",
        "```",
        "cakelm chat: runs/zzz (output, not a command)",
        "$ cakelm chat runs/a/sft2 --temperature hot",  # 16: a transcript's command: wrong type
        "```",
    ])
    problems = check_fenced(readme_commands(drifted), capsys, monkeypatch)
    assert [p.split(":", 2)[1] for p in problems] == ["5", "6", "7", "8", "9", "10", "11", "12", "16"], problems
    assert "reads runs/b/base, which no earlier command" in problems[0]
    assert "--max-stepz" in problems[1] and "sgd" in problems[2] and "max-steps must be >= 1" in problems[4]


def test_inline_commands_name_real_options(monkeypatch) -> None:
    problems = []
    for c in INLINE:
        if c.program == "cakelm":
            argv = canonical(c.argv)
            if not argv or argv[0] not in COMMANDS:
                problems.append(f"{c}\n  no such command: {argv[:1]}")
                continue
            parser = argparse.ArgumentParser()
            add_arguments(parser, COMMANDS[argv[0]].config, COMMANDS[argv[0]].presets)
        elif not (ROOT / c.program).is_file():
            problems.append(f"{c}\n  no such benchmark script")
            continue
        else:
            parser = benchmark_parser(c.program, monkeypatch)
        options = {w.strip("[]").split("=", 1)[0] for w in c.argv if w.strip("[]").startswith("--")}
        unknown = sorted(o for o in options if o not in parser._option_string_actions)
        if unknown:
            problems.append(f"{c}\n  unknown options: {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command is .ci/run's, and it runs the slow tests that a plain `pytest` leaves out."""
    readme_tests = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
                    if re.search(r"&& pytest\b", line)]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert len(readme_tests) == 1, readme_tests
    assert readme_tests[0] in [line.strip() for line in ci], f"README: {readme_tests[0]!r} is not in .ci/run"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"""addopts = .*-m ['"]not slow['"]""", pyproject)  # deselected by default
    assert '-m "slow or not slow"' in readme_tests[0]  # ... and run in CI
