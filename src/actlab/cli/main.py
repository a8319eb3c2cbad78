"""actlab train | eval | list.

    actlab train --model resnet20 --act iieu_b --dataset digits --epochs 10 --seed 0 --out runs/r20
    actlab train --config configs/dpa_vit_tiny_cifar100.yaml --seed 1 --out runs/vit_s1
    actlab train --resume runs/r20
    actlab eval runs/r20
    actlab list [activations|models|datasets]
    torchrun --nproc_per_node=2 -m actlab train ...      # DDP
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..train.config import TrainConfig, coerce


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model (or continue a run with --resume)")
    p.add_argument("--config", help="YAML file of config keys; command-line options override it")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                       help=f"(default: {f.default if f.default is not dataclasses.MISSING else '{}'})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    values: dict = {}
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise ValueError(f"config file {args.config} not found")
        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config} must hold a mapping of config keys")
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        text = getattr(args, f.name)
        if text is not None:
            values[f.name] = coerce(f.name, text)
    return TrainConfig.from_dict(values)


def cmd_train(args) -> int:
    from ..train import train

    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {args.resume}: no config.json there (not an actlab run folder)")
        with open(path) as f:
            values = json.load(f)
        overrides = {f.name: coerce(f.name, getattr(args, f.name)) for f in dataclasses.fields(TrainConfig)
                     if getattr(args, f.name) is not None}
        values.update(overrides, out=args.resume)
        cfg = TrainConfig.from_dict(values)
        resume = os.path.isfile(os.path.join(args.resume, "checkpoint.pt"))  # killed before the first epoch ended
    else:
        cfg, resume = config_from_args(args), False
    summary = train(cfg, resume=resume, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per DDP process
        print(json.dumps({k: summary[k] for k in ("top1", "top5", "loss", "params", "epochs")}))
    return 0


def cmd_eval(args) -> int:
    import torch

    from torch.utils.data import DataLoader

    from ..data import build_datasets
    from ..train import evaluate, load_run_model
    from ..train.distributed import DistInfo

    model, saved = load_run_model(args.dir)
    cfg = TrainConfig.from_dict(saved["config"])
    _, test, _ = build_datasets(cfg.dataset, args.data_dir or cfg.data_dir, image_size=cfg.image_size, augment=False)
    loader = DataLoader(test, cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    metrics = evaluate(model, loader, torch.device("cpu"), DistInfo(), amp=False)
    print(json.dumps({"run": args.dir, "epoch": saved["epoch"], **metrics}))
    return 0


def cmd_list(args) -> int:
    from .. import list_activations
    from ..data import list_datasets
    from ..models import get_model_spec, list_models

    what = args.what or "all"
    if what in ("activations", "all"):
        print("activations: " + ", ".join(list_activations()) + " (and iieu_dc for residual models)")
    if what in ("models", "all"):
        print("models:")
        for name in list_models():
            print(f"  {name:<14} {get_model_spec(name).summary}")
    if what in ("datasets", "all"):
        print("datasets: " + ", ".join(list_datasets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    e = sub.add_parser("eval", help="evaluate a run folder's checkpoint on its test set")
    e.add_argument("dir")
    e.add_argument("--data-dir", dest="data_dir")
    ls = sub.add_parser("list", help="list activations, models or datasets")
    ls.add_argument("what", nargs="?", choices=["activations", "models", "datasets"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"actlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
