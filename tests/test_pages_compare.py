"""Compare and error-slices pages under AppTest, on small stores of every task.

Every number shown is checked against the engine (``core.compare``,
``core.slices``); the changed-image buttons are checked to open the explorer
on exactly those images, and the scorecard to be built only on request, with
the targets and cohorts chosen on the page.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from app import compare_views, nav
from core.cohorts import Cohort, Filter, catalog_of, parse_query
from core.compare import compare_models
from core.errors import EvalError
from core.ingest.build import Dataset, ModelRun, build_store
from core.slices import find_slices
from core.state import StateDB
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_all

TASKS = ("multiclass", "multilabel", "detection")
COMPARE, SLICES = "pages/compare.py", "pages/slices.py"
# Thresholds away from the stores' defaults, so the pages are seen to use the URL's.
THRESHOLDS = {"multiclass": ("", {}), "multilabel": ("&thr=0.4", {"label_threshold": 0.4}),
              "detection": ("&iou=0.75&conf=0.3", {"iou": 0.75, "score_threshold": 0.3})}


def listed_pages() -> tuple[nav.PageSpec, ...]:
    """``app.nav.PAGES`` with the error-slices page listed and the compare page open to any store.

    Both are changes requested of ``app/nav.py``; once made, this returns ``PAGES`` unchanged.
    """
    pages = tuple(replace(p, min_models=0) if p.url_path == "compare" else p for p in nav.PAGES)
    if not any(p.url_path == "slices" for p in pages):
        pages += (nav.PageSpec(SLICES, "slices", "Error slices", ":material/view_quilt:", min_models=1),)
    return pages


def build_single_model(folder: Path) -> None:
    """A four-image multiclass store with one model."""
    (folder / "single.images").mkdir()
    uris = []
    for i in range(4):
        path = folder / "single.images" / f"{i}.png"
        Image.new("RGB", (16, 16), (60 * i, 90, 120)).save(path)
        uris.append(str(path))
    images = pd.DataFrame({"image_id": np.arange(4), "uri": uris, "true_label": [0, 1, 0, 1]})
    probs = np.eye(2, dtype=np.float32)[[0, 1, 1, 1]]
    build_store(folder / "single", Dataset("single", "multiclass", ["a", "b"], images),
                [ModelRun("only", "Only", {}, pd.DataFrame({"image_id": np.arange(4), "probs": list(probs)}))])


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compare-stores")
    build_all(folder)
    for task in TASKS:
        StateDB.for_store(folder / f"demo-{task}.duckdb").create_cohort(
            "North", Cohort((Filter("site", "eq", "north"),)))
    build_single_model(folder)
    return folder


@pytest.fixture
def app(stores, monkeypatch):
    """``app(query, page)``: the app at ``?query`` on ``page``, as a server that has served a page before."""
    monkeypatch.setenv("VISIONLENS_DATA", str(stores))
    monkeypatch.setattr(nav, "PAGES", listed_pages())
    with served_navigation():
        yield open_app


def open_store(stores: Path, task: str) -> Store:
    return Store(stores / f"demo-{task}.duckdb")


def state_of(stores: Path, task: str) -> StateDB:
    return StateDB.for_store(stores / f"demo-{task}.duckdb")


def table_with(at: AppTest, column) -> pd.DataFrame:
    for frame in at.dataframe:
        if column in frame.value.columns:
            return frame.value
    raise AssertionError(f"no table with column {column!r}: {[list(f.value.columns) for f in at.dataframe]}")


def chart_data(at: AppTest, column: str) -> pd.DataFrame:
    """The data set with ``column`` of the page's Vega-Lite charts."""
    for chart in at.get("vega_lite_chart"):
        for dataset in chart.proto.datasets:
            frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
            if column in frame.columns:
                return frame
    raise AssertionError(f"no chart data with column {column!r}")


def params(at: AppTest) -> dict[str, str]:
    return {k: at.query_params[k][0] if isinstance(at.query_params[k], list) else at.query_params[k]
            for k in at.query_params}


def engine_comparison(stores: Path, task: str, cohorts, baseline="baseline", candidate="candidate", **thresholds):
    return compare_models(open_store(stores, task), baseline, candidate, cohorts=cohorts,
                          state=state_of(stores, task), links=False, **thresholds)


def close(shown: object, expected: float | None) -> bool:
    return pd.isna(shown) if expected is None else shown == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- compare


