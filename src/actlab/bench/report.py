"""``actlab report DIR``: tables and plots of a bench folder, as report.md and report.html.

Accuracies are the test top-1 after the last epoch of each run (never the best epoch on the test set),
summarised over seeds with a 95 % t-interval and compared with ReLU by a paired t-test over seeds.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from .grid import load_rows
from .plots import pyplot, save_figure
from .stats import Paired, Summary, overall_ranking, paired_against, ranks, summarize

# the DPA paper's published top-1 (%) with ReLU and with DPA, by (actlab model, dataset)
PAPER_DPA = {
    ("vit_tiny", "cifar10"): (89.9, 91.3), ("vit_tiny", "cifar100"): (65.7, 70.5), ("vit_tiny", "imagenet"): (70.9, 72.2),
    ("cait_xxs24", "cifar10"): (89.4, 91.4), ("cait_xxs24", "cifar100"): (65.8, 68.5), ("cait_xxs24", "imagenet"): (74.0, 75.0),
    ("pvt_tiny", "cifar10"): (93.0, 93.8), ("pvt_tiny", "cifar100"): (70.9, 75.3), ("pvt_tiny", "imagenet"): (73.7, 75.2),
    ("tnt_small", "cifar10"): (90.8, 92.4), ("tnt_small", "cifar100"): (65.4, 72.0), ("tnt_small", "imagenet"): (73.4, 77.8),
    ("resnet18", "cifar10"): (95.0, 95.1), ("resnet18", "cifar100"): (75.7, 76.8), ("resnet18", "imagenet"): (69.7, 70.3),
    ("vgg11", "cifar10"): (92.2, 92.2), ("vgg11", "cifar100"): (70.2, 70.3), ("vgg11", "imagenet"): (69.0, 69.7),
}
SPEED_FILE = "speed.json"
PLOTS = {"accuracy": "accuracy.png", "cost": "accuracy_vs_cost.png", "curves": "curves.png",
         "speed": "speed.png", "paper": "paper_vs_ours.png"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _colors(acts: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(acts) <= 10 else "tab20"]
    return {a: cmap(i % cmap.N) for i, a in enumerate(sorted(acts))}


def _groups(summaries: list[Summary]) -> dict[tuple[str, str], list[Summary]]:
    out: dict[tuple[str, str], list[Summary]] = defaultdict(list)
    for s in summaries:
        out[(s.model, s.dataset)].append(s)
    return out


def plot_accuracy(rows, summaries, path) -> None:
    """Mean top-1 per act with its 95 % interval, each seed as a dot; one panel per (model, dataset)."""
    plt = pyplot()

    groups = _groups(summaries)
    colors = _colors([s.act for s in summaries])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 0.45 * max(len(v) for v in groups.values()) + 1.6),
                             squeeze=False)
    for ax, ((model, dataset), ss) in zip(axes[0], sorted(groups.items())):
        ss = sorted(ss, key=lambda s: s.mean)
        for y, s in enumerate(ss):
            err = None if math.isnan(s.ci_low) else [[s.mean - s.ci_low], [s.ci_high - s.mean]]
            ax.errorbar(s.mean, y, xerr=err, fmt="o", color=colors[s.act], capsize=4, markersize=7)
            seeds = [r["top1"] for r in rows if r["status"] == "done" and (r["model"], r["dataset"], r["act"]) == (model, dataset, s.act)]
            ax.scatter(seeds, [y] * len(seeds), marker="|", color="0.35", s=60, zorder=3)
        ax.set_yticks(range(len(ss)), [f"{s.act} (n={s.n})" for s in ss])
        ax.set_xlabel("test top-1 % (mean, 95 % CI; | = seeds)")
        ax.set_title(f"{model} on {dataset}")
        ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def plot_cost(summaries, path) -> None:
    """Bubble chart: top-1 against FLOPs, bubble area proportional to parameters; colour = act, marker = model."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    colors = _colors([s.act for s in summaries])
    markers = {m: k for m, k in zip(sorted({s.model for s in summaries}), "osD^vP*X")}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pmax = max((s.params or 0) for s in summaries) or 1
    for s in summaries:
        if s.flops is None:
            continue
        ax.scatter(s.flops / 1e6, s.mean, s=30 + 400 * (s.params or 0) / pmax, color=colors[s.act], alpha=0.7,
                   marker=markers[s.model], edgecolors="k", linewidths=0.5)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=a) for a, c in colors.items()]
    handles += [Line2D([], [], marker=k, linestyle="", color="0.5", label=m) for m, k in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (convs and matmuls; log)")
    ax.set_ylabel("test top-1 % (mean over seeds)")
    ax.set_title("accuracy against cost (bubble area: parameters)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_curves(rows, path) -> None:
    """Test top-1 per epoch, mean over seeds, one line per act; one panel per (model, dataset)."""
    plt = pyplot()

    curves: dict[tuple[str, str], dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "done" and r["history"]:
            curves[(r["model"], r["dataset"])][r["act"]].append([h["test_top1"] for h in r["history"]])
    colors = _colors([a for c in curves.values() for a in c])
    fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), squeeze=False)
    for ax, ((model, dataset), by_act) in zip(axes[0], sorted(curves.items())):
        for act, runs in sorted(by_act.items()):
            length = min(len(c) for c in runs)
            mean = [sum(c[e] for c in runs) / len(runs) for e in range(length)]
            ax.plot(range(1, length + 1), mean, marker="o", markersize=3, color=colors[act], label=f"{act} (n={len(runs)})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 %")
        ax.set_title(f"{model} on {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_speed(speed: dict, path) -> None:
    """Time and saved-memory ratios to ReLU from the speed benchmark, per workload."""
    plt = pyplot()

    rows = speed["rows"]
    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 3.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        rs = [r for r in rows if r["workload"] == workload and r["mode"] == "train"]
        rs = [r for r in rs if r["activation"] != "relu"]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["time_vs_relu"] for r in rs], 0.4, label="time / ReLU")
        ax.bar([x + 0.2 for x in xs], [r["memory_vs_relu"] for r in rs], 0.4, label="saved memory / ReLU")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks(list(xs), [r["activation"] for r in rs], rotation=45, ha="right")
        ax.set_title(f"{workload} workload (training step)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def paper_matches(summaries: list[Summary]) -> list[tuple[str, str, float, float, Summary | None, Summary | None]]:
    """(model, dataset, paper relu, paper dpa, our relu, our dpa) wherever we ran the paper's setting."""
    ours = {(s.model, s.dataset, s.act): s for s in summaries}
    out = []
    for (model, dataset), (relu, dpa) in PAPER_DPA.items():
        a, b = ours.get((model, dataset, "relu")), ours.get((model, dataset, "dpa"))
        if a or b:
            out.append((model, dataset, relu, dpa, a, b))
    return out


def plot_paper(matches, path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(1.8 * len(matches) + 2, 3.6))
    for i, (model, dataset, p_relu, p_dpa, relu, dpa) in enumerate(matches):
        vals = [p_relu, p_dpa, relu.mean if relu else math.nan, dpa.mean if dpa else math.nan]
        for j, (v, label) in enumerate(zip(vals, ["paper ReLU", "paper DPA", "ours ReLU", "ours DPA"])):
            ax.bar(i + (j - 1.5) * 0.2, v, 0.2, color=f"C{j}", label=label if i == 0 else None)
    ax.set_xticks(range(len(matches)), [f"{m}\n{d}" for m, d, *_ in matches])
    ax.set_ylabel("top-1 %")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def settings_line(configs: list[dict]) -> str:
    """The run settings of a group (those that differ between its runs are listed with every value)."""
    keys = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "image_size", "label_smoothing")
    parts = []
    for k in keys:
        values = sorted({json.dumps(c.get(k)) for c in configs})
        if values and values != ["null"]:
            parts.append(f"{k} {' / '.join(json.loads(v).__str__() for v in values)}")
    return "Settings: " + ", ".join(parts) + "." if parts else ""


