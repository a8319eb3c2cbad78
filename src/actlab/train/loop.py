"""The training loop: a run's session (model, optimizer, precision, schedule) built once, then one
function per epoch, with the state checkpointed after every epoch."""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..activations import dpa_loss, targets
from ..activations.dpa import check_targets
from ..data import build_datasets, make_loaders
from ..machine import describe as describe_machine
from ..models import create_model, model_stats
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, cleanup, setup
from .metrics import NonFiniteLoss, Totals, accuracy_counts, evaluate, to_device
from .optim import build_optimizer
from .precision import Precision
from .run_folder import RunFolder
from .run_log import RunLog
from .schedule import lr_at
from .state import RunState, checkpoint_state, restore

CHECKPOINT, SUMMARY, CONFIG = RunFolder.CHECKPOINT, RunFolder.SUMMARY, RunFolder.CONFIG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_workers(cfg: TrainConfig, device: torch.device, info: DistInfo) -> int:
    """``cfg.workers``, or by default the CPUs per process (at most 8) on CUDA and 0 on the CPU, where
    loader processes would compete with training for the same cores."""
    if cfg.workers is not None:
        return cfg.workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if info.enabled else 1)))


def build_model(cfg: TrainConfig, num_classes: int, image_size: int, in_channels: int = 3) -> nn.Module:
    """The run's model; ValueError naming the model and the input when it cannot take the data."""
    try:
        model = create_model(cfg.model, cfg.act, num_classes, image_size=image_size, in_channels=in_channels,
                             act_kwargs=cfg.act_kwargs, **cfg.architecture_options())
    except TypeError as exc:  # a timm / torchvision builder without one of the architecture keywords
        raise ValueError(f"{cfg.model} does not take {sorted(cfg.architecture_options())} ({exc})") from None
    except (RuntimeError, AssertionError) as exc:  # the conversion's example forward failed
        raise ValueError(f"{cfg.model} cannot take {in_channels}x{image_size}x{image_size} images: "
                         f"{_first_line(exc)}") from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass
class Session:
    """What every step of a run uses, built once by ``_session``.

    Args:
        cfg: the run's settings.
        model: what the forward runs (the model, compiled and / or wrapped in DDP).
        raw_model: the model itself, whose DPA sites take the targets and whose weights are saved.
        optimizer: its parameter groups' learning rates are set every step.
        scaler: gradient scaling for float16 autocast (a no-op otherwise).
        precision: the autocast settings.
        device: where the model runs.
        info: this process's place in the distributed run.
        total_steps: optimizer steps of the whole run (the LR schedule's length).
        warmup_steps: the LR schedule's warmup.
    """

    cfg: TrainConfig
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    info: DistInfo
    total_steps: int
    warmup_steps: int

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, cfg.lr, self.total_steps, self.warmup_steps, cfg.min_lr, warmup_lr=cfg.warmup_lr,
                     cooldown_steps=round(cfg.cooldown_epochs * self.total_steps / cfg.epochs))


