"""Group metrics and between-group difference / ratio equal fairlearn's MetricFrame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fairlearn.metrics import MetricFrame
from sklearn import metrics as skm

from core import cohorts as C
from core.errors import EvalError
from core.fairness import MISSING, cohort_group_metrics, group_labels, group_metrics
from core.store import Store, build_base

SK = {
    "accuracy": skm.accuracy_score,
    "error_rate": lambda t, p: 1 - skm.accuracy_score(t, p),
    "precision_macro": lambda t, p: skm.precision_score(t, p, average="macro", zero_division=0),
    "recall_macro": lambda t, p: skm.recall_score(t, p, average="macro", zero_division=0),
    "f1_macro": lambda t, p: skm.f1_score(t, p, average="macro", zero_division=0),
    "f1_weighted": lambda t, p: skm.f1_score(t, p, average="weighted", zero_division=0),
}


def frame(seed: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 4, n)
    brightness = rng.random(n)
    # The model does worse on dark images: the groups differ.
    pred = np.where(rng.random(n) < 0.4 + 0.5 * brightness, true, rng.integers(0, 4, n))
    camera = rng.choice(np.array(["canon", "nikon", "sony"], dtype=object), n)
    camera[rng.random(n) < 0.05] = None
    sharpness = rng.gamma(2.0, 30.0, n)
    sharpness[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({"true_label": true, "pred_label": pred, "brightness": brightness, "camera": camera,
                         "sharpness": sharpness, "flag": rng.random(n) < 0.3})


@pytest.mark.parametrize("seed, features, binning", [
    (0, ["brightness"], "equal"),
    (1, ["brightness"], "quantile"),
    (2, ["camera"], "equal"),
    (3, ["sharpness", "camera"], "quantile"),
    (4, ["flag", "brightness"], "equal"),
])
def test_group_metrics_equal_fairlearn(seed, features, binning):
    data = frame(seed)
    ours = group_metrics(data, features, list(SK), bins=4, binning=binning)
    sensitive = pd.DataFrame({f: group_labels(data[f], 4, binning).astype(str) for f in features})
    reference = MetricFrame(metrics=SK, y_true=data["true_label"], y_pred=data["pred_label"],
                            sensitive_features=sensitive)
    expected = reference.by_group.dropna(how="all")
    got = ours.by_group[list(SK)]
    got.index = got.index.set_levels([lvl.astype(str) for lvl in got.index.levels]) \
        if isinstance(got.index, pd.MultiIndex) else got.index.astype(str)
    expected = expected.sort_index()
    pd.testing.assert_frame_equal(got.sort_index().astype(float), expected.astype(float), check_names=False,
                                  check_index_type=False, check_column_type=False, atol=1e-12)
    pd.testing.assert_series_equal(ours.difference, reference.difference().astype(float), check_names=False,
                                   atol=1e-12)
    pd.testing.assert_series_equal(ours.ratio, reference.ratio().astype(float), check_names=False, atol=1e-12)
    pd.testing.assert_series_equal(ours.overall, reference.overall.astype(float), check_names=False, atol=1e-12)
    assert ours.by_group["count"].sum() == len(data)


@pytest.mark.parametrize("binning", ["equal", "quantile"])
def test_feature_groups_are_the_heat_maps_columns(binning):
    from core.error_analysis import Feature, bin_numeric

    values = np.random.default_rng(3).integers(14, 43, 500).astype(float)  # many values on the edges
    groups = group_labels(pd.Series(values), bins=4, binning=binning)
    columns = bin_numeric(Feature("size", "Size", "numeric", "number"), values, 4, binning)
    assert len(groups.cat.categories) == len(columns.labels)
    np.testing.assert_array_equal(groups.cat.codes.to_numpy(), columns.codes)


def test_bins_and_missing_values():
    values = pd.Series([0.0, 0.1, 0.5, 0.9, 1.0, None])
    equal = group_labels(values, bins=2)
    # Left-closed, the last bin holding the maximum: as the heat map bins and its cells' cohorts filter.
    assert list(equal.cat.categories) == ["[0, 0.5)", "[0.5, 1]", MISSING]
    assert equal.tolist() == ["[0, 0.5)"] * 2 + ["[0.5, 1]"] * 3 + [MISSING]
    quantile = group_labels(values, bins=5, binning="quantile")
    assert quantile.value_counts().drop(MISSING).tolist() == [1] * 5
    few = group_labels(pd.Series([3, 1, 3, None]), bins=4)  # few distinct numbers stay as they are
    assert list(few.cat.categories) == ["1", "3", MISSING]
    with pytest.raises(EvalError, match="binning"):
        group_labels(values, binning="log")


def test_errors_name_the_problem():
    data = frame(0, 20)
    with pytest.raises(EvalError, match="no column 'age'"):
        group_metrics(data, ["age"])
    with pytest.raises(EvalError, match="unknown metric"):
        group_metrics(data, ["camera"], ["auc"])


def test_cohort_group_metrics_from_a_store(tmp_path):
    data = frame(3, 120)
    images = pa.table({"image_id": pa.array(range(len(data)), pa.int32()),
                       "uri": [f"/f/{i}" for i in range(len(data))],
                       "width": pa.array([4] * len(data), pa.int32()), "height": pa.array([4] * len(data), pa.int32()),
                       "true_label": pa.array(data["true_label"], pa.int32()),
                       "brightness": pa.array(data["brightness"]), "camera": pa.array(data["camera"], pa.string())})
    predictions = pd.DataFrame({"model_id": "m", "image_id": np.arange(len(data), dtype=np.int32),
                                "pred_label": data["pred_label"].astype(np.int32), "score": np.float32(0.5)})
    columns = pd.DataFrame({"name": ["image_id", "true_label", "brightness", "camera"],
                            "kind": ["numeric", "categorical", "numeric", "categorical"], "source": "auto",
                            "label": ["Image id", "True label", "Brightness", "Camera"]})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multiclass"], "params": ["{}"]})
    build_base(tmp_path / "f.duckdb", {"images": images, "predictions": predictions, "columns": columns,
                                       "models": models}, {"task": "multiclass", "classes": list("wxyz")})
    store = Store(tmp_path / "f.duckdb")
    cohort = C.parse_query("brightness__gte=0.2", C.catalog_of(store)).cohort
    result = cohort_group_metrics(store, cohort, "m", "camera", ["accuracy"])
    chosen = data[data["brightness"] >= 0.2]
    expected = MetricFrame(metrics={"accuracy": skm.accuracy_score}, y_true=chosen["true_label"],
                           y_pred=chosen["pred_label"],
                           sensitive_features=group_labels(chosen["camera"]).astype(str).to_numpy())
    got = pd.Series(result.by_group["accuracy"].to_numpy(), index=result.by_group.index.astype(str)).sort_index()
    assert got.index.tolist() == ["(missing)", "canon", "nikon", "sony"]
    assert got.to_numpy() == pytest.approx(expected.by_group["accuracy"].sort_index().to_numpy(), abs=1e-12)
    assert result.difference["accuracy"] == pytest.approx(expected.difference()["accuracy"])
    store.close()


def test_multilabel_groups_compare_outcomes(tmp_path):
    truth = [[0], [0, 1], [], [1], [0], [1]]
    probs = [[0.9, 0.1], [0.8, 0.7], [0.1, 0.6], [0.2, 0.9], [0.3, 0.2], [0.6, 0.8]]
    n = len(truth)
    images = pa.table({"image_id": pa.array(range(n), pa.int32()), "uri": [f"/m/{i}" for i in range(n)],
                       "width": pa.array([4] * n, pa.int32()), "height": pa.array([4] * n, pa.int32()),
                       "true_label": pa.array(truth, pa.list_(pa.int32())),
                       "camera": ["a", "a", "a", "b", "b", "b"]})
    predictions = pa.table({"model_id": ["m"] * n, "image_id": pa.array(range(n), pa.int32()),
                            "probs": pa.array(probs, pa.list_(pa.float32())),
                            "pred_labels": pa.array([[k for k, p in enumerate(r) if p >= 0.5] for r in probs],
                                                    pa.list_(pa.int32()))})
    columns = pd.DataFrame({"name": ["image_id", "true_label", "camera"], "kind": ["numeric", "list", "categorical"],
                            "source": "auto", "label": ["Image id", "True labels", "Camera"]})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multilabel"], "params": ["{}"]})
    build_base(tmp_path / "ml.duckdb", {"images": images, "predictions": predictions, "columns": columns,
                                        "models": models}, {"task": "multilabel", "classes": ["p", "q"]})
    store = Store(tmp_path / "ml.duckdb")
    result = cohort_group_metrics(store, C.Cohort(), "m", "camera", label_threshold=0.5)
    # camera a: images 0, 1 exact, 2 predicts q for none; camera b: 3 exact, 4 misses p, 5 adds p
    assert result.by_group["accuracy"].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert result.difference["accuracy"] == pytest.approx(1 / 3)
    assert result.ratio["accuracy"] == pytest.approx(0.5)
    with pytest.raises(EvalError, match="choose accuracy or error_rate"):
        cohort_group_metrics(store, C.Cohort(), "m", "camera", ["f1_macro"])
    store.close()
