"""The cost model's prediction of measured GPU steps: the fit, the rows it annotates, the table, and the
compiled modes the GPU suite times (their plumbing; the GPU itself is not here)."""
from __future__ import annotations

import math

import pytest
import torch

from actlab.perf import model_speed, prediction, timing


def counts(gb: float, host_calls: float) -> dict:
    return {"bytes": gb * 1e9, "host_calls": host_calls, "kernels": host_calls / 2}


def test_fit_recovers_the_per_call_cost_that_made_the_times():
    """Times made by 4 TB/s and 7 us per call are fitted back to 7 us; a prediction is bytes plus calls."""
    truth = prediction.CostModel(4e12, 7.0)
    points = [(c, truth.predict_ms(c)) for c in (counts(12.0, 900), counts(20.0, 2500), counts(3.0, 600))]
    fitted = prediction.fit(points, 4e12)
    assert fitted.host_us == pytest.approx(7.0, rel=1e-12)
    assert fitted.predict_ms(counts(8.0, 1000)) == pytest.approx(8e9 / 4e12 * 1e3 + 1000 * 7e-3, rel=1e-12)
    assert fitted.device_ms(counts(8.0, 1000)) == pytest.approx(2.0)


def test_fit_is_least_squares_and_never_negative():
    # residuals after the bytes: 1 ms over 100 calls, 3 ms over 200 calls -> (100*1 + 200*3) / (100^2 + 200^2) ms
    points = [(counts(4.0, 100), 1.0 + 1.0), (counts(4.0, 200), 1.0 + 3.0)]
    assert prediction.fit(points, 4e12).host_us == pytest.approx(700 / 50000 * 1e3)
    faster_than_bytes = [(counts(40.0, 100), 1.0)]  # 10 ms of bytes measured in 1 ms: no negative call cost
    assert prediction.fit(faster_than_bytes, 4e12).host_us == 0.0


def test_fit_refuses_nothing_to_fit_on_and_a_bad_bandwidth():
    with pytest.raises(ValueError, match="at least one counted step"):
        prediction.fit([], 4e12)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        prediction.fit([(counts(1.0, 10), 1.0)], 0.0)


def test_disagreement_is_twenty_percent_either_way():
    assert not prediction.disagrees(12.0, 10.0) and not prediction.disagrees(8.5, 10.0)
    assert prediction.disagrees(12.5, 10.0) and prediction.disagrees(7.5, 10.0)


def _row(act: str, ms: float, ordinary: dict | None, interval: dict | None = None, mean: float | None = None):
    entry = None if ordinary is None else {"ordinary": ordinary, **({"interval": interval} if interval else {})}
    row = model_speed.Row("case", act, "eager", "bf16", ms, 0.1, 1.0, counted=entry)
    row.ms_mean = ms if mean is None else mean
    return row


