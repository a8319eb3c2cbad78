"""`make gpu-check` (scripts/gpu_check.sh) runs where GPU time is short: its plumbing is checked here with a
stand-in python3 that records what it is asked to run. Every stage runs in its order, every actlab
command line is taken by that tool's own parser, and a failing stage is reported without stopping the
others."""
from __future__ import annotations

import importlib
import os
import shlex
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

# records its arguments, one call per line; fails the calls whose arguments contain $FAIL_ON
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
if [ "$1" = "-" ]; then cat > /dev/null; echo "stand-in GPU; driver unknown"; fi
if [ "$1" = "-c" ]; then exit 1; fi
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then echo "stand-in failure"; exit 3; fi
exit 0
"""


def run_script(tmp_path, stages: str, fail_on: str = "") -> tuple[subprocess.CompletedProcess, list[str]]:
    shims = tmp_path / "bin"
    shims.mkdir()
    python = shims / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "OUT": str(tmp_path / "out"), "STAGES": stages, "FAIL_ON": fail_on}
    done = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    return done, calls.read_text().splitlines()


def test_every_stage_runs_in_order_and_every_command_parses(tmp_path):
    done, calls = run_script(tmp_path, "tests eager train profile compiled")
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls[0].startswith("-c import actlab")  # this tree's actlab not installed yet: pip installs it
    assert calls[1].startswith("-m pip install --no-deps --no-build-isolation -e .")
    assert calls[2] == "-"  # the environment line (GPU, driver, versions, copy bandwidth)
    modules = [c.split()[1] for c in calls[3:]]
    assert modules == ["pytest", "actlab.perf.model_speed", "actlab.perf.overhead", "actlab.perf.overhead",
                       "actlab.perf.model_speed", "actlab.perf.model_speed"]
    assert " -m gpu " in calls[3]
    for call in calls[4:]:
        module, *argv = shlex.split(call)[1:]
        importlib.import_module(module).build_parser().parse_args(argv)  # exits on an unknown option
    eager, compiled = calls[4], calls[-1]
    assert "--compile eager" in eager and "--figures" in eager
    assert "--compile compiled,cudagraphs --models resnet26,vit_tiny,resnet50" in compiled
    assert "--model vit_tiny --act dpa" in calls[5] and "--model resnet26 --act iieu_b" in calls[6]
    assert all("--amp bf16" in c and "--epochs 25 --batch-size 64" in c for c in calls[5:7])  # 200 steps
    assert "--profile resnet26:relu,resnet26:iieu_b,vit_tiny:dpa" in calls[7]
    assert "failed: none" in done.stdout


@pytest.mark.parametrize("fail_on,named", [("--model vit_tiny", "train:vit_tiny:dpa"), ("-m gpu", "tests"),
                                           ("--compile eager", "eager")])
def test_a_failing_stage_is_reported_and_the_others_still_run(tmp_path, fail_on, named):
    done, calls = run_script(tmp_path, "tests eager train", fail_on=fail_on)
    assert done.returncode == 1
    assert f"failed: {named}\n" in done.stdout
    assert any("--model resnet26 --act iieu_b" in c for c in calls)  # the last run went ahead


@pytest.mark.parametrize("stages,modules", [("tests", ["pytest"]), ("compiled", ["actlab.perf.model_speed"])])
def test_stages_pick_what_runs(tmp_path, stages, modules):
    done, calls = run_script(tmp_path, stages)
    assert done.returncode == 0
    assert [c.split()[1] for c in calls[3:]] == modules
