"""The app shell under AppTest: URL parsing, fallbacks, canonical URLs, live thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cohorts import catalog_of, cohort_count, parse_query
from core.state import StateDB
from app import nav
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_all


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stores")
    build_all(folder)
    return folder


@pytest.fixture
def app(stores, monkeypatch):
    """``app(query, page)`` runs the app as a server that has served a page before."""
    monkeypatch.setenv("VISIONLENS_DATA", str(stores))
    with served_navigation():
        yield open_app


@pytest.fixture
def first_run_app(stores, monkeypatch):
    """``app(query, page)`` as the first run of a fresh server process."""
    monkeypatch.setenv("VISIONLENS_DATA", str(stores))
    return open_app


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def dialog_titles(at: AppTest) -> list[str]:
    """Titles of the dialogs open after the run (they live in the event block)."""
    events = [block for block in at._tree.children.values() if getattr(block, "type", "") == "event"]
    return [child.proto.dialog.title for block in events for child in block.children.values()
            if getattr(child, "type", "") == "dialog"]


def bar_count(at: AppTest) -> str:
    """The cohort bar's "N of M images" line."""
    lines = [m.value for m in at.markdown if " images" in m.value and " of " in m.value]
    assert lines, [m.value for m in at.markdown]
    return lines[0]


def expected_count(stores: Path, name: str, query: str) -> int:
    store = Store(stores / name)
    catalog = catalog_of(store)
    parsed = parse_query(query, catalog)
    model = parsed.view.model or catalog.models[0]
    return cohort_count(store, parsed.cohort, model, state=StateDB.for_store(store.paths.base),
                        **parsed.view.thresholds(catalog))


def test_default_store_and_model_are_written_into_the_url(app):
    at = app()
    assert at.query_params == {"store": "demo-multiclass", "model": "baseline"}
    assert bar_count(at).startswith("**40** of 40 images")


@pytest.mark.parametrize("query, words", [
    ("brightness__lt=abc", ["brightness__lt", "not a number"]),
    ("bogus__eq=1", ["unknown column 'bogus'"]),
    ("site__between=3", ["between"]),
    ("true_label__in=cat,horse", ["'horse' is not a class"]),
    ("cohort=999", ["no saved cohort #999"]),
])
def test_bad_cohort_in_url_is_shown_and_falls_back_to_all_images(app, query, words):
    at = app(query + "&store=demo-multiclass")
    shown = " ".join(errors(at))
    for word in words:
        assert word in shown
    assert any("Showing all images" in i.value for i in at.info)
    assert bar_count(at).startswith("**40** of 40 images")
    # The URL now says what is shown: the bad part is gone.
    assert at.query_params == {"store": "demo-multiclass", "model": "baseline"}


def test_an_unknown_view_is_told_and_dropped(app):
    at = app("store=demo-multiclass&view=evil", "pages/explorer.py")
    assert ["view 'evil' is not one of this page's views" in e for e in errors(at)] == [True]
    assert "view" not in at.query_params


def test_a_bad_part_of_a_url_cohort_is_left_out_and_the_rest_kept(app, stores):
    at = app("store=demo-multiclass&bogus__eq=1&true_label__eq=cat&brightness__lt=x`y")
    assert any("unknown column 'bogus'" in e for e in errors(at))
    left_out = [i.value for i in at.info if "Left out of the cohort" in i.value]
    assert left_out == ["Left out of the cohort: `bogus__eq=1`, `brightness__lt=x'y`. "
                        "The cohort keeps the URL's other conditions."]
    wanted = expected_count(stores, "demo-multiclass", "true_label__eq=cat")
    assert 0 < wanted < 40 and bar_count(at).startswith(f"**{wanted}** of 40 images")
    assert at.query_params["true_label__eq"] == "cat" and "bogus__eq" not in at.query_params


def test_unknown_store_falls_back_to_a_demo_store(app):
    at = app("store=nope&site__eq=north")
    assert any("no store 'nope'" in e for e in errors(at))
    assert at.query_params["store"] == "demo-multiclass"
    at = app("store=../../etc/passwd")
    assert len(errors(at)) == 1 and "not a valid name" in errors(at)[0]  # told once
    assert at.query_params["store"] == "demo-multiclass"


def test_unknown_model_falls_back_to_the_first(app):
    at = app("store=demo-multilabel&model=ghost")
    assert any("unknown model 'ghost'" in e for e in errors(at))
    assert at.query_params["model"] == "baseline"


def test_valid_filters_are_kept_in_canonical_order(stores, app):
    query = "site__in=south,north&outcome__eq=incorrect&store=demo-multiclass"
    at = app(query)
    assert errors(at) == []
    count = expected_count(stores, "demo-multiclass", query)
    assert bar_count(at).startswith(f"**{count}** of 40 images")
    assert list(at.query_params) == ["outcome__eq", "site__in", "store", "model"]
    assert at.query_params["site__in"] == "north,south"


