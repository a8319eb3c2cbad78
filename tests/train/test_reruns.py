"""Reruns keep work: randomness is a function of (seed, epoch, sample index), run identity is defined once,
and a run folder is never silently replaced."""
from __future__ import annotations

import json
import os

import pytest
import torch

from actlab.bench import grid
from actlab.cli.main import main as cli_main
from actlab.train import TrainConfig, train
from actlab.train import loop as train_loop
from actlab.train.checkpoint import load as load_checkpoint
from actlab.train.config import NOT_IDENTITY
from actlab.train.run_folder import RunFolder

# heavy per-sample randomness (pad-crop, RandAugment, erasing) and drop-path in the model
AUGMENTED = dict(model="vit_micro", act="dpa", dataset="synthetic", image_size=8, epochs=2, batch_size=64,
                 optimizer="adamw", lr=2e-3, drop_path=0.1, auto_augment="rand-m9-mstd0.5-inc1",
                 random_erasing=0.5, log_every=3)


def _weights(folder: str) -> dict:
    return load_checkpoint(os.path.join(folder, "checkpoint.pt"))["model"]


def _assert_same_run(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha, hb = RunFolder(a).history(), RunFolder(b).history()
    keys = [k for k in ha[0] if k not in ("seconds", "images_per_s")]
    assert [[r[k] for k in keys] for r in ha] == [[r[k] for k in keys] for r in hb]


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_loader_workers(tmp_path):
    """Same seed, 0, 1 and 2 loader workers: bitwise the same weights, DPA memories and metrics."""
    for workers in (0, 1, 2):
        train(TrainConfig(**AUGMENTED, workers=workers, out=str(tmp_path / f"w{workers}")), quiet=True)
    _assert_same_run(str(tmp_path / "w0"), str(tmp_path / "w1"))
    _assert_same_run(str(tmp_path / "w0"), str(tmp_path / "w2"))


class _Killed(Exception):
    pass


def _stop_after_first_checkpoint(monkeypatch) -> None:
    """The trainer dies right after writing its first epoch's checkpoint (as a SIGKILL then would)."""
    real = train_loop.RunLog.rewrite

    def rewrite(self, history):
        real(self, history)
        if len(history) == 1:
            raise _Killed

    monkeypatch.setattr(train_loop.RunLog, "rewrite", rewrite)


@pytest.mark.slow
def test_a_resume_that_changes_workers_and_paths_continues_exactly(tmp_path, monkeypatch):
    """Killed after epoch 1 with 0 workers, resumed by the bench grid with 2 workers, another log interval,
    and the folder spelled differently: the checkpoint is kept (epoch 1 is not trained again) and the run
    ends bitwise as an uninterrupted one."""
    train(TrainConfig(**AUGMENTED, workers=0, out=str(tmp_path / "whole")), quiet=True)
    cfg = TrainConfig(**AUGMENTED, workers=0, out=str(tmp_path / "runs" / "a"))
    with monkeypatch.context() as m:
        _stop_after_first_checkpoint(m)
        with pytest.raises(_Killed):
            train(cfg, quiet=True)
    first_epoch = RunFolder(cfg.out).history()
    assert len(first_epoch) == 1
    moved = TrainConfig.from_dict({**cfg.to_dict(), "workers": 2, "log_every": 7,
                                   "out": os.path.join(str(tmp_path), ".", "runs", "..", "runs", "a")})
    folder = RunFolder(moved.out)
    assert folder.resumable(moved)
    row = grid.train_row(moved, folder)
    assert row["status"] == "done", row.get("error")
    history = json.loads(row["history"])
    assert history[0]["seconds"] == first_epoch[0]["seconds"]  # epoch 1 was kept, not trained again
    _assert_same_run(str(tmp_path / "whole"), cfg.out)


def test_identity_is_one_list_for_grid_keys_and_resume():
    a = TrainConfig(dataset="synthetic")
    for key in NOT_IDENTITY:
        value = {"out": "elsewhere", "data_dir": "/data", "download": True, "workers": 3, "log_every": 5,
                 "device": "cpu", "compile": True, "cuda_graphs": True}[key]
        b = TrainConfig.from_dict({**a.to_dict(), key: value})
        assert grid.run_key(a) == grid.run_key(b), key
        assert a.identity() == b.identity(), key
    assert grid.run_key(a) != grid.run_key(TrainConfig.from_dict({**a.to_dict(), "lr": 0.2}))


def _cli_train(*extra: str) -> list[str]:
    return ["train", "--model", "resnet20", "--dataset", "synthetic", "--image-size", "8", "--epochs", "1",
            "--batch-size", "128", "--quiet", *extra]


def test_train_refuses_a_folder_that_holds_another_run(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli_main(_cli_train("--out", out)) == 0
    stored = open(os.path.join(out, "config.json")).read()
    capsys.readouterr()
    # another configuration: refused, naming what differs; nothing in the folder changes
    assert cli_main(_cli_train("--out", out, "--lr", "0.2")) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "lr: 0.1 there vs 0.2 now" in err and "--overwrite" in err
    assert open(os.path.join(out, "config.json")).read() == stored
    # the same configuration: refused too, pointing to eval (it finished)
    assert cli_main(_cli_train("--out", out)) == 2
    assert "already holds this run (finished)" in capsys.readouterr().err
    # --overwrite replaces it
    assert cli_main(_cli_train("--out", out, "--lr", "0.2", "--overwrite")) == 0
    assert json.load(open(os.path.join(out, "config.json")))["lr"] == 0.2


def test_a_run_killed_before_its_first_checkpoint_is_refused_then_resumes(tmp_path, capsys):
    """A folder with only the config of a run that died in its first epoch (and a torn checkpoint
    temporary): another config is refused without touching it, and --resume restarts it cleanly."""
    out = tmp_path / "r"
    cfg = TrainConfig(model="resnet20", dataset="synthetic", image_size=8, epochs=1, batch_size=128, out=str(out))
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / ".checkpoint-abc.tmp").write_bytes(b"torn")
    assert cli_main(_cli_train("--out", str(out), "--lr", "0.3")) == 2
    assert "holds another run" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1
    assert cli_main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file() and not [n for n in os.listdir(out) if n.endswith(".tmp")]
