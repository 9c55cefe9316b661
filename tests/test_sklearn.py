"""sisa.sklearn.SISAClassifier: scikit-learn's estimator checks, meta-estimators, labels, exact deletion, stores."""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from sisa.errors import StoreError  # noqa: E402
from sisa.sklearn import SISAClassifier  # noqa: E402
from tests.conftest import ROOT, blobs  # noqa: E402

# Small and quick, yet enough training for check_classifiers_train's 0.83 accuracy bar on its blobs.
QUICK = {"shards": 2, "slices": 1, "epochs": 10, "lr": 0.01, "hidden": (32,)}


def quick(**params: object) -> SISAClassifier:
    return SISAClassifier(**{**QUICK, **params})  # type: ignore[arg-type]


# Every generated check is expected to pass: no expected_failed_checks. scikit-learn itself skips
# check_array_api_input (unless SCIPY_ARRAY_API=1) and, without pandas, check_classifier_data_not_an_array;
# fit takes no sample_weight, so no sample-weight checks are generated.
@parametrize_with_checks([quick()])
def test_sklearn_estimator_checks(estimator: SISAClassifier, check: object) -> None:
    check(estimator)  # type: ignore[operator]


def test_pipeline_with_scaler_string_labels_and_grid_search() -> None:
    # A separable problem: predictions in the original labels must be about as accurate as a
    # reference estimator's fitted in this run (labels mapped the wrong way round score near 0).
    x, y = blobs(n=240, d=6, classes=3, seed=1)
    names = np.array(["cat", "dog", "eel"])[y]
    reference = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, names)
    reference_accuracy = reference.score(x, names)
    pipe = make_pipeline(StandardScaler(), quick(shards=3, slices=2))
    pipe.fit(x, names)
    predicted = pipe.predict(x)
    assert list(pipe[-1].classes_) == ["cat", "dog", "eel"]
    assert float((predicted == names).mean()) >= reference_accuracy - 0.1
    # The pipeline's score is the accuracy of its predictions, in the original labels.
    assert pipe.score(x, names) == pytest.approx(float((predicted == names).mean()))

    reference_cv = cross_val_score(LogisticRegression(), x, names, cv=3)
    search = GridSearchCV(quick(), {"lr": [0.001, 0.01]}, cv=3, n_jobs=1).fit(x, names)
    assert search.best_score_ >= reference_cv.mean() - 0.1
    assert search.best_estimator_.score(x, names) >= reference_accuracy - 0.1

    scores = cross_val_score(quick(), x, names, cv=3)
    assert scores.shape == (3,) and scores.mean() >= reference_cv.mean() - 0.1


def test_non_contiguous_int_labels_round_trip() -> None:
    x, y = blobs(n=120, d=4, classes=2, seed=2)
    labels = np.where(y == 0, -7, 40)
    reference_accuracy = LogisticRegression().fit(x, labels).score(x, labels)
    clf = quick().fit(x, labels)
    assert clf.classes_.tolist() == [-7, 40]
    assert clf.score(x, labels) >= reference_accuracy - 0.1  # -7 and 40 swapped would score near 0
    proba = clf.predict_proba(x)
    assert proba.shape == (120, 2)
    assert np.array_equal(clf.predict(x), clf.classes_[proba.argmax(axis=1)])


def test_delete_is_exact_against_a_fresh_fit_on_the_rest() -> None:
    x, y = blobs(n=300, d=6, classes=3, seed=3)
    ids = np.arange(1000, 1300)
    clf = quick(shards=3, slices=3).fit(x, y, sample_ids=ids)
    gone = [1004, 1100, 1299]
    cert = clf.delete(gone)
    assert cert["deleted"] == 3
    assert clf.verify()["ok"]

    keep = ~np.isin(ids, gone)
    reference = quick(shards=3, slices=3).fit(x[keep], y[keep], sample_ids=ids[keep])
    assert np.array_equal(clf.predict_proba(x), reference.predict_proba(x))


def test_same_params_same_data_bit_identical_and_pickle_round_trip() -> None:
    x, y = blobs(n=150, d=5, classes=3, seed=4)
    first, second = quick().fit(x, y), quick().fit(x, y)
    assert np.array_equal(first.predict_proba(x), second.predict_proba(x))
    copy = pickle.loads(pickle.dumps(first))
    assert copy.store_path_ != first.store_path_
    assert np.array_equal(copy.predict_proba(x), first.predict_proba(x))
    copy.close()


def test_temporary_store_removed_on_close_and_on_garbage_collection() -> None:
    x, y = blobs(n=100, d=4, classes=2, seed=5)
    clf = quick().fit(x, y)
    path = clf.store_path_
    assert (path / "data.mdb").exists()
    clf.close()
    assert not path.parent.exists()

    clf = quick().fit(x, y)
    path = clf.store_path_
    refit_path = quick().fit(x, y).store_path_  # an unreferenced estimator: collected at once
    gc.collect()
    assert not refit_path.parent.exists()
    clf.fit(x, y)  # a refit replaces the temporary store
    assert not path.parent.exists() and clf.store_path_.exists()
    del clf
    gc.collect()


def test_store_path_is_kept_and_not_overwritten(tmp_path: Path) -> None:
    x, y = blobs(n=100, d=4, classes=2, seed=6)
    store = tmp_path / "kept"
    clf = quick(store=store).fit(x, y)
    expected = clf.predict_proba(x)
    clf.fit(x, y)  # its own store: a refit replaces it
    assert np.array_equal(clf.predict_proba(x), expected)
    clf.close()
    assert (store / "data.mdb").exists()

    with pytest.raises(StoreError, match="already holds a store"):
        quick(store=store).fit(x, y)
    assert (store / "data.mdb").exists()


def test_tiny_data_lowers_shards_and_slices_with_a_warning() -> None:
    x, y = blobs(n=6, d=3, classes=2, seed=7)
    with pytest.warns(UserWarning, match="cannot fill shards=4 x slices=3"):
        clf = quick(shards=4, slices=3).fit(x, y)
    assert clf.n_shards_ * clf.n_slices_ <= 6
    with pytest.raises(ValueError, match="at least 2 classes"):
        quick().fit(x, np.zeros(6, dtype=int))


def test_core_does_not_import_sklearn() -> None:
    code = "import sys, sisa, sisa.ensemble, sisa.cli.main; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------- preprocessing (issue 23 item 12)
def scaled_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blobs on very different feature scales, so a scaler's state depends visibly on its rows."""
    x, y = blobs(n=n, d=5, classes=3, seed=seed)
    return x * np.array([1.0, 10.0, 100.0, 0.1, 3.0]) + 7.0, y


def test_shard_preprocessor_is_refitted_on_the_remaining_rows_and_the_delete_is_exact() -> None:
    from sisa.sklearn_preprocess import stored_transformer
    from sisa.sklearn_state import same_state

    x, y = scaled_blobs(240, seed=11)
    ids = np.arange(500, 740)
    params = {"shards": 3, "slices": 2, "preprocessor": StandardScaler()}
    clf = quick(**params).fit(x, y, sample_ids=ids)
    gone = [503, 600, 739]
    cert = clf.delete(gone)
    assert cert["deleted"] == 3 and {c["state"] for c in cert["certificates"]} == {"applied"}
    result = clf.verify()
    assert result["ok"] and all(result["preprocessors"].values())

    # Each shard's scaler is exactly one fitted on that shard's remaining rows (in id order).
    keep = ~np.isin(ids, gone)
    for ens in clf._handle.ens:
        with ens.store.read() as txn:
            held = np.sort(np.concatenate(ens.planner.shard_slices(txn, 0)))
        assert not np.isin(held, gone).any()
        rows = np.flatnonzero(np.isin(ids, held))
        rows = rows[np.argsort(ids[rows])]
        assert same_state(stored_transformer(ens.config), StandardScaler().fit(x[rows].astype(np.float32)))

    # Predictions equal those of a fresh estimator never given the deleted rows.
    reference = quick(**params).fit(x[keep], y[keep], sample_ids=ids[keep])
    assert np.array_equal(clf.predict_proba(x), reference.predict_proba(x))
    # ... and differ from the estimator before the deletion (the scalers and models changed).
    before = quick(**params).fit(x, y, sample_ids=ids)
    assert not np.array_equal(clf.predict_proba(x), before.predict_proba(x))
    for est in (clf, reference, before):
        est.close()


