"""The bench grid on a real local Ray cluster (2 CPUs): same rows as the local pool, a killed worker's run
retried and resumed from its checkpoint, an interrupted driver's grid finished by a rerun."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from actlab.bench import grid
from actlab.train import TrainConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray cluster and whole grids: about 3 minutes on 2 cores
BASE = TrainConfig(dataset="digits", epochs=1, image_size=16, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def rows(folder) -> dict:
    return {(r["act"], r["seed"]): r for r in grid.load_rows(str(folder))}


def test_ray_grid_equals_the_local_pool(tmp_path, cluster):
    """2 activations x 2 seeds: the same rows, bitwise equal metrics (one thread per run in both)."""
    groups = [grid.GridGroup(("resnet20",), ("relu", "dpa"))]
    local = grid.run_grid(str(tmp_path / "local"), BASE, groups, [0, 1], jobs=2, log=lambda _: None)
    on_ray = grid.run_grid(str(tmp_path / "ray"), BASE, groups, [0, 1], executor="ray",
                           ray_options={"cpus_per_run": 1}, log=lambda _: None)
    assert local == on_ray == {"done": 4, "failed": 0, "skipped": 0, "kept": 0, "busy": 0}
    a, b = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert set(a) == set(b) and len(a) == 4
    for k in a:
        assert (a[k]["top1"], a[k]["top5"], a[k]["loss"]) == (b[k]["top1"], b[k]["top5"], b[k]["loss"]), k
        assert b[k]["status"] == "done" and b[k]["attempts"] == 1


def _kill_first_worker_after_a_checkpoint(runs: str, killed: list) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(os.path.join(runs, "*", "checkpoint.pt")):
        time.sleep(0.05)
    found = subprocess.run(["pgrep", "-f", "ray::train_task"], capture_output=True, text=True).stdout.split()
    for pid in found:
        os.kill(int(pid), signal.SIGKILL)
        killed.append(int(pid))


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, cluster):
    base = dataclasses.replace(BASE, epochs=4)
    groups = [grid.GridGroup(("resnet20",), ("relu",))]
    reference = grid.run_grid(str(tmp_path / "local"), base, groups, [0], jobs=2, log=lambda _: None)
    assert reference["done"] == 1
    killed: list = []
    killer = threading.Thread(target=_kill_first_worker_after_a_checkpoint, args=(str(tmp_path / "ray" / "runs"), killed))
    killer.start()
    counts = grid.run_grid(str(tmp_path / "ray"), base, groups, [0], executor="ray", log=lambda _: None)
    killer.join()
    assert killed, "no Ray worker was running the task"
    assert counts["done"] == 1
    got, want = rows(tmp_path / "ray"), rows(tmp_path / "local")
    assert len(got) == 1  # one row, no duplicate
    row = got[("relu", 0)]
    assert row["status"] == "done" and (row["top1"], row["loss"]) == (want[("relu", 0)]["top1"], want[("relu", 0)]["loss"])
    log = [json.loads(line) for line in open(os.path.join(row["run_dir"], "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # resumed, not restarted: every epoch once


def test_an_interrupted_driver_is_finished_by_a_rerun(tmp_path, cluster):
    groups = [grid.GridGroup(("resnet20",), ("relu", "gelu"))]
    seen = []

    def stop_after_first(line: str) -> None:
        seen.append(line)
        raise KeyboardInterrupt  # the driver dies after recording one run

    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(str(tmp_path), BASE, groups, [0, 1], executor="ray", log=stop_after_first)
    first = {k: r for k, r in rows(tmp_path).items() if r["status"] == "done"}
    assert len(first) == 1
    counts = grid.run_grid(str(tmp_path), BASE, groups, [0, 1], executor="ray", log=lambda _: None)
    assert counts["kept"] == 1 and counts["done"] == 3
    final = rows(tmp_path)
    assert len(final) == 4 and all(r["status"] == "done" for r in final.values())
    (key, row), = first.items()
    assert final[key]["finished"] == row["finished"]  # the finished run was not trained again


def test_clear_errors_without_ray_or_shared_storage(tmp_path, monkeypatch):
    from actlab.bench import ray_executor

    cfg = dataclasses.replace(BASE, out=str(tmp_path / "not-mounted" / "runs" / "r"))
    import torch

    threads = torch.get_num_threads()
    status, row = ray_executor.train_task(cfg, 1, True)
    assert torch.get_num_threads() == threads  # this process's threads untouched
    assert status == "failed" and "is not visible on node" in row["error"] and "every node" in row["error"]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ValueError, match=r"--executor ray needs Ray: pip install 'actlab\[ray\]'"):
        grid.run_grid(str(tmp_path / "g"), BASE, [grid.GridGroup(("resnet20",), ("relu",))], [0], executor="ray")


@pytest.mark.parametrize("options,message", [
    ({"gpus_per_run": 1}, r"no node of the Ray cluster has 1 CPU\(s\) and 1 GPU\(s\)"),
    ({"cpus_per_run": 64}, r"no node of the Ray cluster has 64 CPU\(s\)"),
])
def test_resources_no_node_has_fail_at_once(tmp_path, cluster, options, message):
    """A grid that the cluster could never run fails before anything is submitted, within seconds."""
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        grid.run_grid(str(tmp_path), BASE, [grid.GridGroup(("resnet20",), ("relu",))], [0], executor="ray",
                      ray_options=options, log=lambda _: None)
    assert time.perf_counter() - t0 < 20
    assert not glob.glob(str(tmp_path / "runs" / "*"))


def test_an_out_no_node_sees_fails_at_once(tmp_path, cluster):
    from actlab.bench import ray_executor

    with pytest.raises(ValueError, match="is not visible on Ray node .* every node"):
        ray_executor.check_visible(None, str(tmp_path / "only-on-the-driver"))
    ray_executor.check_visible(None, str(tmp_path))  # a folder the node sees passes


def test_a_relative_out_runs_on_ray(tmp_path, cluster, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = grid.run_grid("rel", BASE, [grid.GridGroup(("resnet20",), ("relu",))], [0], executor="ray",
                           log=lambda _: None)
    assert counts["done"] == 1 and rows(tmp_path / "rel")[("relu", 0)]["status"] == "done"


def test_an_unreachable_address_fails_in_seconds(tmp_path, capsys):
    """No cluster behind --address: one line and exit code 2, not a wait (a fresh process: no Ray yet)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "actlab", "bench", "--acts", "relu", "--models", "resnet20",
                           "--seeds", "0", "--executor", "ray", "--address", "127.0.0.1:1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and time.perf_counter() - t0 < 60


def test_a_stalled_grid_prints_progress(tmp_path, cluster):
    """While no run finishes, a progress line comes every wait_s seconds (60 by default)."""
    lines = []
    counts = grid.run_grid(str(tmp_path), BASE, [grid.GridGroup(("resnet20",), ("relu",))], [0], executor="ray",
                           ray_options={"wait_s": 0.5}, log=lines.append)
    assert counts["done"] == 1
    waiting = [line for line in lines if "running or queued on the Ray cluster; none finished in the last" in line]
    assert waiting and waiting[0].startswith("[0 done, 1 running or queued")
