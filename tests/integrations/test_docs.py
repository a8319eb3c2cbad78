"""The Python snippets of README.md, docs/integrations.md and docs/models.md run as they stand (in a fresh folder)."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PAGES = ("README.md", "docs/integrations.md", "docs/models.md")
SNIPPETS = [(page, code) for page in PAGES
            for code in re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page)).read(), flags=re.S)]


def test_the_pages_have_snippets():
    assert sum(page == "README.md" for page, _ in SNIPPETS) >= 1
    assert sum(page == "docs/integrations.md" for page, _ in SNIPPETS) >= 2
    assert sum(page == "docs/models.md" for page, _ in SNIPPETS) >= 1


@pytest.mark.parametrize("page,code", SNIPPETS, ids=[f"{page}-{i}" for i, (page, _) in enumerate(SNIPPETS)])
def test_snippet_runs(page, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, os.path.join(ROOT, page), "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    for expected in re.findall(r"print\(.*\)\s+# (.+)", code):  # a `# value` comment after a print is its output
        assert expected.strip() in printed
