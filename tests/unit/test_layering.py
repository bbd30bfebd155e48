"""The worker's layering rules, read from the source's imports (README, "Where things live")."""

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = ("aio_pika", "aiohttp", "aioboto3", "botocore", "google.auth")


@dataclass(frozen=True)
class Import:
    source: str  # the importing file, relative to the repository
    importer: str  # its module name
    target: str  # the imported module (`from a import b` names `a.b` when that is a module of ours)
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, at module level or inside functions, except those under `if TYPE_CHECKING:`, which are
    never executed and so can neither pull a library in at run time nor close a cycle."""
    for child in ast.iter_child_nodes(tree):
        for node in child.orelse if isinstance(child, ast.If) and _is_type_checking(child) else [child]:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            else:
                yield from _import_nodes(node)


def _absolute(package: str, level: int, module: str | None) -> str:
    """The module a `from` import names; `level` dots climb from `package` (one dot is the package itself)."""
    if not level:
        return module or ""
    parts = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join([*parts, module] if module else parts)


def _imports(modules: dict[str, Path]) -> list[Import]:
    found = []
    for name, path in modules.items():
        source = str(path.relative_to(ROOT))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(), source)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(package, node.level, node.module)
                # `from a import b` imports the module `a.b` when there is one; of our modules, `a` otherwise.
                # A library's names are kept whole (`from google import auth` is `google.auth`).
                targets = [
                    f"{base}.{a.name}" if base not in modules or f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            found += [Import(source, name, target, node.lineno) for target in targets]
    return found


MODULES = {_module_name(p): p for folder in ("worker", "contracts") for p in sorted((ROOT / folder).rglob("*.py"))}
IMPORTS = _imports(MODULES)


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _offenders(importers: tuple[str, ...], targets: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        str(i)
        for i in IMPORTS
        if _within(i.importer, *importers) and _within(i.target, *targets) and not _within(i.importer, *allowed)
    ]


def test_only_the_broker_and_ops_folders_speak_amqp() -> None:
    offenders = _offenders(("worker",), ("aio_pika", "aiormq", "pamqp"), ("worker.broker", "worker.ops"))
    assert not offenders, "\n".join(offenders)


def test_request_handling_and_prompt_building_do_no_io() -> None:
    offenders = _offenders(("worker.handling", "worker.prompting"), IO_LIBRARIES)
    assert not offenders, "\n".join(offenders)


def test_only_the_entry_points_reach_the_connection_check() -> None:
    entry_points = ("worker.app", "worker.cli", "worker.connection_check")
    offenders = _offenders(("worker",), ("worker.connection_check",), entry_points)
    assert not offenders, "\n".join(offenders)


def test_the_message_contracts_stand_alone() -> None:
    offenders = _offenders(("contracts",), ("worker",))
    assert not offenders, "\n".join(offenders)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as its members."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES if m.startswith("worker")}
    for i in IMPORTS:
        # Package `__init__` files hold only a docstring: an import passing through one adds no edge.
        if (
            i.importer in graph
            and i.target in graph
            and i.target != i.importer
            and MODULES[i.target].stem != "__init__"
        ):
            graph[i.importer].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while (member := stack.pop()) != module:
                component.append(member)
            components.append(sorted([module, *component]))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [c for c in components if len(c) > 1]


def _cycle_edges(component: list[str]) -> list[str]:
    return [str(i) for i in IMPORTS if i.importer in component and i.target in component and i.importer != i.target]


def test_no_import_cycles_between_worker_modules() -> None:
    cycles = [f"{' ↔ '.join(c)}:\n  " + "\n  ".join(_cycle_edges(c)) for c in _cycles()]
    assert not cycles, "\n".join(cycles)
