"""Load one shard's live model from the store: its checkpoint's weights in the network the config builds.

Shared by in-process serving (:mod:`sisa.serve.serving`) and the combiner
(:mod:`sisa.train.combiner`), which fits on the live models' outputs: both must build the
same network from the same bytes, and refuse a mismatch with the same fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from sisa.config.settings import SisaConfig
from sisa.errors import ModelError
from sisa.store.database import Store
from sisa.train.adapters import build_shard_model
from sisa.train.checkpoint import load_checkpoint

__all__ = ["load_live_model"]


def load_live_model(
    store: Store,
    cfg: SisaConfig,
    txn: Any,
    shard: int,
    record: dict[str, Any],
    shape: Sequence[int],
    backbone: nn.Module | None,
) -> nn.Module:
    """The model ``record`` (a live record of ``shard``) points at, in eval mode on the CPU.

    Args:
        store: The store.
        cfg: Its config (builds the network).
        txn: A read transaction of the store, the one ``record`` was read in.
        shard: The shard.
        record: Its live record.
        shape: The stored sample shape.
        backbone: The shared frozen backbone module (None without one).

    Raises:
        IntegrityError: If the checkpoint was modified.
        ModelError: If its weights do not fit the network the config builds now.
    """
    # A stale model kept by the serve-stale policy has only its live record.
    full = store.stage_record(txn, shard, record["stage"]) or record
    ckpt = load_checkpoint(store.checkpoint(txn, {**full, "shard": shard}))
    model = build_shard_model(cfg, tuple(shape), cfg.data.num_classes, backbone)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # another network than the one it was trained as
        raise ModelError(
            f"the live model of shard {shard} was trained as another network than the store's config "
            f"builds now (the model, adapter or backbone settings changed since): run `sisa train "
            f"--store {store.path}` (Ensemble.fit) to retrain under the new config. torch said: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()
