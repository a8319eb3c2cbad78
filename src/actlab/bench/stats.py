"""Statistics over seeds: mean, std, t-interval, paired test against the baseline, win/tie/loss, ranks.

Rows are dicts with at least ``model``, ``dataset``, ``act``, ``seed``, ``status`` and ``top1`` (as
``grid.load_rows`` gives them); only rows with status 'done' count.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from scipy import stats as sps

Group = tuple[str, str]  # (model, dataset)


@dataclass
class Summary:
    model: str
    dataset: str
    act: str
    n: int
    mean: float
    std: float           # sample standard deviation (ddof 1); nan for n = 1
    ci_low: float        # 95 % t-interval of the mean; nan for n = 1
    ci_high: float
    params: float | None
    flops: float | None
    seconds: float | None


@dataclass
class Paired:
    model: str
    dataset: str
    act: str
    baseline: str
    n: int               # seeds run with both
    mean_diff: float     # act - baseline, in points of top-1
    p_value: float       # two-sided paired t-test; nan when n < 2 or all differences are equal
    wins: int
    ties: int
    losses: int


def _done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "done") == "done" and r.get("top1") is not None]


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean (nan, nan) for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(n)
    half = sps.t.ppf(0.5 + level / 2, n - 1) * sem
    return mean - half, mean + half


def summarize(rows: list[dict], metric: str = "top1") -> list[Summary]:
    """One Summary per (model, dataset, act), sorted by group and descending mean."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in _done(rows):
        groups[(r["model"], r["dataset"], r["act"])].append(r)
    out = []
    for (model, dataset, act), rs in groups.items():
        values = [float(r[metric]) for r in rs]
        lo, hi = t_interval(values)
        out.append(Summary(model, dataset, act, len(values), statistics.fmean(values),
                           statistics.stdev(values) if len(values) > 1 else math.nan, lo, hi,
                           _mean_or_none([r.get("params") for r in rs]), _mean_or_none([r.get("flops") for r in rs]),
                           _mean_or_none([r.get("seconds") for r in rs])))
    return sorted(out, key=lambda s: (s.model, s.dataset, -s.mean, s.act))


def paired_against(rows: list[dict], baseline: str = "relu", tie: float = 0.0, metric: str = "top1") -> list[Paired]:
    """Each act against ``baseline`` on the seeds both ran, per (model, dataset).

    Args:
        tie: differences with ``|diff| <= tie`` (points of top-1) count as ties.
    """
    by_seed: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in _done(rows):
        by_seed[(r["model"], r["dataset"], r["act"])][int(r["seed"])] = float(r[metric])
    out = []
    for (model, dataset, act), values in sorted(by_seed.items()):
        base = by_seed.get((model, dataset, baseline))
        if act == baseline or not base:
            continue
        seeds = sorted(set(values) & set(base))
        diffs = [values[s] - base[s] for s in seeds]
        if not diffs:
            continue
        p = math.nan
        if len(diffs) >= 2 and len(set(diffs)) > 1:
            p = float(sps.ttest_rel([values[s] for s in seeds], [base[s] for s in seeds]).pvalue)
        out.append(Paired(model, dataset, act, baseline, len(diffs), statistics.fmean(diffs), p,
                          sum(d > tie for d in diffs), sum(abs(d) <= tie for d in diffs), sum(d < -tie for d in diffs)))
    return out


def ranks(summaries: list[Summary]) -> dict[Group, dict[str, float]]:
    """Rank of each act's mean within each (model, dataset): 1 is best, tied means share the average rank."""
    out: dict[Group, dict[str, float]] = {}
    groups: dict[Group, list[Summary]] = defaultdict(list)
    for s in summaries:
        groups[(s.model, s.dataset)].append(s)
    for group, ss in groups.items():
        ordered = sorted(ss, key=lambda s: -s.mean)
        group_ranks: dict[str, float] = {}
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1].mean == ordered[i].mean:
                j += 1
            for s in ordered[i:j + 1]:
                group_ranks[s.act] = (i + j) / 2 + 1
            i = j + 1
        out[group] = group_ranks
    return out


def overall_ranking(summaries: list[Summary]) -> list[tuple[str, float, int]]:
    """(act, mean rank over the (model, dataset) groups it ran in, number of groups), best first."""
    per_act: dict[str, list[float]] = defaultdict(list)
    for group_ranks in ranks(summaries).values():
        for act, r in group_ranks.items():
            per_act[act].append(r)
    return sorted(((a, statistics.fmean(rs), len(rs)) for a, rs in per_act.items()), key=lambda t: (t[1], t[0]))
