"""configs/: the papers' recipes (SPEC section 6) load, validate and build their models."""
import glob
import json
import os

import pytest
import yaml

from actlab.cli.main import main as cli_main
from actlab.models import create_model
from actlab.train import TrainConfig

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
