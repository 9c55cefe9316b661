"""Layer 2, data in: validated sample arrays and the loaders that produce them.

``arrays`` checks and normalises features, labels and ids; ``loaders`` reads
Fashion-MNIST, IDX, ``.npz`` and CSV files. Nothing here knows about shards or stores.
"""

from sisa.data.arrays import MAX_ID, LabeledArrays, as_arrays
from sisa.data.loaders import load_csv, load_fashion_mnist, load_idx, load_npz, load_split

__all__ = [
    "MAX_ID",
    "LabeledArrays",
    "as_arrays",
    "load_csv",
    "load_fashion_mnist",
    "load_idx",
    "load_npz",
    "load_split",
]
