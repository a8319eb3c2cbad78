"""The bench grid: every (model, act, seed) of a comparison trained once, one row per run in SQLite.

Safe to kill at any moment and rerun with the same command: finished rows are kept, a run that was in
progress continues from its last epoch checkpoint (exact resume) or restarts, and the primary key
(a hash of the resolved run config) makes duplicate rows impossible. A run that raises is recorded
with its error and the grid goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..models import unsupported
from ..train import TrainConfig
from ..train.config import with_recommended
from ..train.run_folder import RunFolder
from .run_row import point_columns, train_row

DB_NAME = "results.db"
DB_TIMEOUT_S = 60.0  # how long a write waits for another process's lock on results.db
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,          -- hash of the resolved config: one row per distinct run, ever
    act TEXT NOT NULL, model TEXT NOT NULL, dataset TEXT NOT NULL, seed INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'skipped')),
    top1 REAL, top5 REAL, loss REAL, params INTEGER, flops INTEGER,
    seconds REAL,                  -- wall clock of the run (start-up, training, evaluation, checkpoints)
    train_seconds REAL, images_per_s REAL,
    error TEXT, config TEXT NOT NULL, versions TEXT, history TEXT, run_dir TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL
)"""


@dataclass(frozen=True)
class GridPoint:
    model: str
    act: str
    seed: int


