"""The tree shows the architecture (docs/architecture.md, "Where things are"): the import graph
of ``gateway/``, read with ``ast``, has no cycle between modules, the role packages are layered
and no module outside ``gateway/channels/`` imports a medium's package.

Every import counts, also one inside a function; only imports under ``if TYPE_CHECKING:``
(annotations, never executed) are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"

# Imports that break the layering today, each with the reason it is tolerated.
KNOWN: dict[tuple[str, str], str] = {}
# Cycles tolerated today (modules of one medium), with the reason.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {
    ("gateway.channels.voice.intake", "gateway.channels.voice.tracker"): (
        "lazy imports both ways inside the voice channel (parse_epoch, caller_address)"
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(GATEWAY.rglob("*.py"))}
REGISTERS = (
    "gateway.channels",
    *sorted(
        name
        for name, path in MODULES.items()
        if name.count(".") == 2
        and name.startswith("gateway.channels.")
        and path.name == "__init__.py"
    ),
)
"""The list of built-in channel types and each medium folder's ``TYPES``: names only."""

# Bottom to top: a module imports only from its own layer and the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the contact and its parts; the version; the lists of built-in channel types (names only);
    # the coalescer that batches writes (no imports: attachments use it as intake does)
    (
        "contact",
        (
            "gateway",
            "gateway.records",
            "gateway.contact",
            *REGISTERS,
            "gateway.queueing.batching",
        ),
    ),
    # the adapter interface and the services every part uses: config, HTTP server, metrics...
    ("services", ("gateway.adapters", "gateway.server")),
    ("queueing", ("gateway.queueing",)),
    ("cases", ("gateway.cases",)),
    ("channels", ("gateway.channels.",)),
    # what puts it all together: the gateway object, the command line, the adapter kit
    (
        "wiring",
        (
            "gateway.server.runtime",
            "gateway.server.workers",
            "gateway.server.cli",
            "gateway.__main__",
            "gateway.testing",
        ),
    ),
)


def layer_of(module: str) -> int:
    """The layer of the longest prefix naming ``module`` (``x.`` names only what is inside x)."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix in REGISTERS:  # the lists themselves, not what they list
                hit = module == prefix
            elif prefix.endswith("."):
                hit = module.startswith(prefix)
            else:
                hit = module == prefix or module.startswith(prefix + ".")
            if hit and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, tree: ast.AST, is_package: bool) -> Iterator[str]:
    """The gateway modules ``module`` imports when it runs."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "gateway" or target.startswith("gateway."):
                while target not in MODULES:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target != module:
                    yield target


def graph() -> dict[str, set[str]]:
    return {
        name: set(imports_of(name, ast.parse(path.read_text("utf-8")), path.name == "__init__.py"))
        for name, path in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    """A sanity check of the reader itself: imports it must see, lazy ones included."""
    edges = graph()
    assert "gateway.records" in edges["gateway.adapters"]
    assert "gateway.contact.clock" in edges["gateway.records"]
    assert "gateway.adapters" in edges["gateway.server.config"]  # inside parse_settings
    assert "gateway.queueing.coordination" not in edges["gateway.adapters"]  # TYPE_CHECKING only


def test_no_import_cycles() -> None:
    found = [tuple(c) for c in cycles(graph())]
    assert [c for c in found if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in found] == [], "mended: drop it from KNOWN_CYCLES"


def test_role_packages_are_layered() -> None:
    """Each import goes to the importer's own layer or one below it (the order is in
    docs/architecture.md); the case side and the channels do not know each other's insides."""
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module) and (module, target) not in KNOWN:
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert upward == []


def test_only_channels_import_a_medium() -> None:
    """Channel types are found through the ``gateway.channels`` entry points (and the built-in
    list), never imported by the core."""
    offending = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if not module.startswith("gateway.channels")
        for target in targets
        if target.startswith("gateway.channels.") and (module, target) not in KNOWN
    ]
    assert offending == []


def test_the_lists_of_built_in_types_import_nothing_else() -> None:
    """``gateway.channels`` and the medium folders' ``__init__`` sit in the bottom layer because
    they only name the built-in types."""
    edges = graph()
    for name in REGISTERS:
        assert {t for t in edges[name] if layer_of(t) > 0} == set(), name
