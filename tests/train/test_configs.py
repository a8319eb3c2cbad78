"""configs/: the papers' recipes load, validate and build their models."""
import glob
import math
import json
import os

import pytest
import yaml

from actlab.cli.main import main as cli_main
from actlab.models import create_model
from actlab.train import TrainConfig, train
from actlab.train.run_folder import RunFolder

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def load(path: str) -> TrainConfig:
    with open(path) as f:
        return TrainConfig.from_dict(yaml.safe_load(f))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"dpa_vit_tiny_cifar100.yaml", "iieu_resnet26_imagenet.yaml", "iieu_mobilenet_v2_imagenet.yaml",
            "iieu_dc_mobilenet_v2_017_imagenet.yaml"} <= names


RECIPES_DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "recipes.md")


def documented_recipes() -> dict[str, dict]:
    """config file name -> {key: value} from docs/recipes.md: each section's "Applies to" files and its
    table rows whose value is a literal (`per recipe` rows are checked by the recipe-specific test)."""
    import re

    recipes, files = {}, []
    for line in open(RECIPES_DOC):
        if line.startswith("## "):
            files = []
        elif line.startswith("Applies to:") or (files and line.startswith("`configs/")):
            files += re.findall(r"`configs/([\w.]+\.yaml)`", line)
        elif files and line.startswith("| ") and "`" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key, value = cells[2].strip("`"), cells[3]
            if value.startswith("`"):
                for name in files:
                    recipes.setdefault(name, {})[key] = yaml.safe_load(value.strip("`"))
    return recipes


def test_every_recipe_is_documented():
    assert set(documented_recipes()) == {os.path.basename(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_recipe_matches_its_documented_table_and_builds(path, capsys):
    """The dry-run of each recipe (config resolved as `actlab train` resolves it) has every value its
    docs/recipes.md table states, and its model builds."""
    assert cli_main(["train", "--config", path, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    resolved = printed["config"]
    for key, value in documented_recipes()[os.path.basename(path)].items():
        assert resolved[key] == pytest.approx(value) if isinstance(value, float) else resolved[key] == value, key
    cfg = TrainConfig.from_dict(resolved)
    if cfg.act == "dpa":
        assert cfg.lr == pytest.approx(5e-4 * cfg.batch_size / 512)
        assert cfg.dpa_lambda == (1 if cfg.dataset == "cifar10" else 5)
        assert (cfg.mean, cfg.std) == ({"cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
                                        "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])}[cfg.dataset])
        assert printed["test_transform"][1:3] == [
            "Resize(size=36, interpolation=bilinear, max_size=None, antialias=True)", "CenterCrop(size=(32, 32))"]
    elif cfg.model == "mobilenet_v2":
        assert cfg.lr == pytest.approx(0.5 * cfg.batch_size / 1024)
    else:
        assert cfg.lr == pytest.approx(0.1 * cfg.batch_size / 256)
        assert printed["train_transform"][-1] == "RandomErasing(p=0.4, mode=pixel, count=(1, 3))"
    size = cfg.image_size or 32
    kw = {"width": cfg.width} if cfg.width else {}
    if cfg.drop_path is not None:
        kw["drop_path_rate"] = cfg.drop_path
    if cfg.dropout is not None:
        kw["dropout"] = cfg.dropout
    model = create_model(cfg.model, cfg.act, NUM_CLASSES[cfg.dataset], image_size=size, **kw)
    assert model.actlab_config["num_classes"] == NUM_CLASSES[cfg.dataset]


def test_a_recipe_runs_from_the_command_line_with_overrides(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli_main(["train", "--config", CONFIGS[[os.path.basename(p) for p in CONFIGS].index("dpa_vit_tiny_cifar100.yaml")],
                   "--dataset", "synthetic", "--image-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                   "--out", out, "--quiet"])
    assert rc == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["optimizer"] == "adamw" and saved["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert saved["dataset"] == "synthetic" and saved["weight_decay_rule"] == "all"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 1


def _write_cifar(root: str, name: str, n_train: int, n_test: int, classes: int) -> None:
    """Official python-pickle batches (the on-disk format of the CIFAR archives), random images."""
    import pickle

    import numpy as np

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for fname, n in [(f, n_train // len(files)) for f in files] + [("test_batch" if name == "cifar10" else "test", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(os.path.join(root, folder, fname), "wb") as f:
            pickle.dump(batch, f)


def _write_imagefolder(root: str, per_class: int, classes: int = 2) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, f"class{c}", f"{i}.jpg"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.slow
def test_every_recipe_trains_two_steps_at_its_own_augmentation(path, tmp_path):
    """Each recipe, with its augmentation, schedule and model as published, trains two steps (batch 2) on
    small generated files in its dataset's real on-disk format; only size and length are cut (ImageNet
    recipes at 64x64)."""
    cfg = load(path)
    data = str(tmp_path / "data")
    if cfg.dataset.startswith("cifar"):
        _write_cifar(data, cfg.dataset, 10 if cfg.dataset == "cifar10" else 4, 2, NUM_CLASSES[cfg.dataset])
    else:
        _write_imagefolder(data, per_class=2)
    batch = 5 if cfg.dataset == "cifar10" else 2  # 2 steps of the 10 (CIFAR-10) or 4 images
    scale = batch / cfg.batch_size  # the recipes' linear LR scaling rule, down to this batch
    small = dict(cfg.to_dict(), data_dir=data, download=False, epochs=1, warmup_epochs=0, cooldown_epochs=0,
                 batch_size=batch, lr=cfg.lr * scale, warmup_lr=cfg.warmup_lr * scale, min_lr=cfg.min_lr * scale,
                 workers=0, out=str(tmp_path / "run"), log_every=1,
                 image_size=64 if cfg.dataset == "imagenet" else cfg.image_size)
    summary = train(TrainConfig.from_dict(small), quiet=True)
    [epoch] = RunFolder(small["out"]).history()
    assert summary["steps"] == 2 and math.isfinite(epoch["train_loss"]) and math.isfinite(summary["loss"])
