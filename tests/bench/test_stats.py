"""Bench statistics against values computed by hand."""
import math

import pytest

from actlab.bench.stats import overall_ranking, paired_against, ranks, summarize, t_interval


def rows(act, values, model="m", dataset="d", status="done"):
    return [dict(model=model, dataset=dataset, act=act, seed=s, top1=v, status=status, params=100, flops=2e6,
                 seconds=1.0) for s, v in enumerate(values)]


DATA = rows("relu", [90, 92, 94]) + rows("new", [91, 95, 96]) + rows("bad", [80, 80, 80])


def test_summary_mean_std_and_t_interval():
    new = next(s for s in summarize(DATA) if s.act == "new")
    assert new.n == 3 and new.mean == pytest.approx(94.0)
    assert new.std == pytest.approx(math.sqrt(7))  # deviations -3, 1, 2 over n - 1 = 2
    half = 4.302652729911275 * math.sqrt(7) / math.sqrt(3)  # t(0.975, df 2) from tables
    assert (new.ci_low, new.ci_high) == pytest.approx((94 - half, 94 + half))
    assert [s.act for s in summarize(DATA)] == ["new", "relu", "bad"]  # best mean first
    assert math.isnan(t_interval([1.0])[0])


def test_paired_test_against_relu_by_seed():
    new = next(p for p in paired_against(DATA) if p.act == "new")
    # differences 1, 3, 2: mean 2, sd 1, t = 2 * sqrt(3); df 2 has cdf 1/2 + t / (2 sqrt(2 + t^2))
    t = 2 * math.sqrt(3)
    assert new.mean_diff == pytest.approx(2.0)
    assert new.p_value == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))))
    assert (new.wins, new.ties, new.losses) == (3, 0, 0)
    with_tie = next(p for p in paired_against(DATA, tie=1.0) if p.act == "new")
    assert (with_tie.wins, with_tie.ties, with_tie.losses) == (2, 1, 0)
    bad = next(p for p in paired_against(DATA) if p.act == "bad")
    assert (bad.wins, bad.ties, bad.losses) == (0, 0, 3) and bad.mean_diff == pytest.approx(-12)
    assert all(p.act != "relu" for p in paired_against(DATA))


def test_pairs_use_only_shared_seeds_and_finished_runs():
    data = rows("relu", [90, 92]) + rows("new", [91, 95, 99]) + rows("new", [0], status="failed")
    new = next(p for p in paired_against(data) if p.act == "new")
    assert new.n == 2 and new.mean_diff == pytest.approx(2.0)
    assert next(s for s in summarize(data) if s.act == "new").n == 3  # the failed row is not counted
    identical = rows("relu", [90, 92]) + rows("same", [91, 93])
    assert math.isnan(next(p for p in paired_against(identical)).p_value)  # equal differences: no variance


def test_ranks_share_ties_and_average_over_groups():
    data = DATA + rows("relu", [50, 50], model="m2") + rows("new", [50, 50], model="m2") + rows("bad", [60, 60], model="m2")
    r = ranks(summarize(data))
    assert r[("m", "d")] == {"new": 1, "relu": 2, "bad": 3}
    assert r[("m2", "d")] == {"bad": 1, "new": 2.5, "relu": 2.5}
    overall = overall_ranking(summarize(data))
    assert overall[0] == ("new", 1.75, 2) and overall[1][0] == "bad" and overall[2] == ("relu", 2.25, 2)
