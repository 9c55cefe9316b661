"""Layer 2, data in: validated sample arrays and the loaders that produce them.

``arrays`` checks and normalises features, labels and ids; ``loaders`` reads
Fashion-MNIST, IDX, ``.npz`` and CSV files. Nothing here knows about shards or stores.
"""

# The public names are those of ``sisa.data.loaders.__all__``: listed once, there.
from sisa.data.loaders import *  # noqa: F403
from sisa.data.loaders import __all__ as __all__