@pytest.mark.parametrize("task", TASKS)
def test_every_metric_and_compatibility_equal_the_engine(app, stores, task):
    suffix, thresholds = THRESHOLDS[task]
    at = app(f"store=demo-{task}&site__eq=south{suffix}", COMPARE)
    assert params(at)["model"] == "baseline" and params(at)["compare.candidate"] == "candidate"
    expected = engine_comparison(stores, task, [("Current cohort", "site__eq=south&model=baseline"),
                                                ("North", "cohort=1&model=baseline")], **thresholds)
    metrics = table_with(at, ("All images", "Δ"))
    assert len(metrics) == len(expected.metric_names)
    for cohort in expected.cohorts:
        for row, name in enumerate(expected.metric_names):
            assert close(metrics[(cohort.name, "baseline")].iloc[row], cohort.baseline[name]), (cohort.name, name)
            assert close(metrics[(cohort.name, "candidate")].iloc[row], cohort.candidate[name]), (cohort.name, name)
            assert close(metrics[(cohort.name, "Δ")].iloc[row], cohort.delta[name]), (cohort.name, name)
    # The cards are about the URL's cohort until another is picked.
    assert at.selectbox(key=f"vl_cmp_focus_demo-{task}").value == "Current cohort"
    focus = expected.cohorts[1]
    btc = next(m for m in at.metric if m.label == "Backward trust compatibility")
    assert btc.value == ("n/a" if focus.btc is None else f"{focus.btc:.1%}")
    if task == "detection":
        objects = table_with(at, "Objects").set_index("Objects")
        o = expected.objects
        assert list(objects["baseline"]) == [o.baseline_tp, o.ground_truths - o.baseline_tp, o.baseline_fp]
        assert list(objects["candidate"]) == [o.candidate_tp, o.ground_truths - o.candidate_tp, o.candidate_fp]
    else:
        assert expected.objects is None and not any("Objects" in f.value.columns for f in at.dataframe)
    assert not any("BTC" in f.value.columns for f in at.dataframe)  # its tab is not open: not drawn
    at.session_state["vl_cmp_tab"] = "Backward compatibility"
    at.run()
    compatibility = table_with(at, "BTC").set_index("Cohort")
    assert list(compatibility.index) == ["All images", "Current cohort", "North"]
    for cohort in expected.cohorts:
        row = compatibility.loc[cohort.name]
        assert close(row["BTC"], cohort.btc) and close(row["BEC"], cohort.bec)
        assert (row["Images"], row["New errors"], row["Fixed errors"], row["Disagreements"]) == (
            cohort.count, cohort.new_errors.count, cohort.fixed_errors.count, cohort.disagreements.count)


def test_a_cohort_defined_by_model_outputs_says_whose(app):
    def said(at):
        return [c.value for c in at.caption if "filter on model outputs" in c.value]

    assert said(app("store=demo-multiclass&site__eq=south", COMPARE)) == []
    assert said(app("store=demo-multiclass&outcome__eq=incorrect", COMPARE)) == [
        "Current cohort filter on model outputs (outcome, errors, predictions): both models are compared on the "
        "images that **baseline**'s outputs put there."]


def test_changed_images_open_the_explorer_on_exactly_those_images(app, stores):
    expected = engine_comparison(stores, "multilabel", [], label_threshold=0.3)
    for button, image_set, model in (("vl_cmp_open_new_errors", expected.new_errors, "candidate"),
                                     ("vl_cmp_open_fixed_errors", expected.fixed_errors, "baseline")):
        assert image_set.count, button  # the store has images of both kinds
        at = app("store=demo-multilabel&thr=0.3", COMPARE)
        at.button(key=button).click().run()
        assert not at.exception
        assert [h.value for h in at.header] == ["Data explorer"]
        shown = params(at)
        assert (shown["model"], shown["thr"]) == (model, "0.3")
        assert not any(key.startswith("compare.") for key in shown)
        ids = parse_query(shown, catalog_of(open_store(stores, "multilabel"))).cohort.filters[0].value
        assert sorted(ids) == image_set.image_ids.tolist()


def test_delta_chart_follows_the_focus_cohort(app, stores):
    expected = engine_comparison(stores, "multiclass", [("Current cohort", "site__eq=south&model=baseline"),
                                                        ("North", "cohort=1&model=baseline")])
    at = app("store=demo-multiclass&site__eq=south", COMPARE)
    shown = []
    for focus in ("Current cohort", "North"):
        at.selectbox(key="vl_cmp_focus_demo-multiclass").set_value(focus).run()
        deltas = next(c for c in expected.cohorts if c.name == focus).delta
        chart = chart_data(at, "delta")
        assert dict(zip(chart["label"], chart["delta"])) == pytest.approx(
            {compare_views.label("multiclass", m): d for m, d in deltas.items() if pd.notna(d)}, abs=1e-12)
        shown.append(chart["delta"].tolist())
    assert shown[0] != shown[1]  # the two cohorts differ, so a stale chart would show


