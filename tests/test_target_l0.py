"""sae.target_l0: a logged controller adapts the sparsity coefficient until L0 hits the target."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from train_helpers import compose_train, dictionary_store, train_overrides

from traitsae.errors import TraitsaeError
from traitsae.sae.sparsity import L0Controller
from traitsae.training import train


def test_controller_raises_the_coefficient_while_l0_is_too_high_and_lowers_it_after() -> None:
    ctl = L0Controller(target=8.0)
    assert ctl.factor() == 1.0
    for _ in range(50):
        ctl.update(32.0)
    high = ctl.factor()
    assert high > 2.0
    for _ in range(50):
        ctl.update(2.0)
    assert ctl.factor() < high
    assert set(ctl.state_dict()) == {"log_integral", "l0_ema"}  # resumed from checkpoints


def test_relu_reaches_the_requested_l0(tmp_path) -> None:
    store = dictionary_store(tmp_path / "store.h5", n_images=256, n_patches=16, d_model=16)
    steps = 400
    overrides = train_overrides(store, tmp_path / "run", steps=steps, **{
        "sae": "relu", "sae.k": "null", "sae.target_l0": 6, "optim.lr": 0.005,
        "data.batch_size": 256, "trainer.val_check_interval": steps,
        "trainer.limit_val_batches": 20, "checkpoint.every_n_train_steps": steps,
    })  # fmt: skip
    run = train(compose_train(overrides))
    metrics = json.loads((run / "sae.json").read_text())["metrics"]
    assert metrics["val/l0"] == pytest.approx(6, rel=0.1)
    assert metrics["train/sparsity_coeff"] > 0.005  # started at sparsity.coeff, adapted up
    logged = (run / "csv").rglob("metrics.csv")
    assert any("train/sparsity_coeff" in p.read_text().splitlines()[0] for p in logged)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_target_l0_for_a_topk_family_is_a_clear_error(variant: str, tmp_path) -> None:
    from traitsae.sae.module import SAEModule

    cfg = compose_train([f"sae={variant}", "sae.d_sae=64", "sae.target_l0=8",
                         f"hydra.run.dir={tmp_path}"])  # fmt: skip
    sae = {**OmegaConf.to_container(cfg.sae, resolve=True), "d_model": 16}
    with pytest.raises(TraitsaeError, match=r"sae.target_l0=8 does not apply .* sae.k=32"):
        SAEModule(sae, OmegaConf.to_container(cfg.sparsity), OmegaConf.to_container(cfg.optim))
