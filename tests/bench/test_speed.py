"""The speed benchmark's accounting (not its timings, which belong in the README)."""
from __future__ import annotations

import json

import torch

from actlab.activations import IIEUB

from actlab.bench import speed


def test_speed_report_accounts_memory_and_sites(tmp_path, capsys):
    out = tmp_path / "speed.json"
    rows = speed.main(["--acts", "relu,frelu,dpa", "--repeats", "2", "--warmup", "0", "--json", str(out)])
    table = capsys.readouterr().out
    by_key = {(r.activation, r.workload, r.mode): r for r in rows}
    relu = by_key[("relu", "conv", "train")]
    # ReLU's conv step keeps 5 maps of 32x64x32x32 float32 (input, 2 conv outputs for BN, 2 ReLU outputs)
    assert 5 * 8.0 <= relu.saved_mb <= 5 * 8.0 + 1.0
    assert relu.time_vs_relu == 1.0 and relu.memory_vs_relu == 1.0
    assert by_key[("frelu", "mlp", "train")].sites == 0  # FReLU takes no token input: nothing to time
    assert "| frelu | mlp | - | 0 | not applicable" in table
    assert by_key[("dpa", "conv", "train")].memory_vs_relu < 1.05
    assert ("dpa", "conv", "eval") in by_key and ("frelu", "conv", "eval") not in by_key
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows) and "torch" in saved["environment"]


def test_time_ratio_is_the_median_of_per_round_ratios(monkeypatch):
    """Drift of the machine between rounds must cancel: each round's time is divided by ReLU's in that
    round. With these costs the per-round ratios are 2, 2, 1.2 (median 2); medians 10 and 12 would say 1.2."""
    now = {"t": 0.0}
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now["t"])
    round_cost = {"relu": [1, 10, 10], "dpa": [2, 20, 12]}
    calls = {}

    def fake_build(name, workload, device, train, iieu_eta=None):
        def step(backward=True):
            round_index = calls.setdefault((name, train), -1)  # -1: the warmup call
            calls[(name, train)] += 1
            if round_index >= 0:
                now["t"] += round_cost[name][round_index]
        return step, 1

    monkeypatch.setattr(speed, "build", fake_build)
    monkeypatch.setattr(speed, "saved_bytes", lambda fn: 1)  # memory is not what this test is about
    rows = speed.run(["relu", "dpa"], repeats=3, warmup=1, device=torch.device("cpu"), workloads=("mlp",))
    dpa = next(r for r in rows if r.activation == "dpa" and r.mode == "train")
    assert dpa.ms_median == 12000.0 and dpa.time_vs_relu == 2.0


def test_iieu_eta_puts_every_response_below_the_threshold():
    """``--iieu-eta 10``, the kernels' worst case: every unit's eta is 10 and every rho is below it."""
    step, sites = speed.build("iieu_b", "mlp", torch.device("cpu"), True, iieu_eta=10.0)
    units = [m for m in step.model.modules() if isinstance(m, IIEUB)]
    assert sites == len(units) == 1 and bool((units[0].eta == 10.0).all())
    fc1 = step.model[0]
    x_pre = step.inputs[:4]
    assert bool((units[0].ii_score(fc1(x_pre), x_pre) < 10.0).all())


def test_model_speed_rows_ratios_and_budget(monkeypatch, capsys, tmp_path):
    """The whole-model benchmark's accounting on a small stand-in case: every activation gets a row with
    its ratios to ReLU (ReLU's own exactly 1), memory is the bytes saved for backward on the CPU, a spent
    time budget lists the cases it skipped, and the JSON holds each case's rows as soon as it is done."""
    import json

    from actlab.bench import model_speed

    small = (model_speed.Case("resnet20", 4, 8, ("iieu_b", "dpa"), num_classes=10),
             model_speed.Case("vgg11", 4, 8, ("dpa",), num_classes=10))
    monkeypatch.setitem(model_speed.SUITES, "cpu", small)
    written = []
    real_write = model_speed.write_json

    def record(path, rows, *args):
        real_write(path, rows, *args)
        written.append(len(json.load(open(path))["rows"]))

    monkeypatch.setattr(model_speed, "write_json", record)
    rows = model_speed.main(["--suite", "cpu", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--budget-s", "0",
                             "--json", str(tmp_path / "speed.json")])
    assert written == [3, 3]  # after the case, and at the end
    assert json.load(open(tmp_path / "speed.json"))["skipped"] == ["vgg11, batch 4, 8x8, eager"]
    out = capsys.readouterr().out
    assert [r.activation for r in rows] == ["relu", "iieu_b", "dpa"]  # the first case runs, then the budget is spent
    assert rows[0].time_vs_relu == 1.0 and rows[0].memory_vs_relu == 1.0 and rows[0].mean_vs_relu == 1.0
    assert all(r.memory_mb > 0 and r.ms_median > 0 and r.ms_mean > 0 for r in rows)
    assert "mean ms (x ReLU)" in out
    assert "skipped (time budget): vgg11, batch 4, 8x8, eager" in out