def test_predict_fits_on_the_extras_over_relu_and_predicts_every_counted_row():
    """The per-call cost comes from what the activations add to ReLU's step in the same case; every counted
    row then gets its step predicted beside its median, an activation its extra beside the measured extra,
    DPA its interval mean beside its mean; uncounted rows (compiled) get none. The table flags a row more
    than 20 % off and says how the model was made."""
    truth = prediction.CostModel(4e12, 10.0)
    relu = counts(10.0, 1000)
    iieu, dpa, dpa_interval = counts(13.0, 1800), counts(10.0, 1100), counts(10.5, 1300)
    relu_ms = truth.predict_ms(relu) + 20.0  # arithmetic the counts do not see: in every step alike
    rows = [_row("relu", relu_ms, relu),
            _row("iieu_b", relu_ms + 10.0, iieu),
            _row("dpa", relu_ms + 1.0, dpa, dpa_interval, mean=relu_ms + 3.0),
            _row("iieu_dc", 50.0, None)]
    model = model_speed.predict(rows, 4e12)
    extra = [(counts(3.0, 800), 10.0), (counts(0.0, 100), 1.0)]
    assert model.host_us == pytest.approx(prediction.fit(extra, 4e12).host_us)
    assert rows[0].predicted_ms == pytest.approx(model.predict_ms(relu))
    assert rows[1].predicted_extra_ms == pytest.approx(model.predict_ms(counts(3.0, 800)))
    assert rows[2].predicted_mean_ms == pytest.approx(model.predict_ms(dpa_interval))
    assert math.isnan(rows[0].predicted_extra_ms) and math.isnan(rows[3].predicted_ms)
    text = model_speed.prediction_markdown(rows, model, "given")
    lines = {line.split(" | ")[1]: line for line in text.splitlines()[4:]}
    assert set(lines) == {"relu", "iieu_b", "dpa"}
    assert "(off by more than 20 %)" in lines["relu"].split(" | ")[5]  # 20 ms of arithmetic not counted
    assert f"{rows[1].predicted_extra_ms:.1f} / 10.0 |" in lines["iieu_b"]
    assert f"{rows[2].predicted_mean_ms:.1f} / {relu_ms + 3.0:.1f}" in lines["dpa"]
    assert "4.00 TB/s (given)" in text and f"{model.host_us:.2f} us each" in text


def test_the_fitted_cost_predicts_extras_made_by_it_exactly():
    truth = prediction.CostModel(4e12, 10.0)
    relu = counts(10.0, 1000)
    rows = [_row("relu", 99.0, relu)]
    for gb, calls in ((13.0, 1800), (11.0, 1500), (9.5, 1100)):
        c = counts(gb, calls)
        rows.append(_row("x", 99.0 + truth.predict_ms({k: c[k] - relu[k] for k in ("bytes", "host_calls")}), c))
    assert model_speed.predict(rows, 4e12).host_us == pytest.approx(10.0)
    assert all(r.predicted_extra_ms == pytest.approx(r.ms_median - 99.0) for r in rows[1:])


def test_predict_without_a_counted_relu_row_predicts_nothing():
    rows = [_row("relu", 10.0, None), _row("iieu_b", 12.0, counts(13.0, 1800))]
    assert model_speed.predict(rows, 4e12) is None
    assert all(math.isnan(r.predicted_ms) for r in rows)


def test_copy_bandwidth_refuses_a_device_without_cuda_memory():
    with pytest.raises(ValueError, match="CUDA device"):
        timing.copy_bandwidth(torch.device("cpu"))


@pytest.mark.parametrize("mode,compile_mode", [("eager", None), ("compiled", "default"),
                                               ("cudagraphs", "reduce-overhead")])
def test_each_mode_compiles_as_it_says_and_cuda_graph_steps_begin_a_replay(monkeypatch, mode, compile_mode):
    """eager: the model itself; compiled: torch.compile's default mode; cudagraphs: its reduce-overhead mode
    (CUDA graphs), each step marked as a new replay so that the last step's outputs may be overwritten."""
    compiled_with, marks = [], []

    def fake_compile(model, mode=None):
        compiled_with.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    case = model_speed.Case("resnet20", 2, 8, ("relu",), num_classes=10)
    step = model_speed.TrainingStep(case, "relu", torch.device("cpu"), None, mode)
    assert compiled_with == ([] if compile_mode is None else [compile_mode])
    step()
    step()
    assert len(marks) == (2 if mode == "cudagraphs" else 0)
    assert step.graphs_skipped == 0


def test_the_compile_choice_takes_a_list_of_modes_or_a_name():
    parse = model_speed.build_parser().parse_args
    assert parse(["--compile", "all"]).compile == ("eager", "compiled", "cudagraphs")
    assert parse(["--compile", "both"]).compile == ("eager", "compiled")
    assert parse(["--compile", "compiled,cudagraphs"]).compile == ("compiled", "cudagraphs")
    with pytest.raises(SystemExit):
        parse(["--compile", "compiled,graphs"])


