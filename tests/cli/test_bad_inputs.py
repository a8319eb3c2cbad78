"""The command line under bad input: every expected failure is one line naming the problem, exit code 2,
no traceback, and no file of an existing run or results database touched."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from actlab.cli.main import main as cli

RUN = ["--model", "vit_micro", "--dataset", "synthetic", "--image-size", "8", "--batch-size", "128", "--quiet"]


def snapshot(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha1(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A finished one-epoch run, a corrupt results database, a file where a folder is expected, YAML files."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    assert cli(["train", *RUN, "--epochs", "1", "--out", str(run)]) == 0
    (root / "db").mkdir()
    (root / "db" / "results.db").write_bytes(b"SQLite format 3\x00" + b"\x17" * 4000)
    (root / "file").write_text("not a folder")
    (root / "broken.yaml").write_text("epochs: [1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "typo.yaml").write_text("modle: vit_micro\n")
    (root / "text.yaml").write_text("epochs: ten\n")
    (root / "grid.yaml").write_text("groups: []\n")
    incomplete = root / "incomplete"
    shutil.copytree(run, incomplete)
    import torch

    saved = torch.load(incomplete / "checkpoint.pt", weights_only=True)
    del saved["model_config"]
    torch.save(saved, incomplete / "checkpoint.pt")
    (root / "corrupt").mkdir()
    shutil.copy(run / "config.json", root / "corrupt" / "config.json")
    (root / "corrupt" / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    (root / "seed_grid.yaml").write_text("seed: 3\ngroups:\n  - models: [vit_micro]\n    acts: [relu]\n")
    (root / "model_grid.yaml").write_text("groups:\n  - models: [vit_micro]\n    acts: [relu]\n    model: vgg11\n")
    nohistory = root / "nohistory"  # a finished run whose checkpoint lost its per-epoch history
    shutil.copytree(run, nohistory)
    saved = torch.load(nohistory / "checkpoint.pt", weights_only=True)
    saved["history"] = []
    torch.save(saved, nohistory / "checkpoint.pt")
    newer = root / "newer"  # a run whose stored config has a key this version does not know
    shutil.copytree(run, newer)
    saved = torch.load(newer / "checkpoint.pt", weights_only=True)
    saved["config"]["future_key"] = 1
    torch.save(saved, newer / "checkpoint.pt")
    return root


CASES = [  # (arguments with {root} for the fixture folder, text the message must contain)
    (["train", *RUN, "--model", "resnet9000"], "resnet9000"),
    (["train", *RUN, "--act", "relu7"], "unknown act 'relu7'"),
    (["train", *RUN, "--dataset", "mnist2"], "unknown dataset 'mnist2'"),
    (["train", *RUN, "--epochs", "0"], "epochs must be >= 1"),
    (["train", *RUN, "--epochs", "ten"], "bad value for epochs: 'ten'"),
    (["train", *RUN, "--epochs", "1.5"], "bad value for epochs: '1.5'"),
    (["train", *RUN, "--lr", "inf"], "lr must be a finite number"),
    (["train", *RUN, "--lr", "-1"], "lr must be > 0"),
    (["train", *RUN, "--momentum", "nan"], "momentum must be a finite number"),
    (["train", *RUN, "--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["train", *RUN, "--min-lr", "-1"], "min_lr must be within [0, lr]"),
    (["train", *RUN, "--image-size", "0"], "image_size must be >= 1"),
    (["train", *RUN, "--batch-size", "-4"], "batch_size must be >= 1"),
    (["train", *RUN, "--act-kwargs", "{{bogus: 1}}"], "activation 'relu' takes no setting(s) ['bogus']"),
    (["train", *RUN, "--act-kwargs", "[1, 2]"], "bad value for act_kwargs"),
    (["train", *RUN, "--augment", "maybe"], "bad value for augment: 'maybe'"),
    (["train", *RUN, "--device", "tpu"], "device must be auto, cpu or cuda"),
    (["train", *RUN, "--amp", "half"], "amp must be one of"),
    (["train", *RUN, "--optimizer", "lamb"], "optimizer must be 'sgd' or 'adamw'"),
    (["train", *RUN, "--warmup-epochs", "20", "--epochs", "2"], "warmup_epochs must be within [0, epochs]"),
    (["train", *RUN, "--config", "{root}/missing.yaml"], "missing.yaml not found"),
    (["train", *RUN, "--config", "{root}/broken.yaml"], "is not valid YAML"),
    (["train", *RUN, "--config", "{root}/list.yaml"], "must hold a mapping of config keys"),
    (["train", *RUN, "--config", "{root}/typo.yaml"], "unknown config key(s) ['modle']"),
    (["train", *RUN, "--config", "{root}/text.yaml"], "bad value for epochs: 'ten'"),
    (["train", *RUN, "--out", "{root}/file"], "{root}/file"),
    (["train", *RUN, "--extend"], "--extend continues a run"),
    (["train", "--resume", "{root}/nowhere"], "no config.json there"),
    (["train", "--resume", "{root}/run", "--lr", "0.3"], "lr: checkpoint 0.1 vs now 0.3"),
    (["train", "--resume", "{root}/run", "--epochs", "3"], "resume with --extend"),
    (["train", "--resume", "{root}/run", "--epochs", "1", "--extend"], "the run has trained 1 epoch(s)"),
    (["train", "--resume", "{root}/run", "--out", "{root}/elsewhere"], "a resumed run stays in its folder"),
    (["train", "--resume", "{root}/corrupt"], "not a readable actlab checkpoint"),
    (["eval", "{root}/nowhere"], "no checkpoint at {root}/nowhere"),
    (["eval", "{root}/incomplete"], "incomplete actlab checkpoint: missing ['model_config']"),
    (["eval", "{root}/corrupt"], "not a readable actlab checkpoint"),
    (["bench", "--acts", "relu", "--models", "vit_micro", "--seeds", "3-1", "--out", "{root}/b"], "--seeds '3-1'"),
    (["bench", "--acts", "relu", "--models", "vit_micro", "--seeds", "x", "--out", "{root}/b"], "--seeds 'x'"),
    (["bench", "--acts", "relu", "--out", "{root}/b"], "give --acts and --models"),
    (["bench", "--acts", ",", "--models", "vit_micro", "--out", "{root}/b"], "empty list"),
    (["bench", "--acts", "relu7", "--models", "vit_micro", "--out", "{root}/b"], "unknown act 'relu7'"),
    (["bench", "--grid", "{root}/missing.yaml", "--out", "{root}/b"], "missing.yaml not found"),
    (["bench", "--grid", "{root}/grid.yaml", "--out", "{root}/b"], "non-empty 'groups' list"),
    (["bench", "--acts", "relu", "--models", "vit_micro", "--out", "{root}/db"], "not a readable actlab results database"),
    (["report", "{root}/db"], "not an actlab results database"),
    (["bench", "--grid", "{root}/seed_grid.yaml", "--out", "{root}/b"], "the top level sets 'seed'"),
    (["bench", "--grid", "{root}/model_grid.yaml", "--out", "{root}/b"], "group 0 sets 'model'"),
    (["train", *RUN, "--model", "resnet20", "--width", "2", "--out", "{root}/b"], "resnet20 has no width setting"),
    (["train", *RUN, "--model", "resnet20", "--drop-path", "0.1", "--out", "{root}/b"],
     "resnet20 has no drop_path setting"),
    (["train", *RUN, "--model", "torchvision:vit_b_16", "--out", "{root}/b"],
     "torchvision:vit_b_16 cannot take 3x8x8 images"),
    (["train", *RUN, "--lr", "1e6", "--epochs", "1", "--out", "{root}/diverged"], "the loss became non-finite"),
    (["train", *RUN, "--epochs", "1", "--out", "{root}/run", "--lr", "0.3"], "holds another run"),
    (["train", "--resume", "{root}/nohistory", "--quiet"], "no per-epoch history"),
    (["eval", "{root}/newer"], "the run's stored config cannot be used"),
    (["train", *RUN, "--augment", "maybe"], "bad value for augment: 'maybe'"),
    (["report", "{root}/nowhere"], "results.db not found"),
    (["analyze", "{root}/nowhere"], "no checkpoint at {root}/nowhere"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_code_2(place, capsys, argv, message):
    root = str(place)
    before = {name: snapshot(place / name) for name in ("run", "db", "incomplete", "corrupt")}
    capsys.readouterr()
    assert cli([a.format(root=root) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"actlab {argv[0]}: error: ") and err.count("\n") == 1, err
    assert message.format(root=root) in err
    assert {name: snapshot(place / name) for name in before} == before  # nothing written or removed
    assert not (place / "b").exists() and not (place / "elsewhere").exists()


def test_dry_run_prints_config_and_transforms_without_data(tmp_path, capsys):
    """--dry-run resolves the recipe (YAML, then flags) and its transforms, reads no data (CIFAR-10 is not
    on disk here) and trains nothing."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: cifar10\nmodel: resnet20\ncrop: rrc\nauto_augment: rand-m9-mstd0.5-inc1\n"
                      "random_erasing: 0.25\neval_crop_pct: 0.8888889\n")
    out = tmp_path / "run"
    assert cli(["train", "--config", str(recipe), "--data-dir", str(tmp_path / "nowhere"), "--epochs", "7",
                "--out", str(out), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["epochs"] == 7 and printed["config"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    train = printed["train_transform"]
    assert train[1].startswith("RandomResizedCropAndInterpolation(size=(32, 32)") and train[-1].startswith(
        "RandomErasing(p=0.25, mode=pixel")
    assert printed["test_transform"][1].startswith("Resize(size=36")
    assert not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("auto_augment: rand-x9\n")
    assert cli(["train", "--config", str(bad), "--dry-run"]) == 2
    assert "auto_augment 'rand-x9' is not a valid timm augmentation string" in capsys.readouterr().err
