"""train.py end to end in-process: run + export, resume after a kill, sweeps, wandb, errors."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from train_helpers import (
    ROOT,
    compose_train,
    dictionary_store,
    id_store,
    train_overrides,
)

import traitsae
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.training import train


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dictionary_store(tmp_path_factory.mktemp("store") / "tiny.h5")


def test_train_exports_a_loadable_sae_with_metrics(store: Path, tmp_path: Path) -> None:
    # data.store: d_model and backbone come from the store, whatever backbone= says (768 wide)
    run = train(compose_train(train_overrides(store, tmp_path / "run", 30, backbone="dinov2")))
    sae = traitsae.load_sae(run)
    meta = sae.meta
    assert (meta["backbone"], meta["dataset"], meta["layer"], meta["tokens"]) == (
        "tiny", "synthetic", 3, "patches",
    )  # fmt: skip
    assert (meta["d_model"], meta["d_sae"], meta["variant"], meta["steps"]) == (16, 64, "topk", 30)
    assert meta["store"] == str(store) and meta["config"]["sae"]["k"] == 4
    with Store(store) as s:
        x_raw = torch.from_numpy(s.patches(3)[:8].reshape(-1, 16))
    codes = sae.encode(x_raw)
    assert codes.shape == (128, 64) and ((codes > 0).sum(1) <= 4).all()
    fvu = (sae.decode(codes) - x_raw.float()).pow(2).sum() / (
        x_raw.float() - x_raw.float().mean(0)
    ).pow(2).sum()
    assert fvu < 0.9  # it learned something in 30 steps
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    for key in ("train/loss", "train/mse", "train/fvu", "train/l0", "train/l1", "train/dead_frac",
                "val/mse", "val/fvu", "val/l0", "val/l1", "val/dead_frac", "val/dense_frac"):  # fmt: skip
        assert key in logged
    assert (
        sorted(p.name for p in (run / "figures").glob("*.png"))[-1] == "firing_freq_step0000030.png"
    )
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("variant", ["relu", "batchtopk", "jumprelu", "matryoshka"])
def test_each_variant_trains_from_the_cli_config(store: Path, tmp_path: Path, variant: str) -> None:
    extra = (
        {"sae": variant, "sae.prefixes": "[16,32]"} if variant == "matryoshka" else {"sae": variant}
    )
    cfg = compose_train(train_overrides(store, tmp_path / "run", steps=6, **extra))
    expected = {"relu": "L1Penalty", "jumprelu": "L0Penalty"}.get(variant, "NoPenalty")
    assert cfg.sparsity._target_.endswith(expected)  # each family brings its own penalty
    run = train(cfg)
    assert traitsae.load_sae(run).meta["variant"] == variant


def test_a_new_penalty_is_one_class_and_a_target(store: Path, tmp_path: Path) -> None:
    """README: subclass SparsityPenalty, point `sparsity._target_` at it, train."""
    penalty = {"sparsity._target_": "train_helpers.LogPenalty", "+sparsity.coeff": 0.01}
    run = train(compose_train(train_overrides(store, tmp_path / "run", steps=6, **penalty)))
    with open(run / "csv" / "metrics.csv") as f:
        logged = [r["train/sparsity"] for r in csv.DictReader(f) if r.get("train/sparsity")]
    assert logged and all(float(p) > 0 for p in logged)


def _train_py_sweep(argv: list[str]) -> None:
    """Run train.py's task under @hydra.main in this process (config dir given absolutely)."""
    import hydra

    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.main.__wrapped__  # train.py's function, without its relative config_path
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train.py", *argv])
        hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")(task)()


def test_sweep_runs_one_job_per_combination(store: Path, tmp_path: Path) -> None:
    fixed = train_overrides(store, tmp_path / "unused", steps=3)
    overrides = [o for o in fixed if not o.startswith(("hydra.run", "sae.k="))]
    _train_py_sweep(["-m", "sae=topk,matryoshka", "sae.k=2,4",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])  # fmt: skip
    exported = sorted((tmp_path / "sweep").glob("*/sae.json"))
    assert len(exported) == 4
    combos = {
        (traitsae.load_sae(p).variant, traitsae.load_sae(p).sae.activation.k) for p in exported
    }
    assert combos == {("topk", 2), ("topk", 4), ("matryoshka", 2), ("matryoshka", 4)}


