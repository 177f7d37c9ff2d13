"""eval=splice and eval=steer end to end through the CLI on a CUB-layout set that is not the
demo (tests/causal_helpers.py's second set: seed 7, 6 species, SAEs at blocks 2 and 3 of 4)."""

from __future__ import annotations

import json

import pytest
from causal_helpers import second_cli


def test_steer_from_the_cli_on_a_second_set(tmp_path):
    done = second_cli("steer", tmp_path, overrides=["eval.target_class=003.Gamma_warbler"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "steer.json").read_text())
    assert result["verdict"]["evidence"] is True and result["n_images"] == 32
    assert "rises at every alpha: True; beats the control at every alpha > 0: True" in done.stdout
    assert "non_finite" not in result


def test_splice_from_the_cli_on_a_second_set(tmp_path):
    done = second_cli("splice", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads((tmp_path / "splice.json").read_text())["metrics"]}
    assert {"embedding_cosine", "probe_accuracy"} <= rows.keys()
    cosine = rows["embedding_cosine"]
    assert cosine["clean"] == pytest.approx(1.0) and cosine["zero_ablated"] < cosine["spliced"] < 1
    for row in rows.values():  # recovered is a number, or n/a with its reason
        assert row["recovered"] is not None or row["recovered_why"]
    assert "embedding_cosine" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("name", "overrides"), [("splice", []), ("steer", ["eval.target_class=003.Gamma_warbler"])]
)
def test_an_sae_at_the_last_block_is_refused_from_the_cli(tmp_path, name, overrides):
    """Patch tokens edited at tiny's last block never reach its CLS read-out: splice used to
    report cosine 1.0 and `recovered —` with exit 0, steer to blame eval.n_candidates."""
    done = second_cli(name, tmp_path, run="train-last", overrides=overrides)
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: eval={name} would be vacuous: the SAE sits at block 3")
    assert "earlier layer" in error and "Traceback" not in done.stderr
    assert not (tmp_path / f"{name}.json").exists()