def test_eager_goes_first_then_each_case_in_its_compiled_modes(monkeypatch):
    """All eager cases first; then case by case both compiled modes, so that the second compile of a model
    finds the first's kernels cached; a spent budget lists what it skipped."""
    ran = []

    def fake_run_case(case, device, dtype, mode, repeats, warmup):
        ran.append((case.model, mode))
        return [model_speed.Row(case.label, a, mode, "bf16", 1.0, 0.0, 1.0) for a in ("relu", *case.acts)]

    monkeypatch.setattr(model_speed, "run_case", fake_run_case)
    cases = (model_speed.Case("a", 1, 8, ("dpa",)), model_speed.Case("b", 1, 8, ("dpa",)))
    timing = model_speed.Timing(repeats=2, warmup=0)
    rows, skipped = model_speed.time_suite(cases, model_speed.MODE_SETS["all"], torch.device("cpu"), None, timing)
    assert ran == [("a", "eager"), ("b", "eager"), ("a", "compiled"), ("a", "cudagraphs"), ("b", "compiled"),
                   ("b", "cudagraphs")]
    assert len(rows) == 12 and skipped == []
    ran.clear()
    rows, skipped = model_speed.time_suite(cases, ("compiled", "cudagraphs"), torch.device("cpu"), None,
                                           model_speed.Timing(2, 0, budget_s=0.0))
    assert ran == [("a", "compiled")]
    assert skipped == ["a, batch 1, 8x8, compiled, CUDA graphs", "b, batch 1, 8x8, compiled",
                       "b, batch 1, 8x8, compiled, CUDA graphs"]


def test_targets_are_judged_on_time_memory_and_dpas_interval_mean():
    """A target is met only within both bounds; DPA's time is its mean over whole intervals (its update
    steps included), the others' the median of per-round ratios. The GPU suite carries the issue's table."""
    row = model_speed.Row("case", "iieu_b", "eager", "bf16", 10.0, 0.1, 1.0, time_vs_relu=1.2, memory_vs_relu=1.12)
    assert model_speed.Target(1.25).verdict(row) == "<= 1.25x time: met"
    assert model_speed.Target(1.25, 1.10).verdict(row) == "<= 1.25x time, <= 1.10x memory: missed (memory 1.12x)"
    dpa = model_speed.Row("case", "dpa", "eager", "bf16", 10.0, 0.1, 1.0, time_vs_relu=1.01, memory_vs_relu=1.0,
                          mean_vs_relu=1.08)
    assert model_speed.Target(1.05, 1.05).verdict(dpa) == "<= 1.05x time, <= 1.05x memory: missed (time 1.08x)"
    gpu = {c.model: dict(c.targets) for c in model_speed.SUITES["gpu"]}
    assert gpu["resnet26"] == {"iieu_b": model_speed.Target(1.25, 1.10), "iieu_dc": model_speed.Target(1.35)}
    assert gpu["resnet50"]["dpa"] == model_speed.Target(1.05) and gpu["vit_tiny"]["dpa"] == model_speed.Target(1.05, 1.05)
    assert all(set(t) == set(c.acts) for c, t in zip(model_speed.SUITES["gpu"], gpu.values()))
    for case in model_speed.SUITES["cpu"]:  # the CPU targets of ResNet-26's whole training step
        assert dict(case.targets) == {"iieu_b": model_speed.Target(1.2), "iieu_dc": model_speed.Target(1.3, 1.15)}