def results_table(summaries: list[Summary], paired: list[Paired], group_ranks: dict, configs: dict) -> list[str]:
    lines = []
    by_act = {(p.model, p.dataset, p.act): p for p in paired}
    for (model, dataset), ss in sorted(_groups(summaries).items()):
        baseline = next((p.baseline for p in paired if (p.model, p.dataset) == (model, dataset)), "relu")
        lines += [f"### {model} on {dataset}", "", settings_line(configs.get((model, dataset), [])), "",
                  f"| rank | act | n | top-1 mean ± std | 95 % CI | Δ vs {baseline} | p (paired t) | W/T/L | params | MFLOPs | s/run |",
                  "|---:|---|---:|---|---|---:|---:|---|---:|---:|---:|"]
        for s in ss:
            p = by_act.get((model, dataset, s.act))
            rank = group_ranks[(model, dataset)][s.act]
            lines.append(
                f"| {rank:g} | {s.act} | {s.n} | {s.mean:.2f} ± {_fmt(s.std)} | [{_fmt(s.ci_low)}, {_fmt(s.ci_high)}] | "
                + (f"{p.mean_diff:+.2f} | {_p(p.p_value)} | {p.wins}/{p.ties}/{p.losses} | " if p else "– | – | – | ")
                + f"{'–' if s.params is None else f'{s.params:,.0f}'} | {_fmt(s.flops / 1e6 if s.flops else None, 1)} | "
                f"{_fmt(s.seconds, 1)} |")
        lines.append("")
    return lines


