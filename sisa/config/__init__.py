"""Layer 1, configuration: frozen dataclasses loaded from YAML, validated on load.

``settings`` holds the sections, the field roles (recipe / fixed / free) and the loader;
``rules`` the small validation helpers they share. Imports only :mod:`sisa.errors`.
"""

# The public names are those of ``sisa.config.settings.__all__``: listed once, there.
from sisa.config.settings import *  # noqa: F403
from sisa.config.settings import __all__ as __all__
