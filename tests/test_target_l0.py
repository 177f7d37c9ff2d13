"""sae.target_l0: a logged controller adapts the sparsity coefficient until L0 hits the target."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import compose_train, dictionary_store, train_overrides

from traitsae.errors import TraitsaeError
from traitsae.sae.model import build_sae
from traitsae.sae.sparsity import L0Controller, start_firing_at
from traitsae.training import train
from traitsae.training.config import TrainConfig


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
    # resumed from checkpoints
    assert set(ctl.state_dict()) == {"log_integral", "l0_ema", "l0_start", "n_updates"}


def test_reference_falls_log_linearly_from_the_first_l0_to_the_target_and_resumes() -> None:
    ctl = L0Controller(target=8.0, ramp_steps=100)
    assert ctl.reference() == 8.0  # nothing seen yet
    ctl.update(800.0)
    assert ctl.reference(0) == pytest.approx(800.0)
    assert ctl.reference(50) == pytest.approx(80.0)  # halfway in log space: sqrt(800 * 8)
    assert ctl.reference(100) == pytest.approx(8.0)
    assert ctl.reference(1000) == pytest.approx(8.0)
    for i in range(40):
        ctl.update(800.0 * 0.9**i)
    resumed = L0Controller(target=8.0, ramp_steps=100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.reference() == pytest.approx(ctl.reference())
    assert resumed.factor() == pytest.approx(ctl.factor())
    already_sparse = L0Controller(target=8.0, ramp_steps=100)
    already_sparse.update(4.0)
    assert already_sparse.reference(0) == 8.0  # starts below the target: nothing to ramp


@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
def test_firing_start_gives_the_requested_l0_on_held_out_vectors(variant: str) -> None:
    gen = torch.Generator().manual_seed(0)
    scales_D = torch.linspace(0.5, 3.0, 32)  # anisotropic: a quantile per latent, not one
    x_ND, held_ND = (torch.randn(2, 8192, 32, generator=gen) * scales_D + 1.0).unbind(0)
    sae = build_sae(variant, 32, 512, threshold_init=0.05, bandwidth=0.05)
    sae.init_b_dec(x_ND, "mean")
    start_firing_at(sae, x_ND, 16.0)
    with torch.no_grad():
        rate_S = (sae.encode(held_ND) > 0).float().mean(0)
    assert float(rate_S.sum()) == pytest.approx(16.0, rel=0.05)  # the L0
    assert float(rate_S.min()) > 0  # every latent fires, none far above its share
    assert float(rate_S.max()) < 3 * 16.0 / 512


@pytest.mark.parametrize(
    ("variant", "lr", "steps"), [("relu", 0.005, 400), ("jumprelu", 0.02, 600)]
)
def test_relu_and_jumprelu_reach_the_requested_l0_within_10_percent(
    variant: str, lr: float, steps: int, tmp_path
) -> None:
    store = dictionary_store(tmp_path / "store.h5", n_images=256, n_patches=16, d_model=16)
    overrides = train_overrides(store, tmp_path / "run", steps=steps, **{
        "sae": variant, "sae.k": "null", "sae.target_l0": 6, "optim.lr": lr,
        "data.batch_size": 256, "trainer.val_check_interval": steps,
        "trainer.limit_val_batches": 20, "checkpoint.every_n_train_steps": steps,
    })  # fmt: skip
    run = train(compose_train(overrides))
    metrics = json.loads((run / "sae.json").read_text())["metrics"]
    assert abs(metrics["val/l0"] / 6 - 1) <= 0.1, metrics["val/l0"]
    start = compose_train(overrides).sparsity.coeff
    assert metrics["train/sparsity_coeff"] > start  # started at sparsity.coeff, adapted up
    logged = (run / "csv").rglob("metrics.csv")
    assert any("train/sparsity_coeff" in p.read_text().splitlines()[0] for p in logged)


def test_controller_does_not_wind_up_while_l0_is_already_falling() -> None:
    # L0 falls 5 % a step (as fast as Adam's step size lets it, whatever the coefficient): the
    # integral must hold, not store up a coefficient that collapses L0 once it arrives.
    falling = [8.0 + 992.0 * 0.95**i for i in range(200)]
    # (a gain well below the bound, so that the plain integral shows how much it stores)
    held = L0Controller(target=8.0, integral_gain=0.03)
    plain = L0Controller(target=8.0, integral_gain=0.03, horizon=0.0)
    for l0 in falling:
        held.update(l0)
        plain.update(l0)
    assert float(plain.log_integral) > 5.0  # what integrating all along would have stored
    assert float(held.log_integral) < float(plain.log_integral) / 4  # only the EMA's start-up lag
    for _ in range(100):  # stalled above the target: now the integral rises
        held.update(16.0)
    assert float(held.log_integral) > 1.0


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_target_l0_for_a_topk_family_is_a_clear_error(variant: str, tmp_path) -> None:
    cfg = compose_train([f"sae={variant}", "sae.d_sae=64", "sae.target_l0=8",
                         f"hydra.run.dir={tmp_path}"])  # fmt: skip
    with pytest.raises(TraitsaeError, match=r"sae.target_l0=8 does not apply .* sae.k=32"):
        TrainConfig.from_cfg(cfg)  # checked up front, before the store is opened


@pytest.mark.parametrize(
    ("override", "match"),
    [("sae.target_l0_start=-1", r"sae.target_l0_start=-1 must be >= 0"),
     ("sae.target_l0_ramp=1.5", r"sae.target_l0_ramp=1.5 must be a fraction of the run")],
)  # fmt: skip
def test_bad_firing_start_or_ramp_is_a_clear_error(override: str, match: str, tmp_path) -> None:
    cfg = compose_train(["sae=relu", "sae.d_sae=64", "sae.target_l0=8", override,
                         f"hydra.run.dir={tmp_path}"])  # fmt: skip
    with pytest.raises(TraitsaeError, match=match):
        TrainConfig.from_cfg(cfg)  # checked up front, before the store is opened


@pytest.mark.parametrize(
    ("overrides", "match"),
    [(["sae=relu", "sae.target_l0=100000"],
      r"sae.target_l0=100000 latents firing per vector is impossible with 1024 latents"),
     (["sae=relu", "sae.target_l0=1024"], r"impossible with 1024 latents"),
     (["sae=relu", "sae.target_l0=abc"], r"sae.target_l0 must be a positive number, got 'abc'"),
     (["sae=topk", "sae.target_l0=abc"], r"sae.target_l0 must be a positive number, got 'abc'"),
     (["sae=relu", "sae.target_l0=8", "sae.target_l0_ramp=x"],
      r"sae.target_l0_ramp must be a number, got 'x'")],
)  # fmt: skip
def test_an_impossible_or_unreadable_target_l0_is_a_clear_error(
    overrides: list[str], match: str, tmp_path
) -> None:
    cfg = compose_train([*overrides, "sae.d_sae=1024", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(TraitsaeError, match=match):
        TrainConfig.from_cfg(cfg)  # checked up front, before the store is opened


def test_a_target_l0_above_the_latents_of_an_expansion_is_refused_once_they_are_known(
    tmp_path,
) -> None:
    """sae.expansion=4: d_sae is 4 x the store's d_model, known when the SAE is built."""
    cfg = compose_train(["sae=relu", "sae.d_sae=null", "sae.expansion=4", "sae.target_l0=100",
                         f"hydra.run.dir={tmp_path}"])  # fmt: skip
    config = TrainConfig.from_cfg(cfg)
    from traitsae.sae.module import SAEModule

    with pytest.raises(TraitsaeError, match=r"target_l0=100 latents .* impossible with 64 lat"):
        SAEModule(config.architecture.build(16), config.objective, config.optim)
