"""Harness overhead: ``actlab.train`` against a minimal hand-written PyTorch loop, same model and data.

Both sides build the same dataset and model, train with SGD for the same epochs and batch size, and
evaluate on the test set after every epoch; the harness additionally logs, checkpoints atomically,
keeps RNG state, counts FLOPs at start-up and updates a progress bar. After one untimed one-epoch run of each, runs alternate in ABBA order so that
drift of the machine and warm-up hit both alike.

    python -m actlab.perf.overhead [--model resnet20] [--act relu] [--epochs 2] [--repeats 3]
    python -m actlab.perf.overhead --device cuda --amp bf16 --model resnet26 --act iieu_b --dataset synthetic \
        --epochs 25 --batch-size 64          # 200 steps on a GPU

Each run's per-epoch training loss is checked: finite throughout and lower in the last epoch than in the
first (the exit status is 1 otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..activations import dpa_loss, targets
from ..data import build_datasets
from ..machine import FIGURES_HELP, command_line, record_figure, summary
from ..models import create_model
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Setting:
    """What both sides train: same model, data, optimizer, schedule, precision and loader processes."""

    model: str = "resnet20"
    act: str = "relu"
    dataset: str = "digits"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    image_size: int | None = None
    device: str = "cpu"
    amp: str = "off"       # off | bf16 | fp16
    workers: int = 0


def plain_loop(s: Setting, seed: int) -> dict:
    """What a user would write by hand: wall seconds, training images/s and per-epoch training loss."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(s.device)
    train_set, test_set, info = build_datasets(s.dataset, image_size=s.image_size)
    model = create_model(s.model, s.act, info.num_classes, image_size=info.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = s.epochs * (len(train_set) // s.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loader = {"num_workers": s.workers, "persistent_workers": s.workers > 0, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, s.batch_size, shuffle=True, drop_last=True, **loader)
    test_loader = DataLoader(test_set, s.batch_size, **loader)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")
    train_seconds, images, epoch_losses = 0.0, 0, []
    for _ in range(s.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), targets(model, y):
                loss = F.cross_entropy(model(x).float(), y) + dpa_loss(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()
            images += len(y)
        epoch_losses.append(float(loss_sum) / len(train_loader))
        train_seconds += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for x, y in test_loader:
                correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    return {"wall": time.perf_counter() - t_start, "images_per_s": images / train_seconds,
            "top1": 100 * correct / len(test_set), "losses": epoch_losses}


def harness(s: Setting, seed: int) -> dict:
    """``actlab.train`` with the same settings (weight decay 5e-4, cosine, no warmup), progress bar on."""
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=s.model, act=s.act, dataset=s.dataset, epochs=s.epochs, batch_size=s.batch_size,
                          lr=s.lr, image_size=s.image_size, seed=seed, device=s.device, amp=s.amp, workers=s.workers,
                          out=out)
        summary = train(cfg, quiet=False)
        with open(f"{out}/log.jsonl") as f:
            rows = [json.loads(line) for line in f]
    images = sum(r["images_per_s"] * r["seconds"] for r in rows)
    return {"wall": time.perf_counter() - t_start, "images_per_s": images / sum(r["seconds"] for r in rows),
            "top1": summary["top1"], "losses": [r["train_loss"] for r in rows]}


def loss_falls(losses: list[float]) -> bool:
    """Finite in every epoch and lower at the end than in the first epoch."""
    return all(math.isfinite(v) for v in losses) and len(losses) > 1 and losses[-1] < losses[0]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def spread_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def run_line(side: str, repeat: int, result: dict) -> str:
    """One finished run, as soon as it is done."""
    losses = result["losses"]
    return (f"run {repeat + 1}, {'actlab train' if side == 'harness' else 'plain loop'}: "
            f"{result['images_per_s']:.1f} training images/s, {result['wall']:.1f} s wall, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def report(args: argparse.Namespace, results: dict, ratio_ips: list[float], ratio_wall: list[float]) -> str:
    """The comparison as markdown: what ran, then one row per figure (median [min-max])."""
    losses = " | ".join("; ".join(f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" for r in results[side])
                        for side in ("harness", "plain"))
    return "\n".join([
        f"{args.model}/{args.act} on {args.dataset}, {args.epochs} epochs, batch {args.batch_size}, amp {args.amp}, "
        f"{args.workers} loader processes; {args.repeats} alternating runs each; median [min-max]; "
        f"{summary(args.device)}", "",
        "| | actlab train | plain loop | ratio per pair (actlab / plain) |",
        "|---|---|---|---|",
        f"| training images/s | {spread([r['images_per_s'] for r in results['harness']])} | "
        f"{spread([r['images_per_s'] for r in results['plain']])} | {spread_ratio(ratio_ips)} |",
        f"| wall s (start-up, train, eval, checkpoints) | {spread([r['wall'] for r in results['harness']])} | "
        f"{spread([r['wall'] for r in results['plain']])} | {spread_ratio(ratio_wall)} |",
        f"| training loss, first -> last epoch | {losses} | |"])


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.perf.overhead``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--act", default="relu")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=0, help="data loader processes, the same on both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    setting = Setting(args.model, args.act, args.dataset, args.epochs, args.batch_size, args.lr, args.image_size,
                      args.device, args.amp, args.workers)
    warmup = dataclasses.replace(setting, epochs=1)
    for fn in (harness, plain_loop):  # kernel compilation, autotuning and loading land outside the timed runs
        fn(warmup, seed=0)
    results: dict[str, list[dict]] = {"harness": [], "plain": []}
    for repeat in range(args.repeats):
        order = (("harness", harness), ("plain", plain_loop))
        for name, fn in order if repeat % 2 == 0 else order[::-1]:  # ABBA: neither side always goes first
            results[name].append(fn(setting, seed=repeat))
            print(run_line(name, repeat, results[name][-1]), flush=True)  # kept by a run cut short
    ratio_ips = [h["images_per_s"] / p["images_per_s"] for h, p in zip(results["harness"], results["plain"])]
    ratio_wall = [h["wall"] / p["wall"] for h, p in zip(results["harness"], results["plain"])]
    text = report(args, results, ratio_ips, ratio_wall)
    print("\n" + text)
    if args.figures:
        record_figure(args.figures, command_line("actlab.perf.overhead", argv), text, args.device)
    falls = all(loss_falls(r["losses"]) for side in results.values() for r in side)
    if not falls:
        print("FAILED: a run's training loss was not finite or did not fall")
    return {"results": results, "ratio_images_per_s": ratio_ips, "ratio_wall": ratio_wall, "loss_falls": falls}


if __name__ == "__main__":
    sys.exit(0 if main()["loss_falls"] else 1)
