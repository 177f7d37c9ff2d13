"""The launchers end to end on a real Slurm (`.ci/slurm.sh start`; `.ci/run` does it).

Each Slurm job spends 20-35 s importing the Python stack, so the runs a selection of these tests
needs start together (the `runs` fixture), and each test then waits for its own: extraction
shards as an array plus the join; a `slurm` and a `grouped_slurm` sweep, each signalled like a
time limit (`scancel --signal=USR2`) after its first checkpoint and compared bit for bit with an
uninterrupted twin; DDP with 2 tasks through `srun` and through the launcher's tasks_per_node;
a job failing on bad input (with and without accounting: `.ci/run` runs these once without);
requests Slurm refuses. Run on a real cluster with TRAITSAE_CLUSTER_TESTS=1 from shared storage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from train_helpers import ROOT, id_store, subprocess_env

pytestmark = pytest.mark.cluster

if os.environ.get("TRAITSAE_CLUSTER_TESTS") != "1":
    pytest.skip(
        "no Slurm for the cluster tests: as root, `.ci/slurm.sh start` brings one up on this "
        "machine and `.ci/run` runs them (or set TRAITSAE_CLUSTER_TESTS=1 where sbatch reaches "
        "a cluster, from storage its nodes share)",
        allow_module_level=True,
    )

WAIT_S = 420  # no run may take longer: a hang fails the test instead of stalling CI
STEPS = 60
# A small store, tiny SAEs, one thread each; checkpoints every 10 steps; the slow-down gives the
# test time to signal a job between its first checkpoint and its end.
TRAIN = [
    "data.batch_size=64", "data.scale_sample=512", "data.val_fraction=0.1", "sae.d_sae=64",
    "sae.k=4", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=30",
    "trainer.limit_val_batches=4", "checkpoint.every_n_train_steps=10", "torch_threads=1",
    "optim.warmup_steps=2", "+callbacks.slow._target_=train_helpers.SlowSteps",
    "+callbacks.slow.seconds=0.15",
]  # fmt: skip
ONE_CPU = "hydra.launcher.cpus_per_task=1"
GROUP_ONE_CPU = "hydra.launcher.submitit.parameters.cpus_per_task=1"


def accounting() -> bool:
    return subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0


@dataclass
class Run:
    """A command started in the background; `interrupt` (a job dir) gets the time-limit signal
    once its first checkpoint is written."""

    name: str
    args: list[str]
    out: Path
    interrupt: Path | None = None
    proc: subprocess.Popen | None = None
    signalled: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        env = subprocess_env()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env["PYTHONPATH"]])
        with open(self.out / "driver.out", "w") as out, open(self.out / "driver.err", "w") as err:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, env=env, text=True, stdout=out, stderr=err
            )
        if self.interrupt is not None:
            threading.Thread(target=self._interrupt, daemon=True).start()

    def _interrupt(self) -> None:
        """USR2 to job 0 of the sweep as soon as its first checkpoint exists."""
        ckpt = self.interrupt / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + WAIT_S
        while not ckpt.exists() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.2)
        jobs = sorted(p.name for p in (self.out / "sweep" / ".submitit").glob("*_0"))
        if ckpt.exists() and jobs:
            subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True)
            self.signalled.append(jobs[0])

    def wait(self) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.name} still running after {WAIT_S} s (it hangs): {self.err()}")
        return code, (self.out / "driver.out").read_text(), self.err()

    def err(self) -> str:
        return (self.out / "driver.err").read_text()


def train_py(*args: str) -> list[str]:
    return [sys.executable, "train.py", *args]


def plan(tmp: Path, store: Path, synthetic: Path) -> dict[str, Run]:
    """Every run the module knows, by name (tests ask for theirs in RUNS_OF)."""
    data = f"data.store={store}"
    runs = [
        Run(
            "extract",
            [
                sys.executable,
                "extract.py",
                "-m",
                "hydra/launcher=slurm",
                ONE_CPU,
                f"hydra.sweep.dir={tmp / 'extract' / 'sweep'}",
                f"paths.root_dir={tmp / 'extract'}",
                f"dataset.root={synthetic}",
                "extract.num_shards=2",
                "extract.shard=0,1",
                "extract.batch_size=8",
            ],
            tmp / "extract",
        ),  # fmt: skip
        # Twins that differ only in how often they log: job 0 is signalled, job 1 is not.
        Run(
            "slurm_requeue",
            train_py(
                "-m",
                "hydra/launcher=slurm",
                ONE_CPU,
                f"hydra.sweep.dir={tmp / 'slurm' / 'sweep'}",
                data,
                *TRAIN,
                "trainer.log_every_n_steps=5,10",
            ),
            tmp / "slurm",
            interrupt=tmp / "slurm" / "sweep" / "0",
        ),  # fmt: skip
        # Two groups (log_every_n_steps keeps them apart) of two SAEs: group 0 is signalled.
        Run(
            "grouped_requeue",
            train_py(
                "-m",
                "hydra/launcher=grouped_slurm",
                GROUP_ONE_CPU,
                f"hydra.sweep.dir={tmp / 'grouped' / 'sweep'}",
                data,
                *TRAIN,
                "sae.k=4,8",
                "trainer.log_every_n_steps=5,10",
            ),
            tmp / "grouped",
            interrupt=tmp / "grouped" / "sweep" / "0",
        ),  # fmt: skip
        Run(
            "ddp_launcher",
            train_py(
                "-m",
                "hydra/launcher=slurm",
                ONE_CPU,
                "hydra.launcher.tasks_per_node=2",
                f"hydra.sweep.dir={tmp / 'ddp_launcher' / 'sweep'}",
                data,
                *TRAIN,
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "+callbacks.rec._target_=train_helpers.RecordRun",
                f"+callbacks.rec.out_dir={tmp / 'ddp_launcher' / 'ranks'}",
            ),
            tmp / "ddp_launcher",
        ),  # fmt: skip
        Run("ddp_srun", ddp_srun_command(tmp / "ddp_srun", data), tmp / "ddp_srun"),
        # Bad input: the store does not exist. The CPU preset's own resources (no overrides).
        Run(
            "slurm_fails",
            train_py(
                "-m",
                "hydra/launcher=slurm",
                f"hydra.sweep.dir={tmp / 'slurm_fails' / 'sweep'}",
                f"data.store={tmp / 'missing.h5'}",
                "sae.k=4,8",
            ),
            tmp / "slurm_fails",
        ),  # fmt: skip
        Run(
            "grouped_fails",
            train_py(
                "-m",
                "hydra/launcher=grouped_slurm",
                GROUP_ONE_CPU,
                f"hydra.sweep.dir={tmp / 'grouped_fails' / 'sweep'}",
                f"data.store={tmp / 'missing.h5'}",
                "sae.k=4,8",
            ),
            tmp / "grouped_fails",
        ),  # fmt: skip
    ]
    return {run.name: run for run in runs}


def ddp_srun_command(out: Path, data: str) -> list[str]:
    """sbatch of the multi-node script (traitsae.cluster.sbatch) on one node, 2 CPU tasks; the
    command waits for the job (sbatch --wait)."""
    from traitsae.cluster.sbatch import ddp_script

    out.mkdir(parents=True, exist_ok=True)
    args = [data, *TRAIN, "+callbacks.rec._target_=train_helpers.RecordRun",
            f"+callbacks.rec.out_dir={out / 'ranks'}"]  # fmt: skip
    script = ddp_script(
        args, nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1,
        run_dir=str(out / "run"), python=sys.executable, time="00:10:00",
    )  # fmt: skip
    (out / "job.sh").write_text(script)
    return ["sbatch", "--wait", f"--output={out / 'slurm-%j.out'}", str(out / "job.sh")]


RUNS_OF = {
    "test_extraction_shards_as_an_array_then_the_join": ["extract"],
    "test_slurm_sweep_requeued_at_the_time_limit_ends_bit_identical": ["slurm_requeue"],
    "test_grouped_sweep_requeued_at_the_time_limit_ends_bit_identical": ["grouped_requeue"],
    "test_ddp_with_two_tasks_through_the_launcher": ["ddp_launcher"],
    "test_ddp_with_two_tasks_through_srun": ["ddp_srun"],
    "test_a_failing_job_ends_the_sweep_with_its_error_and_never_hangs": [
        "slurm_fails", "grouped_fails",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start, together, the runs of the tests selected in this module."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.fail("TRAITSAE_CLUSTER_TESTS=1 but Slurm does not answer (sinfo failed)")
    from extract_helpers import small_synthetic

    tmp = tmp_path_factory.mktemp("cluster")
    store = id_store(tmp / "store.h5", n_images=256, n_patches=16, d_model=16, layers=(3,))
    synthetic = small_synthetic(tmp / "synthetic")
    known = plan(tmp, store, synthetic)
    here = {
        item.name.split("[")[0] for item in request.session.items if item.module is request.module
    }
    wanted = {name for test in here for name in RUNS_OF.get(test, [])}
    for name in sorted(wanted):
        known[name].start()
    return known


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "sae.safetensors")


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and wa[key].equal(wb[key]), f"{key} differs"


def job_dirs_by_override(sweep: Path) -> dict[tuple[str, ...], Path]:
    import yaml

    dirs = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        said = yaml.safe_load(overrides.read_text())
        dirs[tuple(o for o in said if o.startswith(("sae.k", "trainer.log_every")))] = (
            overrides.parent.parent
        )
    return dirs


def assert_one_csv(run_dir: Path) -> None:
    csvs = sorted(p.relative_to(run_dir) for p in run_dir.glob("csv/**/metrics.csv"))
    assert csvs == [Path("csv/metrics.csv")], csvs


def test_extraction_shards_as_an_array_then_the_join(runs: dict[str, Run]) -> None:
    from traitsae.data.store import Store

    run = runs["extract"]
    code, _, err = run.wait()
    assert code == 0, err[-3000:]
    shards = sorted((run.out / "activations").rglob("*.shard-*.h5"))
    assert len(shards) == 2, shards
    join = subprocess.run(
        [sys.executable, "extract.py", f"paths.root_dir={run.out}",
         f"dataset.root={run.out.parent / 'synthetic'}", "extract.num_shards=2",
         f"hydra.run.dir={run.out / 'join'}"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert join.returncode == 0, join.stderr[-3000:]
    (joined,) = (run.out / "activations").rglob("*.h5")
    with Store(joined) as store:
        assert store.complete and store.n_images == 16


def test_slurm_sweep_requeued_at_the_time_limit_ends_bit_identical(runs: dict[str, Run]) -> None:
    run = runs["slurm_requeue"]
    code, _, err = run.wait()
    assert code == 0, err[-3000:]
    assert run.signalled, "the first checkpoint never appeared"
    sweep = run.out / "sweep"
    log = (sweep / "0" / "train.log").read_text()
    assert "resuming from" in log and "done, step 60" in log, log
    assert_bit_identical(sweep / "0", sweep / "1")
    assert_one_csv(sweep / "0")


def test_grouped_sweep_requeued_at_the_time_limit_ends_bit_identical(runs: dict[str, Run]) -> None:
    run = runs["grouped_requeue"]
    code, _, err = run.wait()
    assert code == 0, err[-3000:]
    assert run.signalled, "the first checkpoint never appeared"
    dirs = job_dirs_by_override(run.out / "sweep")
    for k in ("sae.k=4", "sae.k=8"):
        signalled = dirs[(k, "trainer.log_every_n_steps=5")]
        assert_bit_identical(signalled, dirs[(k, "trainer.log_every_n_steps=10")])
        log = (signalled / "train.log").read_text()
        assert "resuming the group" in log and f"done {signalled}, step 60" in log, log
        assert_one_csv(signalled)


def _assert_two_ranks(ranks_dir: Path, run_dir: Path) -> None:
    ranks = [json.loads((ranks_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"]
    assert (run_dir / "sae.json").is_file()
    # Rank 0 writes train.log, rank 1 its own file: not both into one.
    assert (run_dir / "train.log").read_text().count("training sae=") == 1
    assert (run_dir / "train.rank1.log").read_text().count("training sae=") == 1


def test_ddp_with_two_tasks_through_the_launcher(runs: dict[str, Run]) -> None:
    run = runs["ddp_launcher"]
    code, _, err = run.wait()
    assert code == 0, err[-3000:]
    _assert_two_ranks(run.out / "ranks", run.out / "sweep" / "0")


def test_ddp_with_two_tasks_through_srun(runs: dict[str, Run]) -> None:
    run = runs["ddp_srun"]
    code, _, _ = run.wait()
    logs = "".join(p.read_text() for p in run.out.glob("slurm-*.out"))
    assert code == 0, logs[-3000:]
    _assert_two_ranks(run.out / "ranks", run.out / "run")
    assert "srun` command is available" not in logs


def test_a_failing_job_ends_the_sweep_with_its_error_and_never_hangs(
    runs: dict[str, Run],
) -> None:
    for name in ("slurm_fails", "grouped_fails"):
        code, _, err = runs[name].wait()
        assert code == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "does not exist" in errors[0], err[-3000:]
        assert "Traceback" not in err and "Bypassing sacct" not in err, err[-3000:]
        print(f"{name}: accounting={accounting()}: {errors[0][:160]}")


@pytest.mark.parametrize(
    ("launcher", "override", "named"),
    [
        ("slurm_gpu", ONE_CPU, "hydra.launcher.gpus_per_node=1"),
        ("slurm", "hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb=100000"),
        ("grouped_slurm_gpu", GROUP_ONE_CPU, "hydra.launcher.submitit.parameters.gpus_per_node=1"),
    ],
)
def test_a_request_slurm_refuses_names_its_key(
    tmp_path: Path, launcher: str, override: str, named: str
) -> None:
    proc = subprocess.run(
        train_py("-m", f"hydra/launcher={launcher}", override, f"hydra.sweep.dir={tmp_path}",
                 "sae.k=4"),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"comes from {named}" in errors[0] and "Traceback" not in proc.stderr
