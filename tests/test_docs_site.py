"""The documentation site builds with no warning (mkdocs --strict: the API reference is generated from
the docstrings, whose Args must match the signatures, and every link between pages resolves), and the
reference lists every name of actlab's top-level API."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import actlab

ROOT = os.path.join(os.path.dirname(__file__), "..")
pytest.importorskip("mkdocstrings")


@pytest.mark.slow
def test_the_site_builds_without_warnings(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "api" / "index.html").exists()


def test_the_reference_covers_the_top_level_api():
    listed = set(re.findall(r"^::: ([\w.]+)", open(os.path.join(ROOT, "docs", "api.md")).read(), flags=re.M))
    shown = {path.rsplit(".", 1)[-1] for path in listed}
    missing = [name for name in actlab.__all__ if name not in shown]
    assert not missing, f"docs/api.md lacks {missing}"
