"""actlab train | eval | list | bench | report | analyze.

    actlab train --model resnet20 --act iieu_b --dataset digits --epochs 10 --seed 0 --out runs/r20
    actlab train --config configs/dpa_vit_tiny_cifar100.yaml --seed 1 --out runs/vit_s1
    actlab train --resume runs/r20
    actlab eval runs/r20
    actlab list [activations|models|datasets]
    actlab bench --acts relu,gelu,iieu_b,dpa --models resnet20 --dataset digits --seeds 0,1,2 --epochs 3 --out bench/
    actlab report bench/
    actlab analyze bench/runs/resnet20-dpa-s0-<key>
    torchrun --nproc_per_node=2 -m actlab train ...      # DDP
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys

from ..train.config import TrainConfig, coerce, with_recommended
from ..train.run_folder import RunFolder


class Switch(argparse.BooleanOptionalAction):
    """A boolean option: ``--flag`` sets it, ``--no-flag`` clears it, and ``--flag true|false`` (the
    YAML spelling) works too."""

    def __init__(self, option_strings, dest, default=None, config_key: bool = False, **kwargs):
        super().__init__(option_strings, dest, default=default, **kwargs)
        self.nargs, self.metavar = "?", "BOOL"  # set here: newer Pythons drop these constructor arguments
        self.config_key = config_key  # a bad value is left for the config's own check (one clear line)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        if values is None:
            setattr(namespace, self.dest, True)
            return
        text = values.lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            if self.config_key:
                setattr(namespace, self.dest, values)
                return
            parser.error(f"{option_string}: expected no value or true/false, got {values!r}")
        setattr(namespace, self.dest, text in ("true", "1", "yes"))


def _field_option(p, f: dataclasses.Field) -> None:
    """The command-line option of one TrainConfig field (booleans are ``Switch`` es)."""
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else "{}"
    if str(f.type).startswith("bool"):
        p.add_argument(flag, dest=f.name, action=Switch, config_key=True, help=f"(default: {default})")
    else:
        p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=f"(default: {default})")


def _given(args, skip: tuple[str, ...] = ()) -> dict:
    """The TrainConfig fields the command line sets, as typed values."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        value = None if f.name in skip else getattr(args, f.name, None)
        if value is not None:
            out[f.name] = coerce(f.name, value) if isinstance(value, str) else value
    return out


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model (or continue a run with --resume)")
    p.add_argument("--config", help="YAML file of config keys; command-line options override it")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--extend", action=Switch, default=False,
                   help="with --resume and a larger --epochs: train the run further (the LR schedule is recomputed "
                        "over the new total)")
    for f in dataclasses.fields(TrainConfig):
        _field_option(p, f)
    p.add_argument("--overwrite", action=Switch, default=False,
                   help="replace a run that --out already holds (by default such a folder is refused)")
    p.add_argument("--quiet", action=Switch, default=False,
                   help="no progress bar or per-epoch lines (the final summary line stays)")
    p.add_argument("--dry-run", action=Switch, default=False,
                   help="print the resolved config and the train / test transforms as JSON and exit (reads no data)")


def config_values(args, skip: tuple[str, ...] = (), defaults: dict | None = None) -> tuple[dict, dict]:
    """(all values, the command line's own): ``defaults``, then the ``--config`` YAML, then the command
    line's field flags on top (``skip``: fields that the command sets itself)."""
    values: dict = dict(defaults or {})
    if args.config:
        values.update(read_yaml_config(args.config))
    given = _given(args, skip)
    values.update(given)
    return values, given


def read_yaml_config(path: str) -> dict:
    """The mapping of config keys in the YAML file ``path``; ValueError naming the file otherwise."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of config keys")
    return loaded


def config_from_args(args, skip: tuple[str, ...] = (), defaults: dict | None = None,
                     recommend: bool = False) -> TrainConfig:
    """The config from ``config_values``. ``recommend``: settings still unset take the dataset's
    recommended values for the model's family (``recommended_settings``)."""
    values, _ = config_values(args, skip, defaults)
    return TrainConfig.from_dict(with_recommended(values) if recommend else values)


