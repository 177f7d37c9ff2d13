"""eval=features: one streaming pass, per-latent top-k, galleries and frequency statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from discovery_helpers import SHARED, TRAIT_A, TRAIT_B, planted_sae, planted_store

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.firing import density_outputs, scan
from traitsae.evaluation.core.frames import Frame, ImageSource
from traitsae.evaluation.core.labels import label_entropy, top_image_summary
from traitsae.evaluation.latents.features import (
    frequency_histogram,
    galleries,
    select_latents,
    write_features_index,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from traitsae.sae.export import load_sae

    root = tmp_path_factory.mktemp("features")
    store = planted_store(root, n_per_group=12)
    return store, load_sae(planted_sae(root / "run", store))


def dense_image_scores(store_path, sae) -> np.ndarray:
    """Reference: every image's max-over-patches code, the way scan must compute it."""
    with Store(store_path) as store, torch.no_grad():
        acts_NPD = torch.from_numpy(store.patches(3)[()].astype(np.float32))
        codes_NPS = sae.encode(acts_NPD.reshape(-1, acts_NPD.shape[-1]))
        return codes_NPS.reshape(acts_NPD.shape[0], acts_NPD.shape[1], -1).amax(dim=1).numpy()


def test_scan_matches_a_dense_pass(planted):
    store, sae = planted
    expected_NS = dense_image_scores(store.path, sae)
    with Store(store.path) as opened:
        # batch_patches=128 -> 2 images per batch: the running top-k must merge across batches.
        stats, topk = scan(opened, sae, top_k=5, batch_patches=128)
    assert stats.n_images == 24 and stats.n_patches == 24 * 64
    np.testing.assert_allclose(stats.image_max_S, expected_NS.max(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(stats.image_fires_S, (expected_NS > 0).sum(axis=0))
    assert stats.patch_freq[TRAIT_A] == pytest.approx(4 / 64 / 2)  # 2x2 block, half the images
    for latent in (TRAIT_A, TRAIT_B, SHARED):
        rows, values = topk.top(latent)
        np.testing.assert_allclose(values, np.sort(expected_NS[:, latent])[::-1][:5], rtol=1e-6)
        np.testing.assert_allclose(expected_NS[rows, latent], values, rtol=1e-6)


def test_select_latents_by_list_or_frequency(planted):
    store, sae = planted
    with Store(store.path) as opened:
        stats, _ = scan(opened, sae, top_k=3)
    assert select_latents(stats, [2, 0], 0, 1, 10, seed=0).tolist() == [2, 0]
    # SHARED fires on 4/64 patches of every image, the two traits on half as many.
    assert select_latents(stats, None, 0.05, 1.0, 10, seed=0).tolist() == [SHARED]
    alive = select_latents(stats, None, 0.0, 1.0, 100, seed=0)
    assert {TRAIT_A, TRAIT_B, SHARED} <= set(alive.tolist())
    assert np.all(stats.patch_freq[alive] > 0)
    assert len(select_latents(stats, None, 0.0, 1.0, 2, seed=0)) == 2
    with pytest.raises(TraitsaeError, match="outside the SAE's latents"):
        select_latents(stats, [sae.d_sae], 0, 1, 10, seed=0)


def test_galleries_and_index(planted, tmp_path):
    store, sae = planted
    with Store(store.path) as opened:
        stats, topk = scan(opened, sae, top_k=4)
        entries = galleries(
            opened,
            sae,
            stats,
            topk,
            np.array([TRAIT_A, 5]),
            ImageSource(str(store.image_root), Frame.simple(64)),
            tmp_path,
        )
    by_latent = {e["latent"]: e for e in entries}
    assert len(by_latent[TRAIT_A]["top_images"]) == 4
    assert all(p.startswith("001.Alpha/") for p in by_latent[TRAIT_A]["top_images"])
    assert (tmp_path / by_latent[TRAIT_A]["figure"]).stat().st_size > 1000
    result = {
        "n_images": stats.n_images,
        "n_patches": stats.n_patches,
        "d_sae": sae.d_sae,
        "n_dead": 0,
        "n_dense": 0,
        "latents": entries,
    }
    frequency_histogram(stats, tmp_path / "frequency.png")
    with Store(store.path) as opened:
        mean_top_S, entropy_S = density_outputs(opened, stats, topk, tmp_path / "density.png", "t")
    for entry in entries:
        entry["mean_top_score"] = float(mean_top_S[entry["latent"]])
        entry["label_entropy"] = float(entropy_S[entry["latent"]])
    page = write_features_index(tmp_path, result).read_text()
    assert by_latent[TRAIT_A]["figure"] in page and "frequency.png" in page
    assert "density.png" in page and (tmp_path / "density.png").stat().st_size > 1000


def test_label_entropy_weights_images_by_score():
    labels_SK = np.array([[3, 3, 3, 3], [1, 2, 1, 2], [1, 2, -1, 5], [0, 1, 0, 0]])
    weights_SK = np.array([[1, 2, 3, 4], [1, 1, 1, 1], [1, 3, 9, 0], [0, 0, 0, 0]], float)
    entropy_S = label_entropy(labels_SK, weights_SK)
    # one class; two equal classes; 1:3 (unlabelled and zero-weight entries do not count); none
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(entropy_S[:3], [0.0, 1.0, -(p * np.log2(p)).sum()])
    assert np.isnan(entropy_S[3])


def test_top_image_summary_on_the_planted_store(planted):
    store, sae = planted
    with Store(store.path) as opened:
        stats, topk = scan(opened, sae, top_k=8)
        labels_N = np.asarray(opened.metadata["label"])
    values_SK, rows_SK = topk.values_KS.numpy().T, topk.rows_KS.numpy().T
    mean_S, entropy_S = top_image_summary(values_SK, rows_SK, labels_N)
    # A trait latent's top images are all of its group (one class); SHARED fires on both.
    assert entropy_S[TRAIT_A] == 0.0 and entropy_S[TRAIT_B] == 0.0
    assert entropy_S[SHARED] > 0.5
    np.testing.assert_allclose(mean_S[TRAIT_A], values_SK[TRAIT_A].mean(), rtol=1e-6)
    dead = np.flatnonzero(stats.patch_fires_S == 0)
    assert len(dead) and np.isnan(mean_S[dead]).all() and np.isnan(entropy_S[dead]).all()


def test_features_and_health_write_the_density_figure(planted, tmp_path):
    from discovery_helpers import compose_cfg

    from traitsae.evaluation.registry import run_evaluation

    store, _ = planted
    run_dir = store.path.parents[3] / "run"
    common = [
        f"run={run_dir}",
        f"paths.activations_dir={store.path.parents[2]}",
        "eval.draw_images=false",
    ]
    run_evaluation(compose_cfg("evaluate", ["eval=features", *common], tmp_path / "f"))
    header = (tmp_path / "f" / "latents.csv").read_text().splitlines()[0]
    assert header.endswith("mean_top_score,label_entropy")
    assert (tmp_path / "f" / "density.png").is_file()
    run_evaluation(compose_cfg("evaluate", ["eval=health", *common[:2]], tmp_path / "h"))
    assert (tmp_path / "h" / "health_density.png").stat().st_size > 1000


def test_scan_and_galleries_show_progress(planted, tmp_path, capsys):
    """eval=features on a large store ran for minutes without a word (no progress bar)."""
    store, sae = planted
    with Store(store.path) as opened:
        stats, topk = scan(opened, sae, top_k=2)
        galleries(opened, sae, stats, topk, np.array([TRAIT_A]),
                  ImageSource(str(store.image_root), Frame.simple(64)), tmp_path)  # fmt: skip
    err = capsys.readouterr().err
    assert "latent statistics" in err and "img" in err
    assert "galleries" in err and "latent" in err
