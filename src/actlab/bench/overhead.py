"""Harness overhead: ``actlab.train`` against a minimal hand-written PyTorch loop, same model and data.

Both sides build the same dataset and model, train with SGD for the same epochs and batch size, and
evaluate on the test set after every epoch; the harness additionally logs, checkpoints atomically,
keeps RNG state, counts FLOPs at start-up and updates a progress bar. Runs alternate in ABBA order so that
drift of the machine and warm-up hit both alike.

    python -m actlab.bench.overhead [--model resnet20] [--act relu] [--epochs 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import build_datasets
from ..models import create_model
from ..train import TrainConfig, train


def plain_loop(model_name: str, act: str, dataset: str, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """What a user would write by hand: returns wall seconds and training images/s."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    train_set, test_set, info = build_datasets(dataset)
    model = create_model(model_name, act, info.num_classes, image_size=info.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(train_set) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train_loader = DataLoader(train_set, batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size)
    train_seconds, images = 0.0, 0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(y)
        train_seconds += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += int((model(x).argmax(1) == y).sum())
    return {"wall": time.perf_counter() - t_start, "images_per_s": images / train_seconds,
            "top1": 100 * correct / len(test_set)}


def harness(model_name: str, act: str, dataset: str, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """``actlab.train`` with the same settings (weight decay 5e-4, cosine, no warmup), progress bar on."""
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model_name, act=act, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, device="cpu", out=out)
        summary = train(cfg, quiet=False)
        with open(f"{out}/log.jsonl") as f:
            rows = [json.loads(line) for line in f]
    images = sum(r["images_per_s"] * r["seconds"] for r in rows)
    return {"wall": time.perf_counter() - t_start, "images_per_s": images / sum(r["seconds"] for r in rows),
            "top1": summary["top1"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def spread_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--act", default="relu", help="an activation without DPA's targets (the plain loop has none)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.act == "dpa":
        parser.error("the plain loop passes no targets; compare a non-DPA activation")
    settings = (args.model, args.act, args.dataset, args.epochs, args.batch_size, args.lr)
    results: dict[str, list[dict]] = {"harness": [], "plain": []}
    for repeat in range(args.repeats):
        order = (("harness", harness), ("plain", plain_loop))
        for name, fn in order if repeat % 2 == 0 else order[::-1]:  # ABBA: neither side always goes first
            results[name].append(fn(*settings, seed=repeat))
    ratio_ips = [h["images_per_s"] / p["images_per_s"] for h, p in zip(results["harness"], results["plain"])]
    ratio_wall = [h["wall"] / p["wall"] for h, p in zip(results["harness"], results["plain"])]
    print(f"\n{args.model}/{args.act} on {args.dataset}, {args.epochs} epochs, batch {args.batch_size}; "
          f"{args.repeats} alternating runs each; median [min-max]; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| | actlab train | plain loop | ratio per pair (actlab / plain) |")
    print("|---|---|---|---|")
    print(f"| training images/s | {spread([r['images_per_s'] for r in results['harness']])} | "
          f"{spread([r['images_per_s'] for r in results['plain']])} | {spread_ratio(ratio_ips)} |")
    print(f"| wall s (start-up, train, eval, checkpoints) | {spread([r['wall'] for r in results['harness']])} | "
          f"{spread([r['wall'] for r in results['plain']])} | {spread_ratio(ratio_wall)} |")
    return {"results": results, "ratio_images_per_s": ratio_ips, "ratio_wall": ratio_wall}


if __name__ == "__main__":
    main()
