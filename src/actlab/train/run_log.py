"""The per-epoch log of a run: JSON lines, CSV and TensorBoard scalars, written by rank 0."""
from __future__ import annotations

import csv
import json
import os

from .run_folder import RunFolder


class RunLog:
    """Per-epoch rows as JSON lines and CSV (and TensorBoard scalars when it is installed); rank 0 only."""

    def __init__(self, folder: str, enabled: bool):
        self.folder, self.enabled, self.tb = folder, enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(folder, "tb"))
            except ImportError:
                pass

    def rewrite(self, history: list[dict]) -> None:
        """The log files from the full history: a resumed run drops rows written after its checkpoint."""
        if not self.enabled:
            return
        with open(os.path.join(self.folder, RunFolder.LOG_JSONL), "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(self.folder, RunFolder.LOG_CSV), "w", newline="") as f:
            if history:
                writer = csv.DictWriter(f, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)
        if self.tb and history:
            row = history[-1]
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
