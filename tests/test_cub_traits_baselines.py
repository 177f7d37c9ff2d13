"""Baseline directions: random, PCA (both signs), k-means, and the jointly solved linear probes."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import directions, probes


def test_random_directions_are_unit_and_seeded():
    u_MD = directions.random_directions(12, 50, seed=3)
    np.testing.assert_allclose(np.linalg.norm(u_MD, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(u_MD, directions.random_directions(12, 50, seed=3))
    assert not np.allclose(u_MD, directions.random_directions(12, 50, seed=4))


def test_pca_finds_the_dominant_axis_with_both_signs():
    rng = np.random.default_rng(0)
    axis_D = np.eye(6)[2]
    tokens_SD = rng.standard_normal((500, 6)) * 0.1 + rng.standard_normal((500, 1)) * 3 * axis_D
    dirs_MD = directions.pca_directions(tokens_SD.astype(np.float32))
    assert dirs_MD.shape == (12, 6)
    assert abs(dirs_MD[0] @ axis_D) > 0.99
    np.testing.assert_array_equal(dirs_MD[6:], -dirs_MD[:6])
    assert directions.pca_directions(tokens_SD, both_signs=False).shape == (6, 6)


def test_kmeans_centroids_and_too_many_clusters():
    rng = np.random.default_rng(0)
    centres_CD = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    tokens_SD = (
        centres_CD[rng.integers(3, size=600)] + 0.1 * rng.standard_normal((600, 3))
    ).astype(np.float32)
    found_CD = directions.kmeans_directions(tokens_SD, 3, seed=0)
    dist_CC = np.linalg.norm(found_CD[:, None] - centres_CD[None], axis=-1)
    assert dist_CC.min(axis=1).max() < 0.1
    with pytest.raises(TraitsaeError, match="kmeans_clusters=700"):
        directions.kmeans_directions(tokens_SD, 700, seed=0)


def test_joint_probes_equal_separate_sklearn_fits():
    rng = np.random.default_rng(1)
    x_ND = (rng.standard_normal((300, 5)) * [1, 2, 3, 0.5, 1] + 4).astype(np.float32)
    w_true_DT = rng.standard_normal((5, 3))
    labels_NT = (x_ND - 4) @ w_true_DT + rng.standard_normal((300, 3)) > 0
    l2 = 1e-2
    w_TD, b_T = probes.linear_probes(x_ND, labels_NT, l2=l2, max_iter=300)
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
    w_TD, _ = probes.linear_probes(x_ND, labels_NT, l2=[1e-4, 10.0], max_iter=100)
    # The informative trait keeps a weak penalty (big weight on feature 0); the noise trait is
    # shrunk hard: its probe would otherwise fit 40 random features to 120 coin flips.
    assert abs(w_TD[0, 0]) > 1.0
    assert np.abs(w_TD[1]).max() < 0.05


def test_centring_cannot_change_max_pooled_ranks_but_topk_does():
    """The issue's suspicion: 'random scores uncentred activations while the SAE subtracts
    b_dec'. For a linear direction, max_p u.(x_p - b) = max_p u.x_p - u.b: every image moves by
    the same constant, so rankings and precision@k are unchanged. What separates an SAE at init
    from random directions is TopK's competition between latents: sae_init measures that."""
    import torch

    from traitsae.evaluation.core.precision import precision_at_k
    from traitsae.sae.activations import topk_dense

    rng = np.random.default_rng(0)
    x_NPD = torch.from_numpy(rng.standard_normal((80, 9, 12)).astype(np.float32) + 2.0)
    labels_NT = rng.random((80, 3)) < 0.3
    u_MD = torch.from_numpy(directions.random_directions(12, 40, seed=1))
    b_D = x_NPD.reshape(-1, 12).mean(0)
    raw_NM = (x_NPD @ u_MD.T).amax(1)
    centred_NM = ((x_NPD - b_D) @ u_MD.T).amax(1)
    topk_NM = topk_dense(((x_NPD - b_D) @ u_MD.T).reshape(-1, 40), 3).reshape(80, 9, 40).amax(1)
    p_raw, p_centred, p_topk = (
        precision_at_k(s.numpy(), labels_NT, [10])[10] for s in (raw_NM, centred_NM, topk_NM)
    )
    np.testing.assert_allclose(p_raw, p_centred, atol=1e-6)
    assert not np.allclose(p_raw, p_topk)


