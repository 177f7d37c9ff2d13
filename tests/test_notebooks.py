"""The notebooks run headless (jupytext -> nbclient) so they never rot."""

from __future__ import annotations

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


def test_classification_control_runs(tmp_path):
    """The notebook runs eval=steer's own computation and says what the CLI says: on the demo
    the probe cannot tell held-out Alpha images from Beta's, so the curve is no evidence."""
    from causal_helpers import ALPHA, BETA, demo_root

    root = demo_root()
    notebook = run_notebook(
        "classification_control",
        {
            "RUN": str(root / "train"),
            "ACTIVATIONS": str(root / "activations"),
            "DATA_ROOT": str(root / "data" / "synthetic"),
            "TARGET": ALPHA,
            "SOURCE": BETA,
            "ALPHAS": [0, 0.5, 1],
            "OUT": str(tmp_path / "out"),
        },
        tmp_path,
    )
    text = outputs_text(notebook)
    assert "informative: False" in text and "does not tell held-out" in text, text
    assert "control: 8 sets of frequency-matched random latents at equal norm" in text
    rows = [
        line.split() for line in text.splitlines() if line.strip().startswith(("0 ", "0.5 ", "1 "))
    ]
    assert [row[0] for row in rows] == ["0", "0.5", "1"], text
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
