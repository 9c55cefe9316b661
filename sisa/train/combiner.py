"""The combiner (``aggregate.method: combiner``): a stacker fitted on the core set over the live models' outputs.

Exactness: the combiner is a pure function of the models it combines, the core set (never
deletable) and the config, and it never outlives those models. Its *basis* names them (shard ->
checkpoint key, each key covering its recipe and training set) and the core set's digest;
its stored key is ``combiner-`` + the basis digest. Whenever a live record changes (a fit, a
deletion taking a shard out of service or retraining it, an ``add``), the store drops the
stored combiner in the same transaction (:meth:`~sisa.store.records.CheckpointRecords.set_live`);
a fit then stores the one of the new live set (:func:`refit_live`), and a prediction whose
served set has no stored combiner fits one in memory on exactly what it serves
(:class:`~sisa.serve.serving.Serving`). ``verify`` refits it from the verified live models
and compares bytes (:func:`check_live`). A stored one is fitted in the shards' pinned CPU domain
(:func:`fit_in_domain`), so how the driver process was started does not change its bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa.config.settings import SisaConfig
from sisa.errors import ConfigError, IntegrityError, StoreChangedError
from sisa.store.database import Store
from sisa.store.digests import Basis, sha256
from sisa.store.layout import COMBINER_PREFIX
from sisa.train import local_runner
from sisa.train.adapters import AdaptedModel, build_shard_model
from sisa.train.backbone import FEATURE_CHUNK, build_network, freeze, load_stored
from sisa.train.live import load_live_model
from sisa.train.stacking import STACKING_FORMAT, Stacker, fit_stacker, log_probs
from sisa.train.trainer import deterministic

__all__ = [
    "Basis",
    "check_live",
    "fit_domain",
    "fit_from_weights",
    "fit_in_domain",
    "fit_on_core",
    "has_core",
    "read_core",
    "refit_live",
    "require_core",
    "stored_stacker",
]

log = logging.getLogger(__name__)


def has_core(cfg: SisaConfig, core_count: int) -> bool:
    """Whether a store with this config and ``core_count`` core ids can fit (and so serve) the combiner."""
    return cfg.backbone.source == "core" and core_count > 0


def require_core(cfg: SisaConfig, core_count: int) -> None:
    """Refuse the combiner where there is no core set to fit it on.

    Raises:
        ConfigError: Without ``backbone.source: core`` or without core ids, naming the fix.
    """
    if not has_core(cfg, core_count):
        raise ConfigError(
            "aggregate.method: combiner is fitted on the core set (samples declared at ingest, never deletable), "
            f"and this store has {'no core set' if core_count == 0 else 'backbone.source: ' + cfg.backbone.source}: "
            "set backbone.source: core (with backbone.name and model.adapter) and declare core ids at ingest "
            "(core=...), or choose aggregate.method: mean, vote or weighted"
        )


# The shared backbone's features of the core set, chunk by chunk, from this process's last refit that ran
# it: (backbone digest, core digest) -> one tensor per FEATURE_CHUNK rows. A deletion's refit of heads then
# runs only the retrained heads, not the backbone over the whole core set again (the features are those
# chunks' forwards, so the heads see the same bytes). Kept only up to FEATURE_CACHE_BYTES.
_features: dict[tuple[str, str], list[torch.Tensor]] = {}
FEATURE_CACHE_BYTES = 1 << 28


def _core_logits(
    models: Sequence[nn.Module], x: torch.Tensor, reuse: tuple[str, str] | None = None
) -> tuple[torch.Tensor, bool]:
    """``(S, n, C)`` logits of each model on ``x``, ``FEATURE_CHUNK`` rows per forward from the first row.

    A shared frozen backbone's features are computed once per chunk for all heads (as serving does).

    Args:
        models: The models.
        x: The core set's features.
        reuse: ``(backbone digest, core digest)`` naming ``x`` and the one shared backbone, to keep its
            features for the next call (and take them from the last one); None: compute them.

    Returns:
        The logits, and whether the backbone's features were the kept ones.
    """
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    shared_ids = {id(m.shared_backbone) for m in models if isinstance(m, AdaptedModel) and m.shared_backbone}
    reuse = reuse if len(shared_ids) == 1 else None  # one backbone, the one the key names
    kept = _features.get(reuse) if reuse is not None else None
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for i, start in enumerate(range(0, x.shape[0], FEATURE_CHUNK)):
            xb = x[start : start + FEATURE_CHUNK]
            features: dict[int, torch.Tensor] = {}
            for out, m in zip(outs, models, strict=True):
                if not isinstance(m, AdaptedModel) or m.shared_backbone is None:
                    out.append(m(xb))
                    continue
                shared = m.shared_backbone
                if id(shared) not in features:
                    features[id(shared)] = kept[i] if kept is not None else shared(xb).flatten(1)
                    chunks.append(features[id(shared)])
                out.append(m.head(features[id(shared)]))
    if reuse is not None and kept is None and sum(c.numel() * c.element_size() for c in chunks) <= FEATURE_CACHE_BYTES:
        _features.clear()  # the last backbone's only
        _features[reuse] = chunks
    return torch.stack([torch.cat(out) for out in outs]), kept is not None


def fit_on_core(cfg: SisaConfig, models: Mapping[int, tuple[str, nn.Module]], core: tuple[np.ndarray, ...]) -> bytes:
    """The combiner's bytes for ``models`` (shard -> (checkpoint key, model)), fitted on the core set.

    Deterministic: the forwards run on the CPU under the shards' thread count with deterministic
    kernels, in fixed chunks, and the fit is :func:`~sisa.train.stacking.fit_stacker`.

    Args:
        cfg: The store's config (its thread count).
        models: The models combined, by shard; their order is the shards' order.
        core: ``(ids, x, y)`` of the core set, as :func:`read_core` returns them.
    """
    keys = {s: k for s, (k, _) in models.items()}
    return _fit(cfg, keys, {s: m for s, (_, m) in models.items()}, core, {})[0]


def _fit(
    cfg: SisaConfig,
    keys: Mapping[int, str],
    models: Mapping[int, nn.Module],
    core: tuple[np.ndarray, ...],
    known: Mapping[int, torch.Tensor],
    reuse: tuple[str, str] | None = None,
    fmt: int = STACKING_FORMAT,
) -> tuple[bytes, dict[int, torch.Tensor], bool]:
    """The combiner of the models ``keys`` names, with the core-set logits of those it had to compute.

    Each model's logits on the core set depend on that model alone (fixed chunks; a shared backbone's
    features are the same whichever heads share them), so logits computed earlier in the same domain
    (``known``) are the bytes a forward would give again.

    Args:
        cfg: The store's config (its thread count).
        keys: Every model combined: shard -> checkpoint key.
        models: The models whose logits are computed now, by shard.
        core: ``(ids, x, y)`` of the core set.
        known: The other shards' logits ``(n, C)``, computed before in this domain.
        reuse: ``(backbone digest, core digest)``: keep and reuse the shared backbone's core features
            in this process (:func:`_core_logits`); None: compute them.
        fmt: The stacking format to fit in (:data:`~sisa.train.stacking.FORMATS`).

    Returns:
        The combiner's bytes, the logits computed now by shard, and whether the backbone's features
        were the kept ones.
    """
    ids, x, y = core
    order = sorted(models)
    with deterministic(cfg.resources.threads_per_shard, torch.device("cpu")):
        fresh: dict[int, torch.Tensor] = {}
        reused = False
        if order:
            computed, reused = _core_logits([models[s].to("cpu").eval() for s in order], torch.from_numpy(x), reuse)
            fresh = {s: computed[i] for i, s in enumerate(order)}
        logits = torch.stack([fresh[s] if s in fresh else known[s] for s in sorted(keys)])
        stacker = fit_stacker(log_probs(logits), y, fmt)
    return stacker.encode(Basis(keys, ids).header()), fresh, reused


def fit_domain(cfg: SisaConfig) -> str:
    """Id of the determinism domain a stored combiner is fitted in: the shards' CPU domain.

    See :func:`sisa.train.local_runner.cpu_domain`.
    """
    return local_runner.cpu_domain(cfg).domain.id


def fit_in_domain(
    cfg: SisaConfig,
    keys: Mapping[int, str],
    models: Mapping[int, nn.Module],
    core: tuple[np.ndarray, ...],
    backbone: nn.Module | None,
    known: Mapping[int, torch.Tensor] | None = None,
    reuse: tuple[str, str] | None = None,
    fmt: int = STACKING_FORMAT,
) -> tuple[bytes, dict[int, torch.Tensor], bool]:
    """The combiner fitted in the domain of :func:`fit_domain` (the models travel as their weights).

    Args:
        cfg: The store's config.
        keys: Every model combined: shard -> checkpoint key.
        models: The models whose core-set logits are computed now, by shard (all of ``keys`` but ``known``).
        core: ``(ids, x, y)`` of the core set.
        backbone: The stored frozen backbone the models run on (None without one).
        known: Logits computed before in this domain, for the shards not in ``models``.
        reuse: ``(backbone digest, core digest)``: the process that fits (this one or the pinned
            child) keeps the backbone's core features for the next refit (see :func:`_core_logits`).
        fmt: The stacking format to fit in (``verify`` refits a stored combiner in its own).

    Returns:
        The combiner's bytes, the logits computed now by shard, and whether the backbone's core
        features were the ones kept from the last refit.
    """
    runner = local_runner.cpu_domain(cfg)
    known = dict(known or {})
    if runner.in_process:
        return _fit(cfg, keys, models, core, known, reuse, fmt)
    states = {s: _cpu_state(m) for s, m in models.items()}
    shared = _cpu_state(backbone) if backbone is not None else None
    blob, fresh, reused = runner.call(
        __name__, "fit_from_weights", cfg, dict(keys), shared, states, core, known, reuse, fmt
    )
    return bytes(blob), fresh, bool(reused)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def fit_from_weights(
    cfg: SisaConfig,
    keys: Mapping[int, str],
    backbone: dict[str, torch.Tensor] | None,
    states: Mapping[int, dict[str, torch.Tensor]],
    core: tuple[np.ndarray, ...],
    known: Mapping[int, torch.Tensor],
    reuse: tuple[str, str] | None = None,
    fmt: int = STACKING_FORMAT,
) -> tuple[bytes, dict[int, torch.Tensor], bool]:
    """:func:`fit_in_domain`'s fit of models rebuilt from their weights (in the pinned child)."""
    shape = tuple(core[1].shape[1:])
    module = None
    if backbone is not None:
        module = build_network(cfg, shape)
        module.load_state_dict(backbone)
        module = freeze(module, {}).module
    models = {}
    for shard, state in states.items():
        model = build_shard_model(cfg, shape, cfg.data.num_classes, module)
        model.load_state_dict(state)
        models[shard] = model.eval()
    return _fit(cfg, keys, models, core, known, reuse, fmt)


