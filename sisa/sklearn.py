"""A scikit-learn classifier backed by a SISA ensemble: ``fit``/``predict`` plus exact ``delete`` and ``verify``.

Needs the optional extra (``pip install .[sklearn]``); the rest of sisa never imports scikit-learn.

Behaviour worth knowing:

* **Store.** ``store=None`` trains into a temporary store directory that is removed by
  :meth:`SISAClassifier.close`, when the estimator is garbage collected, or at interpreter
  exit. A path keeps the store there (use it with ``sisa status``/``sisa audit``); fit refuses a
  path that already holds a store, except the one this estimator created at its previous fit,
  which a refit replaces. While fitted, the estimator holds that store's writer lock; ``close()``
  releases it.
* **Ids.** Each training row gets an id: its row position ``0..n-1``, or ``fit(..., sample_ids=ids)``.
  :meth:`SISAClassifier.delete` takes those ids.
* **Labels.** Any labels (strings, non-contiguous ints) are mapped to ``0..K-1`` in sorted order
  (``classes_``); ``predict`` returns the original labels. At least 2 classes are needed.
* **Small data.** sisa refuses a first training in which a shard holds fewer samples than slices.
  Under the default uniform partition the estimator instead lowers the shard count until no shard
  is empty, then the slice count to the smallest shard, with a ``UserWarning``; the values used
  are ``n_shards_`` and ``n_slices_``.
* **Determinism.** The same parameters and data give bit-identical predictions (sisa trains
  deterministically), also across refits, clones and pickles.
* **What a deletion forgets in a pipeline.** ``delete`` forgets rows in what the estimator fitted,
  and only there: a step before it in a ``Pipeline`` (a ``StandardScaler``, say) was fitted on every
  row and keeps the deleted rows' statistics, and a ``GridSearchCV`` chose its parameters with them.
  For exact preprocessing pass it as ``preprocessor=`` (:mod:`sisa.sklearn_preprocess`): the stores
  keep the raw rows and each network starts with the fitted transformer, whose state is part of the
  recipe (so of every checkpoint key, and of the store: it survives reopening a ``store`` path).
  ``preprocess="shard"`` (default) trains one store per shard (``<store>/shard-000``, ...; each is a
  plain store for ``sisa status``/``audit``), fits each shard's transformer on that shard's rows and,
  when a deletion touches the shard, erases the rows, refits it on the rows left and retrains the
  shard *from scratch* (new inputs invalidate every slice's checkpoint), then certifies;
  ``verify`` also refits each transformer and compares it bit for bit. ``preprocess="core"``
  fits one transformer on ``fit(..., core_ids=...)`` rows, which train too and can never be deleted
  (``CoreSetError``); deletions never change it and retrain from the last clean slice as usual.
  The fitted transformer is stored in the store's config as canonical JSON, never pickled
  (:func:`sisa.sklearn_state.dump_state`): only the transformers of
  :data:`sisa.sklearn_state.SUPPORTED` (scalers, PCA, ..., and ``Pipeline``/``FeatureUnion`` of
  them) are accepted, others are refused at ``fit`` with a ``ConfigError``, and opening a store
  whose stored state is not one sisa writes (a planted pickle, another class) raises
  ``IntegrityError``/``ConfigError`` without running anything from it.
* **Integer rows** (uint8 pixels, say) are converted to float32 before they reach a store or a
  model, so predict sees the values training saw (no raw+scale path; sisa's own loaders use one).
* **Pickling** a fitted estimator with a temporary store carries the store's bytes; with a
  ``store`` path it carries the path, and the copy opens that store when it is used
  (read-only to predict, writable to delete or verify).

``sklearn.utils.estimator_checks.check_estimator`` (scikit-learn 1.9) passes every check it runs
on ``SISAClassifier(shards=2, slices=1, epochs=10, lr=0.01)``, with no expected failures. Checks
scikit-learn itself skips here: ``check_array_api_input`` (only with ``SCIPY_ARRAY_API=1``; the
estimator takes numpy-convertible input, not other array namespaces) and
``check_classifier_data_not_an_array`` when pandas is not installed. ``fit`` takes no
``sample_weight``, so the sample-weight checks are not generated. ``check_classifiers_train``
asks for 0.83 training accuracy on blobs, which the configuration above reaches; a much shorter
training may not (a statement about the model, not the estimator contract). Needs scikit-learn
>= 1.6 (``validate_data`` and ``__sklearn_tags__``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from sisa import sklearn_preprocess as prep
from sisa.config.fields import config_to_dict
from sisa.config.loader import config_from_dict, load_config
from sisa.config.settings import SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import StoreError
from sisa.partition.assign import uniform_assignment
from sisa.sklearn_state import dump_state

__all__ = ["SISAClassifier"]

log = logging.getLogger(__name__)

# Files of a store that only coordinate processes; a pickled store leaves them out.
_LOCK_FILES = ("lock.mdb", "writer.lock")


def _release(ensembles: list[Ensemble], tmpdir: str | None) -> None:
    """Close the ensembles and remove their temporary directory (a finalizer: must not reference the estimator)."""
    for ens in ensembles:
        try:
            ens.close()
        except Exception:  # noqa: BLE001 - best effort at gc/exit; the lock goes with the process anyway
            log.debug("closing the ensemble failed", exc_info=True)
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check_ids(sample_ids: Any, n: int) -> np.ndarray:
    """The training ids: ``sample_ids`` checked, or the row positions."""
    ids = np.arange(n, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids)
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
        raise ValueError(f"sample_ids must be {n} integers, one per row of X; got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError("sample_ids must be non-negative integers; renumber the negative ones")
    return ids.astype(np.int64)


class _Handle:
    """The open ensembles of a fitted estimator (one store, or one per shard under ``path``) and what to release."""

    def __init__(self, path: Path, tmpdir: str | None, stores: list[Path] | None = None) -> None:
        self.ens: list[Ensemble] = []
        self.path = path
        self.stores = stores or [path]
        self.tmpdir = tmpdir
        self.finalizer: weakref.finalize | None = None

    def arm(self, owner: object) -> None:
        if self.finalizer is not None:
            self.finalizer.detach()
        self.finalizer = weakref.finalize(owner, _release, self.ens, self.tmpdir)

    def release(self) -> None:
        if self.finalizer is not None:
            self.finalizer()
            self.finalizer = None
        else:
            _release(self.ens, self.tmpdir)
        self.ens = []


@dataclasses.dataclass(repr=False, eq=False)
class SISAClassifier(ClassifierMixin, BaseEstimator):
    """A SISA ensemble (S shards x R slices) as a scikit-learn classifier, with exact unlearning.

    Constructor arguments are stored as given and checked at :meth:`fit` (scikit-learn's rule).

    Args:
        shards: Number of shards S.
        slices: Number of slices R per shard.
        model: ``"mlp"``, ``"cnn"`` (needs ``sample_shape`` of an image, e.g. ``(1, 28, 28)``) or
            ``"package.module:callable"`` (see :class:`sisa.config.settings.ModelConfig`).
        hidden: Hidden layer widths of the MLP (fully connected width(s) of the CNN).
        epochs: Epochs an unsliced model would train for (``train.epochs``).
        batch_size: Mini-batch size.
        lr: Learning rate.
        seed: Root seed of the partition and of training.
        aggregate: ``"mean"`` of probabilities, label ``"vote"`` or ``"weighted"`` by shard size.
        address: Where shards train: ``"local"`` (default: this machine, no Ray start), a Ray
            address, or None (``RAY_ADDRESS`` or a new local Ray instance).
        store: Store directory to keep, or None for a temporary one.
        config: Anything else: a YAML config path, or a list of ``key=value`` overrides such as
            ``["train.optimizer=sgd", "model.dropout=0.1"]``. The arguments above take precedence.
        sample_shape: Shape each row is reshaped to before training (e.g. ``(1, 28, 28)`` for
            ``cnn``); None keeps rows flat. With a ``preprocessor``: the shape its output is
            reshaped to.
        preprocessor: A scikit-learn transformer (e.g. ``StandardScaler()``), cloned and fitted
            inside the estimator so that :meth:`delete` forgets exactly what it saw; None: no
            preprocessing. See ``preprocess``. One of :data:`sisa.sklearn_state.SUPPORTED`
            (or a ``Pipeline``/``FeatureUnion`` of them): its state is stored without pickle.
        preprocess: Which rows fit the ``preprocessor``: ``"shard"`` (one per shard, fitted on that
            shard's current rows and refitted, with the shard retrained from scratch, when a
            deletion touches it) or ``"core"`` (one, fitted on the rows ``fit(..., core_ids=...)``
            declares; they can never be deleted, and a deletion never changes it).
    """

    # The constructor parameters: the dataclass writes the ``__init__`` scikit-learn expects,
    # storing each one as given (no validation until ``fit``).
    shards: int = 8
    slices: int = 4
    model: str = "mlp"
    hidden: Sequence[int] = (128,)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    aggregate: str = "mean"
    address: str | None = "local"
    store: str | Path | None = None
    config: str | Path | Sequence[str] | None = None
    sample_shape: Sequence[int] | None = None
    preprocessor: Any = None
    preprocess: str = "shard"

    # ------------------------------------------------------------------ config
    def _sisa_config(self, num_classes: int, shards: int, slices: int) -> SisaConfig:
        """The sisa config of these parameters (``config`` first, the named arguments on top)."""
        path: str | Path | None = None
        overrides: list[str] = []
        if isinstance(self.config, (str, Path)):
            path = self.config
        elif self.config is not None:
            overrides = [str(o) for o in self.config]
        tree = config_to_dict(load_config(path, overrides))
        tree.update(seed=int(self.seed), shards=int(shards), slices=int(slices))
        tree["data"]["num_classes"] = int(num_classes)
        tree["model"].update(name=str(self.model), hidden=[int(h) for h in self.hidden])
        tree["train"].update(epochs=int(self.epochs), batch_size=int(self.batch_size), lr=float(self.lr))
        tree["aggregate"]["method"] = str(self.aggregate)
        return config_from_dict(tree)

    def _mode(self) -> str | None:
        """``None`` (no preprocessor), ``"shard"`` or ``"core"``."""
        if self.preprocessor is None:
            return None
        if self.preprocess not in ("shard", "core"):
            raise ValueError(f"preprocess={self.preprocess!r} is unknown; use 'shard' or 'core'")
        if not (hasattr(self.preprocessor, "fit") and hasattr(self.preprocessor, "transform")):
            raise ValueError(
                f"preprocessor={self.preprocessor!r} is not a scikit-learn transformer (it needs fit and "
                "transform); pass one such as StandardScaler(), or None"
            )
        dump_state(self.preprocessor)  # a ConfigError naming the supported ones, before any work
        return str(self.preprocess)

    def _fit_layout(self, ids: np.ndarray) -> tuple[int, int]:
        """Shards and slices the data can fill: lowered (with a warning) where tiny data leaves a shard short."""
        shards, slices = int(self.shards), int(self.slices)
        probe = self._sisa_config(2, max(shards, 1), max(slices, 1))  # validates the parameters
        if probe.partition.strategy != "uniform" or shards < 1 or slices < 1:
            return shards, slices  # sisa's own check explains a distribution-aware shortfall
        used = min(shards, len(ids))
        while True:
            sizes = np.bincount(uniform_assignment(ids, probe.seed, used, 1)[0], minlength=used)
            if used == 1 or sizes.min() >= 1:
                break
            used -= 1
        used_slices = min(slices, int(sizes.min()))
        if (used, used_slices) != (shards, slices):
            warnings.warn(
                f"{len(ids)} samples cannot fill shards={shards} x slices={slices} (sisa needs every shard to "
                f"hold at least `slices` samples); training shards={used}, slices={used_slices}. "
                "Pass more data or lower shards/slices to silence this.",
                UserWarning,
                stacklevel=3,
            )
        return used, used_slices

    # ------------------------------------------------------------------- store
    def _open(self, *, write: bool) -> list[Ensemble]:
        """The fitted stores' ensembles, opened now if this estimator was unpickled with a store path.

        Raises:
            IntegrityError: If a store's preprocessor state is not one sisa writes (a planted pickle).
            ConfigError: If it names a class outside :data:`sisa.sklearn_state.SUPPORTED`.
        """
        check_is_fitted(self, "classes_")
        handle: _Handle = self._handle
        if handle.ens and (handle.ens[0].store.writable or not write):
            return handle.ens
        for ens in handle.ens:
            ens.close()  # readers that must become writers; the finalizer is re-armed below
        handle.ens = []
        handle.arm(self)
        # A temporary store has no other user: open it writable at once.
        readonly = not write and handle.tmpdir is None
        try:
            for path in handle.stores:
                handle.ens.append(Ensemble.open(path, readonly=readonly, address=self.address))
                # A stored preprocessor that sisa did not write (a planted pickle) is refused here, unrun.
                prep.check_store(handle.ens[-1].config)
        except BaseException:
            for ens in handle.ens:
                ens.close()  # no writer lock stays held by a store that was refused
            handle.ens = []
            raise
        return handle.ens

    def close(self) -> None:
        """Release the store (its writer lock) and remove it if it is temporary; the estimator is unfitted after."""
        handle = self.__dict__.pop("_handle", None)
        if handle is not None:
            handle.release()
        fitted = ("n_features_in_", "feature_names_in_", "n_shards_", "n_slices_", "store_path_", "preprocess_mode_")
        for name in ("classes_", *fitted, "core_ids_"):
            self.__dict__.pop(name, None)

    # --------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any, sample_ids: Any = None, core_ids: Any = None) -> SISAClassifier:
        """Train a new SISA ensemble on ``(X, y)``, replacing any previous one.

        Args:
            X: Features, ``(n_samples, n_features)``.
            y: Labels of any type scikit-learn accepts for classification; at least 2 classes.
            sample_ids: One unique non-negative integer id per row (what :meth:`delete` takes);
                default: the row positions ``0..n-1``.
            core_ids: With ``preprocess="core"`` (and only then): the ids of the rows the
                preprocessor is fitted on; they also train, and can never be deleted.

        Returns:
            self.

        Raises:
            ValueError: On bad data or parameters (sisa's ``DataError``/``ConfigError`` are ValueErrors),
                a single class, or a ``store`` path that already holds another store.
        """
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        classes, encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"SISAClassifier needs samples of at least 2 classes; got 1 class ({classes[0]!r}); "
                "add samples of another class"
            )
        ids = _check_ids(sample_ids, len(y))
        mode = self._mode()
        core = prep.check_core(core_ids, ids, mode)
        shards, slices = self._fit_layout(ids)
        cfg = self._sisa_config(len(classes), shards, slices)
        # Everything that can refuse the data (a transformer's fit included) runs before the old store goes.
        labels = encoded.astype(np.int64)
        if mode is None:
            features = X if self.sample_shape is None else X.reshape(len(X), *[int(d) for d in self.sample_shape])
            plan = [("", cfg, features, labels, ids)]
        else:
            plan = prep.plan_stores(mode, cfg, self.preprocessor, self.sample_shape, X, labels, ids, core)

        previous = self.__dict__.pop("_handle", None)
        if previous is not None:
            previous.release()
        tmpdir: str | None = None
        if self.store is None:
            tmpdir = tempfile.mkdtemp(prefix="sisa-sklearn-")
            root = Path(tmpdir) / "store"
        else:
            root = Path(self.store)
            if previous is not None and previous.tmpdir is None and previous.path.resolve() == root.resolve():
                shutil.rmtree(root)  # the store this estimator created at its previous fit: a refit replaces it
            if mode == "shard" and root.is_dir() and any(root.iterdir()):
                raise StoreError(
                    f"{root} already holds a store or other files; pick a new or empty directory, or store=None"
                )
        handle = _Handle(root, tmpdir, [root / name for name, *_ in plan] if mode == "shard" else None)
        created = False
        try:
            handle.arm(self)
            for path, (_, sub_cfg, x, labels, sub_ids) in zip(handle.stores, plan, strict=True):
                handle.ens.append(Ensemble.create(path, sub_cfg, address=self.address))
                created = True
                handle.ens[-1].ingest(x, labels, sub_ids)
                handle.ens[-1].fit()
        except BaseException:
            handle.release()  # a refused path (say, another store) is left as it was
            if created and tmpdir is None:
                shutil.rmtree(root, ignore_errors=True)  # the half-built store this call created
            raise
        self._handle = handle
        self.classes_ = classes
        self.n_shards_ = shards
        self.n_slices_ = slices
        self.store_path_ = root
        self.preprocess_mode_ = mode
        if core is not None:
            self.core_ids_ = core
        log.info("fitted %d samples, %d classes into %s", len(y), len(classes), root)
        return self

    # ----------------------------------------------------------------- predict
    def predict_proba(self, X: Any) -> np.ndarray:
        """Ensemble class probabilities, columns in the order of ``classes_``.

        Args:
            X: Features with the ``n_features_in_`` columns seen at fit.

        Returns:
            ``(n_samples, n_classes)`` float64 array; rows sum to 1.
        """
        ensembles = self._open(write=False)
        # float32 always, whatever X's dtype: the stores hold float32 rows (never raw values with a
        # feature_scale), so predict sees what training saw.
        X = validate_data(self, X, reset=False, dtype=np.float32)
        mode = self._fitted_mode()
        if mode == "shard":
            method = ensembles[0].config.aggregate.method
            return np.asarray(prep.ShardStores(ensembles).predict_proba(X, method), dtype=np.float64)
        if mode is None and self.sample_shape is not None:
            X = X.reshape(len(X), *[int(d) for d in self.sample_shape])  # with a preprocessor, its output is
        return np.asarray(ensembles[0].predict_proba(X), dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (values of ``classes_``): the argmax of :meth:`predict_proba`."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ exists
        return self.classes_[proba.argmax(axis=1)]

    # ---------------------------------------------------------------- unlearn
    def delete(self, ids: Any) -> dict[str, Any]:
        """Forget training samples exactly: retrain only their shards from the last clean slice.

        With ``preprocess="shard"`` each touched shard's preprocessor is refitted on the shard's
        remaining rows, which changes all of that shard's inputs: the shard retrains from scratch.

        Args:
            ids: Ids of training rows (row positions at fit, or the ``sample_ids`` given to fit).

        Returns:
            The deletion certificate (see :meth:`sisa.Ensemble.delete`); with ``preprocess="shard"``,
            ``{"deleted": n, "certificates": [...]}``, one certificate per touched shard (each with
            its ``shard``).

        Raises:
            CoreSetError: With ``preprocess="core"``, if ``ids`` names a core row (nothing is changed).
            DataError: On malformed or unknown ids (nothing is changed).
        """
        ensembles = self._open(write=True)
        mode = self._fitted_mode()
        if mode == "shard":
            return prep.ShardStores(ensembles).delete(ids)
        if mode == "core":
            prep.refuse_core(ensembles[0].config, ids)
        return ensembles[0].delete(ids)

    def verify(self) -> dict[str, Any]:
        """Retrain every shard from scratch and compare; ``result["ok"]`` only if all are bit-identical.

        With a preprocessor, each one is also refitted on the rows it was fitted on (the shard's
        current rows, or the core rows) and compared bit for bit: ``result["preprocessors"]``
        (per shard) or ``result["preprocessor"]``.
        """
        ensembles = self._open(write=True)
        mode = self._fitted_mode()
        if mode == "shard":
            return prep.ShardStores(ensembles).verify()
        result = ensembles[0].verify()
        if mode == "core":
            result["preprocessor"] = prep.core_matches(ensembles[0])
            result["ok"] = bool(result["ok"] and result["preprocessor"])
        return result

    def _fitted_mode(self) -> str | None:
        """The preprocessing the fitted stores hold (not the parameters, which may have changed since fit)."""
        return self.__dict__.get("preprocess_mode_")

    # ----------------------------------------------------------------- pickle
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_handle"}
        handle: _Handle | None = self.__dict__.get("_handle")
        if handle is not None:
            if handle.tmpdir is None:
                state["_store_at"] = str(handle.path)
            else:
                state["_store_files"] = {
                    f.relative_to(handle.path).as_posix(): f.read_bytes()
                    for f in sorted(handle.path.rglob("*"))
                    if f.is_file() and f.name not in _LOCK_FILES
                }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        at, files = state.pop("_store_at", None), state.pop("_store_files", None)
        self.__dict__.update(state)
        if files is not None:
            tmpdir = tempfile.mkdtemp(prefix="sisa-sklearn-")
            path = Path(tmpdir) / "store"
            path.mkdir(mode=0o700)
            for name, blob in files.items():
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(blob)
            self._handle = _Handle(path, tmpdir, self._store_dirs(path))
            self._handle.arm(self)
            self.store_path_ = path
        elif at is not None:
            self._handle = _Handle(Path(at), None, self._store_dirs(Path(at)))

    def _store_dirs(self, root: Path) -> list[Path] | None:
        """The store of each shard under ``root`` with ``preprocess="shard"``; None: ``root`` is the store."""
        if self._fitted_mode() != "shard":
            return None
        return prep.ShardStores.paths(root, int(self.n_shards_))
