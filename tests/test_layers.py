"""The package's layers import downward only, and no module imports itself round a circle.

Every module of the package is parsed (``ast``, nothing is imported) and each of its
imports, at module level or inside a function, relative or absolute
(``kohakuboard.x``), is mapped to the layer it lands in:

    protocol   wire messages, codec, errors, item contract, endpoints, shared helpers
    storage    run folders: writer, reader, format           -> protocol (not the wire)
    daemon     the kobo-daemon process                        -> storage, protocol
    client     the training-side Board                        -> protocol
    viewer     kobo open / kobo-serve                         -> storage, protocol
    integrations, cli   on top                                -> anything below
    testing    a real daemon for users' tests (a subprocess)  -> storage, protocol

``storage`` may use ``protocol``'s plain pieces (errors, endpoint paths) but not the
wire: messages, codec, the item contract.  The test fails with every upward import
(file:line -> target) and every import cycle between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kohakuboard"

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "protocol": frozenset(),
    "storage": frozenset({"protocol"}),
    "daemon": frozenset({"protocol", "storage"}),
    "client": frozenset({"protocol"}),
    "viewer": frozenset({"protocol", "storage"}),
    "integrations": frozenset({"protocol", "storage", "daemon", "client"}),
    "cli": frozenset({"protocol", "storage", "daemon", "client", "viewer", "integrations"}),
    "testing": frozenset({"protocol", "storage"}),
}
# layer -> modules of an allowed layer it still may not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "storage": frozenset(f"{PACKAGE}.protocol.{m}" for m in ("messages", "codec", "items", "peer")),
}
# Import cycles allowed for now, each with the reason it is still there.  Only a
# strongly connected component inside one of these sets passes.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a module of the package, resolved)
    file: str
    line: int


def package_modules(root: Path, package: str, layers: Iterable[str]) -> dict[str, Path]:
    """``{module name: file}`` of every module of the package's layer folders."""
    out: dict[str, Path] = {}
    for layer in layers:
        base = root / layer
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module of the package ``name`` lands in (itself, or the package holding it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def module_imports(module: str, path: Path, modules: Mapping[str, Path], package: str, root: Path) -> list[Import]:
    """Every import of the package in one file, wherever it stands in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, node: ast.AST) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            found.append(Import(module, target, path.relative_to(root).as_posix(), node.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                if node.module:
                    base = f"{base}.{node.module}"
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                add(sub if sub in modules else base, node)
    return found


def layer_of(module: str, package: str) -> str:
    return module[len(package) + 1 :].split(".")[0]


def upward_imports(
    imports: Iterable[Import],
    package: str,
    allowed: Mapping[str, frozenset[str]],
    forbidden: Mapping[str, frozenset[str]],
) -> list[str]:
    bad: list[str] = []
    for imp in imports:
        src, dst = layer_of(imp.source, package), layer_of(imp.target, package)
        if src == dst:
            continue
        if dst not in allowed.get(src, frozenset()):
            bad.append(f"{imp.file}:{imp.line} -> {imp.target} ({src} may not import {dst})")
        elif imp.target in forbidden.get(src, frozenset()):
            bad.append(f"{imp.file}:{imp.line} -> {imp.target} ({src} may not import the wire module {imp.target})")
    return list(dict.fromkeys(bad))  # one line per import statement and target


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        scc.append(top)
                        if top == node:
                            break
                    if len(scc) > 1:
                        out.append(sorted(scc))
    return out


def check(
    root: Path,
    package: str = PACKAGE,
    allowed: Mapping[str, frozenset[str]] = ALLOWED,
    forbidden: Mapping[str, frozenset[str]] = FORBIDDEN,
    known_cycles: Mapping[frozenset[str], str] = KNOWN_CYCLES,
) -> list[str]:
    """Every problem found, as readable lines (empty when the layering holds)."""
    modules = package_modules(root, package, allowed)
    imports = [imp for mod, path in modules.items() for imp in module_imports(mod, path, modules, package, root)]
    problems = [f"upward import: {line}" for line in upward_imports(imports, package, allowed, forbidden)]
    by_pair = {}
    for imp in imports:
        by_pair.setdefault((imp.source, imp.target), imp)
    for scc in cycles(imports):
        if any(set(scc) <= known for known in known_cycles):
            continue
        members = set(scc)
        edges = [
            f"    {imp.file}:{imp.line} {imp.source} -> {imp.target}"
            for (src, dst), imp in sorted(by_pair.items())
            if src in members and dst in members
        ]
        problems.append("import cycle: " + " <-> ".join(scc) + "\n" + "\n".join(edges))
    return problems


def test_layers_import_downward_only_and_no_cycles() -> None:
    problems = check(ROOT)
    assert not problems, "layering broken (see tests/test_layers.py):\n" + "\n".join(problems)


def test_every_module_is_checked() -> None:
    modules = package_modules(ROOT, PACKAGE, ALLOWED)
    for layer in ALLOWED:
        assert f"{PACKAGE}.{layer}" in modules
    assert f"{PACKAGE}.storage.writer" in modules
    on_disk = {p for layer in ALLOWED for p in (ROOT / layer).rglob("*.py")}
    assert set(modules.values()) == on_disk


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_catches_upward_imports_and_cycles(tmp_path: Path) -> None:
    """The checker bites: a synthetic package with one upward import of each kind and a cycle."""
    _write(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/wire.py": "X = 1\n",
            "low/a.py": "def f():\n    from . import b\n",  # a lazy import: still an edge
            "low/b.py": "from .a import f\n",
            "mid/__init__.py": "",
            "mid/ok.py": "from ..low import a\n",
            "mid/wire_user.py": "import pkg.low.wire\n",
            "mid/up.py": "from pkg.top import thing\n",
            "top/__init__.py": "",
            "top/thing.py": "def g():\n    from ..mid.ok import a\n",
        },
    )
    allowed = {"low": frozenset(), "mid": frozenset({"low"}), "top": frozenset({"mid", "low"})}
    forbidden = {"mid": frozenset({"pkg.low.wire"})}
    problems = check(tmp_path, "pkg", allowed, forbidden, {})
    text = "\n".join(problems)
    assert "mid/up.py:1 -> pkg.top.thing (mid may not import top)" in text
    assert "mid/wire_user.py:1 -> pkg.low.wire" in text
    assert "import cycle: pkg.low.a <-> pkg.low.b" in text
    assert "low/a.py:2 pkg.low.a -> pkg.low.b" in text
    assert not any("mid/ok.py" in p or "top/thing.py" in p for p in problems)
    assert len(problems) == 3
    # a cycle listed as known passes, and only that one
    assert len(check(tmp_path, "pkg", allowed, forbidden, {frozenset({"pkg.low.a", "pkg.low.b"}): "test"})) == 2
