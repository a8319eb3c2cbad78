"""actlab analyze on short runs: DPA memories and the zeroing experiment, IIEU scores and suppression."""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from actlab.activations import IIEUB
from actlab.activations.dpa import DPA
from actlab.bench.analyze import analyze, dpa_views, iieu_views, irrelevant_channels
from actlab.cli.main import main as cli_main
from actlab.data import build_datasets
from actlab.train import TrainConfig, load_run_model, train

RUN = dict(dataset="synthetic", image_size=16, epochs=1, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for model, act in (("resnet20", "dpa"), ("vit_micro", "iieu_b")):
        out[act] = str(root / act)
        train(TrainConfig(model=model, act=act, out=out[act], **RUN), quiet=True)
    return out


def test_dpa_analysis_files_and_numbers(runs):
    assert cli_main(["analyze", runs["dpa"]]) == 0
    folder = os.path.join(runs["dpa"], "analysis")
    assert {"analysis.md", "analysis.json", "dpa_memories.png", "dpa_irrelevant_share.png"} <= set(os.listdir(folder))
    record = json.load(open(os.path.join(folder, "analysis.json")))["dpa"]
    model, _ = load_run_model(runs["dpa"])
    sites = {n: m for n, m in model.named_modules() if isinstance(m, DPA)}
    assert record["layer"] == list(sites)[-1]
    for name, m in sites.items():  # flagged = M_v < tau and M_g < 0, counted per class
        expected = ((m.value_memory < 0) & (m.grad_memory < 0)).sum(1).tolist()
        assert record["flagged_per_class"][name] == expected
    summary = json.load(open(os.path.join(runs["dpa"], "summary.json")))
    assert record["top1_before"] == pytest.approx(summary["top1"])  # the run's own test accuracy
    md = open(os.path.join(folder, "analysis.md")).read()
    assert "irrelevant channels zeroed at all" in md and f"{record['top1_after']:.2f}" in md
    assert f"zeroed at `{record['layer']}` only | {record['top1_after_layer']:.2f}" in md


def test_zeroing_every_channel_of_a_site_leaves_one_prediction(runs):
    model, saved = load_run_model(runs["dpa"])
    model.eval()
    sites = [m for m in model.modules() if isinstance(m, DPA)]
    for m in sites:  # nothing flagged except every channel of the last site
        m.value_memory.fill_(1.0)
    sites[-1].value_memory.fill_(-1.0)
    sites[-1].grad_memory.fill_(-1.0)
    assert irrelevant_channels(sites[-1]).all()
    _, test, info = build_datasets("synthetic", image_size=16, augment=False)
    loader = DataLoader(test, 64)
    views = dpa_views(model, loader, info.num_classes, layer=[n for n, m in model.named_modules() if m is sites[-1]][0])
    assert views["top1_after_layer"] == views["top1_after"]  # only that site flags anything
    # the last site outputs zeros, so every image gets the same logits: accuracy = that class's share
    with torch.no_grad():  # resnet20's last DPA site feeds the pooling and the classifier directly
        logits = model.fc(torch.zeros(1, model.fc.in_features))
    labels = torch.cat([y for _, y in loader])
    assert views["top1_after"] == pytest.approx(100 * float((labels == logits.argmax()).float().mean()))
    last = views["sites"][-1]
    assert all(v == 1.0 for v in views["irrelevant_share"][last] if v == v)
    assert all(v == 0.0 for name in views["sites"][:-1] for v in views["irrelevant_share"][name] if v == v)


def test_iieu_scores_and_suppressed_share(runs):
    model, _ = load_run_model(runs["iieu_b"])
    model.eval()
    sites = [m for m in model.modules() if isinstance(m, IIEUB)]
    assert len(sites) == 4  # one MLP site per block of vit_micro
    with torch.no_grad():
        sites[0].eta.fill_(1e6)   # every response below eta: all suppressed
        sites[1].eta.fill_(-1e6)  # none
    _, test, _ = build_datasets("synthetic", image_size=16, augment=False)
    views = iieu_views(model, DataLoader(test, 64), max_batches=1)
    shares = [views["suppressed_share"][n] for n in views["sites"]]
    assert shares[0] == 1.0 and shares[1] == 0.0 and all(0 <= s <= 1 for s in shares)
    assert cli_main(["analyze", runs["iieu_b"], "--max-batches", "1"]) == 0
    md = open(os.path.join(runs["iieu_b"], "analysis", "analysis.md")).read()
    assert "suppressed (rho < eta)" in md and md.count("| blocks.") == 4


def test_analyze_errors(runs, tmp_path, capsys):
    assert cli_main(["analyze", runs["dpa"], "--layer", "nope"]) == 2
    assert "not a DPA site" in capsys.readouterr().err
    assert cli_main(["analyze", str(tmp_path)]) == 2
