"""The import rule of the package tree: layers only import downwards, and nothing imports in a cycle.

The layer list is read from ``sisa/__init__.py``'s docstring, so the rule is written down
once, where a reader looks for it. Every import counts: module level, inside functions
(the "local import" that hides a cycle at runtime) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sisa

PACKAGE = Path(sisa.__file__).parent


def layers() -> list[str]:
    """The layer names in the package docstring's list, lowest first."""
    doc = sisa.__doc__ or ""
    names = re.findall(r"^    ([a-z_]+) {2,}\S", doc, flags=re.M)
    assert names, "sisa/__init__.py's docstring must list the layers, one per line, indented four spaces"
    return names


def module_name(path: Path) -> str:
    """``sisa/train/trainer.py`` -> ``sisa.train.trainer``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The sisa modules ``name`` imports, anywhere in its file.

    ``from sisa.train import orchestrator`` is the module ``sisa.train.orchestrator``;
    ``from sisa.config import SisaConfig`` is the package ``sisa.config``.
    """
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.split(".")[0] == "sisa")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sisa":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return out


def unit(name: str) -> str:
    """The layer a module belongs to: its first component under ``sisa`` (``sisa`` itself: the top)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "sisa"


def graph() -> dict[str, set[str]]:
    """Module -> the sisa modules it imports."""
    found = modules()
    known = set(found)
    return {name: {t for t in imports(name, path, known) if t in known} for name, path in found.items()}


def test_every_module_belongs_to_a_listed_layer() -> None:
    listed = set(layers())
    stray = sorted({unit(m) for m in modules()} - listed - {"sisa"})
    assert not stray, f"add these to the layer list in sisa/__init__.py's docstring: {stray}"


def test_imports_only_go_down() -> None:
    rank = {name: i for i, name in enumerate(layers())}
    rank["sisa"] = len(rank)  # the package root re-exports the public API: it sits on top
    upward = []
    for source, targets in graph().items():
        for target in sorted(targets):
            a, b = unit(source), unit(target)
            if a != b and rank[b] >= rank[a]:
                upward.append(f"{source} -> {target} ({a} may not import {b})")
    assert not upward, "imports that go up (or sideways) the layer list:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    # Package __init__ files re-export their own modules; an edge from a module to its own
    # package's __init__ would be a cycle through the re-export, and is reported like any other.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_local_and_type_checking_imports(tmp_path: Path) -> None:
    """The rule would be toothless if imports inside functions or under TYPE_CHECKING were missed."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sisa.ensemble import Ensemble\n"
        "def f():\n    from sisa.train import orchestrator\n    import sisa.serve.serving\n"
    )
    found = imports("sisa.store.probe", source, {"sisa.train.orchestrator", "sisa.serve.serving"})
    assert found == {"sisa.ensemble", "sisa.train.orchestrator", "sisa.serve.serving"}


def test_the_readme_architecture_table_names_every_module() -> None:
    """Each package's row in README's **Architecture** table lists every module in it (a new file is named there)."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Architecture") :]
    missing = []
    for package in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        rows = [line for line in table.splitlines() if line.startswith(f"| `{package.name}/`")]
        assert rows, f"README's architecture table has no row for sisa/{package.name}/"
        missing += [
            f"sisa/{package.name}/{m.name}"
            for m in sorted(package.glob("*.py"))
            if m.name != "__init__.py" and f"`{m.name}`" not in rows[0]
        ]
    assert not missing, f"name these modules in README's architecture table: {missing}"
