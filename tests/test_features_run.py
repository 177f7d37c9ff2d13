"""eval=features: one streaming pass, per-latent top-k, galleries and frequency statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from discovery_helpers import SHARED, TRAIT_A, TRAIT_B, planted_sae, planted_store

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.features import (
    frequency_histogram,
    galleries,
    scan,
    select_latents,
    write_features_index,
)
from traitsae.evaluation.heatmaps import Frame, ImageSource


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
    page = write_features_index(tmp_path, result).read_text()
    assert by_latent[TRAIT_A]["figure"] in page and "frequency.png" in page
