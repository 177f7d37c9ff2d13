"""One CSV log per run, across resumes: `<run dir>/csv/metrics.csv`.

Lightning's CSVLogger starts `csv/version_<n+1>` whenever a run starts again (every requeue of a
Slurm job), and with a fixed version it deletes the previous file. Here a resumed run appends to
its file; the rows the interrupted part logged after its last checkpoint are dropped, since the
resumed run logs those steps again.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing `<save_dir>/<name>/metrics.csv` (and hparams.yaml), kept across
    resumes."""

    def __init__(self, save_dir: str, name: str = "csv", **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version="", **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingWriter(self.log_dir)
        return self._experiment


class ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self.resumed = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """(Lightning deletes the previous metrics.csv here.) Kept: this run may continue it."""

    def save(self) -> None:
        if self.metrics and not self.resumed:
            self.resumed = True
            self._truncate_from(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _truncate_from(self, step: int) -> None:
        """Drop the rows of steps >= `step` (logged again now); keep the file's header."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if int(float(row["step"])) < step]
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
        draft = path.with_name(path.name + ".tmp")
        with open(draft, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(draft, path)
