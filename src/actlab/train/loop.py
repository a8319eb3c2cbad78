"""The training loop: one function per concern, state in a checkpoint after every epoch."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

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
from .config import TrainConfig, identity_changes
from .distributed import DistInfo, all_sum, cleanup, setup
from .optim import build_optimizer
from .precision import Precision
from .run_folder import RunFolder
from .schedule import lr_at

CHECKPOINT, SUMMARY, CONFIG, LOG_JSONL, LOG_CSV = (RunFolder.CHECKPOINT, RunFolder.SUMMARY, RunFolder.CONFIG,
                                                   RunFolder.LOG_JSONL, RunFolder.LOG_CSV)


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
class RunState:
    """What a checkpoint restores besides the modules: the position and the metrics so far."""

    epoch: int = 0          # epochs completed
    step: int = 0           # optimizer steps taken
    history: list = field(default_factory=list)


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 and top-5 hits in the batch, as a (2,) tensor on the logits' device (no host sync)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(y[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum()])


@dataclass
class Totals:
    """Running sums of an epoch, kept on the device and read only when reported."""

    loss: torch.Tensor
    channel_loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor
    samples: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "Totals":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(zero.clone(), zero.clone(), zero.clone(), zero.clone())

    def add(self, loss: torch.Tensor, channel: torch.Tensor, hits: torch.Tensor, n: int) -> None:
        self.loss += loss.detach() * n
        self.channel_loss += channel.detach() * n
        self.top1 += hits[0]
        self.top5 += hits[1]
        self.samples += n

    def read(self, info: DistInfo, device: torch.device) -> dict:
        """Means over every process's samples (one host sync)."""
        values = torch.stack([self.loss, self.channel_loss, self.top1, self.top5]).tolist() + [self.samples]
        loss, channel, top1, top5, n = all_sum(values, info, device)
        n = max(n, 1)
        return {"loss": loss / n, "channel_loss": channel / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo, precision: Precision | None = None,
             channels_last: bool = False) -> dict:
    """Test loss, top-1 and top-5 (%) over every process's share of the test set."""
    precision = precision or Precision()
    model.eval()
    totals = Totals.zeros(device)
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with precision.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        totals.add(loss, loss.new_zeros(()), accuracy_counts(logits, y), len(y))
    means = totals.read(info, device)
    return {"loss": means["loss"], "top1": means["top1"], "top5": means["top5"]}


class NonFiniteLoss:
    """Watches the loss on the device; ``check`` (at the log interval) raises for the first bad step."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self, epoch: int) -> None:
        step = int(self.first)
        if step >= 0:
            raise FloatingPointError(f"the loss became non-finite at step {step} (epoch {epoch}); "
                                     "lower the learning rate or enable grad_clip")


def train_epoch(model, loader, optimizer, scaler, cfg: TrainConfig, state: RunState, total_steps: int,
                warmup_steps: int, device: torch.device, info: DistInfo, progress, precision: Precision,
                raw_model: nn.Module) -> dict:
    """One epoch. No host synchronisation per step: sums stay on the device and are read (with the
    non-finite-loss check) every ``log_every`` steps and at the end."""
    model.train()
    totals, nonfinite = Totals.zeros(device), NonFiniteLoss(device)
    t0 = time.perf_counter()
    lr = cfg.lr
    for x, y in loader:
        lr = lr_at(state.step, cfg.lr, total_steps, warmup_steps, cfg.min_lr, warmup_lr=cfg.warmup_lr,
                   cooldown_steps=round(cfg.cooldown_epochs * total_steps / cfg.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        check_targets(raw_model, y)  # on the host copy: a device check would synchronise
        x, y = to_device(x, y, device, cfg.channels_last)
        with precision.autocast(device):
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
    means = totals.read(info, device)  # synchronises: the epoch's time is complete after it
    seconds = time.perf_counter() - t0
    images = totals.samples * info.world_size
    return {"train_loss": means["loss"], "train_channel_loss": means["channel_loss"], "train_top1": means["top1"],
            "seconds": seconds, "images_per_s": images / seconds if seconds else math.nan, "lr": lr}


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
        with open(os.path.join(self.folder, LOG_JSONL), "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(self.folder, LOG_CSV), "w", newline="") as f:
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
    try:
        stats = model_stats(raw_model, data_info.image_size, data_info.in_channels)
    except (RuntimeError, AssertionError, ValueError) as exc:  # the model cannot take the data's images
        raise ValueError(f"{cfg.model} cannot take {data_info.in_channels}x{data_info.image_size}x"
                         f"{data_info.image_size} images ({type(exc).__name__}: {_first_line(exc)}); "
                         "choose another --image-size or model") from None
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
    path = os.path.join(cfg.out, CHECKPOINT)
    if info.is_main:
        RunFolder(cfg.out).remove_temporaries()  # left by a kill during a checkpoint write
    state = restore(path, cfg, model, optimizer, scaler, extend) if resume else RunState()
    if info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, CONFIG), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    log = RunLog(cfg.out, info.is_main)
    log.rewrite(state.history)
    steps_per_epoch = len(train_loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    progress = tqdm(total=total_steps, initial=state.step, disable=quiet or not info.is_main, unit="step",
                    desc=f"{cfg.model}/{cfg.act}", dynamic_ncols=True)
    for epoch in range(state.epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        row = train_epoch(model, train_loader, optimizer, scaler, cfg, state, total_steps,
                          warmup_steps, device, info, progress, precision, raw_model)
        test = evaluate(model, test_loader, device, info, precision, cfg.channels_last)
        row = {"epoch": epoch + 1, **{f"test_{k}": v for k, v in test.items()}, **row}
        state.epoch = epoch + 1
        state.history.append(row)
        if info.is_main:
            ckpt.save_atomic(checkpoint_state(cfg, model, optimizer, scaler, state), path)
            log.rewrite(state.history)
            if not quiet:
                progress.write(f"epoch {epoch + 1}/{cfg.epochs}: test top1 {row['test_top1']:.2f} "
                               f"loss {row['test_loss']:.4f}, train loss {row['train_loss']:.4f}, "
                               f"{row['images_per_s']:.0f} img/s")
    progress.close()
    if not state.history:
        raise ckpt.CheckpointError(f"{path} records {state.epoch} epoch(s) but no per-epoch history; train the "
                                   "run again with --overwrite")
    last = state.history[-1]
    summary = {"top1": last["test_top1"], "top5": last["test_top5"], "loss": last["test_loss"],
               "params": stats["params"], "flops": stats["flops"], "epochs": cfg.epochs, "steps": state.step,
               "model": cfg.model, "act": cfg.act, "dataset": cfg.dataset, "seed": cfg.seed,
               "train_seconds": sum(r["seconds"] for r in state.history), "world_size": info.world_size,
               "amp": precision.name, "environment": describe_machine()}
    if info.is_main:
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
