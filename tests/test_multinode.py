"""The 2-node DDP sbatch script (traitsae.cluster.sbatch): its train.py overrides compose, and in
each task of a (faked) 2-node job Lightning's SLURMEnvironment sees that task's rank."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_helpers import compose_train, id_store, train_overrides

from traitsae.cluster.sbatch import ddp_script, srun_overrides


def test_two_node_script_asks_tasks_per_node_not_ntasks() -> None:
    script = ddp_script(["sae.k=32"], nodes=2, gpus_per_node=4, run_dir="/shared/run")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script and "--ntasks=" not in script
    assert srun_overrides(script)[-1] == "sae.k=32"


@pytest.mark.parametrize(("node", "local_rank"), [(0, 0), (1, 2)])
def test_lightning_sees_each_task_of_a_two_node_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node: int, local_rank: int
) -> None:
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment

    store = id_store(tmp_path / "s.h5")
    base = train_overrides(store, tmp_path / "run")
    # 4 tasks a node on CPUs: the same script a GPU job gets, without the GPUs.
    script = ddp_script(base, nodes=2, gpus_per_node=0, tasks_per_node=4, run_dir=str(tmp_path))
    cfg = compose_train(srun_overrides(script))
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    global_rank = node * 4 + local_rank
    fake_task = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "traitsae-ddp", "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_PROCID": str(global_rank), "SLURM_LOCALID": str(local_rank),
        "SLURM_NODEID": str(node), "SLURM_NODELIST": "gpu[07-08]",
    }  # fmt: skip
    for key, value in fake_task.items():
        monkeypatch.setenv(key, value)
    # The Trainer sets Lightning's process-wide rank (to 6 here) and the environment sets
    # MASTER_ADDR/MASTER_PORT (gpu07): both undone after the test, or later DDP runs of this
    # process and its children would wait for gpu07.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset after the test")
        monkeypatch.delenv(key)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (
        8, global_rank, local_rank, node,
    )  # fmt: skip
    assert env.main_address == "gpu07"  # every task connects to the first node
    assert os.environ["MASTER_ADDR"] == "gpu07"  # (what the monkeypatch above undoes)


def test_the_guide_shows_what_the_generator_writes(capsys: pytest.CaptureFixture) -> None:
    import re
    import shlex

    from traitsae.cluster.sbatch import main

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "cluster.md").read_text()
    (command,) = re.findall(r"^\.venv/bin/python -m traitsae\.cluster\.sbatch (.*?) >", page, re.M)
    main(shlex.split(command))
    shown = page.split("<!-- generated: traitsae.cluster.sbatch")[1].split("```text\n")[1]
    assert shown.split("```")[0] == capsys.readouterr().out
