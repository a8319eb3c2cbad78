"""Every command line shown in README.md and docs/ runs: `actlab list` and the quick start for real (train,
eval, resume), train and bench lines as --dry-run (they would train for hours), the rest parsed by the real
parser. A documented line that the CLI refuses fails here."""
from __future__ import annotations

import glob
import importlib
import os
import re
import shlex

import pytest

from actlab.cli.main import build_parser, main as cli_main

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _code_lines(text: str) -> list[str]:
    """Shell lines of fenced and indented code blocks, continuations joined, comments dropped."""
    lines, fenced, current = [], False, ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or raw.startswith("    ")):
            continue
        current = f"{current} {raw.strip()}" if current else raw.strip()
        if current.endswith("\\"):
            current = current[:-1].strip()
            continue
        lines.append(current.split(" # ")[0].strip())
        current = ""
    return lines


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `actlab ...` (or `python -m actlab`, `torchrun ... -m actlab`) line in a
    code block and every inline `actlab ...` span of the docs."""
    found = []
    for path in DOCS:
        text = open(path).read()
        candidates = _code_lines(text)
        candidates += re.findall(r"`((?:python -m )?actlab [^`]+)`", " ".join(text.split()))
        for line in candidates:
            # the actlab command: at the line's start or after `python -m` / `-m` (not a word in its arguments)
            m = re.search(r"(?:^|-m )actlab (\S.*)$", line) if "actlab " in line else None
            if m and not line.startswith(("pip ", "import ", "from ")):
                found.append((os.path.basename(path), m.group(1)))
    return sorted(set(found))


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    names = {shlex.split(c)[0] for _, c in COMMANDS}
    assert {"train", "eval", "bench", "list", "report", "analyze"} <= names, names


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The README's quick start 2, run for real in a fresh folder."""
    cwd = tmp_path_factory.mktemp("docs")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert cli_main(["train", "--model", "resnet20", "--act", "iieu_b", "--epochs", "3", "--out",
                         "runs/r20_iieu", "--quiet"]) == 0
        yield cwd
    finally:
        os.chdir(old)


PLACEHOLDER = re.compile(r"[A-Z_]+|.*HEAD.*|.*\$.*|.*<.*>.*")


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_documented_command_runs(where, command, quick_start, monkeypatch, capsys):
    monkeypatch.chdir(quick_start)
    if not os.path.exists("configs"):  # documented paths are relative to the repository
        os.symlink(os.path.abspath(os.path.join(ROOT, "configs")), "configs")
    argv = shlex.split(re.sub(r"\[[^\]]*\]", "", command).replace("...", ""))
    if len(argv) <= 1:  # a command named in prose (`actlab train`, `python -m actlab ...`)
        assert not argv or argv[0] in ("train", "eval", "list", "bench", "report", "analyze")
        return
    placeholders = [a for a in argv if PLACEHOLDER.fullmatch(a)] + (["..."] if "..." in command else [])
    if argv[0] in ("train", "bench") and "--dry-run" not in argv:
        argv.append("--dry-run")  # resolves the whole config (and reads a resumed run's), trains nothing
    parsed = build_parser().parse_args(argv)  # every documented flag exists and takes what the line gives it
    if placeholders:
        assert parsed.command == argv[0]
        return
    assert cli_main(argv) == 0, capsys.readouterr().err


def documented_modules() -> list[tuple[str, str, str]]:
    """(file, module, arguments) for every `python -m actlab.<module> ...` line of the docs: the benchmark,
    cost-model, conversion-matrix and timm-runner command lines."""
    found = []
    for path in DOCS:
        text = open(path).read()
        for line in _code_lines(text) + re.findall(r"`(python -m actlab\.[^`]+)`", " ".join(text.split())):
            m = re.search(r"python -m (actlab\.[\w.]+)(.*)$", line)
            if m:
                found.append((os.path.basename(path), m.group(1), m.group(2).strip()))
    for line in open(os.path.join(ROOT, "scripts", "figures.sh")).read().splitlines():  # `make figures`
        m = re.match(r"\$PY -m (actlab\.[\w.]+)(.*)$", line)
        if m:
            found.append(("figures.sh", m.group(1), m.group(2).replace('"$FIG"', "docs/figures").strip()))
    return sorted(set(found))


MODULES = documented_modules()


def test_the_docs_show_module_commands():
    assert {"actlab.perf.gpu_cost", "actlab.perf.model_speed", "actlab.integrations.timm"} <= {m for _, m, _ in MODULES}
    assert sum(w == "figures.sh" for w, _, _ in MODULES) >= 10


@pytest.mark.parametrize("where,module,arguments", MODULES, ids=[f"{w}: {m} {a[:50]}" for w, m, a in MODULES])
def test_documented_module_command_parses(where, module, arguments):
    """Each documented `python -m actlab.X` line names a module with a command line, and its real parser takes
    it: a synopsis (with `[...]` and metavariables such as M, A) names only options that exist; a concrete
    line parses whole (running them is the benchmarks' job: minutes to hours)."""
    parser = importlib.import_module(module).build_parser()
    argv = shlex.split(arguments.replace("...", ""))
    options = {o for action in parser._actions for o in action.option_strings}
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    if "[" in arguments or any(PLACEHOLDER.fullmatch(a) for a in argv if not a.startswith("-")):
        if module != "actlab.integrations.timm":  # its flags after SCRIPT are timm's own
            assert set(flags) <= options, f"{where}: {module} has no option(s) {sorted(set(flags) - options)}"
        return
    parser.parse_args(argv)
