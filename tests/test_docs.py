"""The generated docs (`scripts/docs.py`) match the code and the tree they are generated from:
docs/guide/store.md (the store schema) and ARCHITECTURE.md's layout block and layers table."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("docs_generator", ROOT / "scripts" / "docs.py")
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)

from traitsae.data.store import schema  # noqa: E402

REGENERATE = ".venv/bin/python scripts/docs.py"


def test_the_generated_docs_are_current():
    stale = sorted(str(path.relative_to(ROOT)) for path in docs.stale())
    assert not stale, f"{stale} differ from what the code and tree give; run `{REGENERATE}`"


def test_a_schema_key_missing_from_the_page_is_caught(monkeypatch):
    added = schema.Key("images/weight", "dataset", "float32 [N]", False, "a new column")
    monkeypatch.setattr(schema, "SCHEMA", (*schema.SCHEMA, added))
    assert "| `images/weight` | dataset | float32 [N] |  | a new column |" in docs.store_page()
    assert ROOT / "docs/guide/store.md" in docs.stale()


def _copy_tree(tmp: Path) -> Path:
    """The parts of the repository the layout block reads, copied under `tmp`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "conf", "scripts", "benchmarks"):
        shutil.copytree(ROOT / name, tmp / name, ignore=ignore)
    for name in ("notebooks", "tests", "docs"):
        (tmp / name).mkdir()
    for name in docs.ENTRY_SCRIPTS:
        shutil.copy(ROOT / name, tmp / name)
    return tmp


def test_a_new_module_is_caught_with_its_docstring(tmp_path):
    root = _copy_tree(tmp_path)
    committed = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert docs.architecture(committed, root) == committed  # the copy gives the same block
    module = root / "src" / "traitsae" / "data" / "weights_table.py"
    module.write_text('"""Per-image weights: one float per row.\n\nMore detail."""\n')
    block = docs.layout_block(root)
    assert "    weights_table.py          Per-image weights: one float per row.\n" in block
    assert docs.architecture(committed, root) != committed
    module.unlink()
    (root / "src" / "traitsae" / "data" / "tables.py").unlink()  # a module that went away
    assert "tables.py" not in docs.layout_block(root)
