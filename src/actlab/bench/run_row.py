"""One grid point trained in its run folder, and the database row it gives (``train_row``): the part of
the grid that runs where the training runs (a local worker process or a Ray task)."""
from __future__ import annotations

import json
import time
import traceback

from ..machine import describe as describe_machine
from ..train import TrainConfig, train
from ..train.checkpoint import CheckpointError
from ..train.run_folder import RunFolder


def point_columns(cfg: TrainConfig) -> dict:
    return dict(act=cfg.act, model=cfg.model, dataset=cfg.dataset, seed=cfg.seed, epochs=cfg.epochs,
                config=json.dumps(cfg.to_dict(), sort_keys=True), run_dir=cfg.out)


def train_row(cfg: TrainConfig, folder: RunFolder, quiet: bool = True) -> dict:
    """Train (or resume) one grid point in its run folder and return its finished row: status "done" with
    the metrics, or "failed" with the error. Writes no database (a Ray task returns it to the driver)."""
    base = point_columns(cfg)
    t0 = time.perf_counter()
    try:
        resume = folder.resumable(cfg)
        if not resume:
            folder.reset()
        try:
            summary = train(cfg, resume=resume, quiet=quiet)
        except CheckpointError:
            folder.reset()  # unreadable checkpoint (killed while writing?)
            summary = train(cfg, resume=False, quiet=quiet)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded; the grid goes on
        return dict(**base, status="failed", seconds=time.perf_counter() - t0, finished=time.time(),
                    error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}",
                    versions=json.dumps(versions()))
    history = folder.history()
    train_s = summary["train_seconds"]
    images = sum(r["images_per_s"] * r["seconds"] for r in history)
    return dict(**base, status="done", top1=summary["top1"], top5=summary["top5"], loss=summary["loss"],
                params=summary["params"], flops=summary["flops"], seconds=time.perf_counter() - t0,
                train_seconds=train_s, images_per_s=images / train_s if train_s else None,
                history=json.dumps(history), versions=json.dumps(versions()), finished=time.time())


def versions() -> dict:
    import timm
    import torchvision

    from .. import __version__

    return {"actlab": __version__, "timm": timm.__version__, "torchvision": torchvision.__version__, **describe_machine()}