def train_epoch(run: Session, loader, state: RunState, progress) -> dict:
    """One epoch. No host synchronisation per step: sums stay on the device and are read (with the
    non-finite-loss check) every ``log_every`` steps and at the end."""
    cfg, model, raw_model, optimizer, scaler, device = run.cfg, run.model, run.raw_model, run.optimizer, \
        run.scaler, run.device
    model.train()
    totals, nonfinite = Totals.zeros(device), NonFiniteLoss(device)
    t0 = time.perf_counter()
    lr = cfg.lr
    for x, y in loader:
        lr = run.lr(state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        check_targets(raw_model, y)  # on the host copy: a device check would synchronise
        x, y = to_device(x, y, device, cfg.channels_last)
        with run.precision.autocast(device):
            # every training batch holds cfg.batch_size samples on every rank: DPA gathers without host reads
            with targets(raw_model, y, validate=False, capacity=cfg.batch_size):
                logits = model(x)
            ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            channel = dpa_loss(raw_model)
            loss = ce + cfg.dpa_lambda * channel
        nonfinite.watch(loss, state.step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        totals.add(ce, channel, accuracy_counts(logits.detach(), y), len(y))
        progress.update(1)
        if state.step % cfg.log_every == 0:
            nonfinite.check(state.epoch + 1)
            if not progress.disable:
                seen = totals.read(DistInfo(), device)  # this process's share: no collective mid-epoch
                progress.set_postfix(loss=f"{seen['loss']:.3f}", acc=f"{seen['top1']:.1f}", lr=f"{lr:.3g}")
    nonfinite.check(state.epoch + 1)
    means = totals.read(run.info, device)  # synchronises: the epoch's time is complete after it
    seconds = time.perf_counter() - t0
    images = totals.samples * run.info.world_size
    return {"train_loss": means["loss"], "train_channel_loss": means["channel_loss"], "train_top1": means["top1"],
            "seconds": seconds, "images_per_s": images / seconds if seconds else math.nan, "lr": lr}


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, extend: bool = False,
          overwrite: bool = False) -> dict:
    """Run (or continue) a training run in ``cfg.out``; returns the summary written to summary.json.

    Args:
        resume: continue the run in ``cfg.out`` from its checkpoint.
        extend: with ``resume``, continue the run to a larger ``cfg.epochs``.
        overwrite: a new run may replace a run already in ``cfg.out`` (its files are removed first);
            without it a folder that holds a run is refused, naming what differs.
    """
    cfg.validate()
    if extend and not resume:
        raise ValueError("extend continues an existing run: use it with resume")
    folder = RunFolder(cfg.out)
    if not resume and not overwrite:
        folder.refuse_other_run(cfg)  # every rank, before the rendezvous: no rank has written yet
    elif not resume and int(os.environ.get("RANK", "0")) == 0:
        folder.clear_run()
    info, device = setup(cfg.device)
    try:
        return _train(cfg, resume, quiet, info, device, extend)
    finally:
        cleanup()


def _train(cfg: TrainConfig, resume: bool, quiet: bool, info: DistInfo, device: torch.device,
           extend: bool = False) -> dict:
    from tqdm import tqdm

    seed_everything(cfg.seed + info.rank)
    train_set, test_set, data_info = build_datasets(
        cfg.dataset, cfg.data_dir, image_size=cfg.image_size, augment=cfg.augment,
        augment_options=cfg.augment_options(), **cfg.view_options(), download=cfg.download and info.is_main)
    train_loader, test_loader = make_loaders(train_set, test_set, cfg.batch_size, workers=loader_workers(cfg, device, info),
                                             seed=cfg.seed, rank=info.rank, world=info.world_size)
    raw_model = build_model(cfg, data_info.num_classes, data_info.image_size, data_info.in_channels).to(device)
    stats = _model_stats(cfg, raw_model, data_info)
    run = _session(cfg, raw_model, info, device, len(train_loader))
    path = os.path.join(cfg.out, CHECKPOINT)
    if info.is_main:
        RunFolder(cfg.out).remove_temporaries()  # left by a kill during a checkpoint write
    state = restore(path, cfg, run.model, run.optimizer, run.scaler, extend) if resume else RunState()
    if info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, CONFIG), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    log = RunLog(cfg.out, info.is_main)
    log.rewrite(state.history)
    progress = tqdm(total=run.total_steps, initial=state.step, disable=quiet or not info.is_main, unit="step",
                    desc=f"{cfg.model}/{cfg.act}", dynamic_ncols=True)
    for epoch in range(state.epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        row = train_epoch(run, train_loader, state, progress)
        test = evaluate(run.model, test_loader, device, info, run.precision, cfg.channels_last)
        row = {"epoch": epoch + 1, **{f"test_{k}": v for k, v in test.items()}, **row}
        state.epoch = epoch + 1
        state.history.append(row)
        if info.is_main:
            ckpt.save_atomic(checkpoint_state(cfg, run.model, run.optimizer, run.scaler, state), path)
            log.rewrite(state.history)
            if not quiet:
                progress.write(f"epoch {epoch + 1}/{cfg.epochs}: test top1 {row['test_top1']:.2f} "
                               f"loss {row['test_loss']:.4f}, train loss {row['train_loss']:.4f}, "
                               f"{row['images_per_s']:.0f} img/s")
    progress.close()
    if not state.history:
        raise ckpt.CheckpointError(f"{path} records {state.epoch} epoch(s) but no per-epoch history; train the "
                                   "run again with --overwrite")
    return _summary(cfg, run, state, stats)


def _model_stats(cfg: TrainConfig, model: nn.Module, data_info) -> dict:
    """Parameters and FLOPs; ValueError naming the model and the data when it cannot take the images."""
    try:
        return model_stats(model, data_info.image_size, data_info.in_channels)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ValueError(f"{cfg.model} cannot take {data_info.in_channels}x{data_info.image_size}x"
                         f"{data_info.image_size} images ({type(exc).__name__}: {_first_line(exc)}); "
                         "choose another --image-size or model") from None


def _session(cfg: TrainConfig, raw_model: nn.Module, info: DistInfo, device: torch.device,
             steps_per_epoch: int) -> Session:
    """The model as the run executes it (channels-last, SyncBatchNorm, compiled, DDP), its optimizer,
    precision and LR schedule length."""
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if info.enabled and cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); drop --sync-bn on CPU")
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    compiled = cfg.compile or cfg.cuda_graphs
    model = torch.compile(raw_model, mode="reduce-overhead" if cfg.cuda_graphs else None) if compiled else raw_model
    if info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                nesterov=cfg.nesterov, rule=cfg.weight_decay_rule)
    precision = Precision.resolve(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    return Session(cfg, model, raw_model, optimizer, scaler, precision, device, info,
                   total_steps=cfg.epochs * steps_per_epoch, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch))


def _summary(cfg: TrainConfig, run: Session, state: RunState, stats: dict) -> dict:
    """The run's summary.json (written by rank 0) from its last epoch."""
    last = state.history[-1]
    summary = {"top1": last["test_top1"], "top5": last["test_top5"], "loss": last["test_loss"],
               "params": stats["params"], "flops": stats["flops"], "epochs": cfg.epochs, "steps": state.step,
               "model": cfg.model, "act": cfg.act, "dataset": cfg.dataset, "seed": cfg.seed,
               "train_seconds": sum(r["seconds"] for r in state.history), "world_size": run.info.world_size,
               "amp": run.precision.name, "environment": describe_machine()}
    if run.info.is_main:
        with open(os.path.join(cfg.out, SUMMARY), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def load_run_model(folder: str) -> tuple[nn.Module, dict]:
    """The trained model of a run folder (rebuilt from its stored config) and its checkpoint."""
    saved = ckpt.load(os.path.join(folder, CHECKPOINT))
    mc = dict(saved["model_config"])
    model = create_model(mc.pop("name"), mc.pop("act"), mc.pop("num_classes"), image_size=mc.pop("image_size"),
                         in_channels=mc.pop("in_channels"), act_kwargs=mc.pop("act_kwargs"), **mc)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{folder}/{CHECKPOINT} does not match its own model config: {exc}") from exc
    return model, saved
