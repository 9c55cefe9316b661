"""Every module's ``__all__`` names what it defines for others (a public function left out of it is missed)."""

import importlib
import inspect
import pkgutil

import pytest

import sisa

# The CLI module exports only ``main``; its command functions are wired by its own parser.
MODULES = sorted(m.name for m in pkgutil.iter_modules(sisa.__path__) if m.name != "cli")


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_definition(name: str) -> None:
    module = importlib.import_module(f"sisa.{name}")
    exported = getattr(module, "__all__", None)
    if exported is None:
        pytest.skip(f"sisa.{name} has no __all__")
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    }
    assert defined - set(exported) == set(), f"sisa.{name}.__all__ omits them"
    assert set(exported) - set(vars(module)) == set(), f"sisa.{name}.__all__ names what it does not define"
