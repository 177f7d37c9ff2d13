"""The explorer: its data layer against direct computations, every page driven by AppTest on the
planted store (trait latents 0 and 1 sit on known patches of group A / B images), bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from discovery_helpers import BLOCKS, SHARED, TRAIT_A, TRAIT_B, block_mask, compose_cfg
from explore_helpers import (
    APP,
    COLOUR_BAR,
    explore_overrides,
    planted_session,
    prepare_without_port,
    select_on_chart,
)

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.explore.data import ExplorerData
from traitsae.explore.index import build_index
from traitsae.explore.session import SESSION_ENV, check_port_free, prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    cfg, session, store = planted_session(root)
    path = session.save(root / "explore" / "session.json")
    return root, session, path, store


@pytest.fixture(scope="module")
def data(planted):
    return ExplorerData(planted[1])


@pytest.fixture
def app(planted, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(SESSION_ENV, str(planted[2]))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    return at


def dense_codes(store_path, sae) -> np.ndarray:
    with Store(store_path) as store, torch.no_grad():
        acts_NPD = torch.from_numpy(store.patches(3)[()].astype(np.float32))
        codes = sae.encode(acts_NPD.reshape(-1, acts_NPD.shape[-1]))
    return codes.reshape(acts_NPD.shape[0], acts_NPD.shape[1], -1).numpy()


# ----------------------------------------------------------------------------- data layer


def test_index_matches_dense_max_pooling():
    rng = np.random.default_rng(0)
    codes_NPS = rng.random((7, 4, 5)) * (rng.random((7, 4, 5)) < 0.3)
    flat_RS = codes_NPS.reshape(-1, 5)
    rows, cols = np.nonzero(flat_RS)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(flat_RS)))])
    index = build_index(indptr, cols.astype(np.int32), flat_RS[rows, cols], 4, 5)
    scores_NS = codes_NPS.max(axis=1)
    for v in range(7):
        lo, hi = index.img_indptr[v], index.img_indptr[v + 1]
        dense = np.zeros(5)
        dense[index.img_latent[lo:hi]] = index.img_score[lo:hi]
        np.testing.assert_allclose(dense, scores_NS[v], rtol=1e-6)
    for s in range(5):
        lo, hi = index.lat_indptr[s], index.lat_indptr[s + 1]
        expected = np.sort(scores_NS[:, s][scores_NS[:, s] > 0])[::-1]
        np.testing.assert_allclose(index.lat_score[lo:hi], expected, rtol=1e-6)
        np.testing.assert_allclose(scores_NS[index.lat_image[lo:hi], s], expected, rtol=1e-6)
    np.testing.assert_array_equal(index.patch_fires, (flat_RS > 0).sum(axis=0))


def test_latent_table_agrees_with_eval_features(planted, data):
    from traitsae.evaluation.core.firing import scan

    _, _, _, store = planted
    with Store(store.path) as opened:
        stats, _ = scan(opened, data.sae, top_k=16)
    table = data.latent_table()
    assert len(table) == data.d_sae == 32
    # Codes are stored as float16: scores agree to float16 precision.
    np.testing.assert_allclose(table.patch_freq, stats.patch_freq)
    np.testing.assert_allclose(table.image_freq, stats.image_freq)
    np.testing.assert_allclose(table.max_score, stats.image_max_S, rtol=2e-3)
    np.testing.assert_allclose(table.mean_image_score, stats.mean_image_max, rtol=2e-3, atol=1e-6)
    assert table.label_entropy[TRAIT_A] == 0 and table.label_entropy[SHARED] > 0.5


def test_maps_and_reconstruction_error_match_the_sae(planted, data):
    _, _, _, store = planted
    codes_NPS = dense_codes(store.path, data.sae)
    rows, _ = data.top_images(TRAIT_A, 3)
    maps = data.latent_maps(TRAIT_A, rows)
    np.testing.assert_allclose(maps.reshape(3, -1), codes_NPS[rows, :, TRAIT_A], rtol=2e-3)
    r, c = BLOCKS[TRAIT_A]
    assert (maps[:, r : r + 2, c : c + 2] > 0).all() and maps.sum() == pytest.approx(
        maps[:, r : r + 2, c : c + 2].sum()
    )
    with Store(store.path) as opened:
        x_PD = torch.from_numpy(opened.patches(3)[int(rows[0])].astype(np.float32))
    with torch.no_grad():
        err_P = ((x_PD - data.sae.decode(data.sae.encode(x_PD))) ** 2).sum(-1) / (x_PD**2).sum(-1)
    np.testing.assert_allclose(data.reconstruction_error(int(rows[0])).ravel(), err_P, rtol=1e-5)


def test_search_ranks_the_planted_trait_first(data):
    species = np.asarray(data.metadata["species"])
    alpha, beta = np.flatnonzero(species == "001.Alpha"), np.flatnonzero(species == "002.Beta")
    scores = data.image_scores
    assert data.search(scores(alpha[:4]), scores(beta[:4])).latent.iloc[0] == TRAIT_A
    assert data.search(scores(beta[:3]), scores(alpha[:5])).latent.iloc[0] == TRAIT_B
    # Patches as examples: the SHARED block of Alpha images against the rest of those images.
    block = np.flatnonzero(block_mask(SHARED).ravel())
    outside = np.arange(16)  # the top two patch rows
    pos = np.stack([data.region_scores(int(i), block) for i in alpha[:3]])
    neg = np.stack([data.region_scores(int(i), outside) for i in alpha[:3]])
    ranking = data.search(pos, neg)
    assert ranking.latent.iloc[0] == SHARED and ranking.rate_gap.iloc[0] == 1.0
    with pytest.raises(TraitsaeError, match="at least one positive"):
        data.search(np.zeros((0, data.d_sae)), scores(beta))


# ----------------------------------------------------------------------------- pages


def test_latents_page_table_and_gallery(app):
    table = app.dataframe(key="latent_table").value
    plain = {"patches firing", "images firing", "label mix (bits)", "top activation"}
    assert len(table) == 32 and plain <= set(table) and "patch_freq" not in set(table)
    app.number_input(key="latent").set_value(TRAIT_A).run()
    images = app.get("image")
    captions = [c for img in images for c in img.captions]
    top = [c for c in captions if " · " in c]
    assert len(top) == 12 and all(c.startswith("Alpha · ") for c in top)  # wraps at spaces
    assert any("latent 0" in m.value for m in app.subheader)
    assert any("label mix 0.00 bits" in m.value for m in app.markdown)
    assert any(COLOUR_BAR in m.value for m in app.markdown)  # a colour scale over the gallery
    assert app.query_params["latent"] in (str(TRAIT_A), [str(TRAIT_A)])  # the URL reopens it


def test_every_column_has_plain_help():
    import pandas as pd

    from traitsae.explore.views import table as columns

    raw = pd.DataFrame(
        {c: [0.5] for c in columns.CORE}
        | {"cub_trait": ["has_crown"], "cub_precision@10": [0.9], "discovery_rank": ["A#1"]}
    )
    shown = columns.display_table(raw)
    assert list(shown.columns[:4]) == [
        "latent",
        "CUB trait",
        "trait precision @10",
        "discovery rank",
    ]
    assert all("_" not in c for c in shown.columns)  # no code identifiers
    config = columns.column_config(shown)
    assert all(config[c]["help"] for c in shown.columns)
    assert columns.default_sort(shown) == "trait precision @10"


def test_url_reopens_a_latent(planted, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(SESSION_ENV, str(planted[2]))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["latent"] = str(TRAIT_B)
    at.run()
    assert not at.exception and at.number_input(key="latent").value == TRAIT_B
    assert any(h.value == f"Top images of latent {TRAIT_B}" for h in at.subheader)


def test_lower_activation_bands_and_co_firing(data):
    rows, scores = data.band_images(SHARED, 0.75, 1.0, 4)
    all_scores = data.latent_scores(SHARED)  # best first
    assert len(rows) == 4 and scores.max() <= np.quantile(all_scores, 0.3)
    assert (np.diff(scores) <= 0).all()
    assert len(data.band_images(TRAIT_A, 0.0, 0.25, 16)[0]) == 3  # 12 firing images
    together = data.co_firing(TRAIT_A, 5)
    # TRAIT_A's images all carry SHARED; SHARED fires on twice as many images: Jaccard 1/2.
    first = together.iloc[0]
    assert first.latent == SHARED and first["share of its images"] == 1.0
    assert first.Jaccard == pytest.approx(0.5) and TRAIT_B not in set(together.latent)


def test_lower_band_gallery_on_the_page(app):
    app.number_input(key="latent").set_value(SHARED).run()
    app.radio(key="band").set_value("low (bottom quarter)").run()
    captions = [c for img in app.get("image") for c in img.captions if " · " in c]
    top = sorted(float(c.rsplit(" · ", 1)[1]) for c in captions)
    assert 0 < len(top) <= 16 and max(top) < 2.0
    together = next(d.value for d in app.dataframe if "Jaccard" in d.value)
    assert together.latent.iloc[0] in (TRAIT_A, TRAIT_B)


def test_notes_are_saved_beside_the_run_and_shown(app, planted):
    from traitsae.explore.notes import read_notes

    notes_file = Path(planted[1].notes)
    assert notes_file == planted[0] / "run" / "explore_notes.json"
    notes_file.unlink(missing_ok=True)
    app.number_input(key="latent").set_value(TRAIT_B).run()
    app.text_area(key=f"note_{TRAIT_B}").input("beta crown spot").run()
    app.button(key="save_note").click().run()
    assert read_notes(notes_file) == {TRAIT_B: "beta crown spot"}
    assert not list(notes_file.parent.glob(".explore_notes.json.*"))  # no temp file left
    table = app.dataframe(key="latent_table").value
    assert table.set_index("latent").loc[TRAIT_B, "note"] == "beta crown spot"
    notes_file.unlink()


def test_bad_notes_file_is_an_error_naming_it(tmp_path):
    from traitsae.explore.notes import read_notes, save_note

    bad = tmp_path / "notes.json"
    bad.write_text("[1, 2]")
    with pytest.raises(TraitsaeError, match=f"notes file {bad}.*explore.notes="):
        read_notes(bad)
    assert save_note(tmp_path / "n.json", 3, "x") == {3: "x"}
    assert save_note(tmp_path / "n.json", 3, "  ") == {}  # an empty note drops it


def test_density_click_chooses_that_latent(app):
    from traitsae.explore.draw import DENSITY_PICK

    chosen = app.number_input(key="latent").value
    assert chosen != SHARED
    select_on_chart(app, "density", {DENSITY_PICK: [{"latent": SHARED}]})
    assert not app.exception and app.number_input(key="latent").value == SHARED
    assert any(h.value == f"Top images of latent {SHARED}" for h in app.subheader)
    top = [c for img in app.get("image") for c in img.captions if " · " in c]
    assert len(top) == 16  # SHARED fires on every image: a full gallery


def test_clicked_latent_reads_the_point_selection():
    from traitsae.explore.draw import DENSITY_PICK
    from traitsae.explore.views.latents import clicked_latent

    assert clicked_latent(None) is None
    assert clicked_latent({"selection": {DENSITY_PICK: {}}}) is None  # nothing picked yet
    assert clicked_latent({"selection": {DENSITY_PICK: [{"latent": 7}]}}) == 7


def test_latents_page_sort_and_filter(app):
    app.selectbox(key="sort_by").set_value("latent").run()
    assert app.dataframe(key="latent_table").value.latent.iloc[0] == 0  # ascending by default
    app.checkbox(key="descending_latent").check().run()
    assert app.dataframe(key="latent_table").value.latent.iloc[0] == 31
    app.selectbox(key="sort_by").set_value("label mix (bits)").run()  # a plain name sorts
    assert app.dataframe(key="latent_table").value.latent.iloc[0] == SHARED
    app.checkbox(key="hide_dead").check().run()
    shown = app.dataframe(key="latent_table").value
    assert {TRAIT_A, TRAIT_B, SHARED} <= set(shown.latent) and (shown["patches firing"] > 0).all()
    lo, hi = app.slider(key="window_log10_freq").value
    app.slider(key="window_log10_freq").set_value((lo, (lo + hi) / 2)).run()
    # SHARED fires on twice the patches of the trait latents: the lower window drops it.
    assert SHARED not in set(app.dataframe(key="latent_table").value.latent)


def open_beta_image(app):
    app.sidebar.radio(key="page").set_value("Image").run()
    app.selectbox(key="image_column").set_value("species").run()
    app.selectbox(key="image_value").set_value("002.Beta").run()
    return int(app.selectbox(key="image_row").value)


def test_image_page_latents_and_chosen_patches(app):
    from traitsae.explore.draw import PATCH_BOX, PATCH_PICK

    row = open_beta_image(app)
    latents = app.dataframe[0].value  # the latents firing most on the image
    assert {TRAIT_B, SHARED} <= set(latents.latent.head(2)) and TRAIT_A not in set(latents.latent)
    assert any("reconstruction error" in c for img in app.get("image") for c in img.captions)
    assert len(app.dataframe) == 1  # no patch chosen yet: no second table
    # A box over TRAIT_B's 2x2 block (patch units; patches whose centre lies inside).
    r, c = BLOCKS[TRAIT_B]
    select_on_chart(app, f"patch_grid_{row}", {PATCH_BOX: {"col": [c, c + 2], "row": [r, r + 2]}})
    chosen = app.dataframe[1].value
    assert chosen.latent.iloc[0] == TRAIT_B and chosen.inside.iloc[0] == pytest.approx(1.0)
    assert chosen.fires_on.iloc[0] == 4 and chosen.elsewhere.iloc[0] == 0
    assert SHARED not in set(chosen.latent)
    # Two patches clicked one by one: one of TRAIT_B's block, one of SHARED's.
    rs, cs = BLOCKS[SHARED]
    picks = [{"patch": r * 8 + c}, {"patch": rs * 8 + cs}]
    select_on_chart(app, f"patch_grid_{row}", {PATCH_PICK: picks})
    chosen = app.dataframe[1].value
    assert set(chosen.latent.head(2)) == {TRAIT_B, SHARED}
    assert (chosen.set_index("latent").loc[[TRAIT_B, SHARED], "fires_on"] == 1).all()
    assert (chosen.set_index("latent").loc[[TRAIT_B, SHARED], "elsewhere"] == 3).all()


def test_chosen_patches_are_the_picks_and_the_box():
    from traitsae.explore.draw import PATCH_BOX, PATCH_PICK
    from traitsae.explore.views.image import chosen_patches

    assert len(chosen_patches({PATCH_PICK: {}, PATCH_BOX: {}}, (4, 5))) == 0
    box = {"col": [3.2, 1.0], "row": [0.4, 1.6]}  # centres 1.5, 2.5 x 0.5, 1.5
    assert chosen_patches({PATCH_BOX: box}, (4, 5)).tolist() == [1, 2, 6, 7]
    both = {PATCH_PICK: [{"patch": 19}, {"patch": 2}], PATCH_BOX: box}
    assert chosen_patches(both, (4, 5)).tolist() == [1, 2, 6, 7, 19]


def test_chosen_patches_become_a_search_example(app):
    from traitsae.explore.draw import PATCH_BOX

    beta_row = open_beta_image(app)
    r, c = BLOCKS[TRAIT_B]
    box = {"col": [c, c + 2], "row": [r, r + 2]}
    select_on_chart(app, f"patch_grid_{beta_row}", {PATCH_BOX: box})
    # These patches positive, a whole Alpha image (the row before the Betas) negative.
    app.button(key="region_positive").click().run()
    app.sidebar.radio(key="page").set_value("Search by example").run()
    app.multiselect(key="neg_rows").set_value([beta_row - 1]).run()
    ranking = app.dataframe[0].value
    assert ranking.latent.iloc[0] == TRAIT_B, ranking.head()
    app.button(key="clear_regions").click().run()
    assert not app.session_state["region_examples"]


def test_search_page_ranks_the_planted_trait_first(app):
    app.sidebar.radio(key="page").set_value("Search by example").run()
    app.selectbox(key="pos_col").set_value("species").run()
    app.selectbox(key="pos_val").set_value("001.Alpha").run()
    app.selectbox(key="neg_col").set_value("species").run()
    app.selectbox(key="neg_val").set_value("002.Beta").run()
    ranking = app.dataframe[0].value
    assert ranking.latent.iloc[0] == TRAIT_A and ranking["firing gap"].iloc[0] == 1.0
    assert not app.exception
    # Each ranked latent drawn on the chosen examples themselves: 8 positives, 4 negatives.
    captions = [c for img in app.get("image") for c in img.captions]
    n_shown = min(3, len(ranking))
    assert sum(c.startswith("+ Alpha") for c in captions) == 8 * n_shown
    assert sum(c.startswith("− Beta") for c in captions) == 4 * n_shown


def test_compare_page_uses_discovery_ranking(app):
    app.sidebar.radio(key="page").set_value("Compare groups").run()
    ranking = app.dataframe[0].value  # the dataset's contrast pair by default
    top = {g: ranking[ranking.group == g].iloc[0] for g in ("A", "B")}
    assert top["A"].latent == TRAIT_A and top["B"].latent == TRAIT_B
    assert SHARED not in set(ranking.latent)
    # Each latent's AUROC reads for its own group: B's trait latent is 1.0, not 0.0.
    assert top["A"]["AUROC for its group"] == pytest.approx(1.0)
    assert top["B"]["AUROC for its group"] == pytest.approx(1.0)
    assert top["B"]["held-out AUROC"] == pytest.approx(1.0)
    # discovery_stats' evidence: a permutation p-value and the held-out confirmation.
    assert 0 < top["A"]["p"] < 0.05 and top["A"]["held-out AUROC"] == pytest.approx(1.0)
    words = [m.value for m in app.markdown] + [c.value for c in app.caption]
    assert any("tested latents" in w for w in words)  # the verdict sentences
    assert not any("latents.csv" in w or "{'" in w for w in words)  # no file it never writes
    assert any("images to rank" in w and "held out to confirm" in w for w in words)
    assert len([c for img in app.get("image") for c in img.captions]) >= 12


def test_verdict_settings_agree_with_the_page():
    from traitsae.explore.views.compare import plain_sentence

    sentence = "3 of 9 tested latents ...; 1 are dense, rare or below eval.min_auroc (latents.csv)."
    assert plain_sentence(sentence) == (
        "3 of 9 tested latents ...; 1 are dense, rare or below min_auroc (not in the table)."
    )


def test_guess_the_image_game_scores_a_right_answer(app, data):
    app.sidebar.radio(key="page").set_value("Guess the image").run()
    assert not app.exception and not app.error
    game = app.session_state["guess"]
    right = game["choices"].index(game["hidden"])
    clues = [m.value for m in app.markdown if m.value.startswith("latent ")]
    hidden_latents = set(data.image_latents(game["hidden"])[0][:4].tolist())
    assert {int(c.split()[1]) for c in clues} == hidden_latents
    app.button(key=f"guess_{right}").click().run()
    assert "Right" in app.success[0].value and app.session_state["guess_score"] == [1, 1]
    app.button(key="guess_next").click().run()
    assert app.session_state["guess"]["answered"] is None


# ----------------------------------------------------------------------------- bad input


def test_app_without_session_says_how_to_start(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv(SESSION_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "python explore.py" in at.error[0].value


def test_app_shows_a_broken_session_as_a_message(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from traitsae.explore.session import Session

    bad = Session(
        sae=str(tmp_path / "run"),
        store=str(tmp_path / "missing.h5"),
        codes=str(tmp_path / "codes.h5"),
        cache_dir=str(tmp_path),
        dataset="synthetic",
        split="test",
    ).save(tmp_path / "session.json")
    monkeypatch.setenv(SESSION_ENV, str(bad))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "missing.h5" in at.error[0].value


def test_no_store_and_no_codes_names_the_extract_command(tmp_path):
    from discovery_helpers import planted_sae, planted_store

    planted_sae(tmp_path / "run", planted_store(tmp_path / "elsewhere", n_per_group=2))
    cfg = compose_cfg("explore", explore_overrides(tmp_path), tmp_path / "explore")
    with pytest.raises(TraitsaeError, match="python extract.py backbone=tiny dataset=synthetic"):
        prepare_without_port(cfg, prepare)


def test_run_from_another_backbone_is_refused(planted, tmp_path):
    root = planted[0]
    cfg = compose_cfg("explore", [*explore_overrides(root), "backbone=dinov2_small"], tmp_path)
    with pytest.raises(TraitsaeError, match="trained on 'tiny'"):
        prepare_without_port(cfg, prepare)


def test_port_in_use_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TraitsaeError, match=f"port {port} .* in use.*explore.port="):
            check_port_free("127.0.0.1", port)


def test_prepare_reuses_codes_and_never_writes_into_store_or_run(planted, tmp_path):
    root, session, _, store = planted

    def snapshot():
        return {
            p: p.stat().st_mtime_ns
            for folder in (root / "run", store.path.parent)
            for p in folder.rglob("*")
        }

    before = snapshot()
    codes_mtime = os.stat(session.codes).st_mtime_ns
    cfg = compose_cfg("explore", explore_overrides(root), root / "explore")
    again = prepare_without_port(cfg, prepare)
    assert again.codes == session.codes and os.stat(session.codes).st_mtime_ns == codes_mtime
    assert snapshot() == before
    assert str(root / "explore" / "cache") in session.cache_dir


def explore_cli(root, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """`python explore.py` on the planted store, never opening a browser."""
    overrides = [o for o in explore_overrides(root) if not o.startswith("explore.port=")]
    command = [sys.executable, str(REPO / "explore.py"), *overrides, "explore.browser=false"]
    command += [f"hydra.run.dir={tmp_path / 'explore'}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", ["no store", "other backbone", "port in use"])
def test_cli_bad_input_is_one_error_line_and_exit_2(planted, tmp_path, case):
    from discovery_helpers import planted_sae, planted_store

    root = planted[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if case == "no store":  # an SAE whose store was never extracted here, and no codes
            root = tmp_path / "fresh"
            planted_sae(root / "run", planted_store(tmp_path / "elsewhere", n_per_group=2))
            result, expected = explore_cli(root, tmp_path), "python extract.py backbone=tiny"
        elif case == "other backbone":
            result = explore_cli(root, tmp_path, "backbone=dinov2_small")
            expected = "trained on 'tiny'"
        else:
            result = explore_cli(root, tmp_path, f"explore.port={port}")
            expected = f"port {port} on 127.0.0.1 is in use"
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_framed_pictures_are_cached_and_read_back(planted, data):
    row = int(data.top_images(TRAIT_A, 1)[0][0])
    cached = data.image_cache / f"{row}.png"
    cached.unlink(missing_ok=True)
    framed = data.image(row)
    assert cached.is_file() and framed.shape == (64, 64, 3)
    np.testing.assert_array_equal(data.image(row), framed)  # now from the PNG
    np.testing.assert_array_equal(data.image_source().load(str(data.paths[row])), framed)
    assert str(planted[0] / "explore" / "cache") in str(cached)  # the app's own folder


def test_later_launch_imports_no_torch(planted, tmp_path):
    """Once codes, index and the first page's pictures exist, explore.py's checks and the
    server's preload run without torch (the app's warm-up loads it after the first page)."""
    from omegaconf import OmegaConf

    from traitsae.explore.launch import warm_cache

    root, session, path, _ = planted
    warm_cache(session)
    cfg = compose_cfg("explore", explore_overrides(root), root / "explore")
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # resolvable
    OmegaConf.save(plain, tmp_path / "cfg.yaml", resolve=True)
    check = f"""
