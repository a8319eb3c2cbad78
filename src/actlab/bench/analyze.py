"""``actlab analyze RUN_DIR``: what the activations of a trained run do, on its test set.

DPA runs: per-class x channel heatmaps of the value memory M_v and the gradient memory M_g at a layer,
the share of each class's responses that fall on channels flagged irrelevant for it, and the DPA
paper's second observation: zero, at every DPA site, the channels flagged irrelevant for the true
class and compare accuracy before and after.
IIEU runs: the distribution of II-scores (rho = S + nu, before the adjuster) per layer and the share
of responses the adjuster suppresses (rho < eta).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..activations import IIEUB
from ..activations.dpa import DPA
from ..data import build_datasets
from ..train import TrainConfig, load_run_model
from .plots import pyplot, save_figure


def irrelevant_channels(site: DPA) -> torch.Tensor:
    """(num_classes, C) bool: the memory part of DPA's mask, M_v < tau and M_g < 0."""
    return (site.value_memory < site.tau) & (site.grad_memory < 0)


def _broadcast_keep(keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-sample (B, C) channel mask shaped for a site output (B, C, H, W), (B, N, C), (B, C) or (k*B, ...)."""
    b = keep.shape[0]
    if out.shape[0] != b:
        keep = keep.repeat_interleave(out.shape[0] // b, dim=0)
    if out.dim() == 4 and out.shape[1] == keep.shape[1]:
        return keep[:, :, None, None]
    if out.dim() == 3:
        return keep[:, None, :]
    return keep


@torch.no_grad()
def dpa_views(model: nn.Module, loader, num_classes: int, layer: str | None = None) -> dict:
    """Accuracy as trained and with the true class's irrelevant channels zeroed (at every DPA site, and
    at ``layer`` alone when given), and per-site, per-class irrelevant shares."""
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, DPA)]
    flagged = {n: irrelevant_channels(m) for n, m in sites}
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n, _ in sites}
    current: dict = {}

    def record(name):
        def hook(module, args, out):
            pooled[name].append((module.pool(args[0], current["y"].shape[0]).float(), current["y"]))
        return hook

    def silence(name):
        def hook(module, args, out):
            keep = (~flagged[name][current["y"]]).to(out.dtype)
            return out * _broadcast_keep(keep, out)
        return hook

    phases = {"before": [], "after": [n for n, _ in sites]}
    if layer is not None:
        phases["after_layer"] = [layer]
    correct = dict.fromkeys(phases, 0)
    n = 0
    for phase, zeroed in phases.items():
        hooks = [m.register_forward_hook(record(name) if phase == "before" else silence(name))
                 for name, m in sites if phase == "before" or name in zeroed]
        try:
            for x, y in loader:
                current["y"] = y
                correct[phase] += int((model(x).argmax(1) == y).sum())
                n += len(y) if phase == "before" else 0
        finally:
            for h in hooks:
                h.remove()
    share = {}
    for name, site in sites:
        v = torch.cat([p for p, _ in pooled[name]])
        y = torch.cat([t for _, t in pooled[name]])
        active = v > site.tau
        on_flagged = active & flagged[name][y]
        per_class = []
        for k in range(num_classes):
            rows = y == k
            total = int(active[rows].sum())
            per_class.append(float(on_flagged[rows].sum()) / total if total else float("nan"))
        share[name] = per_class
    out = {"sites": [n for n, _ in sites], "flagged_per_class": {n: flagged[n].sum(1).tolist() for n, _ in sites},
           "irrelevant_share": share, "top1_before": 100 * correct["before"] / n, "top1_after": 100 * correct["after"] / n}
    if layer is not None:
        out["top1_after_layer"] = 100 * correct["after_layer"] / n
    return out


@torch.no_grad()
def iieu_views(model: nn.Module, loader, max_batches: int = 4, sample: int = 20000) -> dict:
    """Per IIEU site: a sample of II-scores and the share of responses with rho < eta."""
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, IIEUB)]
    scores: dict[str, list[torch.Tensor]] = {n: [] for n, _ in sites}
    suppressed: dict[str, list[int]] = {n: [0, 0] for n, _ in sites}

    def hook(name):
        def pre(module, args):
            rho = module.ii_score(args[0], args[1] if len(args) > 1 else None)
            below = module.below_eta(rho)
            suppressed[name][0] += int(below.sum())
            suppressed[name][1] += below.numel()
            flat = rho.flatten()
            scores[name].append(flat[torch.randperm(flat.numel())[:sample]])
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in sites]
    try:
        for i, (x, _) in enumerate(loader):
            if i >= max_batches:
                break
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {"sites": [n for n, _ in sites],
            "scores": {n: torch.cat(v)[:sample] for n, v in scores.items()},
            "suppressed_share": {n: s[0] / s[1] for n, s in suppressed.items() if s[1]}}


def _heatmaps(site_name: str, site: DPA, path: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, data, title, cmap in ((axes[0], site.value_memory, "value memory M_v (PreA-FM)", "coolwarm"),
                                  (axes[1], site.grad_memory, "gradient memory M_g (PostA-BM)", "coolwarm"),
                                  (axes[2], irrelevant_channels(site).float(), "flagged irrelevant (M_v<tau, M_g<0)", "Greys")):
        bound = float(data.abs().max()) or 1.0
        im = ax.imshow(data.cpu().numpy(), aspect="auto", cmap=cmap, interpolation="nearest",
                       vmin=-bound if cmap == "coolwarm" else 0, vmax=bound)
        ax.set_xlabel("channel")
        ax.set_ylabel("class")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"DPA memories at {site_name}")
    save_figure(fig, path)


def _share_plot(share: dict[str, list[float]], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, per_class in share.items():
        ax.plot(range(len(per_class)), [100 * v for v in per_class], marker="o", label=name)
    ax.set_xlabel("class")
    ax.set_ylabel("% of active responses on irrelevant channels")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _score_plot(views: dict, path: str) -> None:
    plt = pyplot()

    names = views["sites"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.8))
    data = [views["scores"][n].numpy() for n in names]
    ax.violinplot(data, showmedians=True)
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("II-score rho = S + nu")
    ax.set_title("II-score distribution per IIEU layer (test images)")
    save_figure(fig, path)


def _dpa_section(model: nn.Module, loader, num_classes: int, layer: str | None, out: str) -> tuple[list[str], dict]:
    """Compute the DPA views, plot them into ``out``, and return the markdown lines and the record."""
    dpa_sites = {n: m for n, m in model.named_modules() if isinstance(m, DPA)}
    if layer is not None and layer not in dpa_sites:
        raise ValueError(f"--layer {layer!r} is not a DPA site of this model; sites: {list(dpa_sites)}")
    layer = layer or list(dpa_sites)[-1]
    views = dpa_views(model, loader, num_classes, layer=layer)
    _heatmaps(layer, dpa_sites[layer], os.path.join(out, "dpa_memories.png"))
    _share_plot(views["irrelevant_share"], os.path.join(out, "dpa_irrelevant_share.png"))
    md = ["## DPA", "",
          f"Channels flagged irrelevant (M_v < tau and M_g < 0) per class at `{layer}`: "
          f"{views['flagged_per_class'][layer]} of {dpa_sites[layer].channels}.", "",
          "![memories](dpa_memories.png)", "",
          "Share of each class's active responses (pooled v > tau) that fall on channels flagged irrelevant for "
          "that class, per DPA site:", "", "![share](dpa_irrelevant_share.png)", "",
          "| site | mean share over classes |", "|---|---:|"]
    for name, per_class in views["irrelevant_share"].items():
        vals = [v for v in per_class if v == v]
        md.append(f"| {name} | {100 * sum(vals) / len(vals):.1f} % |" if vals else f"| {name} | – |")
    md += ["", "Second observation of the DPA paper: zero the channels flagged irrelevant for the true class.",
           "", "| | test top-1 % |", "|---|---:|",
           f"| as trained | {views['top1_before']:.2f} |",
           f"| irrelevant channels zeroed at all {len(dpa_sites)} DPA sites | {views['top1_after']:.2f} |",
           f"| irrelevant channels zeroed at `{layer}` only | {views['top1_after_layer']:.2f} |", ""]
    return md, {**views, "layer": layer}


def _iieu_section(model: nn.Module, loader, max_batches: int, out: str) -> tuple[list[str], dict]:
    """Compute the IIEU views, plot them into ``out``, and return the markdown lines and the record."""
    views = iieu_views(model, loader, max_batches=max_batches)
    _score_plot(views, os.path.join(out, "iieu_scores.png"))
    quantiles = {n: torch.quantile(s, torch.tensor([0.05, 0.5, 0.95])).tolist() for n, s in views["scores"].items()}
    md = ["## IIEU", "", "![scores](iieu_scores.png)", "",
          "| layer | rho 5 % | median | 95 % | suppressed (rho < eta) |", "|---|---:|---:|---:|---:|"]
    for name in views["sites"]:
        q = quantiles[name]
        md.append(f"| {name} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | {100 * views['suppressed_share'][name]:.1f} % |")
    md.append("")
    return md, {"sites": views["sites"], "suppressed_share": views["suppressed_share"], "score_quantiles": quantiles}


def analyze(run_dir: str, layer: str | None = None, data_dir: str | None = None, max_batches: int | None = None) -> str:
    """Write ``run_dir/analysis/`` (PNGs, analysis.md, analysis.json); returns the markdown path.

    Args:
        layer: DPA site (module name) for the heatmaps; default the last DPA site.
        max_batches: limit the test batches used (default: the whole test set for DPA, 4 for IIEU).
    """
    model, saved = load_run_model(run_dir)
    cfg = TrainConfig.from_dict(saved["config"])
    model.eval()
    _, test, info = build_datasets(cfg.dataset, data_dir or cfg.data_dir, image_size=cfg.image_size, augment=False,
                                   **cfg.view_options())
    loader = DataLoader(test, cfg.batch_size, shuffle=False)
    if max_batches is not None:
        loader = [b for i, b in zip(range(max_batches), loader)]
    out = os.path.join(run_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    md = [f"# Analysis of {run_dir}", "", f"{cfg.model} with {cfg.act} on {cfg.dataset}, epoch {saved['epoch']}, "
          f"{len(test)} test images.", ""]
    record: dict = {"run": run_dir, "act": cfg.act, "model": cfg.model}
    if any(isinstance(m, DPA) for m in model.modules()):
        lines, record["dpa"] = _dpa_section(model, loader, info.num_classes, layer, out)
        md += lines
    if any(isinstance(m, IIEUB) for m in model.modules()):
        lines, record["iieu"] = _iieu_section(model, loader, max_batches or 4, out)
        md += lines
    if "dpa" not in record and "iieu" not in record:
        md += [f"This run uses {cfg.act}: it has no DPA or IIEU sites to analyse.", ""]
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(record, f, indent=1)
    path = os.path.join(out, "analysis.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path