def cmd_train(args) -> int:
    from ..train import train

    if args.resume:
        folder = RunFolder(args.resume)
        values = folder.stored_config()
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ValueError(f"--out {args.out} with --resume {args.resume}: a resumed run stays in its folder; "
                             "drop --out (or copy the folder first)")
        values.update(_given(args), out=args.resume)
        cfg = TrainConfig.from_dict(values)
        resume = folder.has_checkpoint()  # none: killed before the first epoch ended, so it starts again
    else:
        if args.extend:
            raise ValueError("--extend continues a run: use it with --resume DIR")
        cfg, resume = config_from_args(args, recommend=True), False
    if args.dry_run:
        print(json.dumps(dry_run(cfg), indent=1))
        return 0
    summary = train(cfg, resume=resume, quiet=args.quiet, extend=args.extend and resume,
                    overwrite=args.overwrite or bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per DDP process
        print(json.dumps({k: summary[k] for k in ("top1", "top5", "loss", "params", "epochs")}))
    return 0


def dry_run(cfg: TrainConfig) -> dict:
    """What a run of ``cfg`` would use, without reading data: its resolved config and its transforms, one
    line per step."""
    from ..data.datasets import dataset_transforms
    from ..data.transforms import describe

    train_t, test_t = dataset_transforms(cfg.dataset, image_size=cfg.image_size, augment=cfg.augment,
                                         augment_options=cfg.augment_options(), **cfg.view_options())
    return {"config": cfg.to_dict(), "train_transform": describe(train_t), "test_transform": describe(test_t)}


def cmd_eval(args) -> int:
    import torch

    from torch.utils.data import DataLoader

    from ..data import build_datasets
    from ..train import evaluate, load_run_model
    from ..train.distributed import DistInfo

    model, saved = load_run_model(args.dir)
    try:
        cfg = TrainConfig.from_dict(saved["config"])
    except ValueError as exc:
        raise ValueError(f"{args.dir}: the run's stored config cannot be used ({exc})") from None
    _, test, _ = build_datasets(cfg.dataset, args.data_dir or cfg.data_dir, image_size=cfg.image_size, augment=False,
                                **cfg.view_options())
    loader = DataLoader(test, cfg.batch_size, shuffle=False, num_workers=cfg.workers or 0)
    metrics = evaluate(model, loader, torch.device("cpu"), DistInfo())
    print(json.dumps({"run": args.dir, "epoch": saved["epoch"], **metrics}))
    return 0


def cmd_list(args) -> int:
    from .. import list_activations
    from ..data import list_datasets
    from ..models import get_model_spec, list_models, model_acts

    what = args.what or "all"
    if what in ("activations", "all"):
        variants = sorted(set(model_acts()) - set(list_activations()))
        print("activations: " + ", ".join(list_activations()) + f" (model variants: {', '.join(variants)})")
    if what in ("models", "all"):
        print("models:")
        for name in list_models():
            print(f"  {name:<14} {get_model_spec(name).summary}")
        print("  timm:NAME      any timm classifier (timm.list_models()), random init, every activation converted")
        print("  torchvision:NAME  any torchvision classifier (torchvision.models.list_models()), likewise")
    if what in ("datasets", "all"):
        print("datasets: " + ", ".join(list_datasets()))
    return 0


BENCH_OWN = ("model", "act", "seed", "out", "dataset", "epochs")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="train a grid of activations x models x seeds into DIR/results.db, then report")
    p.add_argument("--acts", help="comma-separated activations (include relu: it is the baseline)")
    p.add_argument("--models", help="comma-separated models")
    p.add_argument("--grid", metavar="FILE", help="YAML grid: settings, seeds and groups of {models, acts, overrides}")
    p.add_argument("--dataset", default=None, help="(default: digits)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, or a range like 0-4 (default: 0,1,2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--config", help="YAML of the other run settings (batch_size, lr, ...); flags override it")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (threads split between them)")
    p.add_argument("--retry-failed", action=Switch, default=False, help="redo runs recorded as failed")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: --jobs processes on this machine; ray: every run a task on a Ray cluster (--out must "
                        "be storage every node sees)")
    p.add_argument("--address", help="Ray cluster to connect to (default: RAY_ADDRESS, else start a local one)")
    p.add_argument("--cpus-per-run", type=int, default=1, help="Ray: CPUs (and torch threads) per run")
    p.add_argument("--gpus-per-run", type=float, default=0, help="Ray: GPUs per run")
    p.add_argument("--speed-repeats", type=int, default=0,
                   help="also run the speed benchmark with this many repeats into DIR/speed.json (0: skip)")
    p.add_argument("--tie", type=float, default=0.0, help="|difference| in top-1 points counted as a tie")
    p.add_argument("--progress", action=Switch, default=False, help="progress bar for each run")
    p.add_argument("--dry-run", action=Switch, default=False,
                   help="print every grid point's resolved config as JSON lines and exit (trains and writes nothing)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in BENCH_OWN:
            _field_option(p, f)


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return items


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-"))
            if lo > hi:
                raise ValueError(text)
            return list(range(lo, hi + 1))
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers or a range like 0-4") from None


def cmd_bench(args) -> int:
    from .. import list_activations
    from ..bench import grid, report

    grid_settings, seeds = {}, None
    if args.grid:
        if args.acts or args.models:
            raise ValueError("give either --grid FILE or --acts/--models, not both")
        grid_settings, groups, seeds = grid.load_grid_file(args.grid)
    elif args.acts and args.models:
        groups = [grid.GridGroup(tuple(_csv(args.models)), tuple(_csv(args.acts)))]
    else:
        raise ValueError("give --acts and --models (or a --grid FILE)")
    seeds = _seeds(args.seeds) if args.seeds is not None else [int(s) for s in seeds or [0, 1, 2]]
    values, given = config_values(args, skip=BENCH_OWN, defaults=grid_settings)
    given.update({k: getattr(args, k) for k in ("dataset", "epochs") if getattr(args, k) is not None})
    values.update(given)
    # the command line beats the grid file's groups too; unset settings take actlab train's defaults
    groups = [dataclasses.replace(g, overrides=tuple((k, v) for k, v in g.overrides if k not in given))
              for g in groups]
    if args.dry_run:
        for _, key, cfg in grid.grid_configs(args.out, values, groups, seeds, recommend=True):
            print(json.dumps({"key": key, "config": cfg.to_dict()}))
        return 0
    ray_options = {"address": args.address, "cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run}
    counts = grid.run_grid(args.out, values, groups, seeds, retry_failed=args.retry_failed, quiet=not args.progress,
                           jobs=args.jobs, executor=args.executor, ray_options=ray_options, recommend=True)
    print("grid: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.speed_repeats:
        from ..perf import speed

        speed_acts = sorted({a for g in groups for a in g.acts if a in list_activations()})  # not model variants
        speed.main(["--acts", ",".join(speed_acts), "--repeats", str(args.speed_repeats),
                    "--json", os.path.join(args.out, report.SPEED_FILE)])
    path, table = report.report_and_table(args.out, tie=args.tie)
    print(table)
    print(f"report: {path} (and report.html)")
    return 0


def cmd_report(args) -> int:
    from ..bench import report

    path, table = report.report_and_table(args.dir, tie=args.tie)
    print(table)
    print(f"report: {path} (and report.html)")
    return 0


def cmd_analyze(args) -> int:
    from ..bench.analyze import analyze

    print(f"analysis: {analyze(args.dir, layer=args.layer, data_dir=args.data_dir, max_batches=args.max_batches)}")
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
    _bench_parser(sub)
    r = sub.add_parser("report", help="write DIR/report.md, report.html and plots from DIR/results.db")
    r.add_argument("dir")
    r.add_argument("--tie", type=float, default=0.0, help="|difference| in top-1 points counted as a tie")
    a = sub.add_parser("analyze", help="DPA memories / IIEU scores of a trained run, into DIR/analysis/")
    a.add_argument("dir")
    a.add_argument("--layer", help="DPA site for the heatmaps (default: the last)")
    a.add_argument("--data-dir", dest="data_dir")
    a.add_argument("--max-batches", dest="max_batches", type=int, help="test batches to use (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "bench": cmd_bench, "report": cmd_report,
                "analyze": cmd_analyze}
    try:
        return handlers[args.command](args)
    except (ValueError, KeyError, OSError, RuntimeError, ArithmeticError, sqlite3.DatabaseError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() adds quotes
        print(f"actlab {args.command}: error: {message}", file=sys.stderr)
        return 2
