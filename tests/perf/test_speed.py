"""The speed benchmark's accounting (not its timings, which belong in the README)."""
from __future__ import annotations

import json

import torch

from actlab.activations import IIEUB

from actlab.perf import speed, timing


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
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now["t"])
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
    model, x, sites = speed.build_model("iieu_b", "mlp", iieu_eta=10.0)
    units = [m for m in model.modules() if isinstance(m, IIEUB)]
    assert sites == len(units) == 1 and bool((units[0].eta == 10.0).all())
    fc1 = model[0]
    x_pre = x[:4]
    assert bool((units[0].ii_score(fc1(x_pre), x_pre) < 10.0).all())


def test_model_speed_rows_ratios_and_budget(monkeypatch, capsys, tmp_path):
    """The whole-model benchmark's accounting on a small stand-in case: every activation gets a row with
    its ratios to ReLU (ReLU's own exactly 1), memory is the bytes saved for backward on the CPU, a spent
    time budget lists the cases it skipped, and the JSON holds each case's rows as soon as it is done."""
    import json

    from actlab.perf import model_speed

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


def test_model_speed_prints_the_cost_models_counts_beside_bf16_eager_rows(monkeypatch):
    """The committed counts table covers every activation of the GPU suite (DPA with its interval mean);
    a bf16 eager row of a counted case carries them and prints them, a compiled or float32 row does not."""
    from actlab.perf import model_speed

    table = model_speed._counts()
    for case in model_speed.SUITES["gpu"]:
        for act in case.acts:
            entry = table[model_speed.count_key(case, act)]
            assert ("interval" in entry) == (act == "dpa")
            assert all(e["kernels_per_site"] > -5 and e["host_calls_per_site"] > 0 for e in entry.values())
            assert all(e["bytes"] > 0 and e["host_calls"] > e["kernels"] > 0 for e in entry.values())
        relu = table[model_speed.count_key(case, "relu")]
        assert set(relu) == {"ordinary"} and relu["ordinary"]["bytes"] > 0
    case = model_speed.SUITES["gpu"][0]
    act = case.acts[0]
    got = model_speed.counted(case, act, torch.bfloat16, "eager")
    assert got == table[model_speed.count_key(case, act)]
    assert model_speed.counted(case, act, torch.bfloat16, "compiled") is None
    assert model_speed.counted(case, act, torch.bfloat16, "cudagraphs") is None
    assert model_speed.counted(case, act, None, "eager") is None
    row = model_speed.Row(case.label, act, "eager", "bf16", 10.0, 1.0, 5.0, counted=got)
    plain = model_speed.Row(case.label, "relu", "eager", "bf16", 8.0, 1.0, 5.0,
                            counted=model_speed.counted(case, "relu", torch.bfloat16, "eager"))
    text = model_speed.markdown([plain, row], 5, torch.device("cpu"))
    ordinary = got["ordinary"]
    assert f"| {ordinary['kernels_per_site']:.1f} / {ordinary['host_calls_per_site']:.1f} |" in text
    assert text.splitlines()[-2].endswith("| - | - |")  # ReLU's row: nothing beyond itself, no target
