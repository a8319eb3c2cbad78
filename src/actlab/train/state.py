"""A run's position and what its checkpoint holds: the state saved after every epoch and restored on
resume (refused when the checkpoint was written by another configuration)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import TrainConfig, identity_changes


@dataclass
class RunState:
    """What a checkpoint restores besides the modules: the position and the metrics so far."""

    epoch: int = 0          # epochs completed
    step: int = 0           # optimizer steps taken
    history: list = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers (what checkpoints store)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def checkpoint_state(cfg, model, optimizer, scaler, state: RunState) -> dict:
    return {"format": ckpt.FORMAT, "config": cfg.to_dict(), "model": unwrap(model).state_dict(),
            "model_config": unwrap(model).actlab_config, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": ckpt.rng_state(), "epoch": state.epoch, "step": state.step,
            "history": state.history}


def restore(path: str, cfg: TrainConfig, model, optimizer, scaler, extend: bool = False) -> RunState:
    """Load everything from the run's checkpoint; refuses one written by a different configuration.

    ``extend``: the run continues to a larger ``epochs`` (the LR schedule is then recomputed over the new
    total from the current step, so it does not end as the original run would have); without it a
    changed ``epochs`` is refused like any other setting that changes what the run computes."""
    saved = ckpt.load(path)
    mismatched = identity_changes(saved["config"], cfg.to_dict(), allow=("epochs",) if extend else ())
    if mismatched:
        hint = " (to train a run for more epochs, resume with --extend)" if "epochs" in mismatched else ""
        raise ckpt.CheckpointError(f"{path} was written by a different configuration: "
                                   + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
                                   + hint)
    if extend and cfg.epochs <= saved["epoch"]:
        raise ValueError(f"--extend: the run has trained {saved['epoch']} epoch(s); give --epochs above that "
                         f"(got {cfg.epochs})")
    try:
        unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{path} does not match the model or optimizer: {exc}") from exc
    scaler.load_state_dict(saved["scaler"])
    ckpt.set_rng_state(saved["rng"])
    return RunState(saved["epoch"], saved["step"], list(saved["history"]))
