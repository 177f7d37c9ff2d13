"""The notebooks run headless (jupytext -> nbclient) so they never rot."""

from __future__ import annotations

import re

import pytest
from discovery_helpers import NOTEBOOKS, outputs_text, planted_sae, planted_store, run_notebook


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


def test_classification_control_says_what_the_cli_says(tmp_path):
    """The notebook runs eval=steer's own computation on `make demo`'s steering set-up and prints
    the CLI's table line for line: the target's latents raise p(target) on held-out images of
    the other classes, above random latents, and the verdict is evidence."""
    from causal_helpers import makefile_value, steer_demo_cli, steer_demo_root

    root = steer_demo_root()
    cli, _ = steer_demo_cli()
    notebook = run_notebook(
        "classification_control",
        {
            "RUN": str(root / "steer-train"),
            "ACTIVATIONS": str(root / "activations"),
            "DATA_ROOT": str(root / "data" / "synthetic"),
            "TARGET": makefile_value("DEMO_STEER_TARGET"),
            "OUT": str(tmp_path / "out"),
        },
        tmp_path,
    )
    text = outputs_text(notebook)

    def table(output: str) -> list[str]:  # format_result's lines, not the progress bars'
        return [
            ln for ln in output.splitlines() if re.match(r" +(alpha|-?[\d.]+|rises|note:) ", ln)
        ]

    assert len(table(cli.stdout)) == 8 and table(text) == table(cli.stdout), (text, cli.stdout)
    assert "informative: True" in text and "'evidence': True" in text, text
    assert (tmp_path / "out" / "curve.png").exists()


def test_the_dev_install_has_what_jupytext_execute_needs():
    """`jupytext --execute notebooks/<name>.py` runs the notebook with nbconvert's executor (and
    nbclient, an ipykernel): the dev extra must install each of them."""
    import re
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dev = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in dev}
    assert {"jupytext", "nbconvert", "nbclient", "ipykernel"} <= names
