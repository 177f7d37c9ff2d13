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