def _header(folder: str, rows: list[dict], baseline: str, tie: float) -> list[str]:
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return ["# actlab bench report", "", "No finished runs yet.", ""]
    status = defaultdict(int)
    for r in rows:
        status[r["status"]] += 1
    env = done[0]["versions"]
    seeds = sorted({r["seed"] for r in done})
    return ["# actlab bench report", "",
            f"{len(done)} finished runs ({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}) from "
            f"`{os.path.join(folder, 'results.db')}`, seeds {seeds}; settings per model below.",
            f"Machine: {env.get('machine')}, {env.get('threads')} thread(s) per run"
            f"{', ' + env['cuda'] if env.get('cuda') else ', CPU'}; Python {env.get('python')}, torch {env.get('torch')}, "
            f"torchvision {env.get('torchvision')}, timm {env.get('timm')}, actlab {env.get('actlab')}.", "",
            "Top-1 is measured on the test set after the **last** epoch of each run (no best-epoch picking). "
            "The interval is the 95 % t-interval of the mean over seeds; p is a two-sided paired t-test over "
            f"seeds against {baseline} (– when fewer than two pairs or identical differences); W/T/L counts seeds "
            f"where the act beat, tied (|Δ| ≤ {tie}) or lost to {baseline}. With 3 seeds only large, consistent "
            "differences can reach p < 0.05.", ""]


def _results(rows: list[dict], summaries: list[Summary], baseline: str, tie: float) -> list[str]:
    configs: dict = defaultdict(list)
    for r in rows:
        if r["status"] == "done":
            configs[(r["model"], r["dataset"])].append(r["config"])
    paired = paired_against(rows, baseline, tie=tie)
    md = ["## Results", ""] + results_table(summaries, paired, ranks(summaries), configs)
    overall = overall_ranking(summaries)
    if overall:
        md += ["## Ranking", "", "Mean rank of each activation over the (model, dataset) groups it ran in (1 = best).", "",
               "| place | act | mean rank | groups |", "|---:|---|---:|---:|"]
        md += [f"| {i} | {a} | {r:.2f} | {n} |" for i, (a, r, n) in enumerate(overall, 1)] + [""]
    return md


