"""Every module's ``__all__`` names what it defines for others (a public function left out of it is missed)."""

import importlib
import inspect
import pkgutil

import pytest

import sisa

# Every module of every package, walked recursively. The CLI's main module exports only ``main``
# (its command functions are wired by its own parser); ``python -m sisa.cli`` runs on import.
MODULES = sorted(
    m.name.removeprefix("sisa.")
    for m in pkgutil.walk_packages(sisa.__path__, prefix="sisa.")
    if m.name not in ("sisa.cli.main", "sisa.cli.__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_definition(name: str) -> None:
    module = importlib.import_module(f"sisa.{name}")
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    }
    exported = getattr(module, "__all__", None)
    if exported is None:  # a package that only describes its layer defines nothing to export
        assert not defined, f"sisa.{name} defines {sorted(defined)} but has no __all__"
        return
    assert defined - set(exported) == set(), f"sisa.{name}.__all__ omits them"
    assert set(exported) - set(vars(module)) == set(), f"sisa.{name}.__all__ names what it does not define"
