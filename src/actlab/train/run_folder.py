"""A run folder: the files one training run writes, and what the trainer, the CLI and the bench grid ask
of them (is it a run, can it resume this config, who is training it)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import checkpoint as ckpt
from .config import identity_changes


class RunFolder:
    """The folder of one run: ``config.json``, ``checkpoint.pt``, ``log.jsonl`` / ``log.csv`` and
    ``summary.json``.

    Its lease is an exclusive ``flock`` on ``<folder>.lock`` beside the folder, held while the run
    trains under the bench grid: two benches on one grid folder never train the same run, and the
    kernel releases the lock of a process that dies, however it dies, so the next bench takes over."""

    CHECKPOINT, SUMMARY, CONFIG, LOG_JSONL, LOG_CSV = "checkpoint.pt", "summary.json", "config.json", "log.jsonl", "log.csv"

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoint(self) -> str:
        return self.file(self.CHECKPOINT)

    def has_checkpoint(self) -> bool:
        return os.path.isfile(self.checkpoint)

    def stored_config(self) -> dict:
        """The config the run was started with; ValueError when the folder is not a run."""
        path = self.file(self.CONFIG)
        if not os.path.isfile(path):
            raise ValueError(f"{self.path}: no {self.CONFIG} there (not an actlab run folder)")
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not readable JSON: {exc}") from None

    def resumable(self, cfg) -> bool:
        """A checkpoint of this run is there (same identity: settings such as workers or paths may differ)."""
        try:
            return self.has_checkpoint() and not identity_changes(self.stored_config(), cfg.to_dict())
        except (OSError, ValueError):
            return False

    def holds_run(self) -> bool:
        """Whether the folder holds (part of) a run: its config, checkpoint or summary."""
        return any(os.path.exists(self.file(n)) for n in (self.CONFIG, self.CHECKPOINT, self.SUMMARY))

    def refuse_other_run(self, cfg) -> None:
        """ValueError when the folder already holds a run, saying whether it is this run (resume it) or
        another (choose another folder); ``actlab train --overwrite`` replaces it instead."""
        if not self.holds_run():
            return
        try:
            changes = identity_changes(self.stored_config(), cfg.to_dict())
        except ValueError:
            changes = {"config.json": ("unreadable", "")}
        if not changes:
            done = os.path.exists(self.file(self.SUMMARY))
            raise ValueError(f"{self.path} already holds this run ({'finished' if done else 'not finished'}): "
                             f"{'evaluate it with actlab eval' if done else 'continue it with --resume ' + self.path}, "
                             "or pass --overwrite to train it again from scratch")
        shown = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in list(changes.items())[:4])
        more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
        raise ValueError(f"{self.path} holds another run ({shown}{more}): choose another --out, or pass "
                         "--overwrite to replace it")

    def history(self) -> list[dict]:
        """The per-epoch rows logged so far."""
        path = self.file(self.LOG_JSONL)
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def reset(self) -> None:
        """Remove what a partial run of another config (or one without a checkpoint) left."""
        shutil.rmtree(self.path, ignore_errors=True)

    def clear_run(self) -> None:
        """Remove the run's own files (config, checkpoint, summary, logs, TensorBoard events, temporaries),
        nothing else that the folder holds."""
        for name in (self.CONFIG, self.CHECKPOINT, self.SUMMARY, self.LOG_JSONL, self.LOG_CSV):
            if os.path.isfile(self.file(name)):
                os.unlink(self.file(name))
        shutil.rmtree(self.file("tb"), ignore_errors=True)
        self.remove_temporaries()

    def remove_temporaries(self) -> list[str]:
        """Delete the temporaries of checkpoint writes that a kill interrupted; returns their names."""
        return ckpt.remove_temporaries(self.path)

    @contextmanager
    def lease(self) -> Iterator[bool]:
        """Yields True while this process holds the run's lease, False when another process holds it."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.time():.0f}\n".encode())
            yield True
        finally:
            os.close(fd)  # releases the lock
