"""The notebooks run headless (jupytext -> nbclient) so they never rot."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from discovery_helpers import planted_sae, planted_store
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, parameters: dict, workdir: Path) -> nbformat.NotebookNode:
    """Execute notebooks/<name>.py with a parameters cell injected after the tagged one."""
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    tagged = [
        i
        for i, cell in enumerate(notebook.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert tagged, f"{name}.py has no cell tagged 'parameters'"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return notebook


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    store = planted_store(root, n_per_group=8)
    return store, planted_sae(root / "run", store), root


def test_notebooks_are_plain_text_percent_scripts():
    for path in sorted(NOTEBOOKS.glob("*.py")):
        text = path.read_text()
        assert "# %%" in text and '"outputs"' not in text, path


def test_explore_latents_runs(planted):
    store, run_dir, root = planted
    notebook = run_notebook(
        "explore_latents",
        {
            "RUN": str(run_dir),
            "STORE": str(store.path),
            "IMAGE_ROOT": str(store.image_root),
            "OUT": str(root / "explore"),
            "QUERY_IMAGE": 0,
            "QUERY_REGION": (1, 3, 5, 7),
        },
        root,
    )
    # The planted trait of group A sits at patch rows 1-2, cols 5-6 of image 0.
    assert "latents firing in region (1, 3, 5, 7) of image 0: [0" in outputs_text(notebook)
    assert (root / "explore" / "codes.h5").exists()
    assert (root / "explore" / "region_query.png").exists()


def test_discovery_walkthrough_runs(planted):
    store, run_dir, root = planted
    notebook = run_notebook(
        "discovery_walkthrough",
        {
            "RUN": str(run_dir),
            "STORE": str(store.path),
            "IMAGE_ROOT": str(store.image_root),
            "GROUP_A": {"species": ["001.Alpha"]},
            "GROUP_B": {"species": ["002.Beta"]},
            "MASK_TRAIT": None,
            "OUT": str(root / "walk"),
        },
        root,
    )
    assert "group A: 8 images, group B: 8 images" in outputs_text(notebook)
    assert (root / "walk" / "top_candidate.png").exists()
