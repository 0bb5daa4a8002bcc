"""The house rules (CONVENTIONS.md, "The shape of the house") checked on the source itself: imports run
down the floors only, no two modules import each other (not even lazily inside a function), the device
runtime imports nothing from rkdtool, and no file is over 650 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rkdtool"

# Floors from top to ground; a module may import from its own floor's other rooms only where listed below.
FLOORS = [
    ("cli",),
    ("distill.job", "jobs"),
    ("teachers",),
    ("distill", "report"),
    ("attacks",),
    ("deploy",),
    ("probes",),
    ("hub", "runs", "resources", "machine", "ranks", "training", "weights", "models", "data", "errors"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every rkdtool module `path` imports, at module level or inside functions."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("rkdtool"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(path, known) - {name, "rkdtool"} for name, path in modules().items()}


def floor(name: str) -> int:
    short = name.removeprefix("rkdtool.")
    best = None
    for level, rooms in enumerate(FLOORS):
        for room in rooms:
            if (short == room or short.startswith(room + ".")) and (best is None or len(room) > best[1]):
                best = (level, len(room))
    assert best is not None, f"{name} is on no floor of the house: add it to FLOORS"
    return best[0]


def test_the_import_graph_has_no_circle():
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert seen.get(nxt) != 1, "import circle: " + " -> ".join(path + [nxt])
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])


def test_imports_run_down_the_floors():
    upward = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, targets in graph().items()
        if a not in ("rkdtool", "rkdtool.__main__")
        for b in targets
        if floor(b) < floor(a)
    ]
    assert upward == []


def test_packages_import_each_other_one_way_only():
    """Package-level: if any module of A imports B, no module of B imports A (a package is one room)."""

    def room(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2])

    pairs = {(room(a), room(b)) for a, targets in graph().items() for b in targets if room(a) != room(b)}
    both = sorted({tuple(sorted(p)) for p in pairs if (p[1], p[0]) in pairs})
    assert both == []


def test_the_device_runtime_stands_alone():
    for path in (ROOT / "export").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("rkdtool")], path.name


def test_no_file_is_over_650_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "export").glob("*.py")]
        if (n := len(p.read_text().splitlines())) > 650
    }
    assert long == {}


def test_a_library_module_never_prints_or_exits():
    offenders = []
    for name, path in modules().items():
        if name.startswith("rkdtool.cli") or name == "rkdtool.__main__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}: print")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("exit", "argv")
                and getattr(node.value, "id", None) == "sys"
            ):
                offenders.append(f"{name}: sys.{node.attr}")
    assert offenders == []
