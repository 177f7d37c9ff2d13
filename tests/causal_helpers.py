"""The demo run shared by the splice, steer and notebook tests: built once per test process.

extract (train and test splits, block 1 of `backbone=tiny`) -> train (the demo's TopK SAE), all
under one temporary folder, exactly as `make demo` does through the CLI.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
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


SECOND_LAYER = 2  # block 2 of the tiny ViT's 4
LAST_LAYER = 3  # the last block: patch edits there cannot reach tiny's CLS read-out
SECOND_SPECIES = 6


@functools.cache
def second_root() -> Path:
    """A second CUB-layout set, not the demo: another seed, 6 species x 40 images (half train,
    half test), planted class traits; both splits extracted at blocks 2 and 3, an SAE trained
    on the train split at block 2 (`train/`) and a quick one at the last block (`train-last/`).
    Same folder layout as `demo_root()` (data/synthetic, activations, train)."""
    from traitsae.data.synthetic import generate
    from traitsae.extraction import extract
    from traitsae.training import train

    if os.environ.get("TRAITSAE_TEST_SECOND"):  # built earlier (same layout): while debugging
        return Path(os.environ["TRAITSAE_TEST_SECOND"])
    root = Path(tempfile.mkdtemp(prefix="traitsae-second-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    generate(root / "data" / "synthetic", seed=7, n_species=SECOND_SPECIES, images_per_species=40)
    for split in ("train", "test"):
        extract(
            compose_cfg(
                "extract",
                [
                    f"paths.root_dir={root}",
                    f"split={split}",
                    "dataset.seed=7",
                    f"backbone.layers=[{SECOND_LAYER},{LAST_LAYER}]",
                    "extract.num_workers=0",
                    "extract.progress=false",
                ],
                root / f"extract-{split}",
            )
        )
    train(
        compose_cfg(
            "train",
            [
                f"paths.root_dir={root}",
                "dataset.seed=7",
                f"data.layer={SECOND_LAYER}",
                "trainer.max_steps=600",
                "data.num_workers=0",
                "data.batch_size=1024",
                "trainer.enable_progress_bar=false",
                "sae.expansion=4",
                "sae.k=8",
                "optim.lr=4e-4",
            ],
            root / "train",
        )
    )
    train(
        compose_cfg(
            "train",
            [
                f"paths.root_dir={root}",
                "dataset.seed=7",
                f"data.layer={LAST_LAYER}",
                "trainer.max_steps=50",
                "data.num_workers=0",
                "data.batch_size=1024",
                "trainer.enable_progress_bar=false",
            ],
            root / "train-last",
        )
    )
    return root


def second_cfg(name: str, out: Path, overrides: list[str] = ()) -> DictConfig:
    """`evaluate.py eval=<name>` on the second set's SAE, composed in-process."""
    root = second_root()
    return compose_cfg(
        "evaluate",
        [
            f"paths.root_dir={root}",
            "dataset.seed=7",
            f"eval={name}",
            f"run={root / 'train'}",
            *overrides,
        ],
        out,
    )


# ----------------------------------------------------------------------------- make demo's steering

REPO = Path(__file__).resolve().parents[1]


def makefile_value(name: str) -> str:
    """The default of `NAME ?= value` in the Makefile: the tests build what `make demo` builds."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith(f"{name} ?="):
            return line.split("?=", 1)[1].strip()
    raise KeyError(f"{name} is not set in the Makefile")


def steer_demo_overrides(root: Path) -> list[str]:
    """`make demo`'s eval=steer command line (its paths under `root`)."""
    return [
        f"paths.root_dir={root}",
        "eval=steer",
        "dataset=synthetic",
        "split=test",
        f"run={root / 'steer-train'}",
        f"eval.target_class={makefile_value('DEMO_STEER_TARGET')}",
    ]


@functools.cache
def steer_demo_root() -> Path:
    """`make demo`'s steering set-up: the demo dataset, both splits extracted with
    backbone=tiny_maxpool at DEMO_STEER_LAYER, and an SAE trained there with DEMO_SAE (the
    Makefile's values, read from it) in `steer-train/`."""
    from discovery_helpers import compose_cfg

    from traitsae.extraction import extract
    from traitsae.training import train

    if os.environ.get("TRAITSAE_TEST_STEER_DEMO"):  # built earlier (same layout): while debugging
        return Path(os.environ["TRAITSAE_TEST_STEER_DEMO"])
    root = Path(tempfile.mkdtemp(prefix="traitsae-steer-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    layer = makefile_value("DEMO_STEER_LAYER")
    for split in ("train", "test"):
        extract(
            compose_cfg(
                "extract",
                [
                    f"paths.root_dir={root}",
                    "backbone=tiny_maxpool",
                    f"split={split}",
                    f"backbone.layers=[{layer}]",
                    "extract.num_workers=0",
                    "extract.progress=false",
                ],
                root / f"extract-{split}",
            )
        )
    train(
        compose_cfg(
            "train",
            [
                f"paths.root_dir={root}",
                "backbone=tiny_maxpool",
                f"data.layer={layer}",
                *makefile_value("DEMO_SAE").split(),
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
            ],
            root / "steer-train",
        )
    )
    return root


@functools.cache
def steer_demo_cli() -> tuple[subprocess.CompletedProcess, dict]:
    """`make demo`'s eval=steer run through the CLI (evaluate.py in a subprocess): its
    completed process (stdout holds the printed table) and steer.json."""
    root = steer_demo_root()
    out = root / "steer"
    result = evaluate_cli(steer_demo_overrides(root), out)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((out / "steer.json").read_text())


def evaluate_cli(overrides: list[str], out: Path) -> subprocess.CompletedProcess:
    """`python evaluate.py <overrides> hydra.run.dir=<out>` in a subprocess (the real CLI)."""
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg"),
        capture_output=True,
        text=True,
        timeout=600,
    )


def second_cli(name: str, out: Path, run: str = "train", overrides: list[str] = ()):
    """`evaluate.py eval=<name>` on the second set through the CLI; `run`: train | train-last."""
    root = second_root()
    args = [f"paths.root_dir={root}", "dataset=synthetic", "dataset.seed=7", f"eval={name}"]
    return evaluate_cli([*args, f"run={root / run}", *overrides], out)