def test_detection_iou_must_be_a_stored_threshold(app):
    at = app("store=demo-detection&iou=0.53")
    assert any("0.53" in e and "0.55" in e for e in errors(at))
    assert "iou" not in at.query_params
    at = app("store=demo-detection&iou=0.75")
    assert errors(at) == []
    assert at.sidebar.select_slider(key="vl_iou").value == 0.75
    assert at.query_params["iou"] == "0.75"


def test_moving_the_iou_slider_updates_url_and_outcomes(stores, app):
    at = app("store=demo-detection&outcome__eq=incorrect")
    before = bar_count(at)
    at.sidebar.select_slider(key="vl_iou").set_value(0.9).run()
    assert at.query_params["iou"] == "0.9"
    count = expected_count(stores, "demo-detection", "outcome__eq=incorrect&iou=0.9")
    assert bar_count(at).startswith(f"**{count}** of 30 images")
    assert count > int(before.split("**")[1])  # stricter matching makes more images wrong


def test_label_threshold_is_live_for_multilabel(stores, app):
    at = app("store=demo-multilabel&outcome__eq=correct")
    at.sidebar.slider(key="vl_thr").set_value(0.8).run()
    assert at.query_params["thr"] == "0.8"
    count = expected_count(stores, "demo-multilabel", "outcome__eq=correct&thr=0.8")
    assert bar_count(at).startswith(f"**{count}** of 40 images")


def test_model_picker_writes_the_url_and_keeps_the_cohort(app):
    at = app("store=demo-multiclass&site__eq=north")
    at.sidebar.selectbox(key="vl_model").select("candidate").run()
    assert at.query_params["model"] == "candidate"
    assert at.query_params["site__eq"] == "north"


def test_store_picker_starts_a_fresh_view(app):
    at = app("store=demo-multiclass&site__eq=north")
    at.sidebar.selectbox(key="vl_store").select("demo-detection").run()
    assert at.query_params == {"store": "demo-detection", "model": "baseline"}


def test_a_page_opened_alone_still_gets_the_shell(first_run_app):
    # With a pages/ folder Streamlit first runs /explorer as that file alone; the
    # page must rerun through the entry point and find the URL's cohort.
    at = first_run_app("store=demo-multiclass&site__eq=south", page="pages/explorer.py")
    assert at.selectbox(key="vl_cohort") is not None
    assert any("Site is 'south'" in m.value for m in at.markdown)


def test_saved_cohort_opens_from_its_id_and_can_be_refined(stores, app):
    state = StateDB.for_store(stores / "demo-multiclass.duckdb")
    catalog = catalog_of(Store(stores / "demo-multiclass"))
    saved = state.create_cohort("north only", parse_query("site__eq=north", catalog).cohort)
    at = app(f"store=demo-multiclass&cohort={saved.id}")
    assert at.selectbox(key="vl_cohort").value == saved.id
    north = expected_count(stores, "demo-multiclass", f"cohort={saved.id}")
    assert bar_count(at).startswith(f"**{north}** of 40")
    at = app(f"store=demo-multiclass&cohort={saved.id}&outcome__eq=incorrect")
    refined = expected_count(stores, "demo-multiclass", f"cohort={saved.id}&outcome__eq=incorrect")
    assert bar_count(at).startswith(f"**{refined}** of 40")
    assert "unsaved filters" in bar_count(at)


def test_image_param_opens_the_flyout_and_bad_ids_are_refused(app):
    at = app("store=demo-multiclass&image=3", page="pages/explorer.py")
    assert dialog_titles(at) == ["Image 3 · img_0003.png"]
    at = app("store=demo-multiclass&image=4000")
    assert any("no image 4000" in e for e in errors(at))
    assert "image" not in at.query_params


@pytest.mark.parametrize("store", ["demo-multiclass", "demo-multilabel", "demo-detection"])
@pytest.mark.parametrize("view", ["grid", "table", "classes"])
def test_every_explorer_view_renders_for_every_task(app, store, view):
    at = app(f"store={store}&view={view}&image=1", page="pages/explorer.py")
    assert errors(at) == []
    assert dialog_titles(at) == ["Image 1 · img_0001.png"]
    assert any(m.value == "##### Metadata" for m in at.markdown)


def page_link_queries(at: AppTest) -> list[str]:
    return [e.proto.query_string for e in at.get("page_link")]


def test_page_parameters_stay_on_their_page_and_links_carry_the_cohort(app):
    at = app("store=demo-multiclass&site__eq=north&robustness.metric=accuracy&page=2")
    assert errors(at) == []
    assert at.query_params["robustness.metric"] == "accuracy"
    links = page_link_queries(at)
    assert links and all("site__eq=north" in q and "store=demo-multiclass" in q for q in links)
    assert not any("robustness." in q or "page=" in q for q in links)


