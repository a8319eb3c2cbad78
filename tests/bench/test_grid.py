"""The bench grid: kill and rerun keeps finished rows and never duplicates; failures are recorded."""
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from actlab.bench import grid, run_row
from actlab.cli.main import main as cli_main
from actlab.train import TrainConfig, train
from actlab.train.run_folder import RunFolder

BENCH = ["bench", "--acts", "relu,dpa,iieu_dc", "--models", "resnet20,vit_micro", "--dataset", "synthetic",
         "--seeds", "0", "--epochs", "2", "--image-size", "8", "--batch-size", "128"]


def db_rows(folder):
    db = sqlite3.connect(os.path.join(folder, "results.db"))
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM runs")]
    db.close()
    return rows


@pytest.mark.slow
def test_killed_grid_reruns_only_unfinished_runs_without_duplicates(tmp_path):
    out = str(tmp_path / "bench")
    cmd = [sys.executable, "-m", "actlab", *BENCH, "--out", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    finished_lines = 0
    for line in proc.stdout:
        finished_lines += "top1" in line
        if finished_lines == 2:  # two runs recorded: kill the third after its first epoch checkpoint
            deadline = time.time() + 60
            while time.time() < deadline:
                running = [r for r in db_rows(out) if r["status"] == "running"]
                if running and os.path.isfile(os.path.join(running[0]["run_dir"], "checkpoint.pt")):
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    before = {r["key"]: r for r in db_rows(out)}
    done_before = {k for k, r in before.items() if r["status"] == "done"}
    assert len(done_before) == 2
    killed = [r for r in before.values() if r["status"] == "running"]  # the killed run is marked unfinished
    assert len(killed) == 1

    assert cli_main([*BENCH, "--out", out, "--jobs", "2"]) == 0
    after = db_rows(out)
    assert len(after) == len({r["key"] for r in after}) == 2 * 3  # every point once, no duplicates
    by_status = {s: [r for r in after if r["status"] == s] for s in ("done", "skipped")}
    assert len(by_status["done"]) == 5 and len(by_status["skipped"]) == 1  # iieu_dc has no adds in vit_micro
    assert all("residual" in r["error"] for r in by_status["skipped"])
    for r in after:
        if r["key"] in done_before:  # finished runs are kept untouched
            assert r["finished"] == before[r["key"]]["finished"] and r["attempts"] == 1
    assert {r["attempts"] for r in after if r["key"] not in done_before and r["status"] == "done"} <= {1, 2}
    # the killed run continued from its checkpoint and ends as an uninterrupted run of its config ends
    resumed = next(r for r in after if r["key"] == killed[0]["key"])
    assert resumed["status"] == "done" and resumed["attempts"] == 2
    cfg = TrainConfig.from_dict({**json.loads(resumed["config"]), "out": str(tmp_path / "fresh")})
    fresh = train(cfg, quiet=True)
    assert (resumed["top1"], resumed["loss"]) == pytest.approx((fresh["top1"], fresh["loss"]), rel=1e-6)
    assert os.path.isfile(os.path.join(out, "report.md")) and os.path.isfile(os.path.join(out, "accuracy.png"))
    # a third identical command has nothing left to do
    assert cli_main([*BENCH, "--out", out]) == 0
    assert [(r["key"], r["finished"]) for r in db_rows(out)] == [(r["key"], r["finished"]) for r in after]


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    real_train = run_row.train

    def flaky(cfg, resume=False, quiet=True):
        if cfg.act == "gelu":
            raise FloatingPointError("loss is nan at step 3")
        return real_train(cfg, resume=resume, quiet=quiet)

    monkeypatch.setattr(run_row, "train", flaky)
    base = TrainConfig(dataset="synthetic", epochs=1, image_size=8, batch_size=128)
    groups = [grid.GridGroup(("resnet20",), ("gelu", "relu"))]
    counts = grid.run_grid(str(tmp_path), base, groups, [0], log=lambda _: None)
    assert counts == {"done": 1, "failed": 1, "skipped": 0, "kept": 0, "busy": 0}
    rows = {r["act"]: r for r in grid.load_rows(str(tmp_path))}
    assert rows["gelu"]["status"] == "failed" and "FloatingPointError: loss is nan" in rows["gelu"]["error"]
    assert rows["relu"]["status"] == "done" and rows["relu"]["top1"] is not None
    # kept by default, redone with retry_failed (and recorded in the same row)
    assert grid.run_grid(str(tmp_path), base, groups, [0], log=lambda _: None)["kept"] == 2
    monkeypatch.setattr(run_row, "train", real_train)
    counts = grid.run_grid(str(tmp_path), base, groups, [0], retry_failed=True, log=lambda _: None)
    assert counts["done"] == 1
    rows = {r["act"]: r for r in grid.load_rows(str(tmp_path))}
    assert rows["gelu"]["status"] == "done" and rows["gelu"]["attempts"] == 2 and len(rows) == 2


def test_group_overrides_and_keys(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("dataset: synthetic\nseeds: [3]\ngroups:\n  - models: [vit_micro]\n    acts: [relu]\n"
                    "    optimizer: adamw\n    lr: 0.001\n")
    settings, groups, seeds = grid.load_grid_file(str(path))
    assert settings == {"dataset": "synthetic"} and seeds == [3]
    assert dict(groups[0].overrides) == {"optimizer": "adamw", "lr": 0.001}
    a = TrainConfig(dataset="synthetic")
    assert grid.run_key(a) == grid.run_key(dataclasses.replace(a, out="elsewhere", workers=4))
    assert grid.run_key(a) != grid.run_key(dataclasses.replace(a, lr=0.2))
    path.write_text("groups:\n  - models: [vit_micro]\n    acts: [relu]\n    learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key.*learning_rate"):
        grid.load_grid_file(str(path))


def test_bench_errors_name_the_problem(tmp_path, capsys):
    assert cli_main(["bench", "--acts", "relu,nope", "--models", "resnet20", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["bench", "--acts", "relu", "--models", "resnet99", "--out", str(tmp_path)]) == 2
    assert "resnet99" in capsys.readouterr().err
    assert not (tmp_path / "results.db").exists()  # a bad grid is refused before anything is written
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "results.db" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.db").write_bytes(b"this is not sqlite" * 100)
    assert cli_main(["bench", "--acts", "relu", "--models", "resnet20", "--out", str(corrupt)]) == 2
    assert "not a readable actlab results database" in capsys.readouterr().err
    assert (corrupt / "results.db").read_bytes() == b"this is not sqlite" * 100  # left as it was


def test_the_main_jobs_grid_covers_what_it_promises():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "grids", "digits.yaml")
    settings, groups, seeds = grid.load_grid_file(path)
    assert settings["dataset"] == "digits" and len(seeds) == 3
    acts = {m: set(g.acts) for g in groups for m in g.models}
    cnn = next(m for m in acts if m != "vit_micro")
    assert {"relu", "gelu", "silu", "iieu_b", "iieu_dc", "dpa"} <= acts[cnn]
    assert {"relu", "iieu_b", "dpa"} <= acts["vit_micro"]


@pytest.mark.parametrize("seeds", ["3-1", "", "a-b", "1,,x"])
def test_bad_seed_lists_are_errors(tmp_path, capsys, seeds):
    from actlab.cli.main import main as cli

    assert cli(["bench", "--acts", "relu", "--models", "vit_micro", "--dataset", "synthetic", "--seeds", seeds,
                "--out", str(tmp_path / "b")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


SMALL = ["bench", "--acts", "relu,silu", "--models", "vit_micro", "--dataset", "synthetic", "--seeds", "0",
         "--epochs", "1", "--image-size", "8", "--batch-size", "128"]


@pytest.mark.slow
def test_a_leased_run_is_left_to_its_owner_and_a_dead_owners_lease_is_taken_over(tmp_path, capsys):
    out = str(tmp_path / "bench")
    base = TrainConfig(dataset="synthetic", epochs=1, image_size=8, batch_size=128)
    groups = [grid.GridGroup(("vit_micro",), ("relu",))]
    cfg = dataclasses.replace(base, model="vit_micro", act="relu", seed=0)
    run_dir = os.path.join(out, "runs", f"vit_micro-relu-s0-{grid.run_key(cfg)[:8]}")
    with RunFolder(run_dir).lease() as held:  # another bench is training this run
        assert held
        assert grid.run_grid(out, base, groups, [0], log=lambda *_: None)["busy"] == 1
    assert not os.path.isdir(run_dir) and all(r["status"] != "done" for r in db_rows(out))
    # an owner killed while holding the lease: the kernel drops its lock, the next bench trains the run
    code = ("import sys, time; from actlab.train.run_folder import RunFolder\n"
            f"with RunFolder({run_dir!r}).lease() as held:\n    print(held, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "True"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert grid.run_grid(out, base, groups, [0], log=lambda *_: None)["done"] == 1
    assert [r["attempts"] for r in db_rows(out)] == [1]


@pytest.mark.slow
def test_two_benches_on_one_folder_train_each_run_once(tmp_path):
    out = str(tmp_path / "bench")
    cmd = [sys.executable, "-m", "actlab", *SMALL, "--out", out]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
    rows = db_rows(out)
    assert sorted(r["act"] for r in rows) == ["relu", "silu"]
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows), [(r["act"], r["attempts"]) for r in rows]


def test_resume_removes_the_temporary_file_of_an_interrupted_checkpoint_write(tmp_path):
    run = dict(model="vit_micro", act="relu", dataset="synthetic", image_size=8, batch_size=128, out=str(tmp_path / "r"))
    train(TrainConfig(**run, epochs=1), quiet=True)
    orphan = tmp_path / "r" / ".checkpoint-abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    train(TrainConfig(**run, epochs=2), resume=True, extend=True, quiet=True)
    assert not orphan.exists() and (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_grid_takes_library_models_by_name(tmp_path):
    """timm:NAME in a grid: trained, recorded under its name, its run folder without the colon; iieu_dc is
    skipped for it with the reason."""
    base = TrainConfig(dataset="synthetic", epochs=1, image_size=16, batch_size=64)
    groups = [grid.GridGroup(("timm:lcnet_050",), ("relu", "iieu_dc"))]
    counts = grid.run_grid(str(tmp_path), base, groups, [0], log=lambda _: None)
    assert counts["done"] == 1 and counts["skipped"] == 1
    rows = {r["act"]: r for r in grid.load_rows(str(tmp_path))}
    assert rows["relu"]["model"] == "timm:lcnet_050" and rows["relu"]["top1"] is not None
    assert os.listdir(tmp_path / "runs")[0].startswith("timm_lcnet_050-relu-s0-")


def test_a_locked_results_database_is_named_as_locked(tmp_path, monkeypatch, capsys):
    """Another process holding results.db's lock: one line saying so (not "unreadable, move it away")."""
    import sqlite3

    grid.connect(str(tmp_path)).close()
    holder = sqlite3.connect(str(tmp_path / "results.db"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(grid, "DB_TIMEOUT_S", 0.2)
    try:
        assert cli_main(["bench", "--acts", "relu", "--models", "resnet20", "--out", str(tmp_path)]) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert "is locked by another process" in err and "move it away" not in err and err.count("\n") == 1
