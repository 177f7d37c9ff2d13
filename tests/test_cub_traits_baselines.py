"""Baseline directions: random, PCA (both signs), k-means, and the jointly solved linear probes."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from traitsae.errors import TraitsaeError
from traitsae.evaluation import baselines


def test_random_directions_are_unit_and_seeded():
    u_MD = baselines.random_directions(12, 50, seed=3)
    np.testing.assert_allclose(np.linalg.norm(u_MD, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(u_MD, baselines.random_directions(12, 50, seed=3))
    assert not np.allclose(u_MD, baselines.random_directions(12, 50, seed=4))


def test_pca_finds_the_dominant_axis_with_both_signs():
    rng = np.random.default_rng(0)
    axis_D = np.eye(6)[2]
    tokens_SD = rng.standard_normal((500, 6)) * 0.1 + rng.standard_normal((500, 1)) * 3 * axis_D
    dirs_MD = baselines.pca_directions(tokens_SD.astype(np.float32))
    assert dirs_MD.shape == (12, 6)
    assert abs(dirs_MD[0] @ axis_D) > 0.99
    np.testing.assert_array_equal(dirs_MD[6:], -dirs_MD[:6])
    assert baselines.pca_directions(tokens_SD, both_signs=False).shape == (6, 6)


def test_kmeans_centroids_and_too_many_clusters():
    rng = np.random.default_rng(0)
    centres_CD = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    tokens_SD = (
        centres_CD[rng.integers(3, size=600)] + 0.1 * rng.standard_normal((600, 3))
    ).astype(np.float32)
    found_CD = baselines.kmeans_directions(tokens_SD, 3, seed=0)
    dist_CC = np.linalg.norm(found_CD[:, None] - centres_CD[None], axis=-1)
    assert dist_CC.min(axis=1).max() < 0.1
    with pytest.raises(TraitsaeError, match="kmeans_clusters=700"):
        baselines.kmeans_directions(tokens_SD, 700, seed=0)


def test_joint_probes_equal_separate_sklearn_fits():
    rng = np.random.default_rng(1)
    x_ND = (rng.standard_normal((300, 5)) * [1, 2, 3, 0.5, 1] + 4).astype(np.float32)
    w_true_DT = rng.standard_normal((5, 3))
    labels_NT = (x_ND - 4) @ w_true_DT + rng.standard_normal((300, 3)) > 0
    l2 = 1e-2
    w_TD, b_T = baselines.linear_probes(x_ND, labels_NT, l2=l2, max_iter=300)
    # Per trait, mean BCE + l2 |w|^2 on standardised x == sklearn with C = 1 / (2 l2 N).
    mu_D, sd_D = x_ND.mean(0), x_ND.std(0, ddof=1)
    z_ND = (x_ND - mu_D) / sd_D
    for t in range(3):
        ref = LogisticRegression(C=1 / (2 * l2 * len(x_ND)), tol=1e-8, max_iter=1000).fit(
            z_ND, labels_NT[:, t]
        )
        np.testing.assert_allclose(w_TD[t] * sd_D, ref.coef_[0], rtol=2e-3, atol=2e-3)
        logits_N = x_ND @ w_TD[t] + b_T[t]  # raw-space weights reproduce the probe's logits
        np.testing.assert_allclose(logits_N, ref.decision_function(z_ND), rtol=2e-3, atol=5e-3)


def test_probe_regularisation_is_chosen_per_trait_on_held_out_images():
    rng = np.random.default_rng(2)
    x_ND = rng.standard_normal((120, 40)).astype(np.float32)
    labels_NT = np.stack([x_ND[:, 0] > 0, rng.random(120) < 0.5], axis=1)  # signal vs pure noise
    w_TD, _ = baselines.linear_probes(x_ND, labels_NT, l2=[1e-4, 10.0], max_iter=100)
    # The informative trait keeps a weak penalty (big weight on feature 0); the noise trait is
    # shrunk hard: its probe would otherwise fit 40 random features to 120 coin flips.
    assert abs(w_TD[0, 0]) > 1.0
    assert np.abs(w_TD[1]).max() < 0.05