def _plots(folder: str, rows: list[dict], summaries: list[Summary]) -> list[str]:
    plots = []
    if summaries:
        plot_accuracy(rows, summaries, os.path.join(folder, PLOTS["accuracy"]))
        plot_cost(summaries, os.path.join(folder, PLOTS["cost"]))
        plots += [("Accuracy per activation", "accuracy"), ("Accuracy against parameters and FLOPs", "cost")]
    if any(r["history"] for r in rows if r["status"] == "done"):
        plot_curves(rows, os.path.join(folder, PLOTS["curves"]))
        plots.append(("Training curves (test top-1 per epoch, mean over seeds)", "curves"))
    return ["## Plots", ""] + [f"### {title}\n\n![{key}]({PLOTS[key]})\n" for title, key in plots]


def _speed(folder: str) -> list[str]:
    speed_path = os.path.join(folder, SPEED_FILE)
    md = ["## Speed and memory", ""]
    if not os.path.isfile(speed_path):
        return md + [f"No `{SPEED_FILE}` in this folder (run `actlab bench ... --speed-repeats N`).", ""]
    with open(speed_path) as f:
        speed = json.load(f)
    plot_speed(speed, os.path.join(folder, PLOTS["speed"]))
    md += [f"From `python -m actlab.perf.speed` ({speed.get('repeats')} interleaved repeats, medians; "
           f"{speed.get('environment', '?')}). Ratios to ReLU for a training step.", "",
           "| workload | act | time / ReLU | saved memory / ReLU |", "|---|---|---:|---:|"]
    md += [f"| {r['workload']} | {r['activation']} | {r['time_vs_relu']:.2f} | {r['memory_vs_relu']:.2f} |"
           for r in speed["rows"] if r["mode"] == "train"]
    return md + ["", f"![speed]({PLOTS['speed']})", ""]


def _papers(folder: str, summaries: list[Summary]) -> list[str]:
    md = ["## The papers' figures", ""]
    matches = paper_matches(summaries)
    if matches:
        plot_paper(matches, os.path.join(folder, PLOTS["paper"]))
        md += ["| model | dataset | paper ReLU | paper DPA | ours ReLU | ours DPA |", "|---|---|---:|---:|---:|---:|"]
        md += [f"| {m} | {d} | {pr} | {pd} | {_fmt(r.mean if r else None)} | {_fmt(x.mean if x else None)} |"
               for m, d, pr, pd, r, x in matches]
        return md + ["", f"![paper]({PLOTS['paper']})", ""]
    ran = sorted({(s.model, s.dataset) for s in summaries})
    return md + ["None of the runs here uses a model and dataset of the papers' tables "
                 f"(ran: {', '.join(f'{m}/{d}' for m, d in ran) or 'nothing'}). For reference, the DPA paper's top-1 "
                 "(ReLU -> DPA): " + "; ".join(f"{m}/{d} {a} -> {b}" for (m, d), (a, b) in PAPER_DPA.items()) + ". "
                 "The IIEU paper claims ResNet-26 with IIEU matches ResNet-101 with ReLU on ImageNet.", ""]


def _without_result(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if r["status"] in ("failed", "skipped", "running")]
    if not failed:
        return []
    return ["## Runs without a result", "", "| model | act | seed | status | reason |", "|---|---|---:|---|---|"] + [
        f"| {r['model']} | {r['act']} | {r['seed']} | {r['status']} | "
        f"{(r['error'] or 'interrupted').splitlines()[0].replace('|', '/')} |" for r in failed] + [""]


def _write(folder: str, text: str) -> str:
    """report.md and its HTML rendering; returns the markdown path."""
    import markdown

    md_path = os.path.join(folder, "report.md")
    with open(md_path, "w") as f:
        f.write(text)
    body = markdown.markdown(text, extensions=["tables"])
    with open(os.path.join(folder, "report.html"), "w") as f:
        f.write("<!doctype html><html><head><meta charset='utf-8'><title>actlab bench report</title><style>"
                "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
                "th{background:#f3f3f3}img{max-width:100%}</style></head><body>" + body + "</body></html>")
    return md_path


