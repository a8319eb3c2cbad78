"""The bench grid on a Ray cluster: every grid point is a Ray task; the driver alone writes results.db.

Tasks train in the run folders under the grid's ``--out``, which must be storage every node sees (a
shared filesystem): a task that cannot see it fails with a message saying so. A task whose worker or
node dies is retried by Ray (up to ``MAX_RETRIES`` times) and resumes from the run's last checkpoint.
"""
from __future__ import annotations

import os
import socket
import time

from ..train.config import TrainConfig
from ..train.run_folder import RunFolder

MAX_RETRIES = 3


def import_ray():
    """The ray module, or an error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'actlab[ray]' (or pip install ray)") from None
    return ray


def connect(address: str | None):
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def ray_slots(address: str | None, cpus_per_run: int, gpus_per_run: float) -> int:
    """How many runs the cluster holds at once with these resources per run."""
    resources = connect(address).cluster_resources()
    fits = [resources.get("CPU", 0) // max(cpus_per_run, 1)]
    if gpus_per_run:
        fits.append(resources.get("GPU", 0) // gpus_per_run)
    return max(1, int(min(fits)))


def train_task(cfg: TrainConfig, threads: int, quiet: bool) -> tuple[str, dict | None]:
    """One grid point on a Ray worker: (status, finished row), or ("busy", None) when another bench holds
    the run's lease."""
    import torch

    from .grid import point_columns, train_row

    runs = os.path.dirname(cfg.out)
    if not os.path.isdir(runs):
        error = (f"the run folder {runs} is not visible on node {socket.gethostname()}: the grid's --out must be "
                 "storage every node of the Ray cluster sees (a shared filesystem)")
        return "failed", dict(**point_columns(cfg), status="failed", error=error, finished=time.time())
    torch.set_num_threads(threads)  # the worker's: the Ray task owns its process
    folder = RunFolder(cfg.out)
    with folder.lease() as held:
        if not held:
            return "busy", None
        row = train_row(cfg, folder, quiet)
        return row["status"], row


def run_tasks(todo: list[tuple[TrainConfig, str]], record, *, address: str | None = None, cpus_per_run: int = 1,
              gpus_per_run: float = 0, quiet: bool = True):
    """Submit every (config, key) of ``todo`` as a Ray task and yield (config, key, status, row) as they
    finish; ``record(cfg, key)`` marks a point running before it is submitted."""
    ray = connect(address)
    task = ray.remote(train_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=MAX_RETRIES)
    refs = {}
    for cfg, key in todo:
        record(cfg, key)
        refs[task.remote(cfg, cpus_per_run, quiet)] = (cfg, key)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            cfg, key = refs[ready[0]]
            try:
                status, row = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # retries exhausted: the run is recorded as failed
                from .grid import point_columns

                status = "failed"
                row = dict(**point_columns(cfg), status="failed", finished=time.time(),
                           error=f"{type(exc).__name__} after {MAX_RETRIES} retries: {str(exc)[:2000]}")
            yield cfg, key, status, row
    finally:  # a driver that stops early (Ctrl-C, an error) stops its runs; a rerun resumes them
        for ref in pending:
            ray.cancel(ref, force=True)
