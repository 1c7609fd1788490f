"""The package layering as contracts (pyproject ``[tool.importlinter]``), checked with
import-linter: runtime may import calibrate and edge_sr, calibrate only edge_sr, and edge_sr's core
neither (its CLI, the top layer, is exempt). A deliberate violation must fail the check."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("edge_sr", "calibrate", "runtime")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_a_deliberate_violation_breaks_them(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    metrics = tmp_path / "edge_sr" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nimport runtime.build  # noqa: E402,F401\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "edge_sr.metrics -> runtime.build" in r.stdout


def test_no_importlib_detours_below_the_cli():
    """Project modules import each other with plain imports, which the contracts can see; only
    the CLI loads its command modules by name (lazily, to keep --help light)."""
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.relative_to(ROOT).parts[:2] == ("edge_sr", "cli"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "import_module"):
                    bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad
