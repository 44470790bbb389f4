"""Multiclass and multilabel metrics equal scikit-learn: the numpy cores on random arrays, the
store functions on cohorts of a real store (through the compiler's fast path and the plain one)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn import metrics as skm

from core import cohorts as C
from core.errors import EvalError
from core.metrics import classification as M
from core.store import Store, build_base

AVERAGES = ("macro", "micro", "weighted")


def sk_multiclass(y_true, y_pred, labels=None) -> dict:
    out = {"accuracy": skm.accuracy_score(y_true, y_pred)}
    for average in AVERAGES:
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average,
                                                         zero_division=0)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    return out


@pytest.mark.parametrize("seed", range(12))
def test_multiclass_core_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 8))
    n = int(rng.integers(1, 60))
    y_true = rng.integers(0, n_classes, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, n_classes, n))
    if seed % 3 == 0:
        y_pred[y_pred == n_classes - 1] = 0  # a class that is never predicted
    ours = M.multiclass_scores(y_true, y_pred, n_classes)
    for key, value in sk_multiclass(y_true, y_pred).items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(n_classes), zero_division=0)
    np.testing.assert_allclose(ours["precision"], p, atol=1e-12)
    np.testing.assert_allclose(ours["recall"], r, atol=1e-12)
    np.testing.assert_allclose(ours["f1"], f, atol=1e-12)
    np.testing.assert_array_equal(ours["support"], s)
    labels = list(range(n_classes))  # averages over every class, absent ones scoring 0
    forced = M.multiclass_scores(y_true, y_pred, n_classes, labels=labels)
    for key, value in sk_multiclass(y_true, y_pred, labels=labels).items():
        assert forced[key] == pytest.approx(value, abs=1e-12), key
    cm = M.confusion_counts(y_true, y_pred, n_classes)
    for normalize in M.NORMALIZATIONS:
        np.testing.assert_allclose(M.normalize_confusion(cm, normalize),
                                   skm.confusion_matrix(y_true, y_pred, labels=labels, normalize=normalize),
                                   atol=1e-12)


def test_multiclass_core_rejects_bad_labels():
    with pytest.raises(EvalError):
        M.confusion_counts([0, 5], [0, 1], 3)
    with pytest.raises(EvalError):
        M.confusion_counts([0, 1], [0], 3)
    assert np.isnan(M.multiclass_scores(np.array([], int), np.array([], int), 3)["accuracy"])


@pytest.mark.parametrize("seed", range(10))
def test_multilabel_core_equals_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n, n_labels = int(rng.integers(1, 50)), int(rng.integers(2, 7))  # one column reads as binary to sklearn
    y_true = rng.random((n, n_labels)) < 0.3
    y_pred = np.where(rng.random((n, n_labels)) < 0.7, y_true, rng.random((n, n_labels)) < 0.3)
    y_true[:, 0] = False  # a label nobody has
    ours = M.multilabel_scores(y_true, y_pred)
    assert ours["exact_match"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert ours["hamming_loss"] == pytest.approx(skm.hamming_loss(y_true, y_pred), abs=1e-12)
    for average in AVERAGES:
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert (ours[f"precision_{average}"], ours[f"recall_{average}"], ours[f"f1_{average}"]) == \
            pytest.approx((p, r, f), abs=1e-12), average
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    np.testing.assert_allclose(np.stack([ours["precision"], ours["recall"], ours["f1"]]), np.stack([p, r, f]),
                               atol=1e-12)
    np.testing.assert_array_equal(ours["support"], s)


def test_indicator_from_arrow_lists():
    lists = pa.chunked_array([pa.array([[0, 2], None], pa.list_(pa.int32())), pa.array([[], [1, 1]],
                                                                                       pa.list_(pa.int32()))])
    np.testing.assert_array_equal(M.indicator(lists, 3), [[1, 0, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0]])
    with pytest.raises(EvalError):
        M.indicator(pa.array([[3]], pa.list_(pa.int32())), 3)


# --------------------------------------------------------------------------- store functions

CLASSES = ["a", "b", "c", "d", "e"]
N = 300


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    rng = np.random.default_rng(7)
    true = rng.integers(0, 5, N).astype(np.int32)
    pred = np.where(rng.random(N) < 0.7, true, rng.integers(0, 4, N)).astype(np.int32)  # "e" never predicted
    has = rng.random(N) < 0.95
    images = pd.DataFrame({"image_id": np.arange(N, dtype=np.int32), "uri": [f"/x/{i}" for i in range(N)],
                           "width": np.full(N, 4, np.int32), "height": np.full(N, 4, np.int32),
                           "true_label": true, "brightness": rng.random(N)})
    predictions = pd.DataFrame({"model_id": "m", "image_id": images["image_id"][has], "pred_label": pred[has],
                                "score": rng.random(int(has.sum())).astype(np.float32)})
    columns = pd.DataFrame({"name": ["image_id", "true_label", "brightness"], "kind": ["numeric", "categorical",
                            "numeric"], "source": "auto", "label": ["Image id", "True label", "Brightness"]})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multiclass"], "params": ["{}"]})
    path = tmp_path_factory.mktemp("mcm") / "mc.duckdb"
    build_base(path, {"images": images, "predictions": predictions, "columns": columns, "models": models},
               {"task": "multiclass", "classes": CLASSES})
    store = Store(path)
    frame = images.assign(pred=pd.Series(pred, dtype="Int64").where(has))
    yield store, frame
    store.close()


@pytest.mark.parametrize("query, keep", [
    ("", lambda f: np.ones(len(f), bool)),
    ("brightness__lt=0.4", lambda f: f["brightness"] < 0.4),
    ("true_label__in=a,e&brightness__gte=0.2", lambda f: f["true_label"].isin([0, 4]) & (f["brightness"] >= 0.2)),
    ("outcome__eq=incorrect", lambda f: f["pred"].notna() & (f["pred"] != f["true_label"])),
])
def test_classification_metrics_equal_sklearn_on_a_cohort(mc, query, keep):
    store, frame = mc
    chosen = frame[np.asarray(keep(frame), dtype=bool)]
    scored = chosen[chosen["pred"].notna()]
    y_true, y_pred = scored["true_label"].to_numpy(), scored["pred"].to_numpy(int)
    expected = sk_multiclass(y_true, y_pred)
    parsed = C.parse_query(query, C.catalog_of(store))
    selection = C.compile_cohort(parsed, store, model_id="m")
    for given in (selection, tuple(selection), None if not query else selection):
        result = M.classification_metrics(store, "m", given)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-12), key
        assert result["n_evaluated"] == len(scored) and result["n_missing"] == len(chosen) - len(scored)
        assert result["per_class"]["class"].tolist() == CLASSES
        np.testing.assert_array_equal(result["confusion"], skm.confusion_matrix(y_true, y_pred, labels=range(5)))
        for normalize in M.NORMALIZATIONS:
            table = M.confusion_matrix(store, "m", given, normalize=normalize, classes=["e", 1, "a"])
            assert table.index.tolist() == ["e", "b", "a"] and table.columns.tolist() == ["e", "b", "a"]
            np.testing.assert_allclose(table.to_numpy(), skm.confusion_matrix(y_true, y_pred, labels=[4, 1, 0],
                                                                               normalize=normalize), atol=1e-12)


def test_store_metric_errors(mc):
    store, _ = mc
    with pytest.raises(EvalError, match="unknown model"):
        M.classification_metrics(store, "nope")
    with pytest.raises(EvalError, match="normalisation"):
        M.confusion_matrix(store, "m", normalize="rows")
    with pytest.raises(EvalError, match="not a class"):
        M.confusion_matrix(store, "m", classes=["zebra"])


LABELS = ["p", "q", "r", "s"]


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    rng = np.random.default_rng(11)
    n = 200
    truth = rng.random((n, 4)) < 0.35
    probs = np.clip(truth * 0.5 + rng.random((n, 4)) * 0.6, 0, 1).astype(np.float32)
    probs[0, 1] = np.float32(0.7)  # exactly at a threshold that float32 cannot hold: 0.7f < 0.7
    lists = [np.flatnonzero(row).astype(np.int32) for row in truth]
    images = pa.table({"image_id": pa.array(range(n), pa.int32()), "uri": [f"/m/{i}" for i in range(n)],
                       "width": pa.array([4] * n, pa.int32()), "height": pa.array([4] * n, pa.int32()),
                       "true_label": pa.array([list(x) for x in lists], pa.list_(pa.int32())),
                       "brightness": pa.array(rng.random(n))})
    has = np.arange(n) % 17 != 5
    predictions = pa.table({"model_id": ["m"] * int(has.sum()),
                            "image_id": pa.array(np.flatnonzero(has), pa.int32()),
                            "probs": pa.array([list(p) for p in probs[has]], pa.list_(pa.float32())),
                            "pred_labels": pa.array([list(np.flatnonzero(p >= 0.5)) for p in probs[has]],
                                                    pa.list_(pa.int32()))})
    columns = pd.DataFrame({"name": ["image_id", "true_label", "brightness"], "kind": ["numeric", "list", "numeric"],
                            "source": "auto", "label": ["Image id", "True labels", "Brightness"]})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multilabel"], "params": ["{}"]})
    path = tmp_path_factory.mktemp("mlm") / "ml.duckdb"
    build_base(path, {"images": images, "predictions": predictions, "columns": columns, "models": models},
               {"task": "multilabel", "classes": LABELS})
    store = Store(path)
    yield store, truth, probs, has, images.column("brightness").to_numpy()
    store.close()


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("query", ["", "brightness__lt=0.5", "true_label__contains=q"])
def test_multilabel_metrics_equal_sklearn_and_the_cohort_frame(ml, threshold, query):
    store, truth, probs, has, brightness = ml
    keep = np.ones(len(truth), bool)
    if query == "brightness__lt=0.5":
        keep = brightness < 0.5
    elif query:
        keep = truth[:, 1]
    rows = keep & has
    y_true, y_pred = truth[rows], probs[rows] >= threshold  # numpy compares float32 with a float in float32
    catalog = C.catalog_of(store)
    selection = C.compile_cohort(C.parse_query(query, catalog), store, model_id="m", label_threshold=threshold)
    result = M.multilabel_metrics(store, "m", selection, label_threshold=threshold)
    assert result["exact_match"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert result["hamming_loss"] == pytest.approx(skm.hamming_loss(y_true, y_pred), abs=1e-12)
    for average in AVERAGES:
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert (result[f"precision_{average}"], result[f"recall_{average}"], result[f"f1_{average}"]) == \
            pytest.approx((p, r, f), abs=1e-12)
    assert result["n_evaluated"] == rows.sum() and result["n_missing"] == (keep & ~has).sum()
    # The compiler's live outcome agrees with the metrics image by image.
    frame = C.cohort_rows(store, C.Cohort(), "m", label_threshold=threshold, columns=["image_id", "outcome"])
    exact = np.full(len(truth), "no prediction", object)
    exact[has] = np.where((truth[has] == (probs[has] >= threshold)).all(axis=1), "correct", "incorrect")
    assert frame["outcome"].fillna("no prediction").tolist() == exact.tolist()


def test_probability_at_the_threshold_counts_as_predicted(ml):
    store, truth, probs, has, _ = ml
    _, _, y_pred, _ = M.multilabel_arrays(store, "m", None, label_threshold=0.7)
    assert y_pred[0, 1]  # 0.7f is not below the threshold 0.7 once both are float32
    frame = C.cohort_rows(store, C.Cohort(), "m", label_threshold=0.7, columns=["pred_label"], limit=1)
    assert 1 in list(frame["pred_label"].iloc[0])


def test_metrics_of_many_cohorts_equal_each_cohorts_own(mc):
    """The overview's table counts its cohorts in one scan, a FILTER each, in order."""
    store, _ = mc
    catalog = C.catalog_of(store)
    queries = ["brightness__lt=0.4", "true_label__in=a,e&brightness__gte=0.2", "outcome__eq=incorrect",
               "brightness__lt=-1", ""]
    selections = [None, *(C.compile_cohort(C.parse_query(q, catalog), store, model_id="m") for q in queries)]
    assert C.shared_frame(store, "m", selections, ["true_label"]) is not None
    other_threshold = C.compile_cohort(C.parse_query(queries[2], catalog), store, model_id="m", iou=0.3)
    assert C.shared_frame(store, "m", [selections[1], other_threshold], ["true_label"]) is None
    for chosen in (selections, [*selections[:3], other_threshold]):
        together = M.classification_metrics_of_cohorts(store, "m", chosen)
        assert len(together) == len(chosen)
        for result, selection in zip(together, chosen):
            alone = M.classification_metrics(store, "m", selection)
            assert result.keys() == alone.keys()
            for key, value in alone.items():
                if key == "per_class":
                    pd.testing.assert_frame_equal(result[key], value)
                elif key in ("confusion", "labels"):
                    np.testing.assert_array_equal(result[key], value)
                else:
                    assert result[key] == pytest.approx(value, nan_ok=True), key
    assert [r["n_evaluated"] + r["n_missing"] for r in M.classification_metrics_of_cohorts(store, "m", selections)] \
        == [N, *(C.cohort_count(store, C.parse_query(q, catalog).cohort, "m") for q in queries)]
