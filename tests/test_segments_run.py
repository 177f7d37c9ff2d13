"""eval=segments end to end on a tiny generated dataset with masks and planted patch activations.

Every patch whose mask majority is trait t gets AMPLITUDE * v_t added to Gaussian noise; an oracle
SAE whose latent t fires on v_t must be selected for class t and find it (AP near 1), far above
random directions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import (
    AMPLITUDE,
    BACKBONE,
    DATASET,
    LAYER,
    compose_evaluate,
    make_sae,
    trait_directions,
)

from traitsae.data import synthetic
from traitsae.data.images.cub import load_cub
from traitsae.data.images.masks import patch_class_counts, patch_labels
from traitsae.data.store import create_store
from traitsae.errors import TraitsaeError
from traitsae.paths import store_path

D_MODEL, D_SAE, GRID = 16, 32, (8, 8)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    data = synthetic.generate(root / "synthetic", n_species=4, images_per_species=6)
    n_traits = len(synthetic.TRAITS)
    dirs_TD = trait_directions(n_traits, D_MODEL)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images = load_cub(data, split)
        patches = []
        for path in images.paths:
            mask = (data / "masks" / path.split("/images/")[1]).as_posix()
            from PIL import Image

            counts = patch_class_counts(np.asarray(Image.open(mask)), GRID, n_traits + 1)
            y_PT = patch_labels(counts, range(1, n_traits + 1), "majority")
            acts_PD = rng.standard_normal((64, D_MODEL)) + AMPLITUDE * y_PT @ dirs_TD
            patches.append(acts_PD.astype(np.float32))
        patches_NPD = np.stack(patches)
        create_store(
            store_path(root / "activations", DATASET, split, BACKBONE),
            patches={LAYER: patches_NPD},
            cls={LAYER: patches_NPD.mean(1)},
            images={"path": np.array(images.paths, dtype=object), "label": images.labels}
            | {k: np.array(v, dtype=object) for k, v in images.metadata.items()},
            attrs={"backbone": BACKBONE, "dataset": DATASET, "split": split, "depth": LAYER + 1,
                   "grid": list(GRID), "image_size": 64},
        )  # fmt: skip
    run_dir = make_sae(root / "run", D_MODEL, D_SAE, dirs_TD).parent
    return {"root": root, "data": data, "run": run_dir}


def overrides(ex, *extra):
    return [
        "eval=segments",
        f"run={ex['run']}",
        f"dataset.root={ex['data']}",
        f"paths.activations_dir={ex['root'] / 'activations'}",
        "eval.frame=stretch",  # 64 px images onto a 64 px input: identity (alignment: masks test)
        "eval.kmeans_clusters=16",
        "eval.n_samples=2000",
        "eval.n_bootstrap=200",
        "eval.probe_l2=[0.01]",
        "eval.probe_max_iter=50",
        "eval.methods=[sae,random,pca,probe]",
        *extra,
    ]


def test_planted_classes_are_found_by_their_latent(experiment, tmp_path, capsys):
    from traitsae.evaluation.segments.segments import run

    report = run(compose_evaluate(overrides(experiment), tmp_path))
    sae_rows = [r for r in report.per_class if r["method"] == "sae"]
    assert len(sae_rows) >= 4
    for row in sae_rows:
        assert row["best_direction"] == row["class_id"] - 1  # latent t carries trait t
        assert row["ap"] > 0.9 and row["probe_ap"] > 0.9
        assert row["probe_slope"] > 0
    mean = {(r["method"], r["metric"]): r["mean"] for r in report.summary}
    assert mean[("sae", "ap")] > mean[("random", "ap")] + 0.3
    assert mean[("probe", "ap")] > 0.9
    diff = next(
        d for d in report.paired_differences if d["method"] == "random" and d["metric"] == "ap"
    )
    assert diff["excludes_zero"] and diff["sae_minus_method"] > 0
    saved = json.loads((tmp_path / "segments.json").read_text())
    assert {"summary", "per_class", "skipped_classes", "paired_differences", "meta"} <= set(saved)
    for name in ("summary", "per_class", "skipped", "differences"):
        assert (tmp_path / f"segments_{name}.csv").stat().st_size > 0
    assert (tmp_path / "segments_methods.png").stat().st_size > 0
    assert "AP: sae - random" in capsys.readouterr().out


def test_reference_sae_and_bad_options(experiment, tmp_path):
    from traitsae.evaluation.segments.segments import run

    untrained = make_sae(tmp_path / "init", D_MODEL, D_SAE, seed=1)
    report = run(
        compose_evaluate(
            overrides(experiment, f"eval.reference={untrained}", "eval.methods=[sae]"), tmp_path
        )
    )
    diff = report.paired_differences[0]
    assert diff["method"] == "reference" and diff["excludes_zero"]
    with pytest.raises(TraitsaeError, match="eval.patch_rule"):
        run(compose_evaluate(overrides(experiment, "eval.patch_rule=most"), tmp_path))
    with pytest.raises(TraitsaeError, match="no segmentation masks"):
        run(compose_evaluate(overrides(experiment, "dataset.masks=null"), tmp_path))