import sys
from unittest import mock
from omegaconf import OmegaConf
from traitsae.explore import server
from traitsae.explore.session import prepare
with mock.patch("traitsae.explore.session.check_port_free"):  # port 1 of the test config
    assert prepare(OmegaConf.load({str(tmp_path / "cfg.yaml")!r})).codes == {session.codes!r}
server.preload({str(path)!r})
from traitsae.explore.data import PRELOADED
assert PRELOADED and "torch" not in sys.modules
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_chart_specs_are_valid_vega_lite():
    """The hand-written specs (selection params, the picture layer) against Altair's Vega-Lite
    schema: the browser would otherwise show an empty chart, which AppTest cannot see."""
    import altair as alt
    import pandas as pd

    from traitsae.explore import draw

    table = pd.DataFrame(
        {
            "latent": [0, 1],
            "log10_freq": [-1.0, -2.0],
            "patch_freq": [0.1, 0.01],
            "mean_top_score": [1.0, 2.0],
            "label_entropy": [0.0, 1.0],
        }
    )
    charts = [
        draw.density_spec(table, 1),
        draw.patch_grid_spec(np.zeros((64, 64, 3), np.uint8), (8, 8)),
        draw.histogram_spec(np.array([0.5, 1.0]), 3, "latent 0"),
    ]

    def validate(frame, spec):
        full = {**spec, "data": {"values": frame.to_dict("records")}}
        (alt.LayerChart if "layer" in spec else alt.Chart).from_dict(full, validate=True)

    for frame, spec in charts:
        validate(frame, spec)
    with pytest.raises(Exception, match="Failed validating"):  # the check can fail
        validate(charts[1][0], {**charts[1][1], "layer": [{"mark": "no such mark"}]})


