"""The package's layers import only downward (see distrib/__init__.py and DESIGN.md): storage
and format never know about training, the checkpoint manager never imports the Trainer, the
command lines sit on top. Checked on the source (every import, also those inside functions;
only ``if TYPE_CHECKING:`` blocks are exempt)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "distrib"

#: (module prefix, layer): the longest matching prefix decides
LAYERS = [
    ("distrib.config", 0),
    ("distrib.runtime", 1),
    ("distrib.tasks", 1),
    ("distrib.checkpoint", 2),
    ("distrib.checkpoint.store", 3),
    ("distrib.checkpoint.interval", 3),
    ("distrib.checkpoint.lease", 3),
    ("distrib.checkpoint.checkpointer", 3),
    ("distrib.checkpoint.memory", 3),
    ("distrib.records", 3),
    ("distrib.checkpoint.manager", 4),
    ("distrib.training", 5),
    ("distrib", 6),  # the package's public names, exitcodes and the command lines
]


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def distrib_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("distrib"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distrib"):
            assert node.module is not None and node.level == 0
            for alias in node.names:  # `from distrib.runtime import dist` imports a module
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py"))
                              .exists() else node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_every_import_points_downward() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    upward = []
    for path in modules:
        name = module_name(path)
        for line, target in distrib_imports(ast.parse(path.read_text())):
            if layer(target) > layer(name):
                upward.append(f"{path.relative_to(REPO)}:{line}: {name} (layer {layer(name)}) "
                              f"imports {target} (layer {layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import() -> None:
    tree = ast.parse("def f():\n    from distrib.training.trainer import Trainer\n")
    assert distrib_imports(tree) == [(2, "distrib.training.trainer")]
    assert layer("distrib.training.trainer") > layer("distrib.checkpoint.storage")
    assert distrib_imports(ast.parse("if TYPE_CHECKING:\n    import distrib.train\n")) == []
