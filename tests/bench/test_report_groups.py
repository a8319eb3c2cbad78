"""The report compares runs of one configuration only; the command line beats grid files; bench and train
share their per-dataset defaults."""
from __future__ import annotations

import json

from actlab.bench import grid, report
from actlab.cli.main import main as cli_main
from actlab.train import TrainConfig


def _row(db, cfg: TrainConfig, top1: float) -> None:
    grid._upsert(db, grid.run_key(cfg), **grid.point_columns(cfg), status="done", top1=top1, top5=100.0, loss=1.0,
                 history="[]", versions=json.dumps({"machine": "x"}), finished=0.0)


def test_runs_of_different_configurations_are_never_summarised_together(tmp_path):
    db = grid.connect(str(tmp_path))
    for epochs, top1 in ((1, 8.6), (2, 9.2)):
        for act in ("relu", "dpa"):
            _row(db, TrainConfig(dataset="synthetic", act=act, epochs=epochs), top1 + (act == "dpa"))
    db.close()
    table = report.ranked_table(str(tmp_path))
    assert "resnet20 [epochs=1] on synthetic" in table and "resnet20 [epochs=2] on synthetic" in table
    rows = [line.split() for line in table.splitlines() if line.strip().startswith(("relu", "dpa"))]
    assert len(rows) == 4 and all(r[1] == "1" for r in rows)  # n = 1 each: no mixed means
    assert "### resnet20 [epochs=2] on synthetic" in open(report.write_report(str(tmp_path))).read()


def _dry_run(capsys, *argv: str) -> list[dict]:
    assert cli_main(["bench", *argv, "--dry-run"]) == 0
    return [json.loads(line)["config"] for line in capsys.readouterr().out.splitlines()]


def test_command_line_beats_the_grid_file_and_defaults_match_train(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("dataset: digits\nlr: 0.3\ngroups:\n  - models: [resnet20]\n    acts: [relu]\n    epochs: 2\n"
                    "    batch_size: 16\n")
    configs = _dry_run(capsys, "--grid", str(path), "--epochs", "1", "--batch-size", "8", "--seeds", "0",
                       "--out", str(tmp_path / "b"))
    assert [(c["epochs"], c["batch_size"], c["lr"]) for c in configs] == [(1, 8, 0.3)]
    # settings left unset take actlab train's per-dataset defaults, per model family
    configs = _dry_run(capsys, "--acts", "relu", "--models", "resnet20,vit_micro", "--seeds", "0",
                       "--out", str(tmp_path / "c"))
    for c in configs:
        assert cli_main(["train", "--model", c["model"], "--dry-run"]) == 0
        trained = json.loads(capsys.readouterr().out)["config"]
        same = {k: v for k, v in trained.items() if k not in ("out", "epochs")}
        assert same == {k: v for k, v in c.items() if k not in ("out", "epochs")}
    assert {c["model"]: c["optimizer"] for c in configs} == {"resnet20": "sgd", "vit_micro": "adamw"}


def test_grid_files_may_not_set_what_the_grid_sets_per_run(tmp_path, capsys):
    for text, key in (("seed: 3\n", "seed"), ("", "model")):
        path = tmp_path / "g.yaml"
        group_extra = "    model: vgg11\n" if key == "model" else ""
        path.write_text(f"{text}groups:\n  - models: [resnet20]\n    acts: [relu]\n{group_extra}")
        assert cli_main(["bench", "--grid", str(path), "--out", str(tmp_path / "b"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"sets '{key}'" in err and len(err.strip().splitlines()) == 1
