"""Heat-map metrics, group and strata filters, top-k, HTML reports: no store or SAE needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import frames, heatmaps
from traitsae.evaluation.core.firing import RunningTopK
from traitsae.evaluation.core.report import Card, Section, write_report
from traitsae.evaluation.discovery.groups import (
    group_mask,
    parse_group,
    parse_strata,
    strata_labels,
)


def morans_i_reference(map_RC: np.ndarray) -> float:
    """Textbook Moran's I with an explicit rook weight matrix."""
    rows, cols = map_RC.shape
    n = rows * cols
    weights = np.zeros((n, n))
    for r in range(rows):
        for c in range(cols):
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if 0 <= r + dr < rows and 0 <= c + dc < cols:
                    weights[r * cols + c, (r + dr) * cols + c + dc] = 1
    z = map_RC.ravel() - map_RC.mean()
    return n / weights.sum() * (z @ weights @ z) / (z @ z)


def test_entropy_bounds():
    one_hot = np.zeros((1, 16))
    one_hot[0, 5] = 3.0
    maps = np.concatenate([one_hot, np.ones((1, 16)), np.zeros((1, 16))])
    np.testing.assert_allclose(heatmaps.normalised_entropy(maps), [0.0, 1.0, 1.0], atol=1e-12)
    two = np.zeros((1, 16))
    two[0, :2] = 1
    np.testing.assert_allclose(heatmaps.normalised_entropy(two), np.log(2) / np.log(16))


def test_morans_i_matches_reference_and_orders_patterns():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 6, 7))
    ours = heatmaps.morans_i(maps)
    np.testing.assert_allclose(ours, [morans_i_reference(m) for m in maps], rtol=1e-10)

    blob = np.zeros((8, 8))
    blob[2:5, 3:6] = 1.0
    checker = np.indices((8, 8)).sum(axis=0) % 2
    scores = heatmaps.morans_i(np.stack([blob, checker, np.full((8, 8), 2.0)]))
    assert scores[0] > 0.5
    np.testing.assert_allclose(scores[1], -1.0)
    assert scores[2] == 0.0


def test_triage_score_prefers_specific_narrow_coherent():
    w = heatmaps.TriageWeights(alpha=1.0, beta=0.5, gamma=0.5)
    good = heatmaps.triage_score(0.9, 0.2, 0.8, w)
    diffuse = heatmaps.triage_score(0.9, 0.9, 0.0, w)
    np.testing.assert_allclose(good, 0.9 - 0.1 + 0.4)
    assert good > diffuse


def test_mass_inside_counts_upsampled_patches():
    heat = np.zeros((4, 4))
    heat[0, 0] = 3.0
    heat[3, 3] = 1.0
    mask = np.zeros((32, 32), dtype=bool)
    mask[:8, :8] = True  # exactly patch (0, 0)
    assert heatmaps.mass_inside(heat, mask) == pytest.approx(0.75)
    assert heatmaps.mass_inside(np.zeros((4, 4)), mask) == 0.0


METADATA = {
    "index": np.arange(6),
    "path": np.array([f"img{i}.png" for i in range(6)]),
    "valid": np.array([True, True, True, True, True, False]),
    "species": np.array(["erato", "erato", "melpomene", "melpomene", "erato", "erato"]),
    "subspecies": np.array(
        ["lativita", "notabilis", "malleti", "plesseni", "lativita", "lativita"]
    ),
}


def test_groups_filter_on_any_column_with_value_lists():
    group = parse_group({"species": "erato", "subspecies": ["lativita", "notabilis"]}, "group_a")
    assert group == {"species": ["erato"], "subspecies": ["lativita", "notabilis"]}
    mask = group_mask(METADATA, group, "group_a", "s.h5")
    np.testing.assert_array_equal(mask, [True, True, False, False, True, False])  # 5 is invalid


def test_unknown_column_lists_available_columns_and_counts():
    with pytest.raises(TraitsaeError) as err:
        group_mask(METADATA, {"sex": ["male"]}, "group_a", "s.h5")
    message = str(err.value)
    assert "'sex'" in message and "subspecies" in message and "'lativita' (2)" in message


