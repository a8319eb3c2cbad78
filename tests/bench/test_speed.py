"""The speed benchmark's accounting (not its timings, which belong in the README)."""
from __future__ import annotations

import json

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
