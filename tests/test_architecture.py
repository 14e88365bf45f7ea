"""The house rules of docs/architecture.md, checked on the source: layers, sizes, one layout owner.

Read from the code's own imports (``ast``), so the map in docs/architecture.md cannot drift
from the code without a test failing.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ntk_torch"

# Lowest first. A module may import modules of its own layer's package and of lower
# layers; a top-level module of one layer may import others of the same layer only where
# ALSO_ALLOWED says so.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("_version", "errors", "failures", "_options", "steps", "records", "layout", "progress", "allocator"),
    ("functional", "runs", "analytic"),
    ("kernel",),
    ("metrics", "losses", "spectral", "estimate"),
    ("predict", "probe", "schedule", "linearize", "speech", "spotters"),
    ("forecast", "drift", "twin", "diagnostics", "budget", "sharing"),
    ("forecasting", "lifecycle", "provenance", "sinks", "probe_kernel"),
    ("tracker",),
    ("plots",),
    ("report", "data", "models", "config", "integrations"),
    ("experiment",),
    ("sweeps", "kernel_files", "selection", "results"),
    ("cli",),
)
ALSO_ALLOWED = {("report", "config")}  # the report prints the run's config
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _modules() -> Iterator[Tuple[str, Path]]:
    """``(dotted name relative to the package, path)`` of every library module."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(parts), path


def _room(dotted: str) -> str:
    """The top-level module or package a dotted module name belongs to."""
    return dotted.split(".")[0]


def _imports(dotted: str, path: Path) -> List[Tuple[str, int]]:
    """The package modules ``dotted`` imports (dotted names, ``""`` for the root) and lines."""
    tree = ast.parse(path.read_text())
    package = dotted.split(".")[:-1]  # "kernel.api" -> ["kernel"]; "kernel.__init__" too
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ntk_torch":
                target = node.module[len("ntk_torch"):].lstrip(".")
            else:
                continue
            if node.module is None:  # "from . import x": each x is a module or a name of the package
                for alias in node.names:
                    candidate = ".".join(filter(None, [target, alias.name]))
                    found.append((candidate if _is_module(candidate) else target, node.lineno))
            else:
                found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ntk_torch":
                    found.append((alias.name[len("ntk_torch"):].lstrip("."), node.lineno))
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_root(dotted: str) -> bool:
    return dotted == ""


def test_every_module_has_a_layer():
    rooms = {_room(name) for name, _ in _modules() if name != "__init__"}
    assert rooms == set(LAYER), "add the new module to LAYERS (and to docs/architecture.md)"


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, path in _modules():
        if name == "__init__":
            continue
        room = _room(name)
        for target, line in _imports(name, path):
            if _package_root(target):
                wrong.append(f"{name}:{line} imports the package root")
                continue
            other = _room(target)
            if other == room:
                continue
            upward = LAYER[other] > LAYER[room]
            sideways = LAYER[other] == LAYER[room] and (room, other) not in ALSO_ALLOWED
            if upward or sideways:
                wrong.append(f"{name}:{line} imports {target} (layer {LAYER[other]} from layer {LAYER[room]})")
    assert not wrong, "\n".join(wrong)


def test_the_kernel_knows_nothing_of_what_uses_it():
    for name, path in _modules():
        if _room(name) != "kernel":
            continue
        for target, line in _imports(name, path):
            assert _room(target) in ("kernel", *LAYERS[0], *LAYERS[1]), f"{name}:{line} imports {target}"


def test_layout_names_are_compared_only_in_the_layout_module():
    names = {"full", "trace", "diagonal"}
    comparisons = []
    for name, path in _modules():
        if name == "layout":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in names for o in operands):
                comparisons.append(f"{name}:{node.lineno}")
    assert len(comparisons) <= 4, comparisons


def _code_lines(source: str) -> set:
    """Line numbers holding code: no blank lines, comments or lone strings (docstrings)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER, tokenize.STRING):
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    return lines


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("name, path", list(_modules()), ids=[name for name, _ in _modules()])
def test_modules_and_functions_stay_small(name, path):
    source = path.read_text()
    non_blank = sum(1 for line in source.splitlines() if line.strip())
    assert non_blank <= MAX_MODULE_LINES, f"{name} has {non_blank} non-blank lines: split it by job"
    code = _code_lines(source)
    long: Dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            span = set(range(node.lineno, node.end_lineno + 1))
            count = len(span & code)
            if count > MAX_FUNCTION_LINES:
                long[node.name] = count
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines of code: {long}"
