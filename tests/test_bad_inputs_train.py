"""train.py on bad input: one clear paragraph (TraitsaeError; `error: ...` and exit 2 from the
CLI), never a traceback, a wrapped Hydra error or a silently wrong run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra.utils import instantiate
from train_helpers import ROOT, compose_train, id_store, subprocess_env, train_overrides

from traitsae.data.store import create_store
from traitsae.errors import TraitsaeError
from traitsae.training import train


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "ids.h5"
    return id_store(path, n_images=64, n_patches=4, d_model=16, layers=(3,))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"data\.batch_size must be an integer >= 1, got 0"),
        ("data.tokens=foo", r"data\.tokens must be one of patches, cls, foreground, got 'foo'"),
        ("data.layer=abc", r"data\.layer must be an integer, got 'abc'"),
        ("data.val_fraction=2", r"data\.val_fraction must be a number in \[0, 1\)"),
        ("optim.lr=-0.001", r"optim\.lr must be a positive number, got -0\.001"),
        ("optim.lr=abc", r"optim\.lr must be a positive number, got 'abc'"),
        ("trainer.max_steps=0", r"trainer\.max_steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_are_named(store: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(TraitsaeError, match=message):
        train(compose_train([*train_overrides(store, tmp_path / "run"), override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.decay=exponential", r"optim\.decay='exponential' is unknown"),
        ("sae.b_dec_init=median", r"sae\.b_dec_init='median' is unknown"),
        ("sae.k=0", r"sae\.k=0 is out of range for sae=topk"),
        ("sae.dead_after_steps=0", r"sae\.dead_after_steps must be an integer >= 1"),
        ("sparsity=l1", None),  # a good setting: only the missing store stops the run
    ],
)
def test_bad_sae_and_objective_settings_fail_before_the_store_is_opened(
    tmp_path: Path, override: str, message: str | None
) -> None:
    """Typed configs are checked up front: a bad setting is named even when the store is
    missing (the store is opened only after every setting passed)."""
    overrides = [*train_overrides(tmp_path / "missing.h5", tmp_path / "run"), override]
    with pytest.raises(TraitsaeError, match=message or r"missing\.h5"):
        train(compose_train(overrides))


def test_the_cli_prints_one_paragraph_and_exits_2(store: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", *train_overrides(store, tmp_path / "run"), "data.layer=abc"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: data.layer must be an integer, got 'abc'")
    assert "Traceback" not in proc.stderr and "InstantiationException" not in proc.stderr


def test_foreground_tokens_without_flags_exit_2_naming_the_extract_option(
    store: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", *train_overrides(store, tmp_path / "run"),
         "data.tokens=foreground"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: data.tokens=foreground trains on the patches")
    assert "extract.foreground.rule" in proc.stderr and "Traceback" not in proc.stderr


def test_run_dir_that_is_a_file_is_refused(store: Path, tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(TraitsaeError, match=r"hydra\.run\.dir=\S+run is a file"):
        train(compose_train(train_overrides(store, tmp_path / "run")))


def _validation_images(overrides: list[str]) -> list[int]:
    dm = instantiate(compose_train(overrides).data)
    dm.prepare()
    return [i for a, b in dm.val_plan.blocks for i in range(a, b)]


def test_non_finite_held_out_vectors_stop_the_run(tmp_path: Path) -> None:
    path = id_store(tmp_path / "s.h5", n_images=64, n_patches=4, d_model=16, layers=(3,))
    overrides = train_overrides(path, tmp_path / "run", steps=4)
    held_out = _validation_images(overrides)
    with h5py.File(path, "r+") as f:
        f["patches/3"][held_out[0], 1, 2] = np.inf
    with pytest.raises(TraitsaeError, match=r"validation images holds non-finite activations"):
        train(compose_train(overrides))


def test_outliers_would_set_the_normaliser_and_are_refused(tmp_path: Path) -> None:
    path = id_store(tmp_path / "s.h5", n_images=64, n_patches=4, d_model=16, layers=(3,))
    with h5py.File(path, "r+") as f:
        f["patches/3"][:, 0, 2] = 60000.0  # finite in float16, ~10^4 x a typical vector
    with pytest.raises(
        TraitsaeError, match=r"normaliser sample holds \d+ of \d+ vectors longer than 1000 x"
    ):
        train(compose_train(train_overrides(path, tmp_path / "run")))


def test_an_unfinished_store_named_directly_trains_only_on_written_rows(tmp_path: Path) -> None:
    """`data.store=<store>.h5.tmp`: the rows extraction never wrote (zeros) are not trained on."""
    acts = np.random.default_rng(0).normal(size=(64, 4, 16)).astype(np.float16) + 3
    done = np.arange(64) < 40
    acts[~done] = 0
    tmp = create_store(
        tmp_path / "tiny.h5.tmp",
        patches={3: acts},
        cls={3: acts[:, 0]},
        images={"path": np.array(["x.jpg"] * 64), "done": done},
        attrs={"backbone": "tiny", "dataset": "synthetic", "split": "train", "complete": False},
    )
    overrides = train_overrides(tmp, tmp_path / "run", **{"data.allow_incomplete": "true"})
    dm = instantiate(compose_train(overrides).data)
    dm.prepare()
    assert dm.n_train_vectors + dm.n_val_vectors == 40 * 4
    assert np.abs(dm.sample.astype(np.float32)).min(axis=1).min() > 0  # no zero rows sampled


def test_an_unfinished_store_with_fewer_blocks_than_the_default_workers_is_named(tmp_path: Path):
    """`data.allow_incomplete=true` with the default 2 workers on a store of 3 written rows: one
    worker's stream had no vectors, and the run died with a traceback inside the DataLoader."""
    acts = np.random.default_rng(0).normal(size=(64, 4, 16)).astype(np.float16) + 3
    done = np.arange(64) < 3
    acts[~done] = 0
    tmp = create_store(
        tmp_path / "tiny.h5.tmp",
        patches={3: acts},
        cls={3: acts[:, 0]},
        images={"path": np.array(["x.jpg"] * 64), "done": done},
        attrs={"backbone": "tiny", "dataset": "synthetic", "split": "train", "complete": False},
    )
    overrides = train_overrides(
        tmp, tmp_path / "run", **{"data.allow_incomplete": "true", "data.num_workers": 2}
    )
    with pytest.raises(TraitsaeError, match=r"fewer than the 2 streams .*data.num_workers"):
        train(compose_train(overrides))
