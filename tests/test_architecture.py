"""Import rules of the webchat package, checked by static analysis (ast) of its source files."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "webchat"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

MAX_FUNCTION_IMPORTS = 12
MAX_MODULE_LINES = 500
# (relative_path, imported_module) pairs allowed to import a webchat module inside a function.
FUNCTION_IMPORT_ALLOWED: set[tuple[str, str]] = {
    # gunicorn reads its config in the master, which must not load the app (no --preload): the
    # worker imports the hub once it has forked.
    ("webchat/gunicorn_conf.py", "webchat.realtime.hub"),
}

# Modules of the lower layer, relative to the package; "services" covers the whole sub-package.
LOWER_LAYER = ("services", "events", "presence", "models", "extensions", "config")
UPPER_LAYER = ("realtime", "chat", "auth", "admin", "health", "api")


@dataclass(frozen=True)
class Import:
    """One import statement: where it is, what it imports, and whether it runs inside a function."""
    importer: str
    path: str
    line: int
    text: str
    targets: tuple[str, ...]
    in_function: bool


@dataclass
class Analysis:
    """The modules of a package (name -> relative path) and all their import statements."""
    package: str
    modules: dict[str, str]
    imports: list[Import]


def module_name(package: str, relative: Path) -> str:
    """Dotted module name of a file, given its path relative to the package directory."""
    parts = [package, *relative.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    """True for `if TYPE_CHECKING:` and `if typing.TYPE_CHECKING:`."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(nodes, in_function: bool = False):
    """Yield (import node, in_function) pairs found in `nodes`, skipping TYPE_CHECKING block bodies."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif is_type_checking_block(node):
            yield from import_nodes(node.orelse, in_function)
        else:
            nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from import_nodes(ast.iter_child_nodes(node), nested)


def resolve_targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> tuple:
    """Absolute module names an import statement loads (submodule when `from pkg import name` names one)."""
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    base = node.module or ""
    if node.level:
        parts = importer.split(".")
        package_parts = parts if is_package else parts[:-1]
        anchor = package_parts[: len(package_parts) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else base)
    return tuple(dict.fromkeys(targets))


def analyse(root: Path, package: str) -> Analysis:
    """Parse every .py file under the package directory `root` and collect its imports."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(package, f.relative_to(root)): f"{package}/{f.relative_to(root).as_posix()}" for f in files}
    imports = []
    for file in files:
        importer = module_name(package, file.relative_to(root))
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node, in_function in import_nodes(tree.body):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            targets = resolve_targets(node, importer, file.name == "__init__.py", modules)
            imports.append(Import(importer, modules[importer], node.lineno, ast.unparse(node), targets, in_function))
    return Analysis(package, modules, imports)