def test_pipeline_scaler_is_not_unlearned_but_the_preprocessor_is() -> None:
    # The README's pipeline: the StandardScaler step outside the estimator keeps the deleted rows'
    # statistics after clf.delete, so its predictions differ from a pipeline fitted without them.
    x, y = scaled_blobs(150, seed=12)
    gone = [0, 1, 2, 3, 4, 5, 6, 7]
    keep = np.setdiff1d(np.arange(150), gone)
    pipe = make_pipeline(StandardScaler(), quick()).fit(x, y)
    pipe[-1].delete(gone)
    assert not np.allclose(pipe[0].mean_, StandardScaler().fit(x[keep]).mean_)

    clf = quick(preprocessor=StandardScaler()).fit(x, y)
    clf.delete(gone)
    reference = quick(preprocessor=StandardScaler()).fit(x[keep], y[keep], sample_ids=keep)
    assert np.array_equal(clf.predict_proba(x), reference.predict_proba(x))
    for est in (pipe[-1], clf, reference):
        est.close()


def test_core_preprocessor_never_changes_and_core_ids_are_refused() -> None:
    from sisa.errors import CoreSetError
    from sisa.sklearn_preprocess import stored_transformer
    from sisa.sklearn_state import same_state

    x, y = scaled_blobs(160, seed=13)
    core = np.arange(0, 30)
    clf = quick(shards=2, slices=2, preprocessor=StandardScaler(), preprocess="core").fit(x, y, core_ids=core)
    fitted = stored_transformer(clf._handle.ens[0].config)
    assert same_state(fitted, StandardScaler().fit(x[core].astype(np.float32)))
    expected = clf.predict_proba(x)
    with pytest.raises(CoreSetError, match="core rows"):
        clf.delete([5, 100])
    assert np.array_equal(clf.predict_proba(x), expected)  # nothing changed

    assert clf.delete([100, 131])["deleted"] == 2
    assert same_state(stored_transformer(clf._handle.ens[0].config), fitted)
    result = clf.verify()
    assert result["ok"] and result["preprocessor"]
    with pytest.raises(ValueError, match="core_ids"):
        quick(preprocessor=StandardScaler(), preprocess="core").fit(x, y)
    with pytest.raises(ValueError, match="core_ids"):
        quick().fit(x, y, core_ids=core)
    clf.close()


def test_shard_preprocessor_survives_pickle_and_reopening_a_store_path(tmp_path: Path) -> None:
    x, y = scaled_blobs(120, seed=14)
    store = tmp_path / "kept"
    clf = quick(preprocessor=StandardScaler(), store=store).fit(x, y)
    expected = clf.predict_proba(x)
    blob = pickle.dumps(clf)
    clf.close()
    assert sorted(p.name for p in store.iterdir()) == ["shard-000", "shard-001"]
    copy = pickle.loads(blob)  # the scalers live in the stores' recipes, not only in this object
    assert np.array_equal(copy.predict_proba(x), expected)
    assert copy.delete([7])["deleted"] == 1 and copy.verify()["ok"]
    copy.close()
    with pytest.raises(StoreError, match="already holds"):
        quick(preprocessor=StandardScaler(), store=store).fit(x, y)

    temporary = quick(preprocessor=StandardScaler()).fit(x, y)
    restored = pickle.loads(pickle.dumps(temporary))
    assert np.array_equal(restored.predict_proba(x), expected)
    for est in (temporary, restored):
        est.close()


def test_integer_inputs_predict_as_their_float_values() -> None:
    # Issue 23 item 1, the estimator's part: rows are float32 before they reach a store or a model,
    # so uint8 rows never take the store's raw+scale path and predict the same as their float values.
    x, y = blobs(n=100, d=4, classes=2, seed=15)
    xu = (np.abs(x) * 20).astype(np.uint8)
    clf = quick().fit(xu, y)
    assert np.array_equal(clf.predict_proba(xu), clf.predict_proba(xu.astype(np.float32)))
    assert clf._handle.ens[0].store.meta().get("feature_scale") is None
    clf.close()


