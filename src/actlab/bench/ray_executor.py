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
from .run_row import point_columns, train_row

MAX_RETRIES = 3


def import_ray():
    """The ray module, or an error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'actlab[ray]' (or pip install ray)") from None
    return ray


CONNECT_TIMEOUT_S = 5  # an address that does not answer within this is an error, not a wait
PROBE_TIMEOUT_S = 120  # a cluster that cannot start one zero-CPU task within this is an error


def check_reachable(address: str) -> None:
    """ValueError when nothing accepts a TCP connection at ``address`` (``host:port`` or
    ``ray://host:port``) within ``CONNECT_TIMEOUT_S``; "auto" and "local" are left to Ray."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ValueError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                         "with `ray start --head` or give the head node's address") from None


def connect(address: str | None):
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one."""
    ray = import_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def ray_slots(address: str | None, cpus_per_run: int, gpus_per_run: float) -> int:
    """How many runs the cluster holds at once with these resources per run; ValueError when no node of
    the cluster could ever hold one (the tasks would wait forever)."""
    if cpus_per_run < 1 or gpus_per_run < 0:
        raise ValueError(f"--cpus-per-run must be >= 1 and --gpus-per-run >= 0 (got {cpus_per_run}, {gpus_per_run})")
    ray = connect(address)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [int(min(r.get("CPU", 0) // cpus_per_run, r.get("GPU", 0) // gpus_per_run if gpus_per_run else 10**9))
            for r in nodes]
    if not any(fits):
        largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise ValueError(f"no node of the Ray cluster has {cpus_per_run} CPU(s) and {gpus_per_run:g} GPU(s) for one "
                         f"run (the largest has {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs); lower "
                         "--cpus-per-run / --gpus-per-run or add such nodes")
    return sum(fits)


def _sees(path: str) -> tuple[bool, str]:
    return os.path.isdir(path), socket.gethostname()


def check_visible(address: str | None, path: str) -> None:
    """ValueError when a task on the cluster cannot see the folder ``path`` (absolute), or when the
    cluster cannot run a task at all within ``PROBE_TIMEOUT_S``."""
    ray = connect(address)
    probe = ray.remote(_sees).options(num_cpus=0)
    try:
        seen, node = ray.get(probe.remote(path), timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"the Ray cluster ran no task within {PROBE_TIMEOUT_S} s; is it healthy?") from None
    if not seen:
        raise ValueError(f"{path} is not visible on Ray node {node}: the grid's --out must be storage every node of "
                         "the cluster sees (a shared filesystem)")


def train_task(cfg: TrainConfig, threads: int, quiet: bool) -> tuple[str, dict | None]:
    """One grid point on a Ray worker: (status, finished row), or ("busy", None) when another bench holds
    the run's lease."""
    import torch


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
              gpus_per_run: float = 0, quiet: bool = True, waiting=None, wait_s: float = 60.0):
    """Submit every (config, key) of ``todo`` as a Ray task and yield (config, key, status, row) as they
    finish; ``record(cfg, key)`` marks a point running before it is submitted. ``waiting(seconds)`` is
    called after every ``wait_s`` seconds in which no task finished (a progress line for a stalled grid)."""
    ray = connect(address)
    task = ray.remote(train_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=MAX_RETRIES)
    refs = {}
    for cfg, key in todo:
        record(cfg, key)
        refs[task.remote(cfg, cpus_per_run, quiet)] = (cfg, key)
    pending = list(refs)
    try:
        quiet_since = time.perf_counter()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not ready:
                if waiting is not None:
                    waiting(time.perf_counter() - quiet_since)
                continue
            quiet_since = time.perf_counter()
            cfg, key = refs[ready[0]]
            try:
                status, row = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # retries exhausted: the run is recorded as failed
                status = "failed"
                row = dict(**point_columns(cfg), status="failed", finished=time.time(),
                           error=f"{type(exc).__name__} after {MAX_RETRIES} retries: {str(exc)[:2000]}")
            yield cfg, key, status, row
    finally:  # a driver that stops early (Ctrl-C, an error) stops its runs; a rerun resumes them
        for ref in pending:
            ray.cancel(ref, force=True)
