"""The package's layers (``docs/architecture.md``, "What imports what"): each package imports only the ones below
it, lazy imports inside functions included, and nothing imports a demo."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import monai_prompt

PACKAGE = Path(monai_prompt.__file__).parent

#: what each top-level module or package of monai_prompt may import (``io`` is open to all).
ALLOWED = {
    "cli": {"backbones", "benchmarks", "bundle_gen", "data", "demo", "demo_segmentation", "engine", "fpt", "losses",
            "nets", "peft", "runs", "tools"},
    "demo": {"runs", "data", "peft"},
    "demo_segmentation": {"runs", "data", "peft"},
    "benchmarks": {"runs", "tools", "bundle_gen", "nets", "engine", "peft", "backbones", "data"},
    "tools": {"runs", "peft", "backbones"},
    "runs": {"engine", "data"},
    "bundle_gen": {"fpt", "peft", "data"},
    "engine": {"peft", "backbones"},
    "losses": set(),
    "nets": {"fpt", "peft", "backbones"},
    "fpt": {"peft", "backbones"},
    "peft": {"backbones"},
    "backbones": set(),
    "data": set(),
}


def _imports() -> dict[str, set[str]]:
    """Top-level unit -> the other top-level units of monai_prompt it imports anywhere in its files."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        unit = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "monai_prompt" and len(parts) > 1 and parts[1] not in (unit, "io"):
                    found[unit].add(parts[1])
    return found


def test_every_unit_is_placed_in_a_layer():
    units = {p.with_suffix("").name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert units - {"__init__", "io", "bundles"} == set(ALLOWED)


def test_imports_point_down_and_nothing_imports_a_demo():
    imports = _imports()
    assert imports, "no imports found: the scan is broken"
    wrong = {unit: sorted(found - ALLOWED[unit]) for unit, found in imports.items() if found - ALLOWED[unit]}
    assert not wrong, f"imports against the layers of docs/architecture.md: {wrong}"
    assert [unit for unit, found in imports.items() if found & {"demo", "demo_segmentation"}] == ["cli"]
