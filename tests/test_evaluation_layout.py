"""evaluation/ by question: the core imports no task, no task imports another, the explorer
reaches tasks only for what it shows, and no evaluation file grows past ~400 lines."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import import_graph  # noqa: E402

EVALUATION = ROOT / "src" / "traitsae" / "evaluation"
# Every folder beside core/ is a task (its question); new ones are checked as they land.
TASKS = tuple(
    p.name
    for p in EVALUATION.iterdir()
    if p.is_dir() and (p / "__init__.py").is_file() and p.name != "core"
)
# Compositions of tasks (like the registry): eval=bench runs health and cub_traits per SAE.
COMPOSITIONS = ("bench",)
# What the explorer shows of a task: discovery's contrast (its Compare page) and the steered
# probe readout (its Steer page); package __init__s are edges too (Python runs them first).
EXPLORER_MAY_USE = {
    "traitsae.evaluation.discovery",
    "traitsae.evaluation.causal",
    "traitsae.evaluation.causal.forward",
    "traitsae.evaluation.causal.steering",
    "traitsae.evaluation.causal.steer",  # the Steer page runs eval=steer's compute_steer itself
    "traitsae.evaluation.causal.steer_options",
}
MAX_LINES = 410


def _task(module: str) -> str | None:
    parts = module.split(".")
    is_task = len(parts) > 2 and parts[:2] == ["traitsae", "evaluation"] and parts[2] in TASKS
    return parts[2] if is_task else None


def _edges() -> list[import_graph.Import]:
    return import_graph.import_edges(import_graph.project_modules(), ROOT)


def test_core_imports_no_task_and_no_task_imports_another():
    bad = []
    for edge in _edges():
        if _task(edge.target) is None:
            continue
        if edge.source.startswith("traitsae.evaluation.core"):
            bad.append(f"core -> task: {edge}")
        elif _task(edge.source) not in (None, _task(edge.target), *COMPOSITIONS):
            bad.append(f"task -> task: {edge}")
    assert not bad, "\n".join(bad)


def test_explorer_imports_only_the_core_and_what_it_shows():
    bad = [
        str(edge)
        for edge in _edges()
        if edge.source.startswith("traitsae.explore")
        and _task(edge.target) is not None
        and edge.target not in EXPLORER_MAY_USE
        and not edge.target.startswith("traitsae.evaluation.discovery.")
    ]
    assert not bad, "\n".join(bad)


def test_no_evaluation_file_over_400_lines():
    long = {
        str(p.relative_to(EVALUATION)): n
        for p in EVALUATION.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by what they do: {long}"