def connect(folder: str) -> sqlite3.Connection:
    """``folder/results.db`` with the ``runs`` table (created when missing)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, DB_NAME)
    db = sqlite3.connect(path, timeout=DB_TIMEOUT_S)
    db.row_factory = sqlite3.Row
    try:
        db.execute(SCHEMA)
    except sqlite3.OperationalError as exc:
        db.close()
        if "locked" not in str(exc):
            raise ValueError(f"{path} cannot be opened ({exc})") from exc
        raise ValueError(f"{path} is locked by another process (another bench writing to {folder}?); wait for "
                         "it to finish or stop it, then run the command again") from exc
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ValueError(f"{path} is not a readable actlab results database ({exc}); move it away to "
                         "start a new grid") from exc
    return db


def run_key(cfg: TrainConfig) -> str:
    """A hash of the run's identity (``TrainConfig.identity``): one row per distinct run."""
    return hashlib.sha1(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GridGroup:
    """Models x acts sharing one set of overrides of the base config (e.g. AdamW for transformers)."""

    models: tuple[str, ...]
    acts: tuple[str, ...]
    overrides: tuple[tuple[str, object], ...] = ()


def grid_points(groups: Iterable[GridGroup], seeds: Iterable[int]) -> list[tuple[GridPoint, dict]]:
    """Seed-major order: after any prefix of the grid, every (model, act) has as many seeds as possible."""
    return [(GridPoint(m, a, s), dict(g.overrides)) for s in seeds for g in groups for m in g.models for a in g.acts]


def load_grid_file(path: str) -> tuple[dict, list[GridGroup], list[int] | None]:
    """A YAML grid: run settings at the top level, ``seeds``, and ``groups`` (each with ``models``,
    ``acts`` and any run settings that override the top level for that group)."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"grid file {path} not found")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), list) or not spec["groups"]:
        raise ValueError(f"{path}: a grid file needs a non-empty 'groups' list of {{models, acts, ...}}")
    seeds = spec.pop("seeds", None)
    groups = []
    for where, keys in [("the top level", spec)] + [(f"group {i}", g) for i, g in enumerate(spec["groups"])
                                                   if isinstance(g, dict)]:
        for key, instead in PER_POINT.items():
            if key in keys:
                raise ValueError(f"{path}: {where} sets {key!r}, which the grid sets per run; {instead}")
    for i, g in enumerate(spec.pop("groups")):
        if not isinstance(g, dict) or not g.get("models") or not g.get("acts"):
            raise ValueError(f"{path}: group {i} needs 'models' and 'acts' lists")
        g = dict(g)
        models, acts = g.pop("models"), g.pop("acts")
        TrainConfig.from_dict({**spec, **g})  # unknown keys and bad values fail here, naming the key
        groups.append(GridGroup(tuple(models), tuple(acts), tuple(sorted(g.items()))))
    return spec, groups, seeds


# settings a grid sets for each point itself, and where a grid file gives them instead
PER_POINT = {"model": "list models in a group's 'models'", "act": "list activations in a group's 'acts'",
             "seed": "list seeds in the top-level 'seeds'", "out": "the grid's folder is the --out of actlab bench"}


def _upsert(db: sqlite3.Connection, key: str, **values) -> None:
    cols = ["key", *values]
    sets = ", ".join(f"{c} = excluded.{c}" for c in values)
    with db:  # one transaction: a kill leaves either the old row or the new one
        db.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                   f"ON CONFLICT(key) DO UPDATE SET {sets}", [key, *values.values()])


def run_point(db: sqlite3.Connection, cfg: TrainConfig, key: str, quiet: bool = True,
              retry_failed: bool = False) -> str:
    """Train one grid point and record it; returns the final status: 'done' or 'failed', 'busy' when
    another process holds its lease, 'kept' when another process recorded it meanwhile."""
    folder = RunFolder(cfg.out)
    with folder.lease() as held:
        if not held:
            return "busy"
        row = db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        if row and (row["status"] in ("done", "skipped") or (row["status"] == "failed" and not retry_failed)):
            return "kept"  # finished by another bench between our look at the database and the lease
        return _train_point(db, cfg, key, folder, quiet)


def _mark_running(db: sqlite3.Connection, cfg: TrainConfig, key: str) -> None:
    attempts = (db.execute("SELECT attempts FROM runs WHERE key = ?", (key,)).fetchone() or [0])[0] + 1
    _upsert(db, key, **point_columns(cfg), status="running", attempts=attempts, started=time.time(), error=None)


def _train_point(db: sqlite3.Connection, cfg: TrainConfig, key: str, folder: RunFolder, quiet: bool) -> str:
    _mark_running(db, cfg, key)
    row = train_row(cfg, folder, quiet)
    _upsert(db, key, **row)
    return row["status"]


def _pool_init(threads: int) -> None:
    import sys

    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):  # die with the grid process: a rerun must not race an orphan run
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # a libc without prctl: orphans then finish their current run
            pass


def _run_in_worker(folder: str, cfg: TrainConfig, key: str, retry_failed: bool) -> str:
    db = connect(folder)
    try:
        return run_point(db, cfg, key, retry_failed=retry_failed)
    finally:
        db.close()


def point_config(base: TrainConfig | dict, overrides: dict, point: GridPoint, recommend: bool = False) -> TrainConfig:
    """The validated config of one grid point: ``base`` with the group's ``overrides`` and the point's
    model, act and seed. A dict ``base`` holds only the settings given; with ``recommend`` the others
    take the values ``actlab train`` recommends for the point's dataset and model family."""
    own = dict(model=point.model, act=point.act, seed=point.seed)
    if isinstance(base, TrainConfig):
        cfg = dataclasses.replace(base, **overrides, **own)
        cfg.validate()
        return cfg
    values = {**base, **overrides, **own}
    return TrainConfig.from_dict(with_recommended(values) if recommend else values)


def grid_configs(folder: str, base: TrainConfig | dict, groups: list[GridGroup], seeds: list[int],
                 recommend: bool = False) -> list[tuple[GridPoint, str, TrainConfig]]:
    """(point, key, config) of every grid point, each config validated and with its run folder
    ``folder/runs/<model>-<act>-s<seed>-<key>`` as ``out`` (``point_config`` for the arguments)."""
    configs = []
    for point, overrides in grid_points(groups, seeds):
        cfg = point_config(base, overrides, point, recommend)
        key = run_key(cfg)
        name = f"{point.model.replace(':', '_')}-{point.act}-s{point.seed}-{key[:8]}"
        configs.append((point, key, dataclasses.replace(cfg, out=os.path.join(os.path.normpath(folder), "runs", name))))
    return configs


def run_grid(folder: str, base: TrainConfig | dict, groups: list[GridGroup], seeds: list[int],
             retry_failed: bool = False, quiet: bool = True, jobs: int = 1, log=print, executor: str = "local",
             ray_options: dict | None = None, recommend: bool = False) -> dict[str, int]:
    """Run every missing point of the groups' models x acts x seeds into ``folder``; counts per outcome.

    Args:
        base: every other setting (dataset, epochs, batch size, ...), as a config or as a dict of the
            settings given; model, act, seed and out are set per point (runs live in
            ``folder/runs/<model>-<act>-s<seed>-<key>``), after the group's overrides.
        recommend: with a dict ``base``, settings it leaves unset take ``actlab train``'s recommended
            values for the point's dataset and model family (``train.config.recommended_settings``).
        retry_failed: also redo points recorded as failed (by default they are kept, with their error).
        jobs: runs in parallel (processes, each with ``threads / jobs`` threads); 1 runs in this process.
        executor: "local" (this machine: ``jobs`` processes) or "ray" (every point a task on a Ray cluster;
            this process alone writes the database). ``ray_options``: ``address``, ``cpus_per_run``,
            ``gpus_per_run`` (see ``bench.ray_executor.run_tasks``).
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # before anything is written: a missing Ray is one clear error
    # "./b" and "b" are one grid; Ray workers do not share the driver's working directory
    folder = os.path.abspath(folder) if executor == "ray" else os.path.normpath(folder)
    configs = grid_configs(folder, base, groups, seeds, recommend)
    db = connect(folder)
    try:
        progress = _Progress(db, log)
        todo = _plan(db, configs, retry_failed, progress)
        if progress.counts["kept"]:
            log(f"{progress.counts['kept']} of {len(configs)} runs already recorded in "
                f"{os.path.join(folder, DB_NAME)}: kept")
        progress.start(len(todo), max(1, jobs))
        if executor == "ray":
            _run_on_ray(db, folder, todo, progress, quiet, dict(ray_options or {}))
        elif jobs <= 1:
            for i, (cfg, key) in enumerate(todo, 1):
                progress.report(i, cfg, key, run_point(db, cfg, key, quiet=quiet, retry_failed=retry_failed))
        else:
            _run_in_processes(folder, todo, progress, jobs, retry_failed)
    finally:
        db.close()
    return progress.counts


class _Progress:
    """The grid's counts per outcome and its progress lines (done, running, failed, pending, ETA)."""

    def __init__(self, db: sqlite3.Connection, log):
        self.db, self.log = db, log
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "kept": 0, "busy": 0}
        self.total, self.slots, self.started = 0, 1, time.perf_counter()

    def start(self, total: int, slots: int) -> None:
        """``total`` runs to train, ``slots`` of them at a time."""
        self.total, self.slots, self.started = total, slots, time.perf_counter()

    def report(self, i: int, cfg: TrainConfig, key: str, status: str) -> None:
        """The ``i``-th finished run (of ``total``) ended with ``status``."""
        counts = self.counts
        counts[status] += 1
        r = self.db.execute("SELECT top1, seconds, error FROM runs WHERE key = ?", (key,)).fetchone()
        left = self.total - i
        running = min(left, self.slots)
        eta = (time.perf_counter() - self.started) / i * left
        label = (f"[{counts['done']} done, {running} running, {counts['failed']} failed, {left - running} "
                 f"pending, ETA {eta / 60:.1f} min] {cfg.model}/{cfg.act} seed {cfg.seed}")
        if status == "done":
            self.log(f"{label}: top1 {r['top1']:.2f} in {r['seconds']:.1f} s")
        elif status == "failed":
            self.log(f"{label}: FAILED {r['error'].splitlines()[0]}")
        else:
            self.log(f"{label}: {'training in another bench (left to it)' if status == 'busy' else 'recorded by another bench'}")


