"""The import graph of src/ (and the entry scripts): no circle between files, no import running
back up the pipeline (`scripts/import_graph.py`, layers in its `LAYERS`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import import_graph  # noqa: E402


def test_every_module_has_a_layer():
    missing = import_graph.unlayered(import_graph.project_modules())
    assert not missing, f"modules in no layer of scripts/import_graph.py LAYERS: {missing}"


def test_no_import_circle_between_files():
    edges = import_graph.import_edges(import_graph.project_modules(), ROOT)
    found = import_graph.circles(edges)
    assert not found, "import circles (each line: importer -> imported (file:line: import)):\n" + (
        "\n".join("circle:\n" + "\n".join(f"  {edge}" for edge in chain) for chain in found)
    )


def test_no_import_runs_up_the_pipeline():
    edges = import_graph.import_edges(import_graph.project_modules(), ROOT)
    found = import_graph.upward_imports(edges)
    assert not found, "imports from a lower layer to a higher one:\n" + "\n".join(found)


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return import_graph.module_files(root / "src")


LAYERS = (("low", ("pkg.low.*",), ""), ("high", ("pkg.high.*",), ""), ("top", ("pkg",), ""))


def test_checker_names_the_files_and_lines_of_a_circle(tmp_path):
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "import os\nfrom ..high import b\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "def f():\n    from pkg.low.a import x\n",
        },
    )
    found = import_graph.report(modules, tmp_path, LAYERS)
    assert (
        "circle:\n  pkg.high.b -> pkg.low.a   (src/pkg/high/b.py:2: from pkg.low.a import x)\n"
        in found
    )
    assert "  pkg.low.a -> pkg.high.b   (src/pkg/low/a.py:2: from ..high import b)" in found
    assert "upward: low imports high: pkg.low.a -> pkg.high.b" in found


def test_checker_sees_the_package_init_an_import_runs(tmp_path):
    # paths -> store.schema runs store/__init__, which imports reader, which imports paths.
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/paths.py": "from pkg.store.schema import tmp\n",
            "pkg/store/__init__.py": "from pkg.store.reader import Store\n",
            "pkg/store/schema.py": "tmp = 1\n",
            "pkg/store/reader.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pkg import paths\n",
        },
    )
    edges = import_graph.import_edges(modules, tmp_path)
    (chain,) = import_graph.circles(edges)
    assert [(e.source, e.target) for e in chain] == [
        ("pkg.paths", "pkg.store"),
        ("pkg.store", "pkg.store.reader"),
        ("pkg.store.reader", "pkg.paths"),
    ]
    # Inside its own package a module does not re-run the package's __init__.
    assert ("pkg.store.reader", "pkg") not in {(e.source, e.target) for e in edges}


def test_checker_passes_a_clean_package_and_flags_a_module_in_no_layer(tmp_path):
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.high import b\n",
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "import numpy\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from pkg.low import a\nfrom . import c\n",
            "pkg/high/c.py": "",
        },
    )
    assert import_graph.report(modules, tmp_path, LAYERS) == ""
    (tmp_path / "src" / "pkg" / "stray.py").write_text("")
    found = import_graph.report(import_graph.module_files(tmp_path / "src"), tmp_path, LAYERS)
    assert found == "in no layer (add it to LAYERS): pkg.stray"


def test_hydra_start_up_and_the_package_facade_load_no_torch():
    """Hydra imports every `hydra_plugins` module when any app starts, and `import traitsae` is
    the facade: neither may pull in torch or Lightning (seconds on every start)."""
    code = (
        "import sys, traitsae, hydra_plugins.traitsae_grouped_launcher.grouped_launcher\n"
        "print(sorted(m for m in ('torch', 'lightning', 'traitsae.training') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
