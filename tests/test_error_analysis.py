"""Error analysis engine: the tree finds planted slices, nodes and heatmap cells are exact cohorts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from core.cohorts import Cohort, Filter, catalog_of, cohort_count, parse_query, to_query
from core.error_analysis import (ErrorTarget, TreeSettings, available_features, combine, error_heatmap,
                                 error_targets, fit_error_tree, load_error_frame, numeric_edges,
                                 readable_threshold)
from core.errors import CohortError
from core.ingest.build import column_catalog
from core.store import Store, build_base

CAMERAS = ["dslr", "phone", "webcam"]
CLASSES = ["cat", "dog", "bird"]


def _planted(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Images whose errors concentrate where brightness < 0.3 and camera is phone."""
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0, 1, n)
    camera = np.array(CAMERAS, dtype=object)[rng.integers(0, 3, n)]
    altitude = np.round(rng.uniform(0, 100, n), 1)
    altitude[rng.random(n) < 0.1] = np.nan
    site = np.array(["north", "south", None], dtype=object)[rng.integers(0, 3, n)]
    indoor = rng.random(n) < 0.5
    images = pd.DataFrame({
        "image_id": np.arange(n, dtype=np.int32), "uri": [f"/img/{i}.png" for i in range(n)],
        "width": np.full(n, 64, np.int32), "height": np.full(n, 48, np.int32),
        "true_label": rng.integers(0, 3, n).astype(np.int32),
        "brightness": brightness, "camera": pd.Series(camera, dtype=object), "altitude": altitude,
        "site": pd.Series(site, dtype=object), "indoor": indoor,
    })
    planted = (brightness < 0.3) & (camera == "phone")
    wrong = rng.random(n) < np.where(planted, 0.9, 0.05)
    return images, wrong


def _build(path, images: pd.DataFrame, predictions: pd.DataFrame, task: str, classes: list[str]) -> Store:
    user = set(images.columns) - {"image_id", "uri", "true_label", "width", "height"}
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": [task], "params": ["{}"]})
    build_base(path, {"images": images, "columns": column_catalog(images, user, task), "models": models,
                      "predictions": predictions}, {"task": task, "classes": classes, "name": path.stem})
    return Store(path)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    images, wrong = _planted(3000, seed=3)
    truth = images["true_label"].to_numpy()
    pred = np.where(wrong, (truth + 1) % 3, truth).astype(np.int32)
    predictions = pd.DataFrame({"model_id": "m", "image_id": images["image_id"], "pred_label": pred,
                                "score": np.full(len(pred), 0.9, np.float32)})
    store = _build(tmp_path_factory.mktemp("ea") / "mc.duckdb", images, predictions, "multiclass", CLASSES)
    return store, images, wrong


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    rng = np.random.default_rng(5)
    images, _ = _planted(600, seed=5)
    present = rng.random((len(images), 3)) < 0.4
    images["true_label"] = [np.flatnonzero(r).astype(np.int32) for r in present]
    probs = np.clip(present * 0.7 + rng.normal(0.15, 0.2, present.shape), 0, 1).astype(np.float32)
    predictions = pd.DataFrame({"model_id": "m", "image_id": images["image_id"], "probs": list(probs)})
    store = _build(tmp_path_factory.mktemp("ea") / "ml.duckdb", images, predictions, "multilabel", CLASSES)
    return store, present, probs


def _count(store: Store, cohort: Cohort) -> int:
    catalog = catalog_of(store)
    return cohort_count(store, parse_query(to_query(cohort), catalog).cohort, "m")


def test_tree_finds_planted_slice(multiclass):
    store, images, wrong = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["brightness", "camera", "altitude", "site"])
    np.testing.assert_array_equal(frame.target, wrong.astype(float))
    tree = fit_error_tree(frame, TreeSettings(max_depth=2, min_samples_leaf=30), catalog=catalog_of(store))
    worst = max(tree.leaves(), key=lambda n: n.error_rate)
    planted = (images["brightness"] < 0.3) & (images["camera"] == "phone")
    assert worst.error_rate > 0.8
    assert {f.column for f in worst.cohort.filters} == {"brightness", "camera"}
    ids = set(parse_and_select(store, worst.cohort))
    planted_ids = set(np.flatnonzero(planted.to_numpy()))
    overlap = len(ids & planted_ids)
    assert overlap / len(ids) > 0.95 and overlap / len(planted_ids) > 0.95
    assert tree.importances["brightness"] > 0 and tree.importances["camera"] > 0


def parse_and_select(store: Store, cohort: Cohort) -> list[int]:
    from core.cohorts import cohort_rows

    parsed = parse_query(to_query(cohort), catalog_of(store)).cohort
    return cohort_rows(store, parsed, "m", columns=["image_id"])["image_id"].tolist()