def test_empty_group_lists_values_with_counts():
    with pytest.raises(TraitsaeError) as err:
        group_mask(METADATA, {"species": ["elevatus"]}, "group_b", "s.h5")
    assert "selects no valid image" in str(err.value)
    assert "'erato' (3)" in str(err.value) and "'melpomene' (2)" in str(err.value)


def test_strata_label_each_image_and_name_missing_columns():
    assert parse_strata(None) == [] and parse_strata("species") == ["species"]
    labels = strata_labels(METADATA, parse_strata(["species", "subspecies"]), "s.h5")
    assert labels[0] == "species=erato, subspecies=lativita" and len(labels) == 6
    with pytest.raises(TraitsaeError, match=r"\['collection'\].*'lativita' \(2\)"):
        strata_labels(METADATA, ["collection"], "s.h5")
    with pytest.raises(TraitsaeError, match="eval.strata must be"):
        parse_strata({"species": 1})


@pytest.mark.parametrize("spec", [None, {}, "erato", {"species": []}])
def test_bad_group_spec_is_a_user_error(spec):
    with pytest.raises(TraitsaeError):
        parse_group(spec, "group_a")


def test_running_topk_equals_full_sort():
    rng = np.random.default_rng(3)
    scores = rng.random((50, 7)).astype(np.float32)
    topk = RunningTopK(7, k=4)
    for start in range(0, 50, 9):
        topk.update(
            torch.from_numpy(scores[start : start + 9]), np.arange(start, min(start + 9, 50))
        )
    for col in range(7):
        rows, values = topk.top(col)
        expected = np.argsort(-scores[:, col])[:4]
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(values, scores[expected, col])


def test_report_opens_from_disk_with_relative_links(tmp_path):
    figure = tmp_path / "figures" / "a.png"
    figure.parent.mkdir()
    figure.write_bytes(b"")
    page = write_report(
        tmp_path / "index.html",
        "T <1>",
        "intro",
        [
            (
                "Group A",
                ["rank", "latent"],
                [{"rank": 1, "latent": 7, "anchor": "a-1"}],
                [Card("latent 7", "a-1", figure, {"auroc": 0.91234, "q": 2e-5, "ok": True})],
            ),
            Section("Group B", ["rank"], [], [], note="No discoveries: none of 9 latents."),
        ],
        link_column="latent",
    ).read_text()
    assert 'src="figures/a.png"' in page and 'href="#a-1"' in page
    assert "T &lt;1&gt;" in page and "0.912" in page and "http" not in page
    assert "q = 2.0e-05" in page and "ok = yes" in page
    assert "No discoveries: none of 9 latents." in page and "(nothing to show)" not in page


def test_patch_mask_marks_patches_the_trait_touches():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:14, 30:34] = True  # 4x4 px straddling patch cols 3 and 4 of an 8x8 grid
    patches = heatmaps.patch_mask(mask, (8, 8))
    assert patches.sum() == 2 and patches[1, 3] and patches[1, 4]
    assert not heatmaps.patch_mask(mask, (8, 8), min_cover=0.2).any()  # 8 of 64 px each


def test_frame_moves_masks_like_images(tmp_path):
    from PIL import Image

    pixels = np.zeros((80, 100, 3), dtype=np.uint8)
    pixels[20:40, 50:70] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    frame = frames.Frame.simple(40, "center_crop")  # 80x100 -> 40x50 -> crop cols 5..45
    framed_image = frame.image(tmp_path / "x.png")
    framed_mask = frame.mask(pixels[..., 0] > 0)
    assert framed_image.shape == (40, 40, 3) and framed_mask.shape == (40, 40)
    np.testing.assert_array_equal(framed_image[..., 0] > 127, framed_mask)
    assert framed_mask[10:20, 20:30].all() and framed_mask.sum() == 100
    with pytest.raises(TraitsaeError, match="does not exist"):
        frame.image(tmp_path / "missing.png")