def test_untrained_sae_is_the_architecture_at_init(tmp_path):
    import torch
    from eval_helpers import make_sae

    from traitsae import load_sae
    from traitsae.sae.activations import topk_dense

    sae = load_sae(make_sae(tmp_path / "run", 16, 48, variant="topk", seed=3))
    tokens_SD = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32) + 1.0
    init = directions.untrained_sae(sae, tokens_SD, seed=7)
    assert init.sae.architecture() == sae.sae.architecture() and init.scale == sae.scale
    w_SD = init.sae.W_enc.detach()
    np.testing.assert_allclose(w_SD, init.sae.W_dec.detach())  # tied
    np.testing.assert_allclose(w_SD.norm(dim=1), 1.0, rtol=1e-5)  # unit rows
    np.testing.assert_allclose(init.sae.b_dec.detach(), tokens_SD.mean(0) * sae.scale, rtol=1e-5)
    x_BD = torch.from_numpy(tokens_SD[:20])
    expected_BS = topk_dense((x_BD * sae.scale - init.sae.b_dec) @ w_SD.T, 8)
    np.testing.assert_allclose(init.encode(x_BD).detach(), expected_BS.detach(), atol=1e-5)
    again = directions.untrained_sae(sae, tokens_SD, seed=7)
    assert torch.equal(again.sae.W_enc, init.sae.W_enc)  # seeded, and the global RNG untouched
    assert not torch.equal(directions.untrained_sae(sae, tokens_SD, seed=8).sae.W_enc, w_SD)


def test_untrained_sae_starts_b_dec_by_the_runs_own_rule(tmp_path):
    from eval_helpers import make_sae

    from traitsae import load_sae
    from traitsae.sae.model import geometric_median

    sae = load_sae(make_sae(tmp_path / "run", 16, 48, variant="topk", seed=3))
    rng = np.random.default_rng(0)
    tokens_SD = rng.standard_normal((500, 16)).astype(np.float32) + 1.0
    tokens_SD[:50] += 40.0  # outliers pull the mean, not the median
    for rule in ("geometric_median", "zeros"):
        sae.meta["config"] = {"sae": {"b_dec_init": rule}}
        b_dec = directions.untrained_sae(sae, tokens_SD, seed=7).sae.b_dec.detach()
        x_SD = torch.from_numpy(tokens_SD) * sae.scale
        expected = geometric_median(x_SD.double()).float() if rule != "zeros" else 0 * x_SD[0]
        np.testing.assert_allclose(b_dec, expected, rtol=1e-5, atol=1e-6)
        assert rule == "zeros" or (b_dec - x_SD.mean(0)).norm() > 1.0


def test_patch_level_probe_learns_the_planted_direction(tmp_path):
    from eval_helpers import make_store, planted_activations, trait_directions

    from traitsae.data.store import Store
    from traitsae.evaluation.traits.probes import fit_trait_probes, probe_scores

    rng = np.random.default_rng(4)
    labels_NT = rng.random((90, 2)) < 0.4
    dirs_TD = trait_directions(2, 16)
    patches, cls = planted_activations(labels_NT, dirs_TD, n_patches=16, seed=5)
    path = make_store(tmp_path, "train", np.arange(1, 91), patches, cls)
    with Store(path) as store:
        sample = directions.sample_train_activations(store, 3, "patches", 5000, seed=0)
        probes = fit_trait_probes(store, 3, "patches", sample, labels_NT, [1e-3], 3, 2, 50, 0)
        oof_NX, test_NX = probe_scores(probes, store, store, 3, "patches")
    w_TD = probes.w_CD[probes.final_columns()].numpy()
    cos_T = (w_TD * dirs_TD).sum(1) / np.linalg.norm(w_TD, axis=1)
    assert (cos_T > 0.9).all()  # one patch in 16 carries the trait: the mean would dilute it
    # Out-of-fold scores come from the fold fits, the test scores from the fit on everything.
    assert oof_NX.shape == test_NX.shape == (90, 2) and not np.allclose(oof_NX, test_NX)
    for t in range(2):
        assert labels_NT[np.argsort(-oof_NX[:, t])[:20], t].mean() > 0.9
