"""The package's structure: layered folders, imports only going down, no cycles, one name per file, a small front door."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import lightning_nipq

PACKAGE = Path(lightning_nipq.__file__).resolve().parent
#: The layers of the package, lowest first: a module may import only from its own layer or below.
LAYERS = [
    {"quant"},
    {"layers"},
    {"training", "convert", "robust", "data"},
    {"saving"},
    {"callbacks"},
    {"__init__"},
    {"demo"},
]
#: Subpackages of one layer that must not import each other.
INDEPENDENT = [{"training", "convert", "robust", "data"}]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of the package, functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = set(modules())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level ``if`` or ``try`` still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import submodule`` imports the submodule; ``from pkg import name``, the package.
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        for target in targets:
            if target == "lightning_nipq" or target.startswith("lightning_nipq."):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(module: str) -> int:
    layer = layer_of(module)
    return next(index for index, names in enumerate(LAYERS) if layer in names)


def test_every_module_sits_in_a_known_layer_and_nothing_lies_flat_at_the_root():
    flat = [m for m in modules() if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir()]
    assert flat == [], f"modules at the package root besides __init__: {flat}"
    for module in modules():
        rank(module)  # raises StopIteration for a folder the layering does not know


def test_imports_only_go_down_the_layers():
    upward = []
    for module, path in modules().items():
        for target, line, _ in package_imports(path, module):
            if target == "lightning_nipq" and layer_of(module) not in ("__init__", "demo"):
                upward.append(f"{module}:{line} imports the front door")
            elif rank(target) > rank(module):
                upward.append(f"{module}:{line} imports {target}")
            elif layer_of(target) != layer_of(module) and any(
                {layer_of(target), layer_of(module)} <= group for group in INDEPENDENT
            ):
                upward.append(f"{module}:{line} imports its sibling {target}")
    assert upward == []


def test_no_import_cycle_among_the_modules_counting_imports_inside_functions():
    graph = {module: {target for target, _, _ in package_imports(path, module)} for module, path in modules().items()}
    # A package's __init__ imports its own modules, and each module's import of a sibling
    # passes through that __init__: only edges between modules are followed.
    for module in graph:
        graph[module] = {t for t in graph[module] if t in graph and not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_import_of_the_package_inside_a_function():
    inside = [
        f"{module}:{line} imports {target}"
        for module, path in modules().items()
        for target, line, top in package_imports(path, module)
        if not top
    ]
    assert inside == []


def test_no_file_name_repeats_across_folders():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_the_front_door_is_small_and_shadows_no_module():
    assert len(lightning_nipq.__all__) <= 22
    for name in lightning_nipq.__all__:
        assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir(), name


def test_tests_mirror_the_package_folders():
    tests = Path(__file__).resolve().parent
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "demo"):
        assert any((tests / folder.name).glob("test_*.py")), f"tests/{folder.name}/ has no tests for lightning_nipq/{folder.name}/"
