"""The import graph of twin/ stays acyclic and runs only downward through the layers of
ARCHITECTURE.md, so the layers can be moved and tested apart.

Every module under twin/ is parsed with ast (module-level AND in-function imports: a
lazy import still ties two packages together) and two graphs are built:
- the package-level graph, one node per ``twin.X`` unit (as /work/shared/hooks/import-cycles
  does: twin.sim.engine -> twin.sim, twin.cli.simulate -> twin.cli, twin.config -> twin.config);
- inside each package, the module-level graph (twin.sim.engine -> twin.sim.request).
At both levels the cycles must be exactly the known remaining set (none today), so that a
new one fails here instead of slipping in, and every package-level edge must go to the same
or a lower layer (``LAYERS``). ``twin.sched`` is the scheduler shared by the simulator and
the executor, so it must import nothing else of twin.

Only explicit imports are edges: importing twin.sim.engine also runs twin/sim/__init__.py,
but that parent import cannot close a cycle that matters (the parent is already loading).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Package-level cycles that still exist today. Each entry is the set of units of one
# strongly connected component. Remove an entry once the cycle is gone; never add one.
KNOWN_PACKAGE_CYCLES: set = set()

# Module cycles inside a package that still exist today, each closed by a lazy in-function
# import. Same rule: remove an entry once the cycle is gone; never add one.
KNOWN_MODULE_CYCLES = {
}


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/twin (packages as their __init__)."""
    out = {}
    for path in sorted((root / "twin").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Twin modules that `mod` imports anywhere in its body, resolved to module names.

    ``from twin.sim import engine`` names the submodule twin.sim.engine when one exists,
    else the package twin.sim; relative imports are resolved against mod's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs if len(subs) == len(node.names) else subs + [target])
    return {t for t in found if t == "twin" or t.startswith("twin.")}


def _unit(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def import_graphs(root: Path):
    """(package-level edges, {unit: module-level edges inside that unit})."""
    mods = _modules(root)
    known = set(mods)
    packages: dict[str, set[str]] = defaultdict(set)
    inside: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for mod, path in mods.items():
        for target in _imports(mod, path, known):
            if _unit(target) != _unit(mod):
                packages[_unit(mod)].add(_unit(target))
            elif target != mod:
                inside[_unit(mod)][mod].add(target)
    return packages, inside


def cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()
    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.add(frozenset(comp))
    return out


def test_no_new_import_cycle_inside_any_package():
    _, inside = import_graphs(ROOT)
    assert inside, "no intra-package imports found: the scan is broken"
    found = {unit: cycles(edges) for unit, edges in inside.items()}
    assert {u: c for u, c in found.items() if c} == KNOWN_MODULE_CYCLES


def test_package_level_cycles_are_exactly_the_known_ones():
    packages, _ = import_graphs(ROOT)
    assert cycles(packages) == KNOWN_PACKAGE_CYCLES


def test_sched_imports_nothing_else_of_twin():
    packages, _ = import_graphs(ROOT)
    assert "twin.sched" in {u for ws in packages.values() for u in ws}, "scan is broken"
    assert packages.get("twin.sched", set()) == set()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_scan_sees_lazy_relative_and_from_imports(tmp_path):
    """The checks above can fail: a cycle closed by an in-function or relative import counts."""
    _write(tmp_path, {
        "twin/__init__.py": "",
        "twin/a/__init__.py": "",
        "twin/a/x.py": "def f():\n    from twin.b import y\n",
        "twin/a/z.py": "from . import x\n",
        "twin/a/w.py": "from .z import q\n",
        "twin/b/__init__.py": "",
        "twin/b/y.py": "from ..a import x\nfrom twin.b import v\n",
        "twin/b/v.py": "import twin.b.y\n",
        "twin/c/__init__.py": "from twin.c.m import n\n",
        "twin/c/m.py": "def g():\n    from twin.c import other_name\n",
    })
    packages, inside = import_graphs(tmp_path)
    assert packages == {"twin.a": {"twin.b"}, "twin.b": {"twin.a"}}
    assert cycles(packages) == {frozenset({"twin.a", "twin.b"})}
    assert inside["twin.a"] == {"twin.a.z": {"twin.a.x"}, "twin.a.w": {"twin.a.z"}}
    assert cycles(inside["twin.a"]) == set()
    assert cycles(inside["twin.b"]) == {frozenset({"twin.b.y", "twin.b.v"})}
    # __init__ re-exporting a submodule that imports a name from its package is a cycle too
    assert cycles(inside["twin.c"]) == {frozenset({"twin.c", "twin.c.m"})}


# The layers of ARCHITECTURE.md: a unit may import its own layer's units and those below.
LAYERS = {
    "twin.errors": 0, "twin.argtypes": 0, "twin.schemas": 0, "twin.outputs": 0,
    "twin.sched": 1, "twin.config": 2, "twin.workload": 2, "twin.costs": 3,
    "twin.results": 4, "twin.servers": 4, "twin.sim": 5, "twin.executor": 5,
    "twin.policies": 6, "twin.calibrate": 6, "twin.validate": 6, "twin.ml": 6, "twin.fleet": 6,
    "twin.api": 7, "twin.cli": 7, "twin.__main__": 7,
}


def upward_imports(packages: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a unit from a higher layer (``twin`` itself: only its
    version, exempt)."""
    return sorted(f"{a} -> {b}" for a, bs in packages.items() for b in bs
                  if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a])


def test_every_unit_has_a_layer():
    packages, _ = import_graphs(ROOT)
    units = set(packages) | {u for us in packages.values() for u in us}
    assert units - {"twin"} <= set(LAYERS), sorted(units - {"twin"} - set(LAYERS))


def test_imports_run_only_downward():
    packages, _ = import_graphs(ROOT)
    assert upward_imports(packages) == []


def test_an_upward_import_is_seen():
    assert upward_imports({"twin.costs": {"twin.sim"}, "twin.sim": {"twin.costs"}}) == [
        "twin.costs -> twin.sim"]
