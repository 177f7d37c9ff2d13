"""Job signals belong to the main process, never to DataLoader workers.

At its time limit (and on `scancel --signal`) Slurm signals every process of the job step, loader
workers included. A forked worker inherits the main process's Python handlers -- submitit's
checkpoint-and-requeue on SIGUSR2, Lightning's requeue on SIGUSR1, submitit's logging on SIGTERM
-- so several processes raced to write the checkpoint and requeue the job. Workers ignore these
signals instead: the main process checkpoints, requeues and then stops its workers itself.
"""

from __future__ import annotations

import signal

# The signals a scheduler sends to a whole job step before it stops or requeues the job.
JOB_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def ignore_job_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: ignore the job signals whose handler the worker inherited
    from the main process (a signal left at its default keeps it)."""
    for signum in JOB_SIGNALS:
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_IGN)
