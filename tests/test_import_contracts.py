"""The package's "may import" rules, read from the source (every import statement: module level, inside
functions, and under ``if TYPE_CHECKING:``), so a layer cannot grow a dependency unseen.

Layers, top to bottom (a module imports only its own part and the parts below it):

    cli  >  devtools  >  study  >  service  >  analysis  >  wsi | engines  >  base
    base = errors, config, vocab, fileio, logs, logsafe (and the generated edge._proto)

``wsi`` and ``engines`` are siblings: neither imports the other. ``edge.client`` (lab software's client)
is a leaf: it imports only the base and the generated stubs, and only the CLI imports it. The package
root (``edge/__init__``) is the public facade above all of them (it imports its heavy names lazily);
``edge/__main__`` runs the CLI. The numeric cores compute on arrays and import no I/O layer: only the base,
other numeric cores, numpy and scipy (and the standard library). And no two modules import each other,
directly or around a circle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components

PACKAGE = Path(__file__).resolve().parents[1] / "edge"

BASE = frozenset({"errors", "config", "vocab", "fileio", "logs", "logsafe", "_proto"})
LAYERS = {"cli": 6, "devtools": 5, "study": 4, "service": 3, "analysis": 2, "wsi": 1, "engines": 1}
NUMERIC_CORES = frozenset({
    "edge.wsi.tiling",
    "edge.analysis.detect",
    "edge.analysis.classify",
    "edge.analysis.scoring",
    "edge.analysis.review",
    "edge.analysis.drift",
    "edge.analysis.caveats",
})
CORE_THIRD_PARTY = frozenset({"numpy", "scipy"})

# Explicit exceptions, each with its reason. Keep this list short; an entry is a debt, not a rule.
TYPE_ONLY_IN_CORES = {
    # The detector's and classifiers' decoding rules are the bundle manifest's frozen spec dataclasses; the
    # cores read their fields (output format, thresholds, head names) and never load a bundle or a model.
    # Only the type names are imported (under TYPE_CHECKING): nothing of the engines runs in a core.
    ("edge.analysis.detect", "edge.engines.manifest"),
    ("edge.analysis.classify", "edge.engines.manifest"),
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the edge module (or third-party top-level name) imported
    line: int
    names: tuple[str, ...]  # for `from X import a, b`: (a, b)
    type_only: bool  # under `if TYPE_CHECKING:`
    lazy: bool  # inside a function


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    type_only: set[int] = set()
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        targets: list[tuple[str, tuple[str, ...]]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = tuple(alias.name for alias in node.names)
            # `from edge.wsi import slide` imports the module edge.wsi.slide
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            targets = [(s, ()) for s in submodules] or [(base, names)]
        for target, names in targets:
            resolved = target
            while resolved and resolved not in MODULES and resolved.startswith("edge"):
                resolved = resolved.rpartition(".")[0]
            if not resolved.startswith("edge"):
                resolved = target.split(".")[0]
            if resolved != module:
                found.append(Import(module, resolved, node.lineno, names, id(node) in type_only, id(node) in lazy))
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]
EDGE_IMPORTS = [imp for imp in IMPORTS if imp.imported == "edge" or imp.imported.startswith("edge.")]


def _part(module: str) -> str:
    """The part of the package a module belongs to: a layer's name, "base", "client", "root" or "main"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top in BASE:
        return "base"
    if top in ("client", "__main__"):
        return {"client": "client", "__main__": "main"}[top]
    return top


def _may_import(importer: str, imported: Import) -> bool:
    source, target = _part(importer), _part(imported.imported)
    if target == "root":
        # the package root's eager part is base only; submodules read the version from it
        return set(imported.names) <= {"__version__"}
    if source in ("root", "main"):
        return True  # the facade and `python -m edge`
    if target == "client":
        return source == "cli"
    if source == "client":
        return target == "base"
    if source == "base":
        return target == "base"
    if target == "base" or source == target:
        return True
    if source not in LAYERS or target not in LAYERS:
        return False  # a new top-level part: give it a place in the layers first
    return LAYERS[target] < LAYERS[source]


def test_the_parts_are_the_ones_the_layers_know() -> None:
    parts = {_part(m) for m in MODULES}
    assert parts == {"root", "main", "base", "client", *LAYERS}


def test_each_layer_imports_only_layers_below_it() -> None:
    violations = [
        f"{imp.importer}:{imp.line} imports {imp.imported}{' (lazily)' if imp.lazy else ''}"
        for imp in EDGE_IMPORTS
        if not _may_import(imp.importer, imp)
    ]
    assert violations == []


def test_the_rule_sees_lazy_and_type_only_imports() -> None:
    # the checker itself: a function-level import and a TYPE_CHECKING import are both found
    assert any(imp.lazy for imp in EDGE_IMPORTS) and any(imp.type_only for imp in EDGE_IMPORTS)
    cli = Import("edge.analysis.pipeline", "edge.cli.main", 1, (), False, True)
    assert not _may_import("edge.analysis.pipeline", cli)
    assert not _may_import("edge.wsi.slide", Import("edge.wsi.slide", "edge.engines.base", 1, (), False, True))
    assert not _may_import("edge.service.server", Import("edge.service.server", "edge.client", 1, (), True, False))
    assert _may_import("edge.cli.client", Import("edge.cli.client", "edge.client", 1, (), False, False))


def test_client_is_a_leaf_only_the_cli_imports() -> None:
    importers = {imp.importer for imp in EDGE_IMPORTS if imp.imported == "edge.client"}
    assert {_part(m) for m in importers} <= {"cli", "root"}
    assert {_part(imp.imported) for imp in EDGE_IMPORTS if imp.importer == "edge.client"} <= {"base"}


@pytest.mark.parametrize("core", sorted(NUMERIC_CORES))
def test_numeric_cores_import_no_io_layer(core: str) -> None:
    assert core in MODULES
    problems = []
    for imp in (i for i in IMPORTS if i.importer == core):
        if imp.imported.startswith("edge"):
            ok = _part(imp.imported) == "base" or imp.imported in NUMERIC_CORES
            ok = ok or (imp.type_only and (core, imp.imported) in TYPE_ONLY_IN_CORES)
        else:
            ok = imp.imported in CORE_THIRD_PARTY or imp.imported in sys.stdlib_module_names
        if not ok:
            problems.append(f"{core}:{imp.line} imports {imp.imported}")
    assert problems == []


def test_type_only_exceptions_are_still_needed() -> None:
    used = {(i.importer, i.imported) for i in IMPORTS if i.type_only}
    assert used >= TYPE_ONLY_IN_CORES


def _cycles() -> list[set[str]]:
    """Groups of modules that import each other around a circle (runtime imports, lazy ones too; as
    ../shared/tools/import_cycles.py, a module's import of its own package, always loaded first, is none)."""
    names = sorted(MODULES)
    index = {name: i for i, name in enumerate(names)}
    pairs = {
        (index[i.importer], index[i.imported])
        for i in EDGE_IMPORTS
        if not i.type_only and not i.importer.startswith(i.imported + ".")
    }
    rows, cols = zip(*pairs, strict=True) if pairs else ((), ())
    graph = csr_array((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(graph, directed=True, connection="strong")
    groups: dict[int, set[str]] = {}
    for name, label in zip(names, labels, strict=True):
        groups.setdefault(int(label), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def test_no_import_cycles() -> None:
    # the last one (engines.build <-> engines.tensorrt) went when engines.plans took what both need
    assert _cycles() == []