def _plan(db: sqlite3.Connection, configs, retry_failed: bool, progress: _Progress) -> list[tuple[TrainConfig, str]]:
    """The (config, key) of every point still to train: recorded points are kept (failed ones too unless
    ``retry_failed``), points whose model cannot take the activation are recorded as skipped."""
    todo = []
    for point, key, cfg in configs:
        row = db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        if row and (row["status"] in ("done", "skipped") or (row["status"] == "failed" and not retry_failed)):
            progress.counts["kept"] += 1
            continue
        reason = unsupported(point.model, point.act)
        if reason:
            _upsert(db, key, act=point.act, model=point.model, dataset=cfg.dataset, seed=point.seed,
                    epochs=cfg.epochs, config=json.dumps(cfg.to_dict(), sort_keys=True), run_dir=cfg.out,
                    status="skipped", error=reason)
            progress.counts["skipped"] += 1
            progress.log(f"{point.model}/{point.act} seed {point.seed}: skipped ({reason})")
            continue
        todo.append((cfg, key))
    return todo


def _run_on_ray(db: sqlite3.Connection, folder: str, todo, progress: _Progress, quiet: bool, options: dict) -> None:
    """Every run a Ray task; this process alone writes the database."""
    from .ray_executor import check_visible, ray_slots, run_tasks

    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    progress.slots = ray_slots(options.get("address"), options.get("cpus_per_run", 1), options.get("gpus_per_run", 0))
    check_visible(options.get("address"), folder)  # absolute under Ray (run_grid)
    counts = progress.counts

    def waiting(seconds: float) -> None:
        progress.log(f"[{counts['done']} done, {len(todo) - counts['done'] - counts['failed']} running or queued on "
                     f"the Ray cluster; none finished in the last {seconds / 60:.1f} min]")

    finished = run_tasks(todo, lambda cfg, key: _mark_running(db, cfg, key), quiet=quiet, waiting=waiting, **options)
    for i, (cfg, key, status, row) in enumerate(finished, 1):
        if row is not None:
            _upsert(db, key, **row)
        progress.report(i, cfg, key, status)


def _run_in_processes(folder: str, todo, progress: _Progress, jobs: int, retry_failed: bool) -> None:
    """``jobs`` worker processes, each with its share of the threads, each writing its own rows."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_run_in_worker, folder, cfg, key, retry_failed): (cfg, key) for cfg, key in todo}
        for i, future in enumerate(as_completed(futures), 1):
            progress.report(i, *futures[future], future.result())


def load_rows(folder: str) -> list[dict]:
    """All rows of ``folder/results.db`` as dicts (config, versions, history decoded)."""
    path = os.path.join(folder, DB_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `actlab bench ... --out {folder}` first")
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY model, act, seed")]
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not an actlab results database: {exc}") from exc
    finally:
        db.close()
    for r in rows:
        for k in ("config", "versions", "history"):
            r[k] = json.loads(r[k]) if r.get(k) else ({} if k != "history" else [])
    return rows
