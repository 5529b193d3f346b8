"""The package's shape: imports run one way down the pipeline, and the README's map names every module.

Layers, bottom to top: config (+ tracking, atomic, storage) < data < preprocess / model (+ embedded)
/ loss < train < tune / evaluate / pretrain < registry < cli / demo. `loss.py` is pure functions of
tensors (it imports only config), so a model may mine its negatives with them. An import (module-level or inside a
function) may point down or sideways, never up. `evaluate/metrics.py` and `evaluate/smr.py`
are pure leaves (they import nothing from urbancross) that validation in `train/` uses too:
they sit at the loss level.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "urbancross"
LAYERS = {  # module prefix -> level; the longest matching prefix wins
    "urbancross": 0,
    "urbancross.config": 0,
    "urbancross.tracking": 0,
    "urbancross.atomic": 0,
    "urbancross.storage": 0,
    "urbancross.data": 1,
    "urbancross.preprocess": 2,
    "urbancross.model": 2,
    "urbancross.embedded": 2,
    "urbancross.loss": 2,
    "urbancross.train": 3,
    "urbancross.evaluate.metrics": 3,
    "urbancross.evaluate.smr": 3,
    "urbancross.tune": 4,
    "urbancross.pretrain": 4,
    "urbancross.evaluate": 4,
    "urbancross.registry": 5,
    "urbancross.cli": 6,
    "urbancross.demo": 6,
}


def level(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST) -> list[str]:
    """`urbancross...` modules an import statement names (`from a import b` counts a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("urbancross")]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("urbancross"):
        out = []
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            path = ROOT / sub.replace(".", "/")
            out.append(sub if path.with_suffix(".py").exists() or path.is_dir() else node.module)
        return out
    return []


def import_graph() -> list[tuple[str, str, int]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            edges += [(module_name(path), target, node.lineno) for target in imported_modules(node)]
    return edges


def test_no_import_runs_from_a_lower_layer_up():
    edges = import_graph()
    assert len(edges) > 100  # the walk sees the imports at all
    up = [f"{src}:{line} -> {dst}" for src, dst, line in edges if level(dst) > level(src)]
    assert up == []


def test_readme_map_names_every_module():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Map") : text.index("## Commands")]
    named = set(re.findall(r"[\w./-]+\.(?:py|json)", table))
    missing = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json") and path.name != "__init__.py":
            rel = path.relative_to(PACKAGE)
            if path.name not in named and str(rel) not in named and f"urbancross/{rel}" not in named:
                missing.append(str(rel))
    assert missing == []