# settings that may differ between the runs compared in one group: what is compared (the activation and
# its settings), the seed, and DPA's loss weight (ignored by every other activation)
COMPARED = ("act", "act_kwargs", "seed", "dpa_lambda")


def split_configurations(rows: list[dict]) -> list[dict]:
    """Rows whose (model, dataset) group mixes run configurations get a model label naming their
    differing settings (``resnet20 [epochs=2]``), so every group compares runs of one configuration only.
    A row's configuration is its run identity (``train.config.run_identity``) less ``COMPARED``; rows
    without a result (failed, skipped) keep their label."""
    from ..train.config import run_identity

    settings = [{k: v for k, v in run_identity(r["config"]).items() if k not in COMPARED + ("model",)}
                for r in rows]
    keys = [json.dumps(s, sort_keys=True, default=str) for s in settings]
    by_group: dict = defaultdict(dict)
    for r, key, values in zip(rows, keys, settings):
        if r["status"] == "done":
            by_group[(r["model"], r["dataset"])][key] = values
    out = []
    for r, key in zip(rows, keys):
        variants = by_group[(r["model"], r["dataset"])]
        if len(variants) <= 1 or r["status"] != "done":
            out.append(r)
            continue
        mine = variants[key]
        differing = sorted(k for k in set().union(*variants.values())
                           if len({json.dumps(v.get(k), default=str) for v in variants.values()}) > 1)
        label = ", ".join(f"{k}={mine.get(k)}" for k in differing)
        out.append({**r, "model": f"{r['model']} [{label}]", "arch": r["model"]})
    return out


def write_report(folder: str, baseline: str = "relu", tie: float = 0.0) -> str:
    """Write ``folder/report.md``, ``report.html`` and the PNG plots; returns the markdown path. Runs of
    different configurations are never summarised together (``split_configurations``)."""
    return report_and_table(folder, baseline, tie)[0]


def ranked_table(folder: str, baseline: str = "relu") -> str:
    """The short ranked table printed at the end of a bench (plain text, one block per group)."""
    rows = split_configurations(load_rows(folder))
    return _ranked(rows, summarize(rows), baseline)


def report_and_table(folder: str, baseline: str = "relu", tie: float = 0.0) -> tuple[str, str]:
    """``write_report`` and ``ranked_table`` from one read of the database and one set of statistics:
    (the markdown path, the table)."""
    rows = split_configurations(load_rows(folder))
    summaries = summarize(rows)
    sections = (_header(folder, rows, baseline, tie), _results(rows, summaries, baseline, tie),
                _plots(folder, rows, summaries), _speed(folder), _papers(folder, summaries), _without_result(rows))
    path = _write(folder, "\n".join(line for section in sections for line in section))
    return path, _ranked(rows, summaries, baseline)


def _ranked(rows: list[dict], summaries, baseline: str) -> str:
    paired = {(p.model, p.dataset, p.act): p for p in paired_against(rows, baseline)}
    lines = []
    for (model, dataset), ss in sorted(_groups(summaries).items()):
        lines.append(f"{model} on {dataset}")
        lines.append(f"  {'act':<10} {'n':>2} {'top1':>7} {'± std':>6} {'Δ ' + baseline:>8} {'p':>7}  W/T/L")
        for s in ss:
            p = paired.get((model, dataset, s.act))
            lines.append(f"  {s.act:<10} {s.n:>2} {s.mean:>7.2f} {_fmt(s.std):>6} "
                         + (f"{p.mean_diff:>+8.2f} {_p(p.p_value):>7}  {p.wins}/{p.ties}/{p.losses}" if p else f"{'–':>8} {'–':>7}  –"))
    return "\n".join(lines)
