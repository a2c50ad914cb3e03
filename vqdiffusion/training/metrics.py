"""Metrics logging of training runs: a CSV file (and TensorBoard scalars when installed)."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping
from io import StringIO
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["CSVLogger"]


class CSVLogger:
    """Append rows ``step, metric...`` to a CSV file (and TensorBoard scalars when available).

    Args:
        path: CSV file.  A fresh run (``resume_step=None``) starts a new file; a resumed run keeps the rows
            with ``step <= resume_step`` and drops later ones (written after the checkpoint it resumes).
        resume_step: see above.
        tensorboard_dir: if given and ``torch.utils.tensorboard`` imports, scalars are also written there.

    Columns are fixed by the first row; a row with new metric names rewrites the file with extra columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                rows = [row for row in reader if _row_step(row) <= resume_step]
        self._rewrite(rows)
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("TensorBoard is not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = StringIO(newline="")
        if self.columns:
            writer = csv.DictWriter(text, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row; values are written with ``repr`` precision."""
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        new = [key for key in row if key not in self.columns]
        if new:
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f)) if self.columns else []
            self.columns += new
            self._rewrite(old_rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _row_step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step", "inf"))
    except ValueError:
        return math.inf
