"""The layers of ``fourm`` (``fourm.LAYERS``) as the source has them: every ``import`` and
``from ... import`` in every module of the package, function-level ones included, read with ``ast``
(nothing is imported), goes down a layer or stays in its own unit; no module reaches one of a higher
layer or a neighbour beside it, and no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import fourm

PACKAGE = Path(fourm.__file__).resolve().parent


def module_name(path: Path) -> str:
    """``fourm/models/build.py`` -> ``fourm.models.build``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module of ``fourm``) for every import statement in ``path``: ``from fourm.x import y``
    counts as ``fourm.x.y`` where that is a module, else as ``fourm.x``; relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in dict.fromkeys(targets) if t == "fourm" or t.startswith("fourm.")]
    return found


def unit_of(module: str) -> tuple[int, str]:
    """(layer index in ``fourm.LAYERS``, unit) of a module; ``fourm`` itself is above every layer.
    KeyError for a module no unit of the table holds."""
    if module == "fourm":
        return len(fourm.LAYERS), "fourm"
    for rank, (_, units) in enumerate(fourm.LAYERS):
        for unit in units:
            full = f"fourm.{unit}"
            if module == full or module.startswith(full + "."):
                return rank, full
    raise KeyError(module)


def edges() -> list[tuple[str, int, str]]:
    """(importer, line, imported) over the whole package, modules of ``fourm`` only."""
    return [(name, line, target) for name, path in MODULES.items() for line, target in imported_modules(name, path)]


def upward_imports(graph: list[tuple[str, int, str]]) -> list[str]:
    """The imports that break the layering, one line each, naming the file, the line and both layers."""
    names = [layer for layer, _ in fourm.LAYERS] + ["the package's front door"]
    bad = []
    for importer, line, target in graph:
        (rank, unit), (target_rank, target_unit) = unit_of(importer), unit_of(target)
        sideways = target_rank == rank and target_unit != unit and names[rank] != "foundations"
        if target_rank > rank or sideways:
            where = MODULES[importer].relative_to(PACKAGE.parent)
            bad.append(f"{where}:{line} imports {target} ({names[target_rank]}: {'beside' if sideways else 'above'} {unit}, {names[rank]})")
    return bad


def cycles(graph: list[tuple[str, int, str]]) -> list[list[str]]:
    """Import cycles between modules (each once, as a closed path), by depth-first search."""
    follows: dict[str, set[str]] = {}
    for importer, _, target in graph:
        if target != importer:
            follows.setdefault(importer, set()).add(target)
    found, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for nxt in sorted(follows.get(module, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = "done"

    for module in sorted(follows):
        if module not in state:
            visit(module)
    return found


def test_every_module_has_a_layer_and_every_unit_exists():
    units = [f"fourm.{u}" for _, us in fourm.LAYERS for u in us]
    assert len(units) == len(set(units)), "a unit stands in two layers"
    missing = [u for u in units if not any(m == u or m.startswith(u + ".") for m in MODULES)]  # fourm/tokenizers/ has no __init__.py
    assert not missing, f"fourm.LAYERS names what the package does not hold: {missing}"
    unranked = []
    for name in MODULES:
        try:
            unit_of(name)
        except KeyError:
            unranked.append(name)
    assert not unranked, f"modules no layer of fourm.LAYERS holds (add them to the table): {unranked}"


def test_the_graph_is_read_from_the_source():
    """The reader sees a known top-level, function-level and ``from package import module`` import."""
    graph = {(a, b) for a, _, b in edges()}
    assert ("fourm.objectives.builders", "fourm.sequence") in graph  # top level
    assert ("fourm", "fourm.models.build") in graph  # inside build_model
    assert ("fourm.training.loop", "fourm.training.checkpoint") in graph  # from fourm.training import checkpoint


def test_every_imported_module_exists():
    """A function-level import of a module that moved fails only when it runs: find it here."""
    stale = [f"{MODULES[a].relative_to(PACKAGE.parent)}:{line} imports {b}" for a, line, b in edges() if b not in MODULES and not any(m.startswith(b + ".") for m in MODULES)]
    assert not stale, "imports of modules fourm does not hold:\n" + "\n".join(stale)


def test_every_import_goes_down_a_layer_or_stays_in_its_unit():
    bad = upward_imports(edges())
    assert not bad, "imports that break fourm.LAYERS (move the imported code down, or the importer up):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(edges())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_an_upward_import_is_caught():
    """The check itself: an import of training from the objectives, and one of models from the
    objectives beside them, are reported with their file and line."""
    graph = [("fourm.objectives.builders", 7, "fourm.training.loop"), ("fourm.objectives.masking", 9, "fourm.models.decoder"), ("fourm.vocab", 3, "fourm.modalities")]
    bad = upward_imports(graph)
    assert len(bad) == 2
    assert bad[0].startswith("fourm/objectives/builders.py:7 imports fourm.training.loop (training and generation: above fourm.objectives")
    assert bad[1].startswith("fourm/objectives/masking.py:9 imports fourm.models.decoder (tokens and networks: beside fourm.objectives")
    assert cycles([("fourm.a", 1, "fourm.b"), ("fourm.b", 2, "fourm.a")]) == [["fourm.a", "fourm.b", "fourm.a"]]
