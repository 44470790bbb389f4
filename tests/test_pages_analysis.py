"""Model overview, error analysis and data analysis pages under AppTest, on each task.

Numbers shown are checked against the engine (``core.metrics``, ``core.fairness``,
``core.error_analysis``), and a picked tree node or heat-map cell is checked to
become the URL's cohort with the node's image count.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app.state import is_page_param
from core.cohorts import Cohort, Filter, catalog_of, cohort_count, parse_query, to_query
from core.error_analysis import ErrorTarget, TreeSettings, fit_error_tree, load_error_frame
from core.fairness import cohort_group_metrics
from core.metrics.classification import classification_metrics, multilabel_metrics
from core.metrics.detection import detection_metrics
from core.state import StateDB
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_all

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
TASKS = ("multiclass", "multilabel", "detection")
OVERVIEW, ERRORS, DATA = "pages/model-overview.py", "pages/error-analysis.py", "pages/data-analysis.py"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("page-stores")
    build_all(folder)
    for task in TASKS:
        StateDB.for_store(folder / f"demo-{task}.duckdb").create_cohort(
            "North", Cohort((Filter("site", "eq", "north"),)))
    return folder


@pytest.fixture
def app(stores, monkeypatch):
    monkeypatch.setenv("VISIONLENS_DATA", str(stores))
    with served_navigation():
        yield open_app


SHOWN = 5e-5  # tables show four decimals


def number(text: str) -> float:
    return float(str(text).replace(",", ""))


def table_with(at: AppTest, column: str) -> pd.DataFrame:
    for frame in at.dataframe:
        if column in frame.value.columns:
            return frame.value
    raise AssertionError(f"no table with column {column!r}: {[list(f.value.columns) for f in at.dataframe]}")


def open_store(stores: Path, task: str) -> Store:
    return Store(stores / f"demo-{task}.duckdb")


# --------------------------------------------------------------------------- model overview


def test_multiclass_cohort_table_equals_the_metrics(app, stores):
    at = app("store=demo-multiclass", OVERVIEW)
    table = table_with(at, "Accuracy").set_index("Cohort")
    assert list(table.index) == ["All images", "North"]
    store = open_store(stores, "multiclass")
    north = parse_query("site__eq=north", catalog_of(store)).cohort
    from core.cohorts import compile_cohort

    for name, cohort in (("All images", Cohort()), ("North", north)):
        expected = classification_metrics(store, "baseline", compile_cohort(cohort, store, model_id="baseline"))
        assert number(table.loc[name, "Accuracy"]) == pytest.approx(expected["accuracy"], abs=SHOWN)
        assert number(table.loc[name, "F1 (macro)"]) == pytest.approx(expected["f1_macro"], abs=SHOWN)
        assert number(table.loc[name, "Images"]) == cohort_count(store, cohort, "baseline")


def test_per_class_table_is_drawn_when_opened_and_equals_the_metrics(app, stores):
    at = app("store=demo-multiclass", OVERVIEW)
    assert not any("Class" in f.value.columns for f in at.dataframe)  # closed: not drawn
    at.session_state["vl_overview_per_class_open"] = True
    at.run()
    table = table_with(at, "Class").set_index("Class")
    expected = classification_metrics(open_store(stores, "multiclass"), "baseline", None)["per_class"]
    shown = table["All images"].map(number)
    assert shown.tolist() == pytest.approx(expected.set_index("class").loc[shown.index, "f1"].tolist(), abs=SHOWN)


def test_metrics_table_is_drawn_once_unless_the_metrics_are_slow(app, monkeypatch):
    from app import overview

    drawn = []
    show = overview._show_table
    monkeypatch.setattr(overview, "_show_table", lambda target, frame, *a: (drawn.append(frame),
                                                                             show(target, frame, *a)))
    for task in ("multiclass", "multilabel"):
        app(f"store=demo-{task}", OVERVIEW)
        assert len(drawn) == 1 and drawn[0]["Images"].ne("N/A").all()
        drawn.clear()
    monkeypatch.setattr(overview, "PARTIAL_TABLE_AFTER_S", -1.0)  # every cohort counts as slow
    app("store=demo-multilabel", OVERVIEW)
    assert [frame["Images"].eq("N/A").sum() for frame in drawn] == [2, 1, 0]
    drawn.clear()
    app("store=demo-multiclass", OVERVIEW)  # every cohort in one scan: nothing to draw meanwhile
    assert len(drawn) == 1 and drawn[0]["Images"].ne("N/A").all()


def test_help_me_choose_restores_the_recommended_metrics(app):
    at = app("store=demo-multiclass", OVERVIEW)
    at.multiselect(key="vl_overview_metrics_multiclass").set_value(["precision_weighted"]).run()
    assert list(table_with(at, "Precision (weighted)").columns) == ["Cohort", "Images", "Precision (weighted)"]
    at.button(key="vl_overview_metrics_recommend").click().run()
    assert {"Accuracy", "F1 (macro)"} <= set(table_with(at, "Accuracy").columns)


def test_detection_map_follows_the_iou_in_the_url(app, stores):
    store = open_store(stores, "detection")
    shown = {}
    for iou in (0.5, 0.75):
        at = app(f"store=demo-detection&iou={iou}", OVERVIEW)
        shown[iou] = number(table_with(at, "mAP@IoU").set_index("Cohort").loc["All images", "mAP@IoU"])
        expected = detection_metrics(store, "baseline", None, iou=iou, score_threshold=0.5)["mAP"]
        assert shown[iou] == pytest.approx(expected, abs=SHOWN)
    assert shown[0.5] != shown[0.75]


def test_detection_thresholds_reuse_the_cohort_evaluation(app, stores, monkeypatch):
    """A new IoU or score threshold re-reads only the counts; the tabs not open compute nothing."""
    import streamlit as st

    from app import overview

    calls = {"evaluate": 0, "tide": 0, "confusion": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(overview, "evaluate_cohort", counted("evaluate", overview.evaluate_cohort))
    monkeypatch.setattr(overview, "tide_errors", counted("tide", overview.tide_errors))
    monkeypatch.setattr(overview, "confusion_matrix_detection",
                        counted("confusion", overview.confusion_matrix_detection))
    st.cache_data.clear()
    store = open_store(stores, "detection")
    for query in ("iou=0.5", "iou=0.75", "iou=0.75&conf=0.3"):
        at = app(f"store=demo-detection&{query}", OVERVIEW)
        assert not at.exception
        limits = dict(parse_qsl(query))
        row = table_with(at, "mAP@IoU").set_index("Cohort").loc["All images"]
        expected = detection_metrics(store, "baseline", None, iou=float(limits["iou"]),
                                     score_threshold=float(limits.get("conf", 0.5)))
        assert number(row["mAP@IoU"]) == pytest.approx(expected["mAP"], abs=SHOWN)
        assert number(row["Precision@IoU"]) == pytest.approx(expected["aggregates"]["macro"]["precision"], abs=SHOWN)
    # One evaluation per cohort (All images, North), whatever the thresholds; no hidden tab ran.
    assert calls == {"evaluate": 2, "tide": 0, "confusion": 0}


def test_multilabel_metrics_follow_the_label_threshold(app, stores):
    store = open_store(stores, "multilabel")
    for thr in (0.3, 0.7):
        at = app(f"store=demo-multilabel&thr={thr}", OVERVIEW)
        row = table_with(at, "Exact match").set_index("Cohort").loc["All images"]
        expected = multilabel_metrics(store, "baseline", None, label_threshold=thr)
        assert number(row["Exact match"]) == pytest.approx(expected["exact_match"], abs=SHOWN)
        assert number(row["Hamming loss"]) == pytest.approx(expected["hamming_loss"], abs=SHOWN)


@pytest.mark.parametrize("task", TASKS)
def test_feature_cohorts_show_difference_and_ratio(app, stores, task):
    at = app(f"store=demo-{task}&view=features", OVERVIEW)
    at.multiselect(key=f"vl_fc_features_demo-{task}").set_value(["site"]).run()
    gaps = table_with(at, "Difference (max − min)").set_index("Metric")
    groups = table_with(at, "Site")
    store = open_store(stores, task)
    expected = cohort_group_metrics(store, Cohort(), "baseline", ["site"], ["accuracy", "error_rate"], bins=4,
                                    binning="equal", **parse_query("", catalog_of(store)).view.thresholds(
                                        catalog_of(store)))
    assert number(gaps.loc["Accuracy", "Difference (max − min)"]) == pytest.approx(expected.difference["accuracy"],
                                                                                   abs=SHOWN)
    assert number(gaps.loc["Accuracy", "Ratio (min / max)"]) == pytest.approx(expected.ratio["accuracy"], abs=SHOWN)
    assert groups["Images"].sum() == open_store(stores, task).image_count()
    assert sorted(groups["Site"]) == ["east", "north", "south"]


# --------------------------------------------------------------------------- error analysis


@pytest.mark.parametrize("task", TASKS)
def test_tree_node_becomes_the_cohort(app, stores, task):
    at = app(f"store=demo-{task}", ERRORS)
    features = at.multiselect(key=f"vl_ea_features_demo-{task}").value
    assert features
    store = open_store(stores, task)
    catalog = catalog_of(store)
    frame = load_error_frame(store, Cohort(), "baseline", features, **parse_query("", catalog).view.thresholds(catalog))
    n = store.image_count()
    tree = fit_error_tree(frame, TreeSettings(max_depth=4, max_leaves=16, min_samples_leaf=max(1, min(20, n // 20))),
                          catalog=catalog)
    picker = at.selectbox(key="vl_ea_node")
    assert picker.options and len(picker.options) == len(tree.nodes)
    node = next(n for n in tree.nodes if n.depth == 1)
    picker.set_value(node.node_id).run()
    at.button(key="vl_ea_node_actions_apply").click().run()
    assert not at.exception
    expected = dict(parse_qsl(to_query(node.cohort)))
    assert expected and expected.items() <= dict(at.query_params).items()
    parsed = parse_query(dict(at.query_params), catalog)
    assert cohort_count(store, parsed.cohort, "baseline") == node.size


def test_error_rates_count_only_predicted_images(stores, tmp_path, monkeypatch):
    """A model that predicted 30 of the images: the rate, the caption and each node divide by those."""
    import shutil

    from core.ingest.build import ModelRun, add_model

    for path in stores.glob("demo-multiclass.*"):
        (shutil.copytree if path.is_dir() else shutil.copy)(path, tmp_path / path.name)
    store = Store(tmp_path / "demo-multiclass.duckdb")
    n = store.image_count()
    store.close()
    rng = np.random.default_rng(0)
    add_model(tmp_path / "demo-multiclass.duckdb", ModelRun("partial", "partial", {}, pd.DataFrame(
        {"image_id": np.arange(30), "pred_label": rng.integers(0, 3, 30), "score": np.ones(30, np.float32)})))
    monkeypatch.setenv("VISIONLENS_DATA", str(tmp_path))
    with served_navigation():
        at = open_app("store=demo-multiclass&model=partial", ERRORS)
    caption = next(c.value for c in at.caption if c.value.startswith("Error rate"))
    assert f"in 30 images; {n - 30:,} without a prediction left out" in caption
    root = at.selectbox(key="vl_ea_node").format_func(0)
    errors, evaluated = root.rsplit("(", 1)[1].rstrip(")").split("/")
    assert evaluated == "30" and f"{int(errors) / 30:.1%}" in root


def test_heatmap_cell_becomes_the_cohort(app, stores):
    at = app("store=demo-multiclass&view=heatmap", ERRORS)
    at.selectbox(key="vl_hm_x_demo-multiclass").set_value("site").run()
    at.selectbox(key="vl_hm_y_demo-multiclass").set_value("brightness").run()
    cells = at.selectbox(key="vl_hm_cell")
    assert len(cells.options) >= 3
    at.button(key="vl_hm_actions_apply").click().run()
    params = dict(at.query_params)
    assert "site__eq" in params and any(k.startswith("brightness__") for k in params)
    store = open_store(stores, "multiclass")
    cohort = parse_query({k: v for k, v in params.items() if not is_page_param(k)}, catalog_of(store)).cohort
    count = cohort_count(store, cohort, "baseline")
    assert 0 < count < store.image_count()
    # The map's choices live in the URL, and stay there when a cell becomes the cohort.
    assert (params["error.columns"], params["error.rows"]) == ("site", "brightness")
    copied = app("&".join(f"{k}={v}" for k, v in params.items()), ERRORS)
    assert copied.selectbox(key="vl_hm_y_demo-multiclass").value == "brightness"


def test_the_analysis_choices_live_in_the_url(app):
    at = app("store=demo-multilabel", ERRORS)
    label_target = at.selectbox(key="vl_ea_target_demo-multilabel").options[2]
    at.selectbox(key="vl_ea_target_demo-multilabel").select_index(2).run()
    at.multiselect(key="vl_ea_features_demo-multilabel").set_value(["site", "brightness"]).run()
    params = dict(at.query_params)
    assert params["error.features"] == "site,brightness" and params["error.target"].startswith("label-")
    copied = app("&".join(f"{k}={v}" for k, v in params.items()), ERRORS)
    assert copied.multiselect(key="vl_ea_features_demo-multilabel").value == ["site", "brightness"]
    assert copied.selectbox(key="vl_ea_target_demo-multilabel").format_func(
        copied.selectbox(key="vl_ea_target_demo-multilabel").value) == label_target


def test_detection_rate_target(app):
    at = app("store=demo-detection", ERRORS)
    at.selectbox(key="vl_ea_target_demo-detection").set_value(ErrorTarget("rate")).run()
    assert not at.exception
    assert any("wrong objects" in c.value for c in at.caption)


# --------------------------------------------------------------------------- data analysis


@pytest.mark.parametrize("task", TASKS)
def test_data_analysis_chart_and_table(app, task):
    at = app(f"store=demo-{task}", DATA)
    assert any("images, counted per" in c.value for c in at.caption)
    # Labels as the x axis: one bar per class (label lists counted once per label).
    assert not at.toggle(key="vl_da_log_x").value and at.slider(key="vl_da_bins").value == 20  # a numeric x
    at.selectbox(key=f"vl_da_x_aggregate_demo-{task}").set_value("true_label").run()
    at.selectbox(key=f"vl_da_y_aggregate_demo-{task}").set_value("score").run()
    assert not at.exception
    assert any("mean score per true label" in c.value for c in at.caption)
    # Bins and a log scale do not apply to classes: not offered.
    assert not [w for w in at.slider if w.key == "vl_da_bins"] and not [w for w in at.toggle if w.key == "vl_da_log_x"]
    # The chart lives in the URL: a copied link draws the same one.
    assert (at.query_params["data.x"], at.query_params["data.y"]) == ("true_label", "score")
    copied = app("&".join(f"{k}={v}" for k, v in at.query_params.items()), DATA)
    assert copied.selectbox(key=f"vl_da_y_aggregate_demo-{task}").value == "score"
    assert any("mean score per true label" in c.value for c in copied.caption)
    at.segmented_control(key="vl_da_mode").set_value("points").run()
    assert not at.exception
    assert any("All " in c.value and "Click a point" in c.value for c in at.caption)
    at.toggle(key="vl_da_log_y").set_value(True).run()
    assert not at.exception
    at.segmented_control(key="vl_view").set_value("table").run()
    assert not at.exception
    assert at.query_params["view"] == "table"


def test_a_tab_keeps_its_choices_while_another_is_open(app):
    """Only the open visualisation tab runs; the widgets of the others keep their values."""
    at = app("store=demo-multiclass", OVERVIEW)
    at.session_state["vl_viz_tab"] = "Confusion matrix"
    at.run()
    classes = next(w for w in at.multiselect if w.label == "Classes")
    chosen = classes.options[2:4]
    classes.set_value(chosen).run()
    at.session_state["vl_viz_tab"] = "Metrics chart"
    at.run()
    assert not [w for w in at.multiselect if w.label == "Classes"]  # the confusion tab did not run
    at.session_state["vl_viz_tab"] = "Confusion matrix"
    at.run()
    assert not at.exception
    assert next(w for w in at.multiselect if w.label == "Classes").value == chosen


def test_the_confusion_chart_shows_the_engine_matrix_for_each_normalisation(app, stores):
    import pyarrow as pa

    from core.metrics.classification import confusion_matrix

    store = open_store(stores, "multiclass")
    at = app("store=demo-multiclass", OVERVIEW)
    at.session_state["vl_viz_tab"] = "Confusion matrix"
    at.run()
    classes = next(w for w in at.multiselect if w.label == "Classes").value
    for normalize in (None, "true"):
        next(w for w in at.selectbox if w.label == "Normalisation").set_value(normalize).run()
        assert not at.exception
        shown = None
        for chart in at.get("vega_lite_chart"):
            for dataset in chart.proto.datasets:
                frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
                if {"truth", "predicted", "value"} <= set(frame.columns):
                    shown = frame.pivot(index="truth", columns="predicted", values="value")
        expected = confusion_matrix(store, "baseline", None, normalize=normalize, classes=classes)
        assert shown is not None
        np.testing.assert_allclose(shown.loc[expected.index, expected.columns].to_numpy(dtype=float),
                                   expected.to_numpy(dtype=float), atol=1e-12)