def test_detection_objects_and_newly_missed_images(app, stores):
    expected = engine_comparison(stores, "detection", [], iou=0.5, score_threshold=0.5)
    missed = expected.objects.newly_missed_images
    assert missed.count
    at = app("store=demo-detection", COMPARE)
    at.button(key="vl_cmp_open_missed").click().run()
    shown = params(at)
    assert shown["model"] == "candidate"
    ids = parse_query(shown, catalog_of(open_store(stores, "detection"))).cohort.filters[0].value
    assert sorted(ids) == missed.image_ids.tolist()


def test_models_are_picked_and_swapped_in_the_url(app, stores):
    at = app("store=demo-multiclass&compare.candidate=no-such-model", COMPARE)
    assert params(at)["compare.candidate"] == "candidate"  # an unknown candidate falls back to the other model
    at.button(key="vl_cmp_swap").click().run()
    assert (params(at)["model"], params(at)["compare.candidate"]) == ("candidate", "baseline")
    swapped = engine_comparison(stores, "multiclass", [("North", "cohort=1&model=candidate")],
                                baseline="candidate", candidate="baseline")
    assert table_with(at, ("All images", "Δ"))[("All images", "Δ")].iloc[0] == pytest.approx(
        swapped.overall.delta["accuracy"], abs=1e-12)
    # Choosing the baseline's model as candidate swaps the two back.
    at.selectbox(key="vl_cmp_candidate").set_value("candidate").run()
    assert (params(at)["model"], params(at)["compare.candidate"]) == ("baseline", "candidate")
    assert at.selectbox(key="vl_cmp_baseline").value == "baseline"


def test_scorecard_is_built_only_on_request_with_the_chosen_targets_and_cohorts(app, monkeypatch):
    calls = []

    def fake_scorecard(store, **options):
        calls.append(options)
        if options["targets"].get("f1_macro") == 1.0:
            raise EvalError("scorecard refused", field="target")
        return "card"

    monkeypatch.setattr(compare_views, "scorecard", fake_scorecard)
    monkeypatch.setattr(compare_views, "pdf_bytes", lambda card: b"%PDF-1.4 test")
    at = app("store=demo-multiclass", COMPARE)
    at.session_state["vl_cmp_tab"] = "PDF scorecard"
    at.run()
    assert not calls and not at.download_button
    at.multiselect(key="vl_sc_targets_multiclass").set_value(["accuracy"]).run()
    at.number_input(key="vl_sc_target_multiclass_accuracy").set_value(0.8).run()
    at.button(key="vl_sc_prepare").click().run()
    assert len(calls) == 1
    options = calls[0]
    assert (options["model_id"], options["baseline"]) == ("candidate", "baseline")
    assert options["targets"] == {"accuracy": 0.8}
    assert options["cohorts"] == [("North", "cohort=1&model=baseline")]
    assert [b.label for b in at.download_button] == ["Download PDF scorecard"]
    assert at.download_button[0].proto.url.endswith(".pdf")
    assert "vl_sc_prepare" not in [b.key for b in at.button]
    at.multiselect(key="vl_sc_cohorts_demo-multiclass").set_value([]).run()  # a new setting: prepare again
    assert not at.download_button and len(calls) == 1
    at.multiselect(key="vl_sc_cohorts_demo-multiclass").set_value(["North"]).run()
    assert at.download_button and len(calls) == 1  # the same settings reuse the built PDF
    at.multiselect(key="vl_sc_targets_multiclass").set_value(["accuracy", "f1_macro"]).run()
    at.number_input(key="vl_sc_target_multiclass_f1_macro").set_value(1.0).run()
    at.button(key="vl_sc_prepare").click().run()
    assert ["scorecard refused" in e.value for e in at.error] == [True] and not at.download_button


def test_sidebar_scorecard_is_drawn_only_when_opened(app):
    at = app("store=demo-multiclass", "pages/explorer.py")
    assert "vl_sc_side_prepare" not in [b.key for b in at.button]  # closed: the sidebar on every page stays light
    at.session_state["vl_sc_side_open"] = True
    at.run()
    assert "vl_sc_side_prepare" in [b.key for b in at.sidebar.button]
    assert at.sidebar.multiselect(key="vl_sc_side_targets_multiclass").value == []


def test_fewer_than_two_models_is_explained(app):
    at = app("store=single", COMPARE)
    assert any("needs two models" in i.value for i in at.info)
    assert not at.dataframe or all("BTC" not in f.value.columns for f in at.dataframe)


def test_unchanged_metrics_are_not_coloured():
    frame = pd.DataFrame({"metric": ["a", "b", "c", "d"], "delta": [0.0, 0.1, None, -0.2],
                          "better": [False, True, None, False]})
    assert compare_views.unchanged_as_none(frame)["better"].tolist() == [None, True, None, False]


# --------------------------------------------------------------------------- slices