def read_core(store: Store, cfg: SisaConfig, txn: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The core set's sorted ids, features and labels, read in ``txn``.

    Raises:
        ConfigError: If the store has no core set (see :func:`require_core`).
    """
    ids = store.core_ids(txn)
    require_core(cfg, len(ids))
    x, y = store.load_samples(txn, ids, tuple(store.meta(txn)["feature_shape"]), "the core set")
    return ids, x, y


def stored_stacker(store: Store, txn: Any, basis: Basis) -> Stacker | None:
    """The stored combiner if it was fitted on ``basis``, else None.

    Raises:
        IntegrityError: If its bytes were altered, or name another basis than their record.
    """
    got = store.combiner_bytes(txn)
    if got is None or got[0].get("basis") != basis.digest:
        return None
    stacker, head = Stacker.decode(got[1])
    if head.get("models") != basis.header()["models"]:
        raise IntegrityError(f"the stored combiner {got[0]['key']} names other models than its record")
    return stacker


def _stored_format(stored: tuple[dict[str, Any], bytes] | None) -> int | None:
    """The stacking format of stored combiner bytes (the current one when none is stored); None if unknown."""
    if stored is None:
        return STACKING_FORMAT
    try:
        return Stacker.decode(stored[1])[0].format
    except IntegrityError:
        return None


def _live_models(
    store: Store, cfg: SisaConfig, txn: Any, skip: frozenset[int] = frozenset()
) -> tuple[dict[int, nn.Module], nn.Module | None]:
    """The live models, loaded, by shard (but those in ``skip``), and the stored backbone they run on."""
    backbone = load_stored(store, cfg, txn)
    module = backbone.module if backbone is not None else None
    shape = tuple(store.meta(txn)["feature_shape"])
    live = store.live(txn)
    models = {
        s: load_live_model(store, cfg, txn, s, r, shape, module) for s, r in sorted(live.items()) if s not in skip
    }
    return models, module


# Each live model's core-set logits from this process's last refit: (domain id, core digest, checkpoint key,
# weights digest) -> (n, C). A deletion changes one shard's model, so its refit computes one model's
# forwards over the core set, not S (for LoRA, S passes of the whole network were most of a deletion).
# Only the last refit's entries are kept: S tensors of the core set's size times the class count.
_logits: dict[tuple[str, str, str, str], torch.Tensor] = {}


def refit_live(store: Store, cfg: SisaConfig) -> str | None:
    """Store the combiner of the live models now, unless the stored one is theirs, fitted in this domain.

    Called at the end of every fit (and so of every deletion's retrain and every ``add``), by the
    process that holds the store's writer lock, so the live set cannot change between the read and
    the write; the write checks it anyway, since a combiner of another live set would be wrong.

    Returns:
        The stored combiner's key (None when no shard is live).

    Raises:
        ConfigError: Without a core set (:func:`require_core`).
        StoreChangedError: If the live set changed while the combiner was fitted (nothing is stored).
    """
    with store.read() as txn:
        live = store.live(txn)
        core = read_core(store, cfg, txn)
        if not live:
            return None
        basis = Basis({s: r["key"] for s, r in live.items()}, core[0])
        meta = store.meta(txn)
        record = meta.get("combiner")
        domain = fit_domain(cfg)
        if record is not None and record.get("basis") == basis.digest and record.get("domain") == domain:
            return str(record["key"])  # the stored one is this refit's bytes (a driver elsewhere refits it here)
        names = {s: (domain, basis.core, r["key"], str(r.get("weights"))) for s, r in live.items()}
        known = {s: _logits[name] for s, name in names.items() if name in _logits}
        models, backbone = _live_models(store, cfg, txn, frozenset(known))
        reuse = (str(meta["backbone"]["digest"]), basis.core) if meta.get("backbone") else None
    blob, fresh, reused = fit_in_domain(cfg, basis.models, models, core, backbone, known, reuse)
    _logits.clear()  # the last refit's only
    _logits.update({names[s]: t for s, t in {**known, **fresh}.items()})
    key = COMBINER_PREFIX + basis.digest
    new = {"key": key, "sha256": sha256(blob), "basis": basis.digest, "bytes": len(blob), "domain": domain}
    sealed = store.seal_checkpoint(blob, key)

    def put(txn: Any) -> None:
        now = {s: r["key"] for s, r in store.live(txn).items()}
        if now != basis.models:  # the live set changed while this fitted: this one belongs to no state
            raise StoreChangedError("the live models changed while the combiner was fitted; fit again")
        store.put_combiner(txn, new, sealed)

    store.write(put)
    log.info(
        "stored the combiner %s... of %d live model(s); core-set logits computed for %d, reused for %d; "
        "backbone features of the core set %s",
        basis.digest[:16],
        len(basis.models),
        len(fresh),
        len(known),
        "reused" if reused else "not reused",
    )
    return key


def check_live(store: Store, cfg: SisaConfig) -> dict[str, Any]:
    """Verify the stored combiner: refit it from the live models and compare the bytes exactly.

    Returns:
        ``{"ok", "key", "reason"?}``: ``ok`` only when a combiner of the live models is stored and
        its bytes equal the refit's.
    """
    with store.read() as txn:
        live = store.live(txn)
        record = store.meta(txn).get("combiner")
        key = record["key"] if record else None
        if any(r.get("stale") or r.get("interim") for r in live.values()):
            return {"ok": False, "key": key, "reason": "a shard serves a pending model; run sisa apply"}
        core = read_core(store, cfg, txn)
        basis = Basis({s: r["key"] for s, r in live.items()}, core[0])
        if record is None or record.get("basis") != basis.digest:
            return {"ok": False, "key": key, "reason": "no combiner of the live models is stored; run sisa train"}
        try:
            stored = store.combiner_bytes(txn)
        except IntegrityError as exc:
            return {"ok": False, "key": key, "reason": f"the stored combiner is damaged: {exc}"}
        if record.get("domain") not in (None, fit_domain(cfg)):
            # Fitted in another domain (another machine, torch build or cpu_isa): a refit here could differ
            # without anything being wrong. Never called a match, never a mismatch (as for a shard's replay).
            why = f"fitted in domain {record['domain']}, this machine fits in {fit_domain(cfg)}: run sisa train here"
            return {"ok": False, "key": key, "reason": "domain_unavailable", "message": why}
        models, backbone = _live_models(store, cfg, txn)
        fmt = _stored_format(stored)
    if fmt is None:
        return {"ok": False, "key": key, "reason": "the stored combiner is damaged: it names no format this sisa fits"}
    # Every forward again, nothing kept reused: this is the check. In the stored one's format (an older
    # store's combiner summed its Hessian another way, and is refitted that way).
    replay, _, _ = fit_in_domain(cfg, basis.models, models, core, backbone, fmt=fmt)
    if stored is None or stored[1] != replay:
        why = f"the stored combiner {key} differs from its refit on the live models"
        return {"ok": False, "key": key, "reason": why}
    return {"ok": True, "key": key, "sha256": sha256(replay)}
