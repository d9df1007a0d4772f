"""The package's layers point down only (README, "Layout"): every `cakelm` module imports modules of its own layer
or lower, and the stages never import one another (a helper two stages need lives in a lower layer). The stage
table is the one list of stages that the CLI, the pipeline and the report read."""

from __future__ import annotations

import ast
from pathlib import Path

import cakelm
from cakelm.__main__ import COMMANDS
from cakelm.report import MODEL_ORDER
from cakelm.stages import pipeline
from cakelm.stages.table import MODELS, STAGE, STAGES

ROOT = Path(cakelm.__file__).parent

# layer -> modules (a trailing "." names every module of a package)
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("common", "config", "__init__"),
    1: ("model", "kernels", "lora", "tokenizer", "losses", "optim", "tasks", "rnn", "webapp", "metrics_http",
        "tracking", "report_render", "parallel"),
    2: ("checkpoint", "engine", "chat_format", "loop", "rewards", "hf_compat", "openai_api"),
    3: ("data.", "heldout", "batching", "probes"),
    4: ("rollout", "rlhf", "rl", "scaffold"),
    5: ("stages.", "serve", "label"),  # the stages and the apps: none imports another
    6: ("stages.table",),
    7: ("stages.pipeline", "stages.rounds", "report", "report_skills"),
    8: ("__main__",),
}


def layer_of(module: str) -> int:
    exact = [n for n, mods in LAYERS.items() if module in mods]
    if exact:
        return exact[0]
    packages = [n for n, mods in LAYERS.items() for m in mods if m.endswith(".") and module.startswith(m)]
    assert packages, f"cakelm.{module} is in no layer: add it to LAYERS (and to the README's Layout)"
    return packages[0]


def cakelm_imports(path: Path) -> set[str]:
    """The cakelm modules a file imports (relative to the package, e.g. "stages.grpo")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cakelm"):
            base = node.module.removeprefix("cakelm").lstrip(".")
            for alias in node.names:  # `from cakelm.stages import grpo` imports the module cakelm.stages.grpo
                sub = f"{base}.{alias.name}" if base else alias.name
                out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).is_file() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("cakelm.") for a in node.names if a.name.startswith("cakelm.")}
    return {m for m in out if m and m != "stages" and m != "data"}


def test_imports_point_down_and_stages_do_not_import_each_other() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module in ("stages", "data", "web"):
            continue
        mine = layer_of(module)
        for dep in cakelm_imports(path):
            theirs = layer_of(dep)
            if theirs > mine or (theirs == mine == 5 and dep != module):
                bad.append(f"{module} (layer {mine}) imports {dep} (layer {theirs})")
    assert not bad, "\n".join(bad)


def test_the_table_is_what_the_cli_the_pipeline_and_the_report_read() -> None:
    assert [s.name for s in STAGES if s.name in COMMANDS] == [s.name for s in STAGES]
    assert set(COMMANDS) == {s.name for s in STAGES} | {"pipeline", "rlhf-round"}
    assert pipeline.NAMES == (*(s.name for s in STAGES if s.pipeline), "report")
    assert MODEL_ORDER == MODELS == ("base", "sft", "dpo", "ppo", "grpo", "rloo")
    for s in STAGES:
        # a pipeline stage's inputs come from earlier pipeline stages; every model row trains
        earlier = [t.name for t in STAGES[:STAGES.index(s)] if t.pipeline]
        assert all(src in earlier for src in s.inputs.values()), s.name
        assert not s.model or s.trains, s.name
        for key in (*s.inputs, *s.options):  # dotted keys name nested options (grpo's loop.max_steps)
            *parents, leaf = key.split(".")
            target = s.config()
            for part in parents:
                target = getattr(target, part, None)
            assert hasattr(target, leaf), f"{s.name} has no option {key}"
    assert STAGE["rloo"].pipeline and not STAGE["rloo"].default
