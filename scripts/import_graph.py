"""The import graph of the project's Python files, and its two rules.

    .venv/bin/python scripts/import_graph.py        # prints every violation; exit 1 if any

Read with `ast` (nothing is imported): every `import` and `from ... import` in a file counts,
whether at module level, inside a function or under `if TYPE_CHECKING:`, because each is a
dependency of the file. An edge goes to the imported module (`from pkg import name` is the
module `pkg.name` when that file exists, else `pkg`) and to every package `__init__` on the way
that the importer is not itself inside of, since Python runs those first (so
`paths -> data.store.schema` also runs `data/store/__init__.py`).

Rules: (1) no circle between files; (2) no import from a lower layer of `LAYERS` to a higher
one. Within a layer any direction is allowed, circles aside.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The pipeline, bottom up: a module may import from its own layer and the layers below it.
# `x` names one module; `x.*` a package and everything in it. The longest matching name wins.
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("base", ("traitsae.errors", "traitsae.version", "traitsae.config_checks",
              "traitsae.config_diff", "traitsae.files", "traitsae.locks", "traitsae.cluster",
              "traitsae.cluster.*"),
     "errors, the version, config checks, atomic files, locks, cluster jobs and signals: no "
     "knowledge of the pipeline"),
    ("backbones", ("traitsae.backbones.*",), "the ViTs behind one interface"),
    ("data", ("traitsae.data.*", "traitsae.paths"),
     "images, the activation store, the training stream; never the SAE"),
    ("sae", ("traitsae.sae.*",), "the SAE family, its training module, export and load"),
    ("extraction", ("traitsae.extraction.*",), "backbone x images -> store"),
    ("training", ("traitsae.training", "traitsae.training.*"),
     "store -> trained SAE"),
    ("evaluation", ("traitsae.evaluation.*",), "SAE x stores -> numbers, tables, figures"),
    ("explore", ("traitsae.explore.*",), "the interactive explorer"),
    ("entry", ("traitsae", "hydra_plugins.*", "extract", "train", "evaluate", "explore"),
     "the package facade (`traitsae.load_sae`), the Hydra launcher plugin, the CLI scripts"),
)  # fmt: skip
Layers = Sequence[tuple[str, Sequence[str], str]]  # (name, module prefixes, what it holds)
ENTRY_SCRIPTS = ("extract.py", "train.py", "evaluate.py", "explore.py")


@dataclass(frozen=True)
class Import:
    """One import statement of `source` that reaches module `target` of the graph."""

    source: str
    target: str
    file: str  # the importing file, as shown in messages
    line: int
    text: str  # the statement as written (its first line)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}   ({self.file}:{self.line}: {self.text})"


def module_files(src: Path, scripts: Iterable[Path] = ()) -> dict[str, Path]:
    """Module name -> file for every .py under `src` (a src layout) and the given scripts."""
    modules: dict[str, Path] = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    for path in scripts:
        modules[path.stem] = path
    return modules


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([name] if name else [])])


def _targets(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The graph's modules that one import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = _resolve_relative(module, _is_package(modules, module), node.level, node.module)
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        names = [name if name in modules else base for name in names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a package: nearest file
            name = name.rpartition(".")[0]
        if name and name not in found:
            found.append(name)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(modules: dict[str, Path], root: Path) -> list[Import]:
    """Every import between the files of `modules`, with the package `__init__`s it runs
    (files shown relative to `root`)."""
    edges: list[Import] = []
    for module, path in modules.items():
        shown = str(path.relative_to(root))
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        inside = {module, *_parents(module)}
        for node in ast.walk(ast.parse(source, filename=str(path))):
            for target in _targets(node, module, modules):
                text = lines[node.lineno - 1].strip()  # type: ignore[attr-defined]
                run = [p for p in _parents(target) if p in modules and p not in inside]
                for reached in [*run, target]:
                    if reached != module:
                        edges.append(Import(module, reached, shown, node.lineno, text))  # type: ignore[attr-defined]
    return edges


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return module == package or module.startswith(package + ".")
    return module == pattern


def layer_of(module: str, layers: Layers = LAYERS) -> str | None:
    """The layer whose longest name matches `module` (None: in no layer)."""
    best, best_len = None, -1
    for name, patterns, _ in layers:
        for pattern in patterns:
            if _matches(module, pattern) and len(pattern) > best_len:
                best, best_len = name, len(pattern)
    return best


def unlayered(modules: Iterable[str], layers: Layers = LAYERS) -> list[str]:
    """Modules that no layer names (each must have its place in the pipeline)."""
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(edges: Iterable[Import], layers: Layers = LAYERS) -> list[str]:
    """Imports from a lower layer to a higher one."""
    rank = {name: i for i, (name, _, _) in enumerate(layers)}
    problems = []
    for edge in edges:
        low, high = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if low is not None and high is not None and rank[low] < rank[high]:
            problems.append(f"{low} imports {high}: {edge}")
    return sorted(set(problems))


def circles(edges: Iterable[Import]) -> list[list[Import]]:
    """One shortest circle through each group of files that import each other (Tarjan's
    strongly connected components), as the chain of import statements that closes it."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    found = []
    for component in _components(graph):
        if len(component) > 1:
            found.append(_shortest_circle(graph, component))
    return sorted(found, key=lambda chain: [e.source for e in chain])


def _components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _shortest_circle(graph: dict[str, dict[str, Import]], component: list[str]) -> list[Import]:
    """Breadth-first from the component's first module back to itself, inside the component."""
    members, start = set(component), component[0]
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt, edge in sorted(graph[node].items()):
                if nxt not in members or nxt in came_from:
                    continue
                came_from[nxt] = edge
                if nxt == start:
                    chain = [edge]
                    while chain[0].source != start:
                        chain.insert(0, came_from[chain[0].source])
                    return chain
                following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle in strongly connected {component}")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """The modules of `src/` and the entry scripts of the repository at `root`."""
    return module_files(root / "src", [root / name for name in ENTRY_SCRIPTS])


def report(modules: dict[str, Path], root: Path, layers: Layers = LAYERS) -> str:
    """Every violation of the two rules, one paragraph each; empty when there is none."""
    edges = import_edges(modules, root)
    parts = [f"in no layer (add it to LAYERS): {m}" for m in unlayered(modules, layers)]
    for chain in circles(edges):
        parts.append("circle:\n" + "\n".join(f"  {edge}" for edge in chain))
    parts += [f"upward: {problem}" for problem in upward_imports(edges, layers)]
    return "\n".join(parts)


def layers_markdown() -> str:
    """The LAYERS table as markdown (ARCHITECTURE.md mirrors it)."""
    rows = ["| layer | modules | what |", "|---|---|---|"]
    for name, prefixes, what in LAYERS:
        rows.append(f"| {name} | {', '.join(f'`{p}`' for p in prefixes)} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    found = report(project_modules(), ROOT)
    print(found or "import graph: no circle, no upward import")
    sys.exit(1 if found else 0)
