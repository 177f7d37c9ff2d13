"""The sparse training path end to end through train(): BatchTopK/Matryoshka in bf16-mixed."""

from __future__ import annotations

import json
import math

import pytest
from train_helpers import compose_train, dictionary_store, train_overrides

from traitsae.training import train


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_sparse_variants_train_in_bf16_mixed_on_cpu(variant: str, tmp_path) -> None:
    store = dictionary_store(tmp_path / "store.h5", n_images=64, n_patches=16, d_model=16)
    overrides = train_overrides(store, tmp_path / "run", steps=30, **{
        "sae": variant, "trainer.precision": "bf16-mixed", "trainer.val_check_interval": 30,
        "checkpoint.every_n_train_steps": 30, "trainer.gradient_clip_val": 1.0,
    })  # fmt: skip
    run = train(compose_train(overrides))
    record = json.loads((run / "sae.json").read_text())
    metrics = record["metrics"]
    assert math.isfinite(metrics["val/fvu"]) and math.isfinite(metrics["train/fvu"])
    assert metrics["train/l0"] == pytest.approx(4, rel=1e-6)  # exactly k x B entries kept
    assert record["config"]["trainer"]["precision"] == "bf16-mixed"
