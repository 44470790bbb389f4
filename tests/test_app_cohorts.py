"""Saved cohorts through the app: save, switch, duplicate, import, sizes, the builder's grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.cohort_bar import draft_cohort
from core.cohorts import Cohort, Filter, catalog_of, cohort_count, parse_query, to_query
from core.state import StateDB
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_multiclass


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    build_multiclass(folder, n=24)
    return folder


@pytest.fixture
def folder(store_folder, monkeypatch) -> Path:
    """The store with no saved cohorts yet."""
    for leftover in store_folder.glob("demo-multiclass.state.sqlite*"):
        leftover.unlink()
    monkeypatch.setenv("VISIONLENS_DATA", str(store_folder))
    with served_navigation():
        yield store_folder


def state(folder: Path) -> StateDB:
    return StateDB.for_store(folder / "demo-multiclass.duckdb")


def catalog(folder: Path):
    return catalog_of(Store(folder / "demo-multiclass"))


def test_cohorts_page_saves_the_current_filters_and_opens_them(folder):
    at = open_app("site__eq=north&outcome__eq=incorrect", page="pages/cohorts.py")
    at.text_input(key="vl_create_name").input("north errors")
    at.button(key="FormSubmitter:vl_create-Save as cohort").click().run()
    [saved] = state(folder).list_cohorts()
    assert saved.name == "north errors"
    assert saved.query == "outcome__eq=incorrect&site__eq=north"
    assert at.query_params["cohort"] == str(saved.id)
    assert "site__eq" not in at.query_params


def test_switching_to_a_saved_cohort_drops_the_unsaved_filters(folder):
    saved = state(folder).create_cohort("south", parse_query("site__eq=south", catalog(folder)).cohort)
    at = open_app("outcome__eq=correct")
    at.selectbox(key="vl_cohort").select(saved.id).run()
    assert at.query_params["cohort"] == str(saved.id)
    assert "outcome__eq" not in at.query_params
    at.selectbox(key="vl_cohort").select(0).run()
    assert "cohort" not in at.query_params


def test_duplicate_opens_the_copy(folder):
    saved = state(folder).create_cohort("east", parse_query("site__eq=east", catalog(folder)).cohort)
    at = open_app(f"cohort={saved.id}")
    at.button(key="vl_bar_dup").click().run()
    copies = [c for c in state(folder).list_cohorts() if c.id != saved.id]
    assert [c.name for c in copies] == ["east (copy)"]
    assert copies[0].query == saved.query
    assert at.query_params["cohort"] == str(copies[0].id)


def test_rai_cohort_json_is_imported_on_the_cohorts_page(folder):
    rai = {"name": "dark north", "cohort_filter_list": [
        {"method": "less", "arg": [0.5], "column": "brightness"},
        {"method": "includes", "arg": ["north"], "column": "site"}]}
    at = open_app("", page="pages/cohorts.py")
    at.file_uploader(key="vl_import_file").upload("cohort.json", json.dumps(rai).encode(), "application/json").run()
    at.button(key="vl_import").click().run()
    [saved] = state(folder).list_cohorts()
    assert saved.name == "dark north"
    assert saved.query == "brightness__lt=0.5&site__in=north"
    assert any("Imported 'dark north'" in s.value for s in at.success)


def test_cohort_sizes_match_the_engine(folder):
    cat = catalog(folder)
    db = state(folder)
    first = db.create_cohort("north", parse_query("site__eq=north", cat).cohort)
    second = db.create_cohort("north wrong", parse_query("outcome__eq=incorrect", cat).cohort, parent_id=first.id)
    at = AppTest.from_function(_sizes_script, default_timeout=120).run()
    assert not at.exception, at.exception
    sizes = json.loads(at.json[0].value)
    store = Store(folder / "demo-multiclass")
    for saved in (first, second):
        expected = cohort_count(store, Cohort(parent_id=saved.id), "baseline", state=db)
        assert sizes[str(saved.id)] == expected


def test_all_cohorts_list_is_drawn_only_when_opened(folder):
    saved = state(folder).create_cohort("north", parse_query("site__eq=north", catalog(folder)).cohort)
    at = open_app("", page="pages/explorer.py")
    assert not at.dataframe  # closed: the bar on every page draws no table and counts nothing
    at.session_state["vl_bar_all"] = True
    at.run()
    [table] = [f.value for f in at.dataframe if "Cohort" in f.value.columns]
    expected = cohort_count(Store(folder / "demo-multiclass"), Cohort(parent_id=saved.id), "baseline",
                            state=state(folder))
    assert table[["Cohort", "Images"]].values.tolist() == [["north", expected]]


def _sizes_script():
    import streamlit as st

    from app.cohort_bar import cohort_sizes
    from app.state import load_view

    view = load_view().view
    table = cohort_sizes(view, view.saved_cohorts())
    st.json({str(i): int(n) for i, n in zip(table["id"], table["Images"])})


def test_builder_groups_become_or_groups():
    a, b, c = Filter("site", "eq", "north"), Filter("brightness", "lt", 0.3), Filter("sharpness", "gt", 10)
    cohort = draft_cohort([(0, a), (1, b), (2, c), (1, c)], parent=7)
    assert cohort == Cohort((a,), ((b, c), (c,)), 7)
    assert to_query(cohort) == ("cohort=7&site__eq=north&g1.brightness__lt=0.3&g1.sharpness__gt=10"
                                "&g2.sharpness__gt=10")


def test_editing_filters_keeps_every_condition_and_group(folder):
    query = "altitude__gt=50&g1.site__in=north,south&g2.true_label__eq=cat&g2.brightness__between=0.1,0.9"
    at = open_app(query)
    before = {k: v for k, v in at.query_params.items() if k not in ("store", "model")}
    at.button(key="vl_bar_edit").click().run()
    preview = [m.value for m in at.markdown if "images match" in m.value]
    assert preview and "either (" in preview[0]
    at.button(key="vl_draft_apply").click().run()
    assert not at.exception
    assert {k: v for k, v in at.query_params.items() if k not in ("store", "model")} == before



def test_refine_builds_a_cohort_within_the_saved_one(folder):
    saved = state(folder).create_cohort("north", parse_query("site__eq=north", catalog(folder)).cohort)
    at = open_app(f"cohort={saved.id}")
    at.button(key="vl_bar_refine").click().run()
    preview = [m.value for m in at.markdown if "images match" in m.value]
    north = cohort_count(Store(folder / "demo-multiclass"), parse_query("site__eq=north", catalog(folder)).cohort,
                         "baseline")
    assert preview and preview[0].startswith(f"**{north}** images match")
    assert "within saved cohort 'north'" in preview[0]
    assert at.session_state["_vl_draft"]["parent"] == saved.id  # what it applies or saves lies inside 'north'
    assert not at.exception


def test_a_new_numeric_condition_starts_at_round_numbers_holding_every_image():
    from app.cohort_bar import number_format, readable_range

    # The number boxes show the value the filter uses: 0.115 as 0.115, not 0.12.
    assert number_format(0.115, 0.9) == "%.3f" and number_format(10.0, 4100.0) == "%.2f"
    assert number_format(1 / 3) == "%.6f"

    assert readable_range(0.16699938398692812, 0.9012) == (0.166, 0.902)
    assert readable_range(12.3, 4098.7) == (10.0, 4100.0)
    assert readable_range(5.0, 5.0) == (5.0, 5.0)
