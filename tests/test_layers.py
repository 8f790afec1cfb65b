"""
The shape of the tree: the protocol core loads no Twisted, zope, passlib or
TLS library, the modules of L{pop3srv} import each other without a cycle,
only the hash-policy room imports passlib, and every C{test-case-name}
header names a test module that exists.

These read the source with L{ast} (or import it in a fresh interpreter), so
they see the tree as it is on disk and need no fixtures.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pop3srv"
PLUGINS = ROOT / "twisted" / "plugins"

#: Top-level packages the core must not load, even indirectly.
FORBIDDEN_IN_CORE = ("twisted", "zope", "passlib", "OpenSSL", "cryptography")


def module_name(path: Path) -> str:
    """The dotted name of a source file under C{ROOT}."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files() -> list[Path]:
    """Every module of the L{pop3srv} package."""
    return sorted(PACKAGE.rglob("*.py"))


def core_modules() -> list[str]:
    """Every module of C{pop3srv.core}, the package itself included."""
    return [module_name(p) for p in sorted((PACKAGE / "core").glob("*.py"))]


# --- a. the core is pure -------------------------------------------------------

_LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] in sys.argv[2:])))
"""


@pytest.mark.parametrize("module", core_modules())
def test_core_imports_no_framework(module: str) -> None:
    """
    Importing any module of C{pop3srv.core} in a fresh interpreter loads
    nothing from Twisted, zope.interface, passlib, pyOpenSSL or
    cryptography: the core takes bytes and plain values, so it can be read,
    tested and reused without them.
    """
    result = subprocess.run(
        [sys.executable, "-c", _LOADED, module, *FORBIDDEN_IN_CORE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    tops = sorted({name.split(".")[0] for name in loaded})
    assert not loaded, f"import {module} loads {len(loaded)} modules of {', '.join(tops)}"


def test_core_modules_found() -> None:
    """The purity test above has modules to check (a moved package would empty it)."""
    assert {"pop3srv.core.machine", "pop3srv.core.wire", "pop3srv.core.sasl"} <= set(core_modules())


# --- reading imports with ast ------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, source: str | None = None) -> Iterator[tuple[str, list[str], int]]:
    """
    Yield C{(module, names, line)} for every import in C{path}, at module
    level or inside functions and classes, but not under
    C{if TYPE_CHECKING:} (those are never executed).  Relative imports are
    resolved against the file's package; C{names} are the names of a
    C{from ... import} (empty for a plain C{import}).  C{source}, if
    given, is read as the text of C{path}.
    """
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    own = module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]

    def visit(node: ast.AST) -> Iterator[tuple[str, list[str], int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    yield from visit_one(other)
                continue
            yield from visit_one(child)

    def visit_one(node: ast.AST) -> Iterator[tuple[str, list[str], int]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno
        else:
            yield from visit(node)

    yield from visit(tree)


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of C{name} that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """
    Module → the L{pop3srv} modules it imports.  C{from pkg import name}
    counts as importing C{pkg.name} when that is a module, else C{pkg}.
    The implied import of a module's parent packages is not counted: our
    package C{__init__} modules import their children lazily or not at all.
    """
    modules = {module_name(p) for p in package_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in package_files():
        here = module_name(path)
        for target, names, _ in imports_of(path):
            if target != "pop3srv" and not target.startswith("pop3srv."):
                continue
            hits = {_known(f"{target}.{n}", modules) for n in names} or {_known(target, modules)}
            graph[here] |= {h for h in hits if h is not None and h != here}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    The strongly connected components of more than one module (or a module
    importing itself), by Tarjan's algorithm, each as a sorted list.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One import loop through C{component}, as C{a -> b -> a}."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return " -> ".join([*path, start])
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return " -> ".join([*path, (nxt or [start])[0]])
        path.append(fresh[0])
        seen.add(fresh[0])


# --- b. no import cycle ---------------------------------------------------------------


def test_no_import_cycle() -> None:
    """
    No two modules of L{pop3srv} import each other, directly or through
    others.

    Imports inside functions count: a lazy import still makes one module
    depend on the other, and a pair that needs it to load at all is a
    cycle with the knot hidden.  Imports under C{if TYPE_CHECKING:} do not
    count: they are never executed and only name types for mypy.
    """
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(graph, c) for c in cycles)


def test_cycle_finder_finds_cycles() -> None:
    """The finder reports a loop of three and a self-import, and not a diamond."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []
    graph = {"a": {"b"}, "b": {"a"}}
    assert _cycle_path(graph, ["a", "b"]) == "a -> b -> a"


def test_import_reader() -> None:
    """
    The reader sees imports in functions and C{from} imports of submodules,
    resolves relative imports, and skips C{if TYPE_CHECKING:} blocks.
    """
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import tls\n"
        "from ..core import wire\n"
        "if TYPE_CHECKING:\n"
        "    import pop3srv.app.tap\n"
        "else:\n"
        "    import pop3srv.app.config\n"
        "def f():\n"
        "    import pop3srv.mbox.scan\n"
    )
    probe = PACKAGE / "server" / "probe.py"  # never written: only its name is used
    found = {(t, tuple(n)) for t, n, _ in imports_of(probe, source)}
    assert found == {
        ("typing", ("TYPE_CHECKING",)),
        ("pop3srv.server", ("tls",)),
        ("pop3srv.core", ("wire",)),
        ("pop3srv.app.config", ()),
        ("pop3srv.mbox.scan", ()),
    }


# --- c. only the hash-policy room imports passlib ----------------------------------------


def _hash_policy_room(name: str) -> bool:
    return name == "pop3srv.auth.hashpolicy" or name.startswith("pop3srv.auth.hashpolicy.")


def test_only_hash_policy_imports_passlib() -> None:
    """
    passlib is imported by the hash-policy module (or package) alone, so a
    change of hashing library, or its import-time quirks, touch one room.
    Imports inside functions count (they still load passlib); the Twisted
    plugins are checked too.
    """
    offenders = []
    for path in [*package_files(), *sorted(PLUGINS.glob("*.py"))]:
        if _hash_policy_room(module_name(path)):
            continue
        for target, _, line in imports_of(path):
            if target == "passlib" or target.startswith("passlib."):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not offenders, "passlib imported outside pop3srv.auth.hashpolicy:\n" + "\n".join(
        offenders
    )


# --- d. test-case-name headers name real modules ---------------------------------------------

_HEADER = re.compile(r"#\s*-\*-\s*test-case-name:\s*(?P<names>[^*]+?)\s*-\*-")


def test_case_names_exist() -> None:
    """
    Every C{test-case-name} header (read by trial and editors to find a
    module's tests) names test modules that exist.
    """
    missing = []
    headers = 0
    for path in [*package_files(), *sorted(PLUGINS.glob("*.py"))]:
        with path.open() as f:
            first = "".join(f.readline() for _ in range(2))
        match = _HEADER.search(first)
        if match is None:
            continue
        headers += 1
        for name in match["names"].split(","):
            target = ROOT / Path(*name.strip().split("."))
            if not target.with_suffix(".py").exists() and not (target / "__init__.py").exists():
                missing.append(f"{path.relative_to(ROOT)}: {name.strip()}")
    assert headers > 0
    assert not missing, "test-case-name names a missing module:\n" + "\n".join(missing)
