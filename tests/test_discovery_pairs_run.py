"""eval=discovery eval.pairs=<csv> eval.replicates=[...] on a generated collection: planted pairs
are found, null pairs make none, small pairs are skipped with their counts, candidates replicate
in SAEs that share their directions; bad pairs files and replicates are one-paragraph errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from discovery_helpers import (
    SHARED,
    TRAIT_A,
    TRAIT_B,
    collection_store,
    compose_cfg,
    planted_sae,
)

from traitsae.errors import TraitsaeError
from traitsae.evaluation.discovery.replicates import chance_cosine
from traitsae.evaluation.registry import run_evaluation

PAIRS = """pair,a,b
alpha_beta,subspecies=alpha,subspecies=beta
# a comment line, and a blank one below

gamma_halves,subspecies=gamma;collection=c1,subspecies=gamma;collection=c2
gamma_delta,subspecies=gamma,subspecies=delta|tiny
tiny_delta,subspecies=tiny,subspecies=delta
"""


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    store = collection_store(root, layers=(2, 3))
    run = planted_sae(root / "run", store, planted_decoder=True)
    # Replicates: another seed with the planted latents elsewhere, another width, another
    # layer; a sweep dir holding two of them (and, as a sweep would, the SAE under test).
    sweep = root / "sweep"
    seed1 = planted_sae(
        sweep / "0", store, seed=1, rows={TRAIT_A: 7, TRAIT_B: 3, SHARED: 12}, planted_decoder=True
    )
    wide = planted_sae(sweep / "1", store, d_sae=48, seed=2, planted_decoder=True)
    layer2 = planted_sae(root / "layer2", store, layer=2, seed=3, planted_decoder=True)
    (root / "pairs.csv").write_text(PAIRS)
    return store, run, root, {"seed1": seed1, "wide": wide, "layer2": layer2, "sweep": sweep}


def overrides(collection, *extra: str) -> list[str]:
    store, run, root, _ = collection
    return [
        "eval=discovery",
        f"run={run}",
        f"paths.root_dir={root}",
        f"paths.activations_dir={root / 'activations'}",
        f"eval.image_root={store.image_root}",
        "eval.n_top_images=3",
        "eval.n_candidates=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def pairs_run(collection, tmp_path_factory):
    _, _, root, reps = collection
    out = tmp_path_factory.mktemp("pairs_out")
    cfg = compose_cfg(
        "evaluate",
        overrides(
            collection,
            f"eval.pairs={root / 'pairs.csv'}",
            f"eval.replicates=[{reps['sweep']},{reps['layer2']}]",
        ),
        out,
    )
    return run_evaluation(cfg), out


def test_planted_pair_is_found_and_null_pairs_make_none(pairs_run):
    result, _ = pairs_run
    rows = {r["pair"]: r for r in result["pairs"]}
    assert list(rows) == ["alpha_beta", "gamma_halves", "gamma_delta", "tiny_delta"]
    # Beside the planted latents, a random latent that reads a little of TRAIT_B may count:
    # a true difference, not a false discovery.
    assert min(rows["alpha_beta"]["n_discoveries"].values()) >= 1
    for null_pair in ("gamma_halves", "gamma_delta"):
        assert rows[null_pair]["discoveries"] == 0 and rows[null_pair]["skipped_reason"] is None
    assert (rows["gamma_halves"]["n_a"], rows["gamma_halves"]["n_b"]) == (10, 10)
    assert rows["gamma_delta"]["n_b"] == 19  # delta|tiny: either value
    tops = {
        c["group"]: c for c in result["candidates"] if c["pair"] == "alpha_beta" and c["rank"] == 1
    }
    assert tops["a"]["latent"] == TRAIT_A and tops["b"]["latent"] == TRAIT_B
    assert all(tops[g]["discovery"] and tops[g]["confirmed"] for g in "ab")
    assert not any(c["discovery"] for c in result["candidates"] if c["pair"] != "alpha_beta")
    fdr = result["fdr"]
    assert fdr["pairs_tested"] == 3 and fdr["pairs_skipped"] == 1
    assert fdr["discoveries"] == rows["alpha_beta"]["discoveries"]
    assert fdr["tests"] == sum(
        rows[p]["tested"] for p in ("alpha_beta", "gamma_halves", "gamma_delta")
    )


def test_small_pair_is_skipped_with_its_counts(pairs_run):
    result, out = pairs_run
    tiny = next(r for r in result["pairs"] if r["pair"] == "tiny_delta")
    assert (tiny["n_a"], tiny["n_b"], tiny["tested"], tiny["discoveries"]) == (3, 16, None, None)
    assert "has 3 images (2 to select, 1 to confirm)" in tiny["skipped_reason"]
    assert not (out / "pairs" / "tiny_delta").exists()
    page = (out / "index.html").read_text()
    assert "tiny_delta: group A (subspecies=tiny) has 3 images" in page


def test_outputs_of_a_pairs_run(pairs_run):
    result, out = pairs_run
    saved = json.loads((out / "discovery.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for row in saved["pairs"]:
        assert {"pair", "a", "b", "n_a", "n_b", "tested", "discoveries", "skipped_reason"} <= set(
            row
        )
    assert saved["pairs"][1]["a"] == "subspecies=gamma;collection=c1"
    for cand in saved["candidates"]:
        assert (out / cand["figure"]).stat().st_size > 1000  # pairs/<pair>/figures/...
        assert cand["figure"].startswith(f"pairs/{cand['pair']}/figures/")
    page = (out / "index.html").read_text()
    for pair in ("alpha_beta", "gamma_halves", "gamma_delta"):
        assert f'href="pairs/{pair}/index.html"' in page
        pair_dir = out / "pairs" / pair
        assert (pair_dir / "index.html").exists() and (pair_dir / "latents.csv").exists()
        inner = json.loads((pair_dir / "discovery.json").read_text())
        assert inner["family_contrasts"] == 3
    assert 'href="pairs/alpha_beta/index.html#a-1"' in page  # the discovery, to its card
    assert (out / "figures" / "discoveries_per_pair.png").stat().st_size > 1000
    with (out / "candidates.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {r["pair"] for r in table} == {"alpha_beta"}  # the null pairs have no candidate
    assert {"replicated_in", "n_replicates"} <= set(table[0])


def test_candidates_replicate_in_saes_that_share_their_directions(pairs_run):
    result, out = pairs_run
    replicates = result["settings"]["replication"]["replicates"]
    assert len(replicates) == 3  # the sweep's two jobs, the layer-2 run; not the SAE itself
    notes = {r["d_sae"]: r["note"] for r in replicates}
    assert "width 48, not 32" in notes[48]
    assert any("layer 2, not 3" in r["note"] for r in replicates)
    for r in replicates:  # 16 dims: chance is high, and the threshold never below it
        assert r["threshold"] == max(0.7, r["chance_cosine"]) and r["chance_cosine"] > 0.7
    found = [c for c in result["candidates"] if c["pair"] == "alpha_beta" and c["discovery"]]
    tops = [c for c in found if c["latent"] in (TRAIT_A, TRAIT_B)]
    assert len(tops) == 2
    for top in tops:
        assert top["n_replicates"] == 3 and top["replicated_in"] == 3
        by_label = {t["replicate"]: t for t in top["replicates"]}
        assert set(by_label) == {"0", "1", "layer2"}  # run dir names (no swept overrides)
        assert by_label["0"]["latent"] == {TRAIT_A: 7, TRAIT_B: 3}[top["latent"]]
        assert all(t["cosine"] > 0.999 and t["q_value"] <= 0.05 for t in top["replicates"])
    # A discovery of a random latent that happens to read a little of a trait in this SAE has
    # no counterpart in the others: an accident of this seed, and the report says so.
    for accident in (c for c in found if c["latent"] not in (TRAIT_A, TRAIT_B)):
        assert accident["replicated_in"] == 0
        assert not any(t["matched"] for t in accident["replicates"])
    page = (out / "pairs" / "alpha_beta" / "index.html").read_text()
    assert "Replicates: " in page and "3/3" in page


def test_chance_cosine_matches_random_directions():
    rng = np.random.default_rng(0)
    d_model, d_sae = 16, 32
    w = rng.normal(size=(20_000, d_sae, d_model))
    u = rng.normal(size=(20_000, d_model))
    cos = (
        np.einsum("nsd,nd->ns", w, u)
        / np.linalg.norm(w, axis=2)
        / np.linalg.norm(u, axis=1)[:, None]
    )
    best = cos.max(axis=1)
    assert np.mean(best >= chance_cosine(d_model, d_sae)) == pytest.approx(0.001, abs=0.001)
    assert chance_cosine(768, 16384) == pytest.approx(0.19, abs=0.01)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            ["alpha_beta,subspecies=alpha,species=beta"],
            [r"line 2, column b", "'species'", "subspecies: "],
        ),
        (["alpha_beta,subspecies=alpha,"], [r"line 2, column b is empty"]),
        (
            ["alpha_beta,subspecies=alhpa,subspecies=beta"],
            ["line 2, column a", "alhpa", "'alpha' (16)"],
        ),
        (
            ["alpha_beta,subspecies alpha,subspecies=beta"],
            ["line 2, column a", "'subspecies alpha'", "column=value"],
        ),
        (
            ["x,subspecies=alpha;subspecies=gamma,subspecies=beta"],
            ["names column 'subspecies' twice", "subspecies=alpha|gamma"],
        ),
        (
            ["ab,subspecies=alpha,subspecies=beta", "ab,subspecies=gamma,subspecies=delta"],
            ["line 3", "'ab' is already used on line 2"],
        ),
        (["a/b,subspecies=alpha,subspecies=beta"], ["line 2", "'a/b' is not a folder name"]),
        (["ab,subspecies=alpha,subspecies=beta,extra"], ["line 2 has 4 cells"]),
        (
            ["ab,subspecies=alpha,subspecies=alpha|beta"],
            ["line 2 (pair 'ab'): groups a and b share 16 images"],
        ),
        ([], ["lists no pair"]),
        (
            ["t,subspecies=tiny,subspecies=delta"],
            ["every pair was skipped", "line 2 (t)", "has 3 images"],
        ),
    ],
)
def test_bad_pairs_files_are_one_paragraph_errors(collection, tmp_path, lines, expected):
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(["pair,a,b", *lines]) + "\n")
    cfg = compose_cfg("evaluate", overrides(collection, f"eval.pairs={path}"), tmp_path / "out")
    with pytest.raises(TraitsaeError) as err:
        run_evaluation(cfg)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_pairs_file_header_and_existence(collection, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("name,group_a,group_b\nx,subspecies=alpha,subspecies=beta\n")
    for target, fragment in (
        (path, "line 1 is 'name,group_a,group_b'"),
        (tmp_path / "no.csv", "no such file"),
    ):
        cfg = compose_cfg("evaluate", overrides(collection, f"eval.pairs={target}"), tmp_path)
        with pytest.raises(TraitsaeError, match=fragment):
            run_evaluation(cfg)
    cfg = compose_cfg(
        "evaluate",
        overrides(collection, f"eval.pairs={path}", "eval.group_a={subspecies: alpha}"),
        tmp_path,
    )
    with pytest.raises(TraitsaeError, match="were both given"):
        run_evaluation(cfg)


def test_replicates_of_another_backbone_are_an_error(collection, tmp_path):
    store, _, _, _ = collection
    other = planted_sae(tmp_path / "other", store, backbone="small")
    for target, fragment in (
        (other, "trained on 'small' activations"),
        (tmp_path / "missing", "does not exist"),
    ):
        cfg = compose_cfg(
            "evaluate",
            overrides(
                collection,
                "eval.group_a={subspecies: alpha}",
                "eval.group_b={subspecies: beta}",
                f"eval.replicates=[{target}]",
            ),
            tmp_path / "out",
        )
        with pytest.raises(TraitsaeError, match=fragment):
            run_evaluation(cfg)


def test_single_pair_with_replicates_keeps_its_outputs(collection, tmp_path):
    _, _, _, reps = collection
    cfg = compose_cfg(
        "evaluate",
        overrides(
            collection,
            "eval.group_a={subspecies: alpha}",
            "eval.group_b={subspecies: beta}",
            f"eval.replicates={reps['seed1']}",
            "eval.draw_images=false",
        ),
        tmp_path,
    )
    result = run_evaluation(cfg)
    assert "pairs" not in result and "pair" not in result["candidates"][0]
    assert result["groups"]["a"]["n_images"] == 16 and result["family_contrasts"] == 1
    top = result["candidates"][0]
    assert top["latent"] == TRAIT_A and top["replicated_in"] == 1 and top["n_replicates"] == 1
    assert Path(tmp_path / "index.html").exists()


def test_bad_match_cosine_is_a_user_error(collection, tmp_path):
    _, _, _, reps = collection
    cfg = compose_cfg(
        "evaluate",
        overrides(
            collection,
            "eval.group_a={subspecies: alpha}",
            "eval.group_b={subspecies: beta}",
            f"eval.replicates={reps['seed1']}",
            "eval.match_cosine=1.5",
        ),
        tmp_path,
    )
    with pytest.raises(TraitsaeError, match=r"eval.match_cosine=1.5 must be in \(0, 1\]"):
        run_evaluation(cfg)
