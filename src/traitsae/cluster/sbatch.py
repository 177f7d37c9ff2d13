"""The sbatch script of one multi-node DDP training run (docs/guide/cluster.md).

    python -m traitsae.cluster.sbatch --nodes 2 --gpus-per-node 4 --partition gpu \\
        --run-dir /shared/runs/topk32 -- sae=topk sae.k=32 data.store=/shared/acts/cub.h5 > job.sh
    sbatch job.sh

Slurm starts one task per GPU on every node (`--ntasks-per-node`, which Lightning requires:
it refuses `--ntasks`); `srun` runs train.py in each task, and Lightning's SLURMEnvironment reads
the rank, world size and main node from the task's SLURM_* variables. A sweep of such runs:
`hydra/launcher=slurm_gpu hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=4` instead.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence


def ddp_script(
    train_args: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    run_dir: str,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 8,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    python: str = "python",
    job_name: str = "traitsae-ddp",
) -> str:
    """The script's text. `gpus_per_node=0` trains on CPUs (tasks_per_node processes a node)."""
    tasks = tasks_per_node or gpus_per_node
    if nodes < 1 or tasks < 1:
        raise ValueError("need nodes >= 1 and tasks_per_node (or gpus_per_node) >= 1")
    accelerator = "gpu" if gpus_per_node else "cpu"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        # Lightning's SLURMEnvironment: on USR1 rank 0 saves and requeues the job, which then
        # resumes from <run dir>/checkpoints/last.ckpt (train.resume).
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    overrides = [
        "trainer=ddp",
        f"trainer.accelerator={accelerator}",
        f"trainer.devices={tasks}",
        f"+trainer.num_nodes={nodes}",
        f"hydra.run.dir={run_dir}",
        *train_args,
    ]
    command = " ".join(shlex.quote(a) for a in [python, "train.py", *overrides])
    lines += [
        "",
        "# Every path here must be on storage that all nodes share: the run dir (checkpoints,",
        "# logs), the store (data.store / paths.activations_dir), this repository and its venv.",
        "export HDF5_USE_FILE_LOCKING=FALSE  # HDF5 locks misbehave on NFS/Lustre; reads only",
        f"srun {command}",
        "",
    ]
    return "\n".join(lines)


def srun_overrides(script: str) -> list[str]:
    """The train.py overrides of a script written by `ddp_script` (what its tasks compose)."""
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    words = shlex.split(line)
    return words[words.index("train.py") + 1 :]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--tasks-per-node", type=int, default=None)
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--python", default="python")
    parser.add_argument("--run-dir", required=True, help="on shared storage")
    parser.add_argument("train_args", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)
    sys.stdout.write(
        ddp_script(
            args.train_args,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            run_dir=args.run_dir,
            tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task,
            time=args.time,
            partition=args.partition,
            account=args.account,
            python=args.python,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
