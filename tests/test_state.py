"""Saved cohorts, reviews and RAI cohort JSON in the state database; concurrent writers lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from core.cohorts import Catalog, ColumnInfo, Cohort, Filter, parse_query
from core.errors import CohortError
from core.state import StateDB, cohort_to_rai, rai_to_cohort
from core.store import StorePaths


def catalog() -> Catalog:
    info = [
        ColumnInfo("brightness", "Brightness", "numeric", "number", "auto"),
        ColumnInfo("camera", "Camera", "categorical", "text", "user"),
        ColumnInfo("tags", "Tags", "list", "text", "user", is_list=True),
        ColumnInfo("image_id", "Image id", "numeric", "number", "derived"),
        ColumnInfo("true_label", "True label", "categorical", "class", "derived"),
        ColumnInfo("pred_label", "Predicted label", "categorical", "class", "model"),
        ColumnInfo("outcome", "Outcome", "categorical", "outcome", "model"),
    ]
    return Catalog("multiclass", ("cat", "dog", "bird"), {c.name: c for c in info}, models=("m",))


@pytest.fixture()
def state(tmp_path):
    return StateDB.for_store(tmp_path / "ds.duckdb")


def cohort(query: str) -> Cohort:
    return parse_query(query, catalog()).cohort


def test_state_file_sits_beside_the_store_in_wal_mode(tmp_path, state):
    assert state.path == StorePaths.of(tmp_path / "ds.duckdb").state
    assert state.list_cohorts() == [] and state.get_review("image", 1) is None
    assert not state.path.exists()  # reading never creates the file
    state.create_cohort("a", cohort("brightness__lt=0.3"))
    with sqlite3.connect(state.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_create_get_edit_duplicate(state):
    saved = state.create_cohort("  Dark images ", cohort("camera__eq=canon&brightness__lt=0.3"),
                                description="too dark to label")
    assert saved.name == "Dark images" and saved.query == "brightness__lt=0.3&camera__eq=canon"
    assert saved.link == f"cohort={saved.id}" and saved.created_at == saved.updated_at
    assert saved.cohort(catalog()) == cohort("brightness__lt=0.3&camera__eq=canon")
    assert state.get_cohort(saved.id) == saved
    renamed = state.rename_cohort(saved.id, "Dark")
    assert renamed.name == "Dark" and renamed.query == saved.query and renamed.updated_at > saved.updated_at
    edited = state.update_cohort(saved.id, cohort=cohort("brightness__lt=0.2"), description="")
    assert edited.query == "brightness__lt=0.2" and edited.name == "Dark" and edited.description == ""
    copy = state.duplicate_cohort(saved.id)
    assert copy.id != saved.id and copy.name == "Dark (copy)" and copy.query == edited.query
    picked = state.create_cohort("picked", image_ids=[5, 3, 5, 9])
    assert picked.image_ids == (3, 5, 9) and picked.query == ""
    assert picked.cohort(catalog()) == Cohort((Filter("image_id", "in", (3, 5, 9)),))
    assert state.update_cohort(picked.id, image_ids=None).image_ids is None
    assert [c.id for c in state.list_cohorts()] == [saved.id, copy.id, picked.id]
    for bad in (dict(name=" "), dict(name="x" * 201)):
        with pytest.raises(CohortError):
            state.create_cohort(**bad)
    with pytest.raises(CohortError, match="at least one image"):
        state.create_cohort("empty", image_ids=[])
    with pytest.raises(CohortError, match="no saved cohort #77") as caught:
        state.get_cohort(77)
    assert saved.id in caught.value.choices


def test_refinement_keeps_its_parent(state):
    parent = state.create_cohort("p", cohort("brightness__lt=0.5"))
    child = state.create_cohort("c", cohort(f"cohort={parent.id}&camera__eq=nikon"))
    assert child.parent_id == parent.id and child.query == "camera__eq=nikon"
    assert state.children(parent.id) == [child]
    with pytest.raises(CohortError, match="refines"):
        state.create_cohort("d", cohort(f"cohort={parent.id}"), parent_id=child.id)
    with pytest.raises(CohortError, match="no saved cohort"):
        state.create_cohort("orphan", parent_id=999)


def test_parent_changes_never_make_a_cycle(state):
    a = state.create_cohort("a")
    b = state.create_cohort("b", parent_id=a.id)
    c = state.create_cohort("c", parent_id=b.id)
    with pytest.raises(CohortError, match="inside itself"):
        state.update_cohort(a.id, parent_id=c.id)
    with pytest.raises(CohortError, match="inside itself"):
        state.update_cohort(a.id, parent_id=a.id)
    assert state.update_cohort(c.id, parent_id=None).parent_id is None
    assert state.update_cohort(a.id, parent_id=c.id).parent_id == c.id


def tree(state):
    root = state.create_cohort("root")
    mid = state.create_cohort("mid", parent_id=root.id)
    leaf1 = state.create_cohort("leaf1", parent_id=mid.id)
    leaf2 = state.create_cohort("leaf2", parent_id=mid.id)
    grand = state.create_cohort("grand", parent_id=leaf1.id)
    return root, mid, leaf1, leaf2, grand


def test_delete_refuses_with_children_by_default(state):
    root, mid, leaf1, leaf2, grand = tree(state)
    with pytest.raises(CohortError, match="has 2 child") as caught:
        state.delete_cohort(mid.id)
    assert caught.value.choices == ["reparent", "cascade"]
    assert len(state.list_cohorts()) == 5
    with pytest.raises(CohortError, match="unknown delete mode"):
        state.delete_cohort(mid.id, children="orphan")
    assert state.delete_cohort(grand.id) == [grand.id]


def test_delete_reparents_children_to_the_grandparent(state):
    root, mid, leaf1, leaf2, grand = tree(state)
    state.set_review("cohort", mid.id, status="reviewed")
    assert state.delete_cohort(mid.id, children="reparent") == [mid.id]
    assert {c.name: c.parent_id for c in state.list_cohorts()} == \
        {"root": None, "leaf1": root.id, "leaf2": root.id, "grand": leaf1.id}
    assert state.get_review("cohort", mid.id) is None


def test_delete_cascades_to_every_descendant(state):
    root, mid, leaf1, leaf2, grand = tree(state)
    other = state.create_cohort("other")
    assert state.delete_cohort(mid.id, children="cascade") == sorted([mid.id, leaf1.id, leaf2.id, grand.id])
    assert [c.id for c in state.list_cohorts()] == [root.id, other.id]


def test_reviews_of_images_and_cohorts(state):
    saved = state.create_cohort("x")
    first = state.set_review("image", 42, note="blurry, relabel?")
    assert (first.status, first.note) == ("open", "blurry, relabel?")
    assert state.set_review("image", 42, status="fixed").note == "blurry, relabel?"
    assert state.set_review("image", 42, note="relabelled").status == "fixed"
    state.set_review("cohort", saved.id, status="reviewed", note="ok")
    state.set_review("image", 7, status="reviewed")
    assert [(r.kind, r.target) for r in state.list_reviews()] == [("cohort", saved.id), ("image", 7), ("image", 42)]
    assert [r.target for r in state.list_reviews("image", "fixed")] == [42]
    with pytest.raises(CohortError, match="unknown review status"):
        state.set_review("image", 1, status="done")
    with pytest.raises(CohortError, match="unknown review kind"):
        state.set_review("model", 1)
    with pytest.raises(CohortError, match="no saved cohort"):
        state.set_review("cohort", 999, status="open")


# --------------------------------------------------------------------------- RAI cohort JSON


def test_export_to_rai_folds_parents(state):
    parent = state.create_cohort("p", cohort("brightness__between=0.1,0.4&true_label__in=cat,bird"))
    child = state.create_cohort("Dark birds", cohort(f"cohort={parent.id}&pred_label__ne=dog&image_id__in=1,2"
                                                     "&brightness__gte=0.2&tags__contains=x&camera__eq=canon"))
    exported = state.export_rai(child.id, catalog())
    assert exported == {"name": "Dark birds", "cohort_filter_list": [
        {"method": "greater and equal", "arg": [0.2], "column": "brightness"},
        {"method": "includes", "arg": ["canon"], "column": "camera"},
        {"method": "includes", "arg": [1, 2], "column": "Index"},
        {"method": "excludes", "arg": ["dog"], "column": "Predicted Y"},
        {"method": "includes", "arg": ["x"], "column": "tags"},
        {"method": "in the range of", "arg": [0.1, 0.4], "column": "brightness"},
        {"method": "includes", "arg": ["bird", "cat"], "column": "True Y"},
    ]}
    json.dumps(exported)


@pytest.mark.parametrize("query, message", [
    ("g1.brightness__lt=1&g2.brightness__gt=2", "OR groups"),
    ("camera__contains=an", "no RAI cohort equivalent"),
    ("brightness__isnull=true", "no RAI cohort equivalent"),
    ("outcome__eq=correct", "outcome has no RAI"),
])
def test_export_refuses_what_rai_cannot_say(query, message):
    with pytest.raises(CohortError, match=message):
        cohort_to_rai("x", [cohort(query)], catalog())


def test_import_from_rai(state):
    data = [
        {"name": "young", "cohort_filter_list": [
            {"method": "less", "arg": [0.5], "column": "brightness"},
            {"method": "includes", "arg": ["bird", 1], "column": "True Y"},
            {"method": "excludes", "arg": ["nikon"], "column": "camera"},
            {"method": "equal", "arg": [3], "column": "Index"},
            {"method": "equal", "arg": ["canon"], "column": "camera"},
        ]},
        {"name": "range", "cohort_filter_list": [
            {"method": "in the range of", "arg": [0.2, 0.6], "column": "brightness"}]},
    ]
    saved = state.import_rai(json.dumps(data), catalog())
    assert [s.name for s in saved] == ["young", "range"]
    assert saved[0].cohort(catalog()) == cohort(
        "brightness__lt=0.5&true_label__in=bird,dog&camera__notin=nikon&image_id__eq=3&camera__in=canon")
    assert saved[1].query == "brightness__between=0.2,0.6"
    again = state.import_rai(state.export_rai(saved[0].id, catalog()), catalog())[0]
    assert again.cohort(catalog()) == saved[0].cohort(catalog())


@pytest.mark.parametrize("item, message", [
    ({"name": "x"}, "cohort_filter_list"),
    ({"name": "x", "cohort_filter_list": [{"method": "like", "arg": [1], "column": "brightness"}]},
     "unknown RAI method"),
    ({"name": "x", "cohort_filter_list": [{"method": "less", "arg": [1], "column": "age"}]}, "unknown column"),
    ({"name": "x", "cohort_filter_list": [{"method": "less", "arg": ["a"], "column": "brightness"}]},
     "not a number"),
    ({"name": "x", "cohort_filter_list": [{"method": "less", "arg": [1, 2], "column": "brightness"}]},
     "takes one value"),
    ({"name": "x", "cohort_filter_list": [{"method": "includes", "arg": ["zebra"], "column": "True Y"}]},
     "not a class"),
    ({"name": "x", "cohort_filter_list": [{"method": "includes", "arg": [], "column": "True Y"}]},
     "non-empty list"),
])
def test_import_errors_name_the_filter(item, message):
    with pytest.raises(CohortError, match=message) as caught:
        rai_to_cohort(item, catalog(), index=4)
    assert caught.value.row == 4


def test_nothing_is_saved_when_one_imported_cohort_is_bad(state):
    good = {"name": "ok", "cohort_filter_list": []}
    bad = {"name": "bad", "cohort_filter_list": [{"method": "less", "arg": [1], "column": "nope"}]}
    with pytest.raises(CohortError):
        state.import_rai([good, bad], catalog())
    assert state.list_cohorts() == []


# --------------------------------------------------------------------------- concurrency

WRITERS, SAVES = 8, 100


def _writer(path: str, worker: int, barrier) -> None:
    state = StateDB(path)
    barrier.wait()  # all start at once, on a database none of them has created yet
    for i in range(SAVES):
        state.create_cohort(f"w{worker}-{i}", Cohort((Filter("brightness", "lt", i),)), image_ids=[worker, i])
        if i % 10 == 0:
            state.set_review("image", i, note=f"w{worker}")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(StorePaths.of(tmp_path / "ds.duckdb").state)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(WRITERS)
    workers = [ctx.Process(target=_writer, args=(path, w, barrier)) for w in range(WRITERS)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0] * WRITERS
    saved = StateDB(path).list_cohorts()
    assert len(saved) == WRITERS * SAVES
    assert {c.name for c in saved} == {f"w{w}-{i}" for w in range(WRITERS) for i in range(SAVES)}
    assert len({c.id for c in saved}) == WRITERS * SAVES
    assert all(c.query == f"brightness__lt={c.name.split('-')[1]}" for c in saved)
    assert len(StateDB(path).list_reviews("image")) == SAVES // 10