def in_package(module: str, package: str) -> bool:
    """True when `module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def modules_run_by(imp: Import, analysis: Analysis) -> set[str]:
    """Package modules an import makes Python run: its targets, plus their parent packages outside the importer."""
    run = set()
    for target in imp.targets:
        parts = target.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        run |= {target, *(p for p in parents if not in_package(imp.importer, p))}
    return {m for m in run if m in analysis.modules and m != imp.importer}


def dependency_graph(analysis: Analysis) -> dict[str, set[str]]:
    """Module -> the package modules its import statements make Python run (self-imports left out)."""
    graph: dict[str, set[str]] = {name: set() for name in analysis.modules}
    for imp in analysis.imports:
        graph[imp.importer] |= modules_run_by(imp, analysis) - {blueprint_package(imp, analysis)}
    return graph


def blueprint_package(imp: Import, analysis: Analysis) -> str | None:
    """The package a blueprint's routes take `bp` from (`from . import bp`), which Python has already run.

    Flask's blueprint layout (flaskr, microblog): the package's __init__ makes `bp`, then imports
    its routes at the bottom, which take `bp` back from the half-run package. The only cycle allowed.
    """
    parent = imp.importer.rpartition(".")[0]
    if imp.targets == (parent,) and imp.text == "from . import bp":
        return parent
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        """Number `node`, explore its successors, and pop a component when `node` is its root."""
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                lowlink[node] = min(lowlink[node], lowlink[successor])
            elif successor in on_stack:
                lowlink[node] = min(lowlink[node], index[successor])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def describe_cycles(analysis: Analysis, cycles: list[list[str]]) -> list[str]:
    """One line per cycle, followed by the import statements that link its members."""
    lines = []
    for members in cycles:
        lines.append("cycle: " + " <-> ".join(members))
        for imp in analysis.imports:
            if imp.importer in members and modules_run_by(imp, analysis) & set(members):
                lines.append(f"    {imp.path}:{imp.line}: {imp.text}")
    return lines


def layering_violations(analysis: Analysis) -> list[str]:
    """`path:line -> module` for each lower-layer module importing the realtime or blueprint packages."""
    package = analysis.package
    lower = [f"{package}.{name}" for name in LOWER_LAYER]
    upper = [f"{package}.{name}" for name in UPPER_LAYER]
    violations = []
    for imp in analysis.imports:
        if not any(in_package(imp.importer, module) for module in lower):
            continue
        is_service = in_package(imp.importer, f"{package}.services")
        for target in imp.targets:
            if any(in_package(target, module) for module in upper) or (is_service and target == package):
                violations.append(f"{imp.path}:{imp.line} -> {target}")
    return violations


def function_imports(analysis: Analysis) -> list[Import]:
    """Import statements nested inside a function or method body."""
    return [imp for imp in analysis.imports if imp.in_function]


def forbidden_function_imports(analysis: Analysis, allowed: set[tuple[str, str]]) -> list[str]:
    """`path:line: import X` for each function-level import of a package module not in `allowed`."""
    return [
        f"{imp.path}:{imp.line}: {imp.text}"
        for imp in function_imports(analysis)
        if any(in_package(t, analysis.package) and (imp.path, t) not in allowed for t in imp.targets)
    ]


def oversized_modules(root: Path, package: str, limit: int) -> list[str]:
    """`path: N lines` for each .py file under `root` longer than `limit` lines."""
    sizes = {f: len(f.read_text(encoding="utf-8").splitlines()) for f in sorted(root.rglob("*.py"))}
    return [f"{package}/{f.relative_to(root).as_posix()}: {n} lines" for f, n in sizes.items() if n > limit]


# Tests on the real package. The two fixtures replace conftest's autouse ones: no app, no database.


@pytest.fixture(autouse=True)
def clean_state():
    """Nothing to clean: these tests only read source files."""


@pytest.fixture(autouse=True)
def fast_password_hashing():
    """Nothing to patch: no account is created here."""


def test_no_import_cycles():
    """No two webchat modules depend on each other, directly or through others."""
    analysis = analyse(PACKAGE_DIR, PACKAGE)
    cycles = find_cycles(dependency_graph(analysis))
    assert not cycles, "\n".join(describe_cycles(analysis, cycles))


def test_lower_layers_do_not_import_realtime_or_blueprints():
    """Services, models, extensions and config never import realtime, blueprints or webchat/__init__."""
    violations = layering_violations(analyse(PACKAGE_DIR, PACKAGE))
    assert not violations, "\n".join(violations)


def test_few_imports_inside_functions():
    """At most MAX_FUNCTION_IMPORTS function-level imports, none of a webchat module unless allowed."""
    analysis = analyse(PACKAGE_DIR, PACKAGE)
    nested = function_imports(analysis)
    forbidden = forbidden_function_imports(analysis, FUNCTION_IMPORT_ALLOWED)
    report = [f"{len(nested)} function-level imports (max {MAX_FUNCTION_IMPORTS}):"]
    report += [f"{imp.path}:{imp.line}: {imp.text}" for imp in nested]
    report += [f"{len(forbidden)} of them import webchat modules and are not allowed:", *forbidden]
    assert len(nested) <= MAX_FUNCTION_IMPORTS and not forbidden, "\n".join(report)


def test_modules_are_small():
    """No webchat source file is longer than MAX_MODULE_LINES lines."""
    oversized = oversized_modules(PACKAGE_DIR, PACKAGE, MAX_MODULE_LINES)
    assert not oversized, "\n".join(oversized)


# Self-tests: each checker reports a violation planted in a fake package.


def write_fake_package(root: Path) -> Path:
    """A package `fake` with a function-level cycle, a layering violation and a long module."""
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",
        "b.py": "def g():\n    from .a import f\n",
        "realtime/__init__.py": "from . import hub\n",
        "realtime/bus.py": "",
        "realtime/hub.py": "from .bus import publish\nif TYPE_CHECKING:\n    from ..services import x\n",
        "services/__init__.py": "",
        "services/x.py": "from .. import helper\ndef f():\n    from ..realtime.hub import online\n" + "pass\n" * 600,
    }
    package_dir = root / "fake"
    for name, text in files.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(text)
    return package_dir


def test_self_analysis_finds_cycle(tmp_path):
    """A function-level mutual import is a cycle; a package's own parents and TYPE_CHECKING blocks are not."""
    analysis = analyse(write_fake_package(tmp_path), "fake")
    assert find_cycles(dependency_graph(analysis)) == [["fake.a", "fake.b"]]


def test_self_analysis_finds_layering_violation(tmp_path):
    """A service importing realtime.hub or the top-level package is reported with its line."""
    analysis = analyse(write_fake_package(tmp_path), "fake")
    assert layering_violations(analysis) == [
        "fake/services/x.py:1 -> fake",
        "fake/services/x.py:3 -> fake.realtime.hub",
    ]


def test_self_analysis_finds_function_imports(tmp_path):
    """Function-level imports of package modules are reported unless allow-listed."""
    analysis = analyse(write_fake_package(tmp_path), "fake")
    assert len(function_imports(analysis)) == 3
    assert forbidden_function_imports(analysis, {("fake/services/x.py", "fake.realtime.hub")}) == [
        "fake/a.py:2: from . import b",
        "fake/b.py:2: from .a import f",
    ]


def test_self_analysis_finds_long_module(tmp_path):
    """A module over the line limit is reported with its length."""
    package_dir = write_fake_package(tmp_path)
    assert oversized_modules(package_dir, "fake", 500) == ["fake/services/x.py: 603 lines"]
