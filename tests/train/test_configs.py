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
    assert {"dpa_vit_tiny_cifar100.yaml", "iieu_resnet26_imagenet.yaml", "iieu_mobilenet_v2_imagenet.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_follows_its_paper_recipe_and_builds(path):
    cfg = load(path)
    if cfg.act == "dpa":
        assert (cfg.optimizer, cfg.epochs, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 300, 0.05, 20)
        assert (cfg.grad_clip, cfg.drop_path, cfg.randaugment, cfg.random_erasing) == (1.0, 0.1, 9, 0.25)
        assert cfg.lr == pytest.approx(5e-4 * cfg.batch_size / 512)
        assert cfg.dpa_lambda == (1 if cfg.dataset == "cifar10" else 5)
    else:
        assert (cfg.optimizer, cfg.momentum, cfg.warmup_epochs, cfg.label_smoothing) == ("sgd", 0.9, 5, 0.1)
        if cfg.model == "mobilenet_v2":
            assert (cfg.epochs, cfg.weight_decay) == (240, 4e-5) and cfg.lr == pytest.approx(0.5 * cfg.batch_size / 1024)
        else:
            assert (cfg.epochs, cfg.weight_decay) == (120, 1e-4) and cfg.lr == pytest.approx(0.1 * cfg.batch_size / 256)
    size = cfg.image_size or 32
    kw = {"width": cfg.width} if cfg.width else {}
    if cfg.drop_path is not None:
        kw["drop_path_rate"] = cfg.drop_path
    model = create_model(cfg.model, cfg.act, NUM_CLASSES[cfg.dataset], image_size=size, **kw)
    assert model.actlab_config["num_classes"] == NUM_CLASSES[cfg.dataset]


def test_a_recipe_runs_from_the_command_line_with_overrides(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli_main(["train", "--config", CONFIGS[[os.path.basename(p) for p in CONFIGS].index("dpa_vit_tiny_cifar100.yaml")],
                   "--dataset", "synthetic", "--image-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                   "--out", out, "--quiet"])
    assert rc == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["optimizer"] == "adamw" and saved["randaugment"] == 9 and saved["dataset"] == "synthetic"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 1