@pytest.mark.parametrize("encoding", ["onehot", "ordinal"])
@pytest.mark.parametrize("max_fit_rows", [None, 500])
def test_every_node_round_trips_to_its_count(multiclass, encoding, max_fit_rows):
    store, _, _ = multiclass
    base = Cohort((Filter("indoor", "eq", True),))
    frame = load_error_frame(store, base, "m", ["altitude", "site", "camera", "true_label", "indoor"])
    options = TreeSettings(max_depth=4, max_leaves=12, min_samples_leaf=10, categorical=encoding,
                           **({"max_fit_rows": max_fit_rows} if max_fit_rows else {}))
    tree = fit_error_tree(frame, options, catalog=catalog_of(store))
    assert tree.sampled == (max_fit_rows is not None)
    assert len(tree.nodes) > 5
    assert tree.root.size == len(frame) == _count(store, base)
    by_id = {n.node_id: n for n in tree.nodes}
    for node in tree.nodes:
        assert _count(store, combine(base, node.cohort)) == node.size, (node.split, to_query(node.cohort))
        if node.children:
            left, right = (by_id[c] for c in node.children)
            assert left.size + right.size == node.size
            assert left.errors + right.errors == node.errors
    # Missing altitudes and sites exercise "or missing" groups somewhere in the tree.
    assert sum(n.size for n in tree.leaves()) == len(frame)


def test_categorical_features_are_held_once_per_value(multiclass):
    store, _, _ = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["site", "camera", "brightness"])
    stored = store.query('SELECT site, camera FROM "images" ORDER BY image_id')
    for name in ("site", "camera"):
        assert isinstance(frame.features[name].dtype, pd.CategoricalDtype)  # codes, not a million strings
        pd.testing.assert_series_equal(frame.features[name].astype(object), stored[name].astype(object),
                                       check_names=False)


def test_frame_is_in_image_order_whatever_order_the_query_returns(multiclass, monkeypatch):
    store, images, wrong = multiclass
    features = ["site", "camera", "brightness", "altitude", "indoor"]
    ordered = load_error_frame(store, Cohort(), "m", features)
    read = store.arrow
    shuffle = np.random.default_rng(0).permutation(len(images))
    monkeypatch.setattr(store, "arrow", lambda sql, params=None: read(sql, params).take(shuffle))
    shuffled = load_error_frame(store, Cohort(), "m", features)
    assert ordered.image_ids.tolist() == shuffled.image_ids.tolist() == images["image_id"].tolist()
    pd.testing.assert_frame_equal(ordered.features, shuffled.features)
    np.testing.assert_array_equal(shuffled.target, wrong.astype(float))
    np.testing.assert_array_equal(shuffled.errors, wrong.astype(float))
    expected = images.set_index("image_id")
    np.testing.assert_array_equal(shuffled.features["altitude"].to_numpy(), expected["altitude"].to_numpy())
    assert shuffled.features["site"].astype(object).where(shuffled.features["site"].notna(), None).tolist() == \
        expected["site"].tolist()


def test_sampled_fit_counts_every_image(multiclass):
    store, _, wrong = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["brightness", "camera"])
    tree = fit_error_tree(frame, TreeSettings(max_fit_rows=400, min_samples_leaf=5), catalog=catalog_of(store))
    assert tree.n_fitted == 400 and tree.n_evaluated == 3000
    assert tree.root.errors == wrong.sum()


def test_node_conditions_are_readable(multiclass):
    store, _, _ = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["brightness", "camera"])
    tree = fit_error_tree(frame, TreeSettings(max_depth=2, min_samples_leaf=30), catalog=catalog_of(store))
    for node in tree.nodes[1:]:
        for f in node.cohort.filters:
            if f.column == "brightness":
                assert len(repr(f.value)) <= 6  # e.g. 0.3, 0.31, not 0.30012345
    assert all(n.conditions for n in tree.nodes[1:])
    assert tree.root.conditions == () and tree.root.split is None


def test_readable_threshold_examples():
    assert readable_threshold(0.2912, 0.3088) == 0.3
    assert readable_threshold(0.30012, 0.30877) == 0.304
    assert readable_threshold(7.0, 8.0) == 7.0
    assert readable_threshold(1234.5, 1290.0) == 1260.0


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6, allow_nan=False), st.floats(1e-9, 1e3, allow_nan=False))
def test_readable_threshold_stays_in_the_gap(low, gap):
    high = low + gap
    if not low < high:
        return
    value = readable_threshold(low, high)
    assert low <= value < high


