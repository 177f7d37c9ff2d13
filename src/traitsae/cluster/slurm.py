"""Submitting a sweep's jobs through submitit and waiting for them, as both Slurm launchers do.

submitit asks `sacct` how a job ended. Without accounting (many small clusters) `sacct` fails, and
a job that exited without a result file (an `error:` on bad input exits 2) left the launchers
polling forever. Here a job's end is read from `squeue` (which knows finished jobs for
`MinJobAge` seconds, and then forgets them): a job that is over without a result failed, and its
`error:` line (or the end of its log) becomes one paragraph. Slurm refusing the request (no GPU in
the partition, too much memory) becomes one paragraph naming the launcher key that asked for it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)

# squeue states after which a job will not run again (PREEMPTED and REQUEUED jobs come back).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "SPECIAL_EXIT",
}  # fmt: skip
# Pending reasons that no amount of waiting resolves: the request does not fit the partition.
NEVER_REASONS = {
    "PartitionConfig", "BadConstraints", "InvalidAccount", "InvalidQOS", "PartitionTimeLimit",
    "PartitionNodeLimit", "QOSMaxMemoryPerJob", "QOSMaxGRESPerJob", "QOSMaxCpuPerJobLimit",
}  # fmt: skip
# How long a job that left squeue may take to show its result file (slow shared file systems).
RESULT_GRACE_S = 10.0
# Seconds between squeue polls: short at first (tests, quick failures), then gentle.
POLLS_S = (1.0,) * 30 + (5.0,) * 60 + (15.0,)
PENDING_NOTE_S = 300.0

# sbatch's complaint -> the resource (a key of `keys` in `submit`) that caused it.
REFUSALS = (
    ("generic resource", "gpus"),
    ("gres", "gpus"),
    ("memory specification", "memory"),
    ("invalid partition", "partition"),
    ("time limit", "time"),
    ("invalid account", "account"),
    ("invalid qos", "account"),
    ("node configuration is not available", "cpus"),
    ("more processors than permitted", "cpus"),
    ("cpu count per node can not be satisfied", "cpus"),
)


def submit(
    executor: Any,
    fn: Callable[..., Any],
    arg_lists: Sequence[Sequence[Any]],
    keys: Mapping[str, str],
) -> list[Any]:
    """`executor.map_array(fn, *arg_lists)`; a request that sbatch refuses is a TraitsaeError
    naming the launcher key behind it (`keys`: resource -> `key=value` as configured)."""
    from submitit.core.utils import FailedJobError

    quiet = io.StringIO()  # submitit prints sbatch's stderr before raising it: say it once
    try:
        with contextlib.redirect_stderr(quiet):
            return executor.map_array(fn, *arg_lists)
    except FailedJobError as err:
        if not isinstance(err.__cause__, subprocess.CalledProcessError):
            raise
        raise TraitsaeError(refusal_message(str(err), keys)) from None


def refusal_message(sbatch_stderr: str, keys: Mapping[str, str]) -> str:
    lines = [line.strip() for line in sbatch_stderr.strip().splitlines() if line.strip()]
    said = " ".join(lines) or "no reason given"
    lower = said.lower()
    culprit = next((keys[r] for word, r in REFUSALS if word in lower and r in keys), None)
    asked = "; ".join(v for v in keys.values() if v)
    if culprit:
        where = f"The request that does not fit comes from {culprit}."
    else:
        where = f"The request was: {asked}."
    return (
        f"Slurm refused to queue the sweep's jobs ({said}). {where} Check what the partition "
        "offers (`sinfo -o '%P %c %m %G'` lists CPUs, memory in MB and GPUs per partition), "
        "then lower that value, set the partition, or start from a preset that fits: "
        "hydra/launcher=slurm (CPU) or slurm_gpu (grouped_slurm / grouped_slurm_gpu)."
    )


def result(job: Any, what: str) -> Any:
    """The result of `job` (task 0) once it is over; a job that ended without one (an `error:`
    exit, a kill, a time limit with no requeue left) raises TraitsaeError with its reason."""
    from submitit.core.utils import UncompletedJobError

    if _is_slurm(job) and not _wait_until_over(job, what):
        # No result: submitit's own `results()` would ask sacct, and wait forever without it.
        raise TraitsaeError(failure_message(job, what, "it left no result"))
    try:
        return job.results()[0]
    except UncompletedJobError as err:
        raise TraitsaeError(failure_message(job, what, str(err))) from None


def failure_message(job: Any, what: str, fallback: str) -> str:
    """One paragraph: which job, the `error:` line it printed (else its log's last line)."""
    stderr = Path(job.paths.stderr)
    lines = stderr.read_text(errors="replace").strip().splitlines() if stderr.is_file() else []
    said = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    if said:
        reason = said[len("error: ") :]
    else:
        last = next((line for line in reversed(lines) if line.strip()), "")
        reason = last.strip() or fallback.strip().splitlines()[0]
    return (
        f"{what} failed (Slurm job {job.job_id}): {reason} (its log: {stderr}). Fix the cause "
        "and re-run the same sweep command: finished jobs are not retrained, the others resume."
    )


def _is_slurm(job: Any) -> bool:
    return type(job).__name__ == "SlurmJob"


def squeue_state(job_id: str) -> tuple[str, str] | None:
    """(state, reason) of a job that squeue still knows, else None."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T|%r"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    line = out.stdout.strip().splitlines()[:1]
    if out.returncode or not line or "|" not in line[0]:
        return None
    state, reason = line[0].split("|", 1)
    return state.split()[0], reason


def _wait_until_over(job: Any, what: str) -> bool:
    """Poll until the job wrote its result (True), or squeue says (or stops saying) that it
    is over without one (False)."""
    result_file = Path(job.paths.result_pickle)
    over_since: float | None = None
    pending_since: float | None = None
    noted = 0.0
    for poll in _polls():
        if result_file.exists():
            return True
        now = time.monotonic()
        status = squeue_state(str(job.job_id))
        state, reason = status if status else ("GONE", "")
        if state in FINAL_STATES or state == "GONE":
            over_since = over_since or now
            grace = 2.0 if state not in ("COMPLETED", "GONE") else RESULT_GRACE_S
            if now - over_since >= grace:
                return result_file.exists()
        else:
            over_since = None
        if state == "PENDING":
            pending_since = pending_since or now
            if reason in NEVER_REASONS:
                subprocess.run(["scancel", str(job.job_id)], check=False)
                raise TraitsaeError(
                    f"{what} (Slurm job {job.job_id}) can never start: Slurm says {reason} "
                    "(the request exceeds what the partition or account allows). Lower the "
                    "launcher's resources (gpus_per_node, cpus_per_task, mem_gb, timeout_min) "
                    "or pick another partition; the job was cancelled."
                )
            if now - pending_since >= noted + PENDING_NOTE_S:
                noted += PENDING_NOTE_S
                log.info("%s (Slurm job %s) still pending: %s", what, job.job_id, reason)
        else:
            pending_since, noted = None, 0.0
        time.sleep(poll)


def _polls():
    yield from POLLS_S
    while True:
        yield POLLS_S[-1]