def test_the_gpu_suite_prints_targets_and_predictions_end_to_end(monkeypatch, tmp_path, capsys):
    """A stand-in GPU suite (bf16, eager) on the CPU with a given bandwidth: the speed table carries each
    activation's target verdict, the prediction table every counted row (ReLU and DPA with its interval), and
    the figures file both."""
    small = (model_speed.Case("resnet20", 2, 8, ("dpa",), num_classes=10, targets=(("dpa", model_speed.Target(9.0)),)),)
    monkeypatch.setitem(model_speed.SUITES, "gpu", small)
    key = model_speed.count_key
    monkeypatch.setattr(model_speed, "_counts", lambda: {
        key(small[0], "relu"): {"ordinary": counts(0.02, 300)},
        key(small[0], "dpa"): {"ordinary": counts(0.02, 340), "interval": counts(0.021, 350)}})
    rows = model_speed.main(["--suite", "gpu", "--device", "cpu", "--compile", "eager", "--repeats", "5",
                             "--warmup", "1", "--bandwidth", "1e12", "--figures", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r.activation for r in rows] == ["relu", "dpa"]
    assert rows[1].target.startswith("<= 9.00x time: ")
    assert all(r.predicted_ms > 0 for r in rows) and rows[1].predicted_extra_ms > 0
    assert "Cost model: a step's counted bytes at 1.00 TB/s (given)" in out
    figure = next(tmp_path.glob("*.md")).read_text()
    assert "| resnet20, batch 2, 8x8 | dpa | 0.02, 340 |" in figure and "<= 9.00x time" in figure


def test_the_first_step_is_timed_apart_and_a_compiled_row_states_it(monkeypatch):
    """The first warm-up call of each step (where compilation happens) is reported in seconds; the timed
    rounds come after it; a compiled row's mode says how long its first step took."""
    now = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now["t"])
    cost = {"a": [30.0, 1.0, 0.002, 0.002], "b": [50.0, 2.0, 0.003, 0.003]}
    calls = {"a": 0, "b": 0}

    def step(key):
        def call():
            now["t"] += cost[key][calls[key]]
            calls[key] += 1
        return call

    first = {}
    times = timing.time_interleaved({"a": step("a"), "b": step("b")}, 2, 2, torch.device("cpu"), first)
    assert first == {"a": 30.0, "b": 50.0}
    assert times == {"a": [pytest.approx(2.0)] * 2, "b": [pytest.approx(3.0)] * 2}
    row = model_speed.Row("case", "relu", "compiled", "bf16", 2.0, 0.0, 1.0, first_step_s=41.6)
    assert "| bf16, compiled; first step 42 s |" in model_speed.markdown([row], 2, torch.device("cpu"))


def test_profile_prints_the_kernel_table_of_eager_steps(monkeypatch, capsys):
    """``--profile MODEL:ACT`` (gpu_check's profile stage): the profiler's table of a few eager steps of each
    named activation, and no timing of the suite."""
    small = (model_speed.Case("resnet20", 2, 8, ("dpa",), num_classes=10),)
    monkeypatch.setitem(model_speed.SUITES, "cpu", small)
    rows = model_speed.main(["--suite", "cpu", "--device", "cpu", "--profile", "resnet20:relu,resnet20:dpa"])
    out = capsys.readouterr().out
    assert rows == []
    assert "resnet20, batch 2, 8x8, relu, 3 steps:" in out and "resnet20, batch 2, 8x8, dpa, 3 steps:" in out
    assert "aten::convolution" in out or "aten::conv2d" in out


@pytest.mark.parametrize("value,message", [("resnet20", "MODEL:ACT pairs"), ("vgg11:relu", "MODEL:ACT pairs"),
                                           ("resnet20:nope", "nope")])
def test_profile_refuses_a_bad_pair_before_any_work(monkeypatch, capsys, value, message):
    small = (model_speed.Case("resnet20", 2, 8, ("dpa",), num_classes=10),)
    monkeypatch.setitem(model_speed.SUITES, "cpu", small)
    monkeypatch.setattr(model_speed, "profile", lambda *a: pytest.fail("profiled before refusing"))
    with pytest.raises((SystemExit, KeyError, ValueError)) as raised:
        model_speed.main(["--suite", "cpu", "--device", "cpu", "--profile", f"resnet20:relu,{value}"])
    assert message in (capsys.readouterr().err + str(raised.value))