def test_heatmap_counts_equal_pandas(multiclass):
    store, images, wrong = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["brightness", "camera", "altitude"])
    for binning in ("equal", "quantile"):
        heat = error_heatmap(frame, "altitude", "camera", bins=4, binning=binning)
        edges = list(heat.x.edges)
        values = images["altitude"].to_numpy()
        present = values[~np.isnan(values)]
        reference_edges = (np.linspace(present.min(), present.max(), 5)[1:-1] if binning == "equal"
                           else np.quantile(present, [0.25, 0.5, 0.75]))
        np.testing.assert_allclose(edges, reference_edges, atol=(present.max() - present.min()) / 40)
        ref = pd.DataFrame({"camera": images["camera"], "wrong": wrong.astype(float),
                            "bin": pd.cut(values, [-math.inf, *edges, math.inf], right=False, labels=False)})
        ref["bin"] = ref["bin"].fillna(len(edges) + 1).astype(int)  # missing: the last bin
        expected = ref.groupby(["bin", "camera"]).agg(size=("wrong", "size"), rate=("wrong", "mean"))
        got = heat.cells.assign(camera=[heat.y.labels[j] for j in heat.cells["y"]]).set_index(["x", "camera"])
        assert len(got) == len(expected)
        for (b, camera), row in expected.iterrows():
            assert got.loc[(b, camera), "size"] == row["size"]
            assert got.loc[(b, camera), "error_rate"] == pytest.approx(row["rate"], abs=1e-12)
        assert heat.x.labels[-1] == "missing"
        for cell in heat.cells.itertuples():
            assert _count(store, cell.cohort) == cell.size


def test_heatmap_one_categorical_feature(multiclass):
    store, images, wrong = multiclass
    frame = load_error_frame(store, Cohort(), "m", ["site"])
    heat = error_heatmap(frame, "site")
    assert heat.y is None
    assert list(heat.x.labels) == ["north", "south", "missing"]
    counts = images["site"].fillna("missing").value_counts()
    for cell in heat.cells.itertuples():
        assert cell.size == counts[cell.x_label]
        assert _count(store, cell.cohort) == cell.size


def test_numeric_edges_are_rounded_and_inside():
    values = np.array([0.0, 0.1234567, 0.45678, 0.7777, 1.0])
    edges = numeric_edges(values, 4, "equal")
    np.testing.assert_array_equal(edges, [0.25, 0.5, 0.75])


def test_multilabel_label_target_is_xor(multilabel):
    store, present, probs = multilabel
    for label in range(3):
        frame = load_error_frame(store, Cohort(), "m", ["brightness"], ErrorTarget("label", label),
                                 label_threshold=0.6)
        expected = present[:, label] != (probs[:, label].astype(np.float64) >= 0.6)
        np.testing.assert_array_equal(frame.target, expected.astype(float))
    frame = load_error_frame(store, Cohort(), "m", ["brightness"], label_threshold=0.6)
    np.testing.assert_array_equal(frame.target, (present != (probs.astype(np.float64) >= 0.6)).any(axis=1))


def test_targets_and_features_per_task(multiclass, multilabel):
    mc, ml = catalog_of(multiclass[0]), catalog_of(multilabel[0])
    assert error_targets(mc) == [ErrorTarget()]
    assert [t.label for t in error_targets(ml)] == [None, 0, 1, 2]
    names = [f.name for f in available_features(mc)]
    assert {"brightness", "camera", "true_label", "pred_label", "indoor"} <= set(names)
    assert "error" not in names and "uri" not in names and "image_id" not in names
    assert "true_label" not in [f.name for f in available_features(ml)]  # a list column


def test_bad_requests_are_clear(multiclass):
    store = multiclass[0]
    with pytest.raises(CohortError, match="multilabel"):
        load_error_frame(store, Cohort(), "m", ["brightness"], ErrorTarget("label", 0))
    with pytest.raises(CohortError, match="cannot be an error-analysis feature"):
        load_error_frame(store, Cohort(), "m", ["error"])
    with pytest.raises(CohortError):
        TreeSettings(max_depth=0)
    frame = load_error_frame(store, Cohort(), "m", ["brightness"])
    with pytest.raises(CohortError, match="bins"):
        error_heatmap(frame, "brightness", bins=1)


def test_combine_multiplies_groups():
    a = Cohort((Filter("x", "eq", 1),), ((Filter("y", "eq", 1),), (Filter("y", "eq", 2),)))
    b = Cohort((), ((Filter("z", "lt", 3),), (Filter("z", "isnull"),)))
    both = combine(a, b)
    assert both.filters == a.filters and len(both.groups) == 4