# ------------------------------------- a stored preprocessor is state, never code (no pickle in a store)
class _RunsShell:
    """Unpickling this runs ``touch <marker>``: the classic malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def _bad_state(name: str, marker: Path) -> str:
    """A stored preprocessor state that a writer of the store could plant."""
    import base64
    import json

    if name == "pickle":  # the format before: base64 of a pickle
        return base64.b64encode(pickle.dumps(_RunsShell(marker))).decode("ascii")
    if name == "raw-pickle":
        return pickle.dumps(_RunsShell(marker), protocol=0).decode("latin-1")
    from sisa.sklearn_state import dump_state

    if name == "pipeline-with-a-cache":  # a joblib cache is read back as pickles on a refit
        tree = json.loads(dump_state(make_pipeline(StandardScaler())))
        tree["state"]["attrs"]["memory"] = str(marker.parent / "joblib-cache")
        return json.dumps(tree)
    renamed = {"untrusted-class": "posix.system", "function-transformer": "sklearn.preprocessing.FunctionTransformer"}
    tree = json.loads(dump_state(StandardScaler()))
    tree["state"]["class"] = renamed[name]
    return json.dumps(tree)


@pytest.mark.parametrize("option", ["preprocessor", "template"])
@pytest.mark.parametrize(
    "bad", ["pickle", "raw-pickle", "untrusted-class", "function-transformer", "pipeline-with-a-cache"]
)
def test_a_planted_preprocessor_state_is_refused_and_never_run(tmp_path: Path, bad: str, option: str) -> None:
    from sisa.config.fields import config_to_dict
    from sisa.ensemble import Ensemble
    from sisa.errors import ConfigError, IntegrityError, ModelError

    marker = tmp_path / "pwned"
    x, y = scaled_blobs(80, seed=16)
    store = tmp_path / "kept"
    clf = quick(preprocessor=StandardScaler(), store=store).fit(x, y)
    blob = pickle.dumps(clf)
    clf.close()
    # Someone who can write the store replaces shard 0's stored transformer (or its refit template).
    with Ensemble.open(store / "shard-000") as ens:
        tree = config_to_dict(ens.config)
        tree["model"]["options"][option] = _bad_state(bad, marker)
        ens.store.write(lambda txn: ens.store.put_meta(txn, config=tree))

    copy = pickle.loads(blob)
    for use in (copy.predict_proba, lambda _: copy.verify(), lambda _: copy.delete([1, 2])):
        with pytest.raises((IntegrityError, ConfigError), match="preprocessor"):
            use(x)
        assert not copy._handle.ens  # refused at open: no store (nor its writer lock) stays open
        assert not marker.exists()
    from sisa.sklearn_preprocess import check_store

    with Ensemble.open(store / "shard-000", readonly=True) as ens:  # sisa's own API, without the estimator
        with pytest.raises((IntegrityError, ConfigError)):
            check_store(ens.config)
        if option == "preprocessor":  # a network is built from it (the template only serves a refit)
            with pytest.raises(ModelError, match="preprocessor") as refused:
                ens.predict_proba(x)
            assert isinstance(refused.value.__cause__, (IntegrityError, ConfigError))
    assert not marker.exists()
    assert not (tmp_path / "joblib-cache").exists()


def test_an_unsupported_preprocessor_is_refused_at_fit_naming_the_supported_ones(tmp_path: Path) -> None:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import FunctionTransformer

    from sisa.errors import ConfigError

    class MyScaler(StandardScaler):
        """A subclass may change transform: it is code, not state."""

    x, y = scaled_blobs(60, seed=17)
    refused = [
        FunctionTransformer(np.log1p),
        MyScaler(),
        make_pipeline(StandardScaler(), memory=str(tmp_path / "cache")),
        PCA(2, svd_solver="randomized", random_state=np.random.RandomState(0)),
    ]
    for i, template in enumerate(refused):
        for mode in ("shard", "core"):
            store = tmp_path / f"s{i}{mode}"
            clf = quick(preprocessor=template, preprocess=mode, store=store)
            with pytest.raises(ConfigError, match=r"StandardScaler, MinMaxScaler.*PCA.*Pipeline or FeatureUnion"):
                clf.fit(x, y, core_ids=[0, 1, 2] if mode == "core" else None)
            assert not store.exists()
    assert not (tmp_path / "cache").exists()


def _templates() -> list[object]:
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.pipeline import FeatureUnion
    from sklearn.preprocessing import (
        Binarizer,
        MaxAbsScaler,
        MinMaxScaler,
        Normalizer,
        PolynomialFeatures,
        PowerTransformer,
        QuantileTransformer,
        RobustScaler,
    )

    return [
        StandardScaler(),
        MinMaxScaler(feature_range=(-1, 1)),
        MaxAbsScaler(),
        RobustScaler(quantile_range=(10.0, 90.0)),
        Normalizer(norm="l1"),
        Binarizer(threshold=7.5),
        PolynomialFeatures(2),
        QuantileTransformer(n_quantiles=20),
        PowerTransformer(),
        PCA(3),  # components_ is Fortran-ordered: the layout is state too
        # components_ is a strided view here: stored compact (as its C-order copy), so the last bits of
        # transform may differ from the in-memory object's; sisa only ever uses the stored state.
        PCA(3, whiten=True, svd_solver="randomized", random_state=0),
        TruncatedSVD(2, random_state=0),
        VarianceThreshold(0.01),
        make_pipeline(StandardScaler(), PCA(3)),
        FeatureUnion([("scaled", StandardScaler()), ("pca", PCA(2))]),
    ]


def test_every_supported_preprocessor_state_round_trips_exactly_as_canonical_json() -> None:
    import json

    from sklearn.base import clone

    from sisa.sklearn_state import SUPPORTED, dump_state, load_state, same_state

    x, _ = scaled_blobs(90, seed=18)
    x = x.astype(np.float32)
    seen: set[str] = set()
    for template in _templates():
        fitted = clone(template).fit(x)
        text = dump_state(fitted)
        tree = json.loads(text)  # plain JSON: no pickle anywhere in it
        seen.update(n for n in SUPPORTED if f'"{n}"' in text)
        assert tree["format"] == "sisa.sklearn-state/1"
        assert dump_state(clone(template).fit(x)) == text  # the same fitted state, the same bytes (and keys)
        loaded = load_state(text)
        assert type(loaded) is type(fitted) and same_state(loaded, fitted)
        out = loaded.transform(x)
        assert np.array_equal(out, load_state(text).transform(x))  # what a store's networks compute, every time
        strided = getattr(template, "svd_solver", None) == "randomized"
        assert np.array_equal(out, fitted.transform(x)) or strided and np.allclose(out, fitted.transform(x))
        assert dump_state(loaded) == text
        assert same_state(load_state(dump_state(clone(template))), clone(template))  # the unfitted template
    assert seen == set(SUPPORTED)  # every supported class is exercised here


def test_a_pipeline_preprocessor_store_is_exact_and_its_recipe_deterministic(tmp_path: Path) -> None:
    import json

    from sklearn.decomposition import PCA

    x, y = scaled_blobs(150, seed=19)
    params = {"shards": 2, "slices": 2, "preprocessor": make_pipeline(StandardScaler(), PCA(3))}
    first = quick(**params, store=tmp_path / "a").fit(x, y)
    second = quick(**params, store=tmp_path / "b").fit(x, y)
    for one, two in zip(first._handle.ens, second._handle.ens, strict=True):
        text = one.config.model.options["preprocessor"]
        json.loads(text)
        assert text == two.config.model.options["preprocessor"]  # same rows, same recipe and checkpoint keys
    assert np.array_equal(first.predict_proba(x), second.predict_proba(x))
    first.delete([3, 77])
    result = first.verify()
    assert result["ok"] and all(result["preprocessors"].values())
    keep = np.setdiff1d(np.arange(150), [3, 77])
    reference = quick(**params).fit(x[keep], y[keep], sample_ids=keep)
    assert np.array_equal(first.predict_proba(x), reference.predict_proba(x))
    for est in (first, second, reference):
        est.close()
