"""The import graph of ``calseg``, ``api`` and ``worker`` has no cycles and no upward arrows
(issue 16 item 7; the layers are drawn in docs/ARCHITECTURE.md, "Layers").

Every ``import`` and ``from ... import`` counts, wherever it is written: at the top of a module,
inside a function (lazy imports) or under ``if TYPE_CHECKING:``. A module may import modules of
its own group and of any lower layer; every module must belong to a group, so a new package is
placed in a layer before it can be imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calseg", "api", "worker")

LAYERS: list[tuple[str, list[tuple[str, ...]]]] = [
    # (layer name, groups); lowest first. A group is a tuple of module prefixes (a trailing "$"
    # means that module alone). Modules of one group may import each other; groups of one
    # layer may not import each other.
    ("core", [("calseg$", "calseg.progress", "calseg.fmt", "calseg.machine")]),
    ("analysis", [("calseg.analysis",)]),
    ("io", [("calseg.io",)]),
    ("science", [("calseg.simulate",), ("calseg.preprocess",)]),
    ("segment", [("calseg.segment",)]),
    ("pipelines", [("calseg.pipelines",)]),
    ("service", [("calseg.service",)]),
    (
        "edges",
        [
            (
                "calseg.cli",
                "calseg.__main__",
                "calseg.client",
                "calseg.demo",
                "calseg.report",
                "calseg.interleave_study",
                "calseg.bench",
                "calseg.bench_accuracy",
                "calseg.bench_costs",
                "calseg.bench_jobs",
                "calseg.bench_peers",
                "calseg.bench_service",
                "calseg.service.embedded",
                "api",
                "worker",
            )
        ],
    ),
]


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of :data:`PACKAGES`."""
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ``modules`` that ``name`` (a module or a name in one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(source: str, module: str, is_package: bool, modules: dict[str, Path]) -> set:
    """``{(module, imported module, line)}`` of one module's source, within ``modules``."""
    package = module if is_package else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{name}.{a.name}" for a in node.names]
        for target in targets:
            found = _resolve(target, modules)
            if found and found != module:
                edges.add((module, found, node.lineno))
    return edges


def graph(root: Path = ROOT) -> set:
    """All import edges ``(importer, imported, line)`` of :data:`PACKAGES`."""
    modules = _modules(root)
    edges = set()
    for name, path in modules.items():
        edges |= import_edges(path.read_text(), name, path.name == "__init__.py", modules)
    return edges


def place(module: str) -> tuple[int, int] | None:
    """``(layer index, group index)`` of a module: the group with the longest matching prefix."""
    best, best_len = None, -1
    for li, (_, groups) in enumerate(LAYERS):
        for gi, group in enumerate(groups):
            for prefix in group:
                exact = prefix.endswith("$")
                p = prefix.rstrip("$")
                hit = module == p if exact else module == p or module.startswith(p + ".")
                if hit and len(p) > best_len:
                    best, best_len = (li, gi), len(p)
    return best


def upward_arrows(edges: set) -> list[str]:
    """Edges that go up a layer or across groups of one layer, as readable lines."""
    bad = []
    for a, b, line in sorted(edges):
        pa, pb = place(a), place(b)
        if pa is None or pb is None:
            continue
        if pb[0] > pa[0] or (pb[0] == pa[0] and pb[1] != pa[1]):
            bad.append(
                f"{a} (layer {LAYERS[pa[0]][0]}) imports {b} (layer {LAYERS[pb[0]][0]}) "
                f"at line {line}"
            )
    return bad


def cycles(edges: set) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    succ: dict[str, set[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, set()).add(b)
        succ.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in _modules() if place(m) is None)
    assert not unplaced, f"place these modules in LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_upward_arrows() -> None:
    bad = upward_arrows(graph())
    assert not bad, "imports against the layer order (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_architecture_doc_names_every_layer() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert "## Layers" in doc
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    for name, groups in LAYERS:
        assert f"**{name}**" in section, f"layer {name} is not drawn in docs/ARCHITECTURE.md"
        for group in groups:
            for prefix in group:
                shown = prefix.rstrip("$").removeprefix("calseg.")
                assert f"`{shown}" in section, f"{prefix} is not named in the Layers section"


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        # the checker itself must be able to fail: an io module running an analysis ...
        ("from calseg.analysis.events import Event", "calseg.io.tables", []),
        ("def f():\n    from calseg.segment.infer import x", "calseg.io.tables", ["layer segment"]),
        # ... the library reaching into the worker, under TYPE_CHECKING too
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import worker.celery_app",
            "calseg.service.jobs",
            ["layer edges"],
        ),
        # siblings of one layer are separate groups
        ("from calseg.simulate import render", "calseg.preprocess", ["layer science"]),
        ("from . import choice", "calseg.segment.infer", []),
    ],
)
def test_checker_sees_upward_arrows(source: str, module: str, expected: list[str]) -> None:
    modules = _modules()
    bad = upward_arrows(import_edges(source, module, False, modules))
    assert len(bad) == len(expected)
    for line, want in zip(bad, expected, strict=True):
        assert want in line


def test_checker_sees_a_cycle() -> None:
    edges = {("a", "b", 1), ("b", "c", 1), ("c", "a", 1), ("c", "d", 1)}
    assert cycles(edges) == [["a", "b", "c"]]


ENV_EXCEPTIONS: dict[str, str] = {
    # module: why it still touches the environment (each entry must still be true); none
    # left since load_sam2 takes the configured checkpoint as an argument
}
"""Library modules allowed, for now, to read or change the process environment."""


def environment_uses(source: str) -> list[int]:
    """Lines of ``source`` that read or change the process environment: ``os.environ``,
    ``os.getenv``/``putenv``/``unsetenv``, ``from os import environ``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "environb", "getenv", "putenv", "unsetenv")
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if {a.name for a in node.names} & {"environ", "environb", "getenv", "putenv"}:
                lines.append(node.lineno)
    return sorted(lines)


def test_settings_are_read_at_the_edges_only() -> None:
    """Issue 16 item 6: the library (every layer below ``edges``) takes explicit arguments and
    never reads or changes ``os.environ``; the CLI, the service's settings
    (``calseg.service.settings``, pydantic-settings) and the other edges do."""
    edges = len(LAYERS) - 1
    found = {}
    for name, path in _modules().items():
        where = place(name)
        if where is None or where[0] == edges:
            continue
        lines = environment_uses(path.read_text())
        if lines:
            found[name] = lines
    unexpected = {m: lines for m, lines in found.items() if m not in ENV_EXCEPTIONS}
    assert not unexpected, f"the library reads the environment (pass it in instead): {unexpected}"
    stale = sorted(set(ENV_EXCEPTIONS) - set(found))
    assert not stale, f"no longer touch the environment: remove from ENV_EXCEPTIONS: {stale}"


def test_environment_checker_sees_reads() -> None:
    src = "import os\nx = os.environ.get('A')\ny = os.getenv('B')\nfrom os import environ\n"
    assert environment_uses(src) == [2, 3, 4]
    assert environment_uses("import os\nos.cpu_count()\n") == []