def test_sae_gone_after_launch_is_a_message_on_the_pages_that_need_it(
    planted, tmp_path, monkeypatch
):
    """The SAE loads lazily: without it the Latents page still works, the Image page says why
    it cannot show the reconstruction error (no traceback)."""
    import dataclasses

    from streamlit.testing.v1 import AppTest

    session = dataclasses.replace(planted[1], sae=str(tmp_path / "moved_run"))
    monkeypatch.setenv(SESSION_ENV, str(session.save(tmp_path / "session.json")))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error and len(at.dataframe[0].value) == 32
    at.sidebar.radio(key="page").set_value("Image").run()
    assert not at.exception and "no exported SAE at" in at.error[0].value


def test_foreground_pooling_ignores_background_patches(tmp_path):
    """explore.patches=foreground: image scores pool over the store's foreground flags only.
    Foreground = the left half of the grid: SHARED's block is in it, the trait blocks are not."""
    from discovery_helpers import GRID

    from traitsae.extraction.foreground import write_flags

    cfg, session, store = planted_session(tmp_path)
    with Store(store.path) as opened:
        n_images = opened.n_images
    left_RC = np.zeros(GRID, dtype=bool)
    left_RC[:, : GRID[1] // 2] = True
    write_flags(store.path, np.broadcast_to(left_RC.ravel(), (n_images, left_RC.size)), "{}")
    cfg = compose_cfg("explore", explore_overrides(tmp_path, "explore.patches=foreground"),
                      tmp_path / "explore")  # fmt: skip
    pooled = ExplorerData(prepare_without_port(cfg, prepare))
    everywhere = ExplorerData(session)
    assert pooled.session.patches == "foreground" and everywhere.session.patches == "all"
    assert everywhere.fire_counts()[TRAIT_A] == 12 and pooled.fire_counts()[TRAIT_A] == 0
    np.testing.assert_array_equal(pooled.latent_scores(SHARED), everywhere.latent_scores(SHARED))


def test_foreground_pooling_without_flags_is_an_error(planted, tmp_path):
    cfg = compose_cfg("explore", explore_overrides(planted[0], "explore.patches=foreground"),
                      tmp_path)  # fmt: skip
    with pytest.raises(TraitsaeError, match="no foreground flags"):
        prepare_without_port(cfg, prepare)


def test_clicked_table_row_chooses_its_latent(app):
    """A row clicked in the (sorted) table: its latent is shown, as the browser sends it."""
    import json

    shown = app.dataframe(key="latent_table").value
    states = app._tree.get_widget_states()
    state = states.widgets.add()
    state.id = app.dataframe(key="latent_table").proto.id
    state.string_value = json.dumps({"selection": {"rows": [2], "columns": []}})
    app._run(states)
    expected = int(shown.latent.iloc[2])
    assert app.number_input(key="latent").value == expected
    assert any(h.value == f"Top images of latent {expected}" for h in app.subheader)
