"""Report generation from a results database: files, plots referenced, papers' figures, failures."""
import json
import os
import re

from actlab.bench import grid, report


def fake_bench(folder):
    db = grid.connect(folder)
    for act, base in (("relu", 94.0), ("dpa", 95.0), ("gelu", 93.0)):
        for seed in range(3):
            top1 = base + seed * 0.5
            history = [{"epoch": e, "test_top1": top1 - 10 / e} for e in (1, 2, 3)]
            grid._upsert(db, f"{act}{seed}", act=act, model="resnet18", dataset="cifar10", seed=seed, epochs=3,
                         status="done", top1=top1, top5=99.0, loss=0.2, params=11_000_000, flops=556_000_000,
                         seconds=10.0, config=json.dumps({"epochs": 3, "batch_size": 128, "lr": 0.1}),
                         versions=json.dumps({"machine": "x86_64", "torch": "2.14.1", "threads": 2}),
                         history=json.dumps(history), run_dir="x")
    grid._upsert(db, "bad", act="iieu_b", model="resnet18", dataset="cifar10", seed=0, epochs=3, status="failed",
                 error="FloatingPointError: loss is nan | at step 3\ntraceback...", config="{}", run_dir="y")
    db.close()
    with open(os.path.join(folder, report.SPEED_FILE), "w") as f:
        json.dump({"environment": "CPU test", "repeats": 3, "rows": [
            {"activation": a, "workload": w, "mode": "train", "time_vs_relu": t, "memory_vs_relu": m}
            for a, t, m in (("relu", 1.0, 1.0), ("dpa", 1.1, 1.01)) for w in ("conv", "mlp")]}, f)


def test_report_files_tables_and_plots(tmp_path):
    folder = str(tmp_path)
    fake_bench(folder)
    md_path = report.write_report(folder)
    md = open(md_path).read()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(images) == set(report.PLOTS.values())  # every plot, the papers' one included (resnet18/cifar10)
    for image in images:
        assert os.path.getsize(os.path.join(folder, image)) > 5000
    html = open(os.path.join(folder, "report.html")).read()
    assert all(f'src="{image}"' in html for image in images) and "<table>" in html
    # means, intervals and the paired comparison of the fabricated numbers
    assert "| 1 | dpa | 3 | 95.50 ± 0.50 |" in md and "+1.00" in md and "3/0/0" in md
    assert "| resnet18 | cifar10 | 95.0 | 95.1 | 94.50 | 95.50 |" in md  # paper beside ours
    assert "| resnet18 | iieu_b | 0 | failed | FloatingPointError: loss is nan / at step 3 |" in md
    assert "| conv | dpa | 1.10 | 1.01 |" in md
    acts = [line.split()[0] for line in report.ranked_table(folder).splitlines()[2:]]
    assert acts == ["dpa", "relu", "gelu"]


def test_report_without_paper_settings_says_so(tmp_path):
    db = grid.connect(str(tmp_path))
    grid._upsert(db, "k", act="relu", model="resnet20", dataset="digits", seed=0, epochs=1, status="done", top1=90.0,
                 loss=0.3, params=1, flops=2, seconds=1.0, config="{}", versions="{}", history="[]", run_dir="z")
    db.close()
    md = open(report.write_report(str(tmp_path))).read()
    assert "None of the runs here uses a model and dataset of the papers' tables" in md and "resnet20/digits" in md
    assert "No `speed.json`" in md


def test_actlab_report_reads_the_database_once(tmp_path, monkeypatch, capsys):
    """`actlab report` (and the end of `actlab bench`) write the report and print the ranked table from one
    read of the database and one set of statistics."""
    from actlab.cli.main import main as cli_main

    folder = str(tmp_path)
    fake_bench(folder)
    reads, real = [], report.load_rows
    monkeypatch.setattr(report, "load_rows", lambda f: reads.append(f) or real(f))
    assert cli_main(["report", folder]) == 0
    assert reads == [folder]
    assert capsys.readouterr().out.splitlines()[0] == "resnet18 on cifar10"
