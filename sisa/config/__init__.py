"""Layer 1, configuration: frozen dataclasses loaded from YAML, validated on load.

``settings`` holds the schema (the sections, each field declared with its role), ``fields``
the roles (recipe / fixed / free) and the walks over fields, ``loader`` the YAML loading and
type conversion, ``stored`` the configs a store keeps, and ``rules`` the small validation
helpers they share. Imports only :mod:`sisa.errors`.
"""

# The public names are those of each module's ``__all__``: listed once, there.
from sisa.config.fields import *  # noqa: F403
from sisa.config.fields import __all__ as _fields_all
from sisa.config.loader import *  # noqa: F403
from sisa.config.loader import __all__ as _loader_all
from sisa.config.settings import *  # noqa: F403
from sisa.config.settings import __all__ as _settings_all

__all__ = [*_settings_all, *_fields_all, *_loader_all]