def test_class_view_choices_live_in_the_url(app):
    at = app("store=demo-multilabel&view=classes&explorer.labels=1,3&explorer.show=incorrect",
             page="pages/explorer.py")
    assert at.multiselect(key="vl_class_labels").value == [1, 3]
    headers = [m.value for m in at.markdown if "examples" in m.value]
    assert [h.split("**")[1] for h in headers] == ["tree", "person"]
    assert all("(incorrect only)" in h for h in headers)
    at.multiselect(key="vl_class_labels").select(2).run()
    assert at.query_params["explorer.labels"] == "1,2,3"
    # Without a choice: the first five classes, so a store of up to five shows every one.
    at = app("store=demo-multilabel&view=classes", page="pages/explorer.py")
    labels = at.multiselect(key="vl_class_labels")
    assert len(labels.options) == 4 and labels.value == [0, 1, 2, 3]


def test_page_files_are_named_after_their_url_paths():
    # Streamlit maps a first request to `pages/<stem>.py` before st.navigation has run: a URL
    # path that differs from the file's stem shows "Page not found" to the first visitor.
    for spec in nav.PAGES:
        assert spec.path.exists(), spec.file
        assert spec.path.parent.name == "pages" and spec.path.stem == spec.url_path, spec


def test_grid_page_past_a_sections_end_queries_no_rows(stores, app, monkeypatch):
    from app.state import View
    from core.cohorts import cohort_outcome_counts

    store = Store(stores / "demo-multiclass.duckdb")
    counts = cohort_outcome_counts(store, parse_query("", catalog_of(store)).cohort, "baseline")
    small, large = sorted(counts[o] for o in ("correct", "incorrect"))
    per_page = 12
    page = small // per_page + 2  # past the smaller section's end, within the larger one
    assert (page - 1) * per_page < large, counts
    offsets = []
    rows = View.rows

    def recording(self, cohort=None, **kwargs):
        offsets.append(kwargs.get("offset", 0))
        return rows(self, cohort, **kwargs)

    monkeypatch.setattr(View, "rows", recording)
    at = app(f"store=demo-multiclass&page={page}&explorer.per={per_page}", page="pages/explorer.py")
    assert errors(at) == []
    assert offsets == [(page - 1) * per_page]  # the larger section's page alone
    shown = [m.value for m in at.markdown if m.value.startswith(("**Correct**", "**Incorrect**"))]
    assert sorted(shown) == sorted([f"**Correct** · {counts['correct']:,}" if counts["correct"] == small else
                                    f"**Correct** · {(page - 1) * per_page + 1:,}–{min(page * per_page, large):,} "
                                    f"of {large:,}",
                                    f"**Incorrect** · {counts['incorrect']:,}" if counts["incorrect"] == small else
                                    f"**Incorrect** · {(page - 1) * per_page + 1:,}–{min(page * per_page, large):,} "
                                    f"of {large:,}"])


def test_no_full_garbage_collection_after_every_run():
    """Streamlit's collection after each run walked every object torch and pandas bring (0.3 s a
    click); the config turns it off and the imported modules leave the collector's full passes."""
    import gc
    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False
    nav.freeze_imports()
    frozen = gc.get_freeze_count()
    assert frozen > 10_000
    nav.freeze_imports()  # once per process
    assert gc.get_freeze_count() == frozen


def test_every_page_preloads_the_element_code_later_pages_need(app):
    """Each preloaded name is a file of this Streamlit (a renamed one would silently load nothing),
    and the sidebar asks the browser for them."""
    files = nav.preloaded_files()
    assert sorted(name.split(".")[0] for name in files) == sorted(nav.PRELOADED_CHUNKS)
    at = app("store=demo-multiclass", "pages/explorer.py")
    [html] = [e for e in at.sidebar if type(e).__name__ == "Html"]
    assert all(f'"{name}"' in html.proto.body for name in files)
    assert html.proto.unsafe_allow_javascript


def test_a_link_to_a_page_needing_a_model_is_registered_on_a_store_without_one():
    """Not in the menu, but a shared /model-overview link gets the page's own words, not "Page not found"."""
    # Guarded: multiprocessing's spawned children re-run the last __main__ script (as __mp_main__).
    script = """
if __name__ == "__main__":
    import streamlit as st
    from types import SimpleNamespace
    from app import nav

    view = SimpleNamespace(task="detection", catalog=SimpleNamespace(models={}),
                           store=SimpleNamespace(paths=SimpleNamespace(base="data/voc.duckdb")))
    listed, lacking = nav._pages(view)
    st.text(",".join(p.url_path for p in listed))
    st.text(",".join(p.url_path for p in lacking))
    lacking[0]._page()
"""
    at = AppTest.from_string(script, default_timeout=60).run()
    listed, lacking = (t.value.split(",") for t in at.text)
    assert set(lacking) == {s.url_path for s in nav.PAGES if s.min_models and "detection" in s.tasks}
    assert "model-overview" in lacking and not set(listed) & set(lacking)
    assert "needs a model's predictions; this store has none" in at.info[0].value
    assert "--predictions FILE --out data/voc.duckdb" in at.info[0].value
