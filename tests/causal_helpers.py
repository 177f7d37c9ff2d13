"""The demo run shared by the splice, steer and notebook tests: built once per test process.

extract (train and test splits, block 1 of `backbone=tiny`) -> train (the demo's TopK SAE), all
under one temporary folder, exactly as `make demo` does through the CLI.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from discovery_helpers import compose_cfg, demo_sae
from omegaconf import DictConfig

DEMO_LAYER = 1
ALPHA, BETA = "001.Alpha_warbler", "002.Beta_warbler"


@functools.cache
def demo_root() -> Path:
    """A folder holding activations/ (train, test), data/ and train/ (the SAE's run dir)."""
    from traitsae.extraction import extract

    if os.environ.get("TRAITSAE_TEST_DEMO"):  # a demo built earlier (same layout): while debugging
        return Path(os.environ["TRAITSAE_TEST_DEMO"])
    root = Path(tempfile.mkdtemp(prefix="traitsae-causal-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    demo_sae(root, layer=DEMO_LAYER)
    extract(
        compose_cfg(
            "extract",
            [
                f"paths.root_dir={root}",
                "split=test",
                f"backbone.layers=[{DEMO_LAYER}]",
                "extract.num_workers=0",
                "extract.progress=false",
            ],
            root / "extract-test",
        )
    )
    return root


def evaluate_cfg(name: str, out: Path, overrides: list[str] = ()) -> DictConfig:
    """`evaluate.py eval=<name> run=<demo run> dataset=synthetic` composed in-process."""
    root = demo_root()
    return compose_cfg(
        "evaluate",
        [f"paths.root_dir={root}", f"eval={name}", f"run={root / 'train'}", *overrides],
        out,
    )
