"""The architecture is what docs/architecture.md says: layers that point one way (pyproject.toml's import-linter
contract, checked here on the code and shown to catch a planted upward import) and one line per module."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

importlinter = pytest.importorskip("importlinter", reason="import-linter is part of the dev install")
from importlinter.cli import lint_imports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _lint(project: Path, monkeypatch) -> int:
    """Exit code of the layers contract run over the `disco` package found in `project`."""
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    for name in [n for n in sys.modules if n == "disco" or n.startswith("disco.")]:
        monkeypatch.delitem(sys.modules, name)  # grimp finds the package through the import system
    return lint_imports(config_filename=str(project / "pyproject.toml"), no_cache=True)


def test_layers_contract_is_kept(monkeypatch):
    assert _lint(ROOT, monkeypatch) == 0


def test_layers_contract_fails_on_an_upward_import(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "disco", tmp_path / "disco", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path, monkeypatch) == 0  # the copy alone is kept
    planted = tmp_path / "disco" / "split" / "modules.py"
    planted.write_text(planted.read_text() + "\n\ndef _upward():\n    from disco.cli import main  # noqa: F401\n")
    assert _lint(tmp_path, monkeypatch) == 1


def _sections(text: str) -> list[tuple[list[str], str]]:
    """[(packages a heading names, e.g. ['split'], the section's text)] of the document."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return [(re.findall(r"`disco/(\w+)/`", heading), body) for heading, body in zip(parts[1::2], parts[2::2])]


def test_every_module_has_its_line():
    text = DOC.read_text()
    sections = _sections(text)
    missing = []
    for path in sorted((ROOT / "disco").rglob("*.py")):
        relative = path.relative_to(ROOT / "disco")
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        package = relative.parts[0] if len(relative.parts) > 1 else None
        qualified = f"`{relative.as_posix()}`"
        in_section = any(package in packages and re.search(rf"`{re.escape(path.name)}`", body)
                         for packages, body in sections) if package else False
        if qualified not in text and not in_section:
            missing.append(relative.as_posix())
    assert not missing, f"docs/architecture.md has no line for {missing}"


MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 400  # past these a module or function does more than one job


def test_no_function_or_file_too_long_to_read():
    import ast

    too_long = []
    for path in sorted((ROOT / "disco").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"split these: {too_long}"