# Thresholds under which the top slice differs from the one at the defaults.
SLICE_THRESHOLDS = {"multiclass": ("", {}), "multilabel": ("&thr=0.4", {"label_threshold": 0.4}),
                    "detection": ("&iou=0.6&conf=0.4", {"iou": 0.6, "score_threshold": 0.4})}


@pytest.mark.parametrize("task", TASKS)
def test_slices_equal_the_engine_and_link_to_the_explorer(app, stores, task):
    suffix, thresholds = SLICE_THRESHOLDS[task]
    at = app(f"store=demo-{task}{suffix}", SLICES)
    store = open_store(stores, task)
    expected = find_slices(store, "baseline", top_k=10, max_order=3, **thresholds)
    assert expected
    texts = [m.value for m in at.markdown]
    links = [p for p in at.page_link if p.proto.label == "Explore"]
    assert len(links) == len(expected)
    catalog = catalog_of(store)
    for found, link in zip(expected, links):
        assert f"{found.size:,} images" in texts
        assert any(t.startswith(f"**{found.error_rate:.1%}** wrong") for t in texts)
        assert f":gray[score {found.score:.3f}]" in texts
        assert link.proto.page == "explorer"
        target = dict(parse_qsl(link.proto.query_string))
        assert (target["store"], target["model"]) == (f"demo-{task}", "baseline")
        for key, value in parse_qsl(suffix.lstrip("&")):
            assert target[key] == value
        assert parse_query(target, catalog).cohort == parse_query(found.query, catalog).cohort
    chart = chart_data(at, "error_rate")
    assert chart["error_rate"].tolist() == pytest.approx([found.error_rate for found in expected], abs=1e-12)


def test_slice_options_live_in_the_url(app, stores):
    at = app("store=demo-multiclass&slices.order=1", SLICES)
    assert at.segmented_control(key="vl_slices_order").value == 1
    expected = find_slices(open_store(stores, "multiclass"), "baseline", max_order=1)
    assert len([p for p in at.page_link if p.proto.label == "Explore"]) == len(expected)
    at.segmented_control(key="vl_slices_order").set_value(2).run()
    assert params(at)["slices.order"] == "2"
    at.selectbox(key="vl_slices_top_k").set_value(5).run()
    assert params(at)["slices.top"] == "5"
    # A cohort in the URL narrows the search: the slices are the engine's within it, their links keep it.
    store = open_store(stores, "multiclass")
    two_sites = parse_query("site__in=north,south", catalog_of(store)).cohort
    within = find_slices(store, "baseline", cohort=two_sites)
    assert within != find_slices(store, "baseline")
    narrowed = app("store=demo-multiclass&site__in=north,south", SLICES)
    links = [dict(parse_qsl(p.proto.query_string)) for p in narrowed.page_link if p.proto.label == "Explore"]
    assert within and [parse_query(link, catalog_of(store)).cohort for link in links] == [
        parse_query(found.query, catalog_of(store)).cohort for found in within]
    assert all(link["site__in"] == "north,south" for link in links)


def test_a_slice_is_saved_as_a_named_cohort(app, stores):
    store = open_store(stores, "multiclass")
    top = find_slices(store, "baseline", top_k=10)[0]
    at = app("store=demo-multiclass", SLICES)
    at.text_input(key=f"vl_slice_name_{top.query}").set_value("Hard slice").run()
    at.button(key=f"vl_slice_save_{top.query}").click().run()
    saved = [c for c in state_of(stores, "multiclass").list_cohorts() if c.name == "Hard slice"]
    assert len(saved) == 1
    assert saved[0].cohort(catalog_of(store)) == parse_query(top.query, catalog_of(store)).cohort
    assert any("Hard slice" in s.value for s in at.success)
    assert f"vl_slice_save_{top.query}" not in [b.key for b in at.button]  # shown as saved instead


def test_detection_compare_reuses_the_overviews_evaluations(app, monkeypatch):
    """The compare page ranks each model's detections once per cohort, whatever the thresholds, and
    shares those rankings with the model overview."""
    import streamlit as st

    from app import overview

    calls = []
    original = overview.evaluate_cohort
    monkeypatch.setattr(overview, "evaluate_cohort",
                        lambda store, model_id, selection, **kw: calls.append(model_id) or original(
                            store, model_id, selection, **kw))
    st.cache_data.clear()
    assert not app("store=demo-detection", "pages/model-overview.py").exception
    after_overview = len(calls)
    for query in ("", "&iou=0.75", "&iou=0.75&conf=0.3"):
        assert not app(f"store=demo-detection{query}", COMPARE).exception
    # The overview ranked the baseline on All images and North; compare adds the candidate's two.
    assert after_overview == 2 and sorted(calls[after_overview:]) == ["candidate", "candidate"]
