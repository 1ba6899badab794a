"""Every third-party module the lab's code imports is a declared dependency of the project.

A package that only arrives through someone else's dependencies can vanish with their next release;
the lab's own imports (also the lazy ones inside functions) must each name a distribution that
`pyproject.toml` lists in `[project] dependencies`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"pd_lightning", "analysis"}


def imported_top_level_modules() -> dict[str, str]:
    """Top-level module name -> one file importing it, over pd_lightning/ and analysis/."""
    found: dict[str, str] = {}
    for path in sorted([*ROOT.glob("pd_lightning/**/*.py"), *ROOT.glob("analysis/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_direct_import_is_a_declared_dependency():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, where in imported_top_level_modules().items():
        if module in OWN or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{where} imports {module!r}, which no installed distribution provides"
        if not dists & declared:
            missing.append(f"{module} ({where}; from {sorted(dists)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)