def test_wandb_logger_works_offline(store: Path, tmp_path: Path) -> None:
    run = train(compose_train(train_overrides(store, tmp_path / "run", steps=10, logger="wandb")))
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
    assert list((run / "figures").glob("*.png"))


def test_user_errors(store: Path, tmp_path: Path) -> None:
    with pytest.raises(
        MissingConfigException, match="(?s)batchtopk.*jumprelu.*matryoshka.*relu.*topk"
    ):
        compose_train(train_overrides(store, tmp_path / "run", sae="gated"))
    with pytest.raises(TraitsaeError, match=r"sae.k=99 .*d_sae=64"):
        train(compose_train(train_overrides(store, tmp_path / "a", **{"sae.k": 99})))
    with pytest.raises(TraitsaeError, match="prefixes"):
        train(
            compose_train(
                train_overrides(
                    store, tmp_path / "b", sae="matryoshka", **{"sae.prefixes": "[32,8]"}
                )
            )
        )
    with pytest.raises(TraitsaeError, match=r"layer 5 .*holds layers \[3\]"):
        train(compose_train(train_overrides(store, tmp_path / "d", **{"data.layer": 5})))


def test_local_sweep_of_ddp_jobs_is_refused(store: Path, tmp_path: Path) -> None:
    overrides = train_overrides(store, tmp_path / "run", trainer="ddp")
    cfg = compose_train([*overrides, "hydra.mode=MULTIRUN"])  # as under `train.py -m`
    with pytest.raises(TraitsaeError, match=r"local sweep \(-m\) .*trainer.devices=2"):
        train(cfg)


def test_non_finite_loss_stops_with_step_and_batch_statistics(store: Path, tmp_path: Path) -> None:
    diverging = {"optim.lr": 1e38, "optim.warmup_steps": 0, "trainer.gradient_clip_val": "null"}
    cfg = compose_train(train_overrides(store, tmp_path / "run", **diverging))
    with pytest.raises(
        TraitsaeError, match=r"(?s)non-finite loss at step [1-9].*lr=\S+e\+37.*max="
    ):
        train(cfg)


def test_non_finite_activations_in_the_store_are_named(tmp_path: Path) -> None:
    path = id_store(tmp_path / "inf.h5", n_images=64, n_patches=4, d_model=16, layers=(3,))
    import h5py

    with h5py.File(path, "r+") as f:
        f["patches/3"][:, 0, 2] = np.inf
    with pytest.raises(TraitsaeError, match=r"non-finite"):
        train(compose_train(train_overrides(path, tmp_path / "run")))


@pytest.mark.parametrize("workers", [0, 1])
def test_the_last_step_is_validated_and_summarised(
    store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    """7 steps, validation every 5: the final metrics are those of step 7, not of step 5.

    With loader workers the last validation builds its loader under Lightning's inference
    mode: the loader's rings must still be ordinary tensors (it once crashed make demo)."""
    extra = {"trainer.val_check_interval": 5, "data.num_workers": workers}
    overrides = train_overrides(store, tmp_path / "run", steps=7, **extra)
    with caplog.at_level("INFO", logger="traitsae.training"):
        run = train(compose_train(overrides))
    figures = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert figures == ["firing_freq_step0000005.png", "firing_freq_step0000007.png"]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done")]
    assert len(summary) == 1
    assert re.fullmatch(
        r"done, step 7: val FVU [\d.]+, L0 [\d.]+, dead [\d.]+, dense [\d.]+", summary[0]
    )
    fvu = traitsae.load_sae(run).meta["metrics"]["val/fvu"]
    assert summary[0].startswith(f"done, step 7: val FVU {fvu:.4g},")


def test_lightning_lines_print_once_without_adverts() -> None:
    """Hydra's root handler prints Lightning's records: Lightning's own console handler must not
    print them a second time, and its cloud-logger advert is dropped."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from traitsae.training.trainer import quiet_lightning_console

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler = Collect()
    root.addHandler(handler)
    try:
        quiet_lightning_console()
        lightning_logger = logging.getLogger("lightning")
        assert not [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
    finally:
        root.removeHandler(handler)
    assert seen == ["GPU available: False, used: False"]
