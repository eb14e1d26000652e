"""The package's import graph, read from the source with ``ast``: no module imports in a circle,
the core (``sharded_adamw/core``) imports only the core, checkpointing only the core, the
integrations only the core, and nothing in the package imports the benchmark (``benchmarks/``,
outside the installed package).

Only imports that run when a module is imported count: those at module level and in class
bodies. Imports inside functions (``ShardedAdamW.attach`` loads ``ddp`` when called) and under
``if TYPE_CHECKING:`` (type hints only) do not. A submodule's implicit import of its parent
package does not count either, as in import-linter and grimp.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sharded_adamw

PACKAGE = Path(sharded_adamw.__file__).parent
# what each folder of the package may import at import time (besides itself)
ALLOWED = {
    "core": {"core"},
    "checkpointing": {"core", "checkpointing"},
    "integrations": {"core", "integrations"},
    "tools": {"core", "checkpointing", "integrations", "tools"},
}


def module_name(path: Path, root: Path = PACKAGE, top: str = "sharded_adamw") -> str:
    parts = [top, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


BENCH = PACKAGE.parent / "benchmarks"
MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))} | {
    module_name(p, BENCH, "benchmarks"): p for p in sorted(BENCH.rglob("*.py"))
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of ``body`` that run when the module is imported."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += import_time_statements(node.body)
            found += import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += import_time_statements(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += import_time_statements(node.body)
    return found


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports at import time."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in import_time_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in MODULES:
                out.add(sub)
            elif target in MODULES:
                out.add(target)
    return out - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "sharded_adamw" and len(parts) > 2 else None


def test_the_graph_is_read_from_every_module_of_the_package_and_the_benchmark():
    assert {"sharded_adamw.core.optimizer", "sharded_adamw.integrations.ddp"} <= set(GRAPH)
    assert "sharded_adamw.core.collectives" in GRAPH["sharded_adamw.integrations.ddp"]
    assert "sharded_adamw.core.optimizer" in GRAPH["benchmarks.contenders"]


def test_type_checking_blocks_and_function_level_imports_do_not_count():
    # optimizer.attach imports ddp inside the method; ddp needs ShardedAdamW for hints only
    assert "sharded_adamw.integrations.ddp" not in GRAPH["sharded_adamw.core.optimizer"]


def test_no_module_imports_in_a_circle():
    circles = {
        name: sorted(m for m in reachable(name) if name in reachable(m))
        for name in GRAPH
        if name in reachable(name)
    }
    assert not circles, circles


def test_each_folder_imports_only_what_it_builds_on():
    wrong = {
        (name, m)
        for name in GRAPH
        if folder(name) in ALLOWED
        for m in GRAPH[name]
        if m.startswith("benchmarks")
        or (folder(m) is not None and folder(m) not in ALLOWED[folder(name)])
    }
    assert not wrong, sorted(wrong)


def test_every_module_of_the_package_lives_in_a_folder():
    loose = [
        n
        for n in MODULES
        if n.startswith("sharded_adamw.")
        and folder(n) is None
        and n.count(".") == 1
        and n.split(".")[1] not in ALLOWED
    ]
    assert loose == [], loose


def _private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module constants, and attributes
    it assigns on ``self``/``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def private_reads(readers: list[Path]) -> list[str]:
    """``x._name`` in ``readers`` where ``_name`` is a private name that some module of the
    package defines and the reading module does not (``x`` not ``self``/``cls``)."""
    trees = {p: ast.parse(p.read_text()) for p in MODULES.values()}
    ours = set().union(*(_private_names(t) for t in trees.values()))
    found = []
    for path in readers:
        tree = trees.get(path) or ast.parse(path.read_text())
        own = _private_names(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ours - own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}")
    return found


def test_no_module_of_the_package_reads_another_modules_private_names():
    """What a module needs from another is a named interface (the optimizer's is listed under
    "internal interface" in ``core/optimizer.py``), so a change inside one module cannot
    break another in silence."""
    assert private_reads(list(MODULES.values())) == []


def test_the_tests_read_no_private_names_of_the_package():
    tests = sorted(Path(__file__).parent.rglob("*.py"))
    assert private_reads(tests) == []
