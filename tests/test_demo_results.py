"""scripts/demo_results.py renders the demo's JSON outputs into the numbers docs/guide/demo.md shows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("demo_results", ROOT / "scripts/demo_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


def test_render_reads_every_number_from_the_outputs(tmp_path: Path) -> None:
    summary = {"protocol": "select_on_train", "k": 10, "ci_low": 0.5, "ci_high": 0.9}
    write(
        tmp_path / "cub_traits/cub_traits.json",
        {
            "summary": [{"method": "sae", "mean_precision": 0.812, "n_directions": 128} | summary],
            "r_precision": {
                "summary": [{"method": "sae", "mean_r_precision": 0.658} | summary],
            },
            "paired_differences": [
                {"method": "sae_init", "protocol": "select_on_train", "metric": "precision_at_k",
                 "k": 10, "sae_minus_method": 0.133, "ci_low": -0.001, "ci_high": 0.287,
                 "excludes_zero": False},
            ],
        },
    )  # fmt: skip
    candidate = {"rank": 1, "p_value": 0.002, "q_value": 0.06, "confirmed": True}
    write(
        tmp_path / "discovery/discovery.json",
        {
            "groups": {"a": {"name": "species=A", "n_images": 12}},
            "tested": 106,
            "candidates": [
                {"latent": 41, "group": "a", "auroc": 0.97, "confirm_auroc": 1.0} | candidate,
                {"latent": 7, "group": "b", "auroc": 0.08, "confirm_auroc": 0.35} | candidate,
            ],
        },
    )
    page = load_script().render(tmp_path)
    assert "| sae | 0.812 [0.500, 0.900] | 0.658 [0.500, 0.900] | 128 |" in page
    assert "| sae_init | P@10 | +0.133 [-0.001, +0.287] | no |" in page
    assert "| a | 1 | 41 | 0.97 |" in page
    assert "| b | 1 | 7 | 0.92 |" in page and "| 0.65 |" in page  # B read as B vs A
    assert "species=A (12 images)" in page
    assert "segments" not in page.split("How to read")[1].split("\n", 1)[1]  # no output, no section


def test_steer_section_reads_the_curve_control_and_verdict(tmp_path: Path) -> None:
    write(tmp_path / "cub_traits/cub_traits.json", {"summary": [], "r_precision": {"summary": []},
                                                    "paired_differences": []})  # fmt: skip
    point = {"frac_top1_target": 0.0, "control_mean_p_target": 0.044}
    write(
        tmp_path / "steer/steer.json",
        {
            "target_class": "001.Alpha_warbler",
            "latents": [63, 33, 38],
            "n_images": 32,
            "meta": {"backbone": "tiny_maxpool", "layer": 2, "depth": 4, "split": "test",
                     "train_split": "train"},
            "control": {"n_sets": 8},
            "curve": [
                {"alpha": 0, "mean_p_target": 0.044, "ci": [0.018, 0.071], "difference": 0.0,
                 "difference_ci": [0.0, 0.0]} | point,
                {"alpha": 4, "mean_p_target": 0.118, "ci": [0.071, 0.166], "difference": 0.099,
                 "difference_ci": [0.054, 0.143]} | point,
            ],
            "readout": {"p_target_on_target": 0.2, "p_target_on_source": 0.044,
                        "difference": 0.156, "difference_ci": [0.05, 0.26]},
            "verdict": {"monotonic": True, "beats_control": True, "readout_informative": True,
                        "evidence": True},
            "notes": [],
        },
    )  # fmt: skip
    page = load_script().render(tmp_path)
    assert "`tiny_maxpool`, SAE at block 2 of 4, latents [63, 33, 38]" in page
    assert "| 4 | 0.118 [0.071, 0.166] | 0.044 | +0.099 [+0.054, +0.143] | 0.000 |" in page
    assert "Evidence: **yes**" in page and "difference +0.156 [+0.050, +0.260]" in page


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    path.write_text(
        "\n".join([",".join(columns), *(",".join(str(r[c]) for c in columns) for r in rows)]) + "\n"
    )


def test_collection_section_counts_pairs_background_and_the_table(tmp_path: Path) -> None:
    coll = tmp_path / "collection"
    pairs = [
        {"pair": "lativita_malleti", "a": "subspecies=lativita", "b": "subspecies=malleti",
         "n_a": 40, "n_b": 40, "discoveries": 2},
        {"pair": "lativita_collection", "a": "subspecies=lativita;collection=c1",
         "b": "subspecies=lativita;collection=c2", "n_a": 20, "n_b": 20, "discoveries": 1},
    ]  # fmt: skip
    confirmed = {"discovery": True, "confirmed": True, "group": "a", "confirm_auroc": 0.9}
    for name, candidates in (
        ("all", [{"pair": "lativita_collection", "latent": 5, "rank": 1} | confirmed]),
        ("fg", [{"pair": "lativita_malleti", "latent": 7, "rank": 1} | confirmed,
                {"pair": "lativita_malleti", "latent": 8, "rank": 2, "discovery": True,
                 "confirmed": False, "group": "a", "confirm_auroc": 0.99}]),
    ):  # fmt: skip
        write(
            coll / f"discovery_{name}" / "discovery.json",
            {"alpha": 0.05, "pairs": pairs, "candidates": candidates},
        )

    def row(latent, sub, coll_, **values):
        base = {"latent": latent, "subspecies": sub, "collection": coll_, "area": 0.0,
                "centroid_x_fg": "", "centroid_y_fg": "", "total": 0.0, "outside": "",
                "max": 0.0, "max_outside": 0.0, "path": "/nowhere/images/a.png"}  # fmt: skip
        return base | values

    write(coll / "traits_table" / "traits_table.json", {"grid": [8, 8]})
    write_csv(
        coll / "traits_table" / "traits_table.csv",
        [
            row(7, "lativita", "c1", area=0.2, centroid_x_fg=0.1, centroid_y_fg=0.9),
            row(7, "lativita", "c2", area=0.4, centroid_x_fg=0.3, centroid_y_fg=0.7),
            row(7, "malleti", "c1", area=0.05),
        ],
    )
    write_csv(  # latent 1: 3/4 of its mass off the specimen; latent 2: 1/4; latent 3 never fires
        coll / "latents_all" / "traits_table.csv",
        [row(1, "x", "c1", total=2.0, outside=1.0), row(1, "x", "c2", total=2.0, outside=0.5),
         row(2, "x", "c1", total=4.0, outside=0.25), row(3, "x", "c1")],
    )  # fmt: skip
    write_csv(  # candidate 5 of group a (lativita, c1): the background wins in 2 of 3 images
        coll / "candidates_all" / "traits_table.csv",
        [row(5, "lativita", "c1", max=1.0, max_outside=2.0),
         row(5, "lativita", "c1", max=1.0, max_outside=3.0),
         row(5, "lativita", "c1", max=2.0, max_outside=1.0),
         row(5, "lativita", "c2", max=0.0, max_outside=5.0)],
    )  # fmt: skip
    text = load_script().collection_section(coll)
    assert "| lativita_malleti | white_hindwing_spot | 40 / 40 | 2 / 0 | 2 / 1 |" in text
    assert "| lativita_collection | none (null) | 20 / 20 | 1 / 1 | 1 / 0 |" in text
    assert "every patch: planted pairs with a confirmed discovery 0 of 1" not in text  # of 3
    assert "every patch: planted pairs with a confirmed discovery 0 of 3" in text
    assert "foreground: planted pairs with a confirmed discovery 1 of 3" in text
    assert "any discovery at q <= 0.05: 1 of 4" in text  # the null pair, in both runs
    assert "1 of the 2 firing latents" in text
    assert "2 of 1 take" not in text and "1 of 1 take their image score" in text
    assert "| lativita_malleti | 7 | a | 0.300 | 0.050 | (0.20, 0.80) | — |" in text  # no masks
    numbers = load_script().collection_numbers(coll)
    assert numbers.startswith("With foreground tokens 1 of 3 planted pairs have a confirmed")
    assert "(0 of 3 on every patch)" in numbers and "1 of 4 pairs without" in numbers
    assert "1 of the SAE's 2 firing latents fire mostly on the background" in numbers


def test_replace_block_rewrites_only_between_the_markers() -> None:
    replace = load_script().replace_block
    text = "a\n<!-- generated: x -->\nold\n<!-- end: x -->\nb\n"
    assert replace(text, "x", "new") == "a\n<!-- generated: x -->\nnew\n<!-- end: x -->\nb\n"
    assert replace("no markers\n", "x", "new") == "no markers\n"


def test_an_undefined_number_reads_n_a() -> None:
    """write_json writes NaN as null: the tables must not die on it."""
    script = load_script()
    assert script.ci({"v": 0.5, "ci_low": None, "ci_high": 0.9}, "v") == "0.500 [n/a, 0.900]"
    assert script.signed_ci({"v": None, "ci_low": -0.1, "ci_high": 0.2}, "v") == (
        "n/a [-0.100, +0.200]"
    )
