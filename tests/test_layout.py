"""The house rules of the package, checked: the layers of pyproject.toml hold, functions stay short enough to read
at once, and no tracked file names a path of one particular machine."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
from pathlib import Path

from conftest import REPO_ROOT

MAX_FUNCTION_LINES = 60


def test_import_layers_hold() -> None:
    """`lint-imports` (import-linter) over pyproject.toml's contracts: no import up the layers, no cycle."""
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # grimp finds dynlm_pl from the repository root
    # import-linter configures logging with disable_existing_loggers: the loggers already made (dynlm's own) would
    # stay silent for the rest of the session
    enabled = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
               and not lg.disabled]
    try:
        assert lint_imports(config_filename=str(REPO_ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
    finally:
        os.chdir(cwd)
        for lg in enabled:
            lg.disabled = False


def test_functions_are_short() -> None:
    long = []
    for path in sorted((REPO_ROOT / "dynlm_pl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_machine_paths_in_tracked_files() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): nothing to check
        return
    pattern = re.compile(r"(?<![\w.])/(?:work|home|root|Users)/\w")
    hits = []
    for name in files:
        path = Path(REPO_ROOT / name)
        if path.suffix in {".png", ".npz", ".pt", ".ckpt"} or not path.is_file():
            continue
        for k, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line) and name != "tests/test_layout.py":
                hits.append(f"{name}:{k}: {line.strip()[:100]}")
    assert not hits, hits

