"""cub_traits' evidence: the probe bounds the other methods, coverage and R-precision mean what
they say, seeds spread, and the paired comparison tells a trained SAE from its initialisation."""

import numpy as np
import pytest
from eval_helpers import compose_evaluate, experiment_overrides, make_sae, planted_experiment
from test_cub_traits_run import FAST, METHODS

from traitsae.evaluation.core.precision import precision_at_k_loop, precision_at_trait_k
from traitsae.evaluation.registry import run_evaluation

UNSUPERVISED = [m for m in METHODS if m != "probe"]
K_COVER = 30  # some planted traits have >= 30 test positives, some fewer


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return planted_experiment(tmp_path_factory.mktemp("power"))


def _run(experiment, tmp_path, *extra, run_dir=None):
    overrides = experiment_overrides(experiment, *FAST, f"eval.k=[5,{K_COVER}]", *extra)
    if run_dir is not None:
        overrides[0] = f"run={run_dir}"
    return run_evaluation(compose_evaluate(overrides, tmp_path))


@pytest.fixture(scope="module")
def oracle(experiment, tmp_path_factory):
    return _run(experiment, tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def untrained(experiment, tmp_path_factory):
    """A random SAE (the architecture at init, no planted rows): the probe has real work."""
    root = tmp_path_factory.mktemp("untrained")
    run_dir = make_sae(root / "run", 16, 32, variant="topk", seed=5).parent
    return _run(experiment, root, run_dir=run_dir)


def _by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


@pytest.mark.parametrize("which", ["oracle", "untrained"])
def test_probe_is_an_upper_bound(which, request):
    rep = request.getfixturevalue(which)
    summary = _by(rep.summary, "method", "protocol", "k")
    r_summary = _by(rep.r_summary, "method", "protocol")
    for protocol in ("select_on_train", "select_on_test"):
        for m in UNSUPERVISED:
            for k in (5, K_COVER):
                probe = summary[("probe", protocol, k)]["mean_precision"]
                assert probe >= summary[(m, protocol, k)]["mean_precision"] - 1e-9, (m, k)
    # R-precision on test, chosen on test: by construction. (Chosen on train it bounds the others
    # only up to the noise of the choice: on the oracle 0.987 vs the SAE's 0.989.)
    for m in UNSUPERVISED:
        probe_r = r_summary[("probe", "select_on_test")]["mean_r_precision"]
        assert probe_r >= r_summary[(m, "select_on_test")]["mean_r_precision"] - 1e-9, m
    # By construction, per trait and seed, on the split the choice is made on.
    per = _by(rep.per_trait, "method", "protocol", "k", "trait", "seed")
    for (m, protocol, k, trait, seed), row in per.items():
        if m != "probe" and protocol == "select_on_train":
            bound = per[("probe", protocol, k, trait, seed)]["selection_precision"]
            assert bound >= row["selection_precision"] - 1e-9


def test_patch_level_probe_finds_planted_traits_a_random_sae_misses(untrained):
    summary = _by(untrained.summary, "method", "protocol", "k")
    probe = summary[("probe", "select_on_train", K_COVER)]["mean_precision"]
    assert probe >= 0.95 > summary[("sae", "select_on_train", K_COVER)]["mean_precision"] + 0.15
    # ... and it is the probes themselves (not a borrowed direction) that win there.
    winners = [
        r["best_method"]
        for r in untrained.per_trait
        if r["method"] == "probe" and r["k"] == K_COVER and r["protocol"] == "select_on_train"
    ]
    assert winners.count("probe") > len(winners) / 2


def test_precision_at_k_averages_only_traits_with_k_positives(oracle, experiment):
    n_pos_T = experiment["test_NT"].sum(0)
    covered = int((n_pos_T >= K_COVER).sum())
    assert 0 < covered < len(n_pos_T)
    for row in oracle.summary:
        per = [
            r["precision"]
            for r in oracle.per_trait
            if (r["method"], r["protocol"], r["k"]) == (row["method"], row["protocol"], row["k"])
        ]
        n_traits = covered if row["k"] == K_COVER else len(n_pos_T)
        assert row["n_traits"] == n_traits
        assert len(per) == n_traits * row["n_seeds"]
        assert row["mean_precision"] == pytest.approx(np.mean(per))
        assert all(r["n_pos"] >= row["k"] for r in oracle.per_trait if r["k"] == row["k"])


def test_r_precision_equals_a_naive_loop():
    rng = np.random.default_rng(0)
    scores_NM = rng.integers(0, 4, size=(60, 7)).astype(np.float32)  # ties included
    labels_NT = rng.random((60, 5)) < [0.1, 0.2, 0.3, 0.5, 0.2]
    n_pos_T = labels_NT.sum(0)
    fast_MT = precision_at_trait_k(scores_NM, labels_NT, n_pos_T, block=3)
    for t in range(5):
        np.testing.assert_allclose(
            fast_MT[:, t], precision_at_k(scores_NM, labels_NT[:, [t]], n_pos_T[t]), rtol=1e-6
        )
    continuous_NM = rng.standard_normal((60, 7)).astype(np.float32)
    fast_MT = precision_at_trait_k(continuous_NM, labels_NT, n_pos_T)
    for t in range(5):
        np.testing.assert_array_equal(
            fast_MT[:, t], precision_at_k_loop(continuous_NM, labels_NT[:, [t]], n_pos_T[t])[:, 0]
        )


def precision_at_k(scores_NM, labels_N1, k):
    """Naive expected precision@k under random tie-breaking, one direction at a time."""
    out = []
    for j in range(scores_NM.shape[1]):
        s_N, y_N = scores_NM[:, j], labels_N1[:, 0].astype(float)
        kth = np.sort(s_N)[::-1][k - 1]
        above, tied = s_N > kth, s_N == kth
        share = (k - above.sum()) / tied.sum()
        out.append((y_N[above].sum() + share * y_N[tied].sum()) / k)
    return np.array(out)


def test_r_precision_rows_cover_every_trait(oracle, experiment):
    n_traits = experiment["test_NT"].shape[1]
    for row in oracle.r_summary:
        assert row["n_traits"] == n_traits
    sae = [r for r in oracle.r_per_trait if r["method"] == "sae"]
    # The oracle SAE's latent t ranks trait t's images first (up to the noise of the planting).
    assert len(sae) == 2 * 2 * n_traits  # protocols x seeds x traits
    assert np.mean([r["r_precision"] for r in sae]) > 0.95


def test_seeds_repeat_the_random_methods_and_their_spread_is_reported(oracle):
    summary = _by(oracle.summary, "method", "protocol", "k")
    for row in summary.values():
        assert row["n_seeds"] == 2
        assert row["seed_min"] - 1e-9 <= row["mean_precision"] <= row["seed_max"] + 1e-9
    assert summary[("sae", "select_on_train", K_COVER)]["seed_sd"] == 0.0  # no seed involved
    seeds = {r["seed"] for r in oracle.per_trait if r["method"] == "random"}
    assert seeds == {0, 1}
    best = {
        seed: [
            r["best_direction"]
            for r in oracle.per_trait
            if (r["method"], r["seed"], r["k"]) == ("sae_init", seed, 5)
        ]
        for seed in seeds
    }
    assert best[0] != best[1]  # another draw of the initialisation picks other latents


def test_paired_comparison_tells_trained_from_init(oracle, untrained):
    def diff(rep, metric):
        rows = [
            d
            for d in rep.paired_differences
            if (d["method"], d["protocol"], d["metric"]) == ("sae_init", "select_on_train", metric)
        ]
        return rows[0] if metric == "r_precision" else min(rows, key=lambda d: d["k"])

    told = diff(oracle, "r_precision")
    assert told["excludes_zero"] and told["ci_low"] > 0.2
    # A random SAE *is* an initialisation: against other draws of it there is nothing to find.
    same = diff(untrained, "r_precision")
    assert not same["excludes_zero"] and abs(same["sae_minus_method"]) < 0.1
