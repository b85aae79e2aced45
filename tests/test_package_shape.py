"""The package's shape: imports point down the layers, and no product file outgrows one reading."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "hallo3_worker"

#: Top-level parts of hallo3_worker, lowest first. A part may import only parts of a lower layer.
LAYERS = [
    {"errors", "settings", "timing", "interface", "lazy"},
    {"models", "sampling"},
    {"conditioning", "weights", "denoiser"},
    {"memory", "fitness", "presets", "parallel"},
    {"pipeline"},
    {"pipeline_factory", "tiny"},
    {"worker"},
]
#: Inside packages with an order of their own, lowest first.
INNER_ORDER = {
    "weights": ["formats", "locate", "verify", "load", "__init__"],
    "conditioning": ["decode"],  # the decode path depends on no other conditioning module
}


def _rank(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def _imports(path: Path) -> set[str]:
    """Every ``hallo3_worker.x[.y]`` a file imports, TYPE_CHECKING blocks and function bodies included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "hallo3_worker":
                found.update(f"hallo3_worker.{alias.name}" for alias in node.names)
            elif node.module.startswith("hallo3_worker."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hallo3_worker."))
    return found


def _part(path: Path) -> list[str]:
    return list(path.relative_to(PACKAGE).with_suffix("").parts)


def test_imports_point_down_the_layers() -> None:
    every_part = set().union(*LAYERS)
    wrong: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        me = _part(path)
        if me == ["__init__"]:
            continue
        assert me[0] in every_part, f"{path.name}: add {me[0]!r} to LAYERS"
        for module in _imports(path):
            target = module.split(".")[1:]
            if target[0] == me[0]:  # inside one part: only what INNER_ORDER puts earlier
                order = INNER_ORDER.get(me[0], [])
                if len(me) > 1 and me[1] in order and len(target) > 1 and target[1] != me[1]:
                    if target[1] not in order[: order.index(me[1])]:
                        wrong.append(f"{'/'.join(me)} imports {module}")
                continue
            if _rank(target[0]) >= _rank(me[0]):
                wrong.append(f"{'/'.join(me)} imports {module}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def test_no_product_file_is_over_600_lines() -> None:
    product = [*PACKAGE.rglob("*.py"), *(REPO / "builder").rglob("*.py"), *(REPO / "scripts").rglob("*.py"),
               REPO / "handler.py"]
    long = {str(p.relative_to(REPO)): n for p in product if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
