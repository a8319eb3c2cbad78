"""The Python snippets of docs/integrations.md run as they stand (in a fresh folder)."""
from __future__ import annotations

import os
import re

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "integrations.md")
SNIPPETS = re.findall(r"```python\n(.*?)```", open(DOC).read(), flags=re.S)


def test_the_page_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, DOC, "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    for expected in re.findall(r"print\(.*\)\s+# (.+)", code):  # a `# value` comment after a print is its output
        assert expected.strip() in printed
