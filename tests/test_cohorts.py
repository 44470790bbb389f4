"""Cohort filter model, URL codec and SQL compiler: one table of cases, checked as SQL
text without a database and as image ids against a real store; round trips, errors,
frames and paging, saved parents, multilabel and detection frames, the CLI."""

from __future__ import annotations

import json
import pickle
import sqlite3
from types import MappingProxyType
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core import cohorts as C
from core.cohorts import Catalog, ColumnInfo, Cohort, Filter, ViewState
from core.errors import CohortError
from core.matching import match_detections
from core.state import StateDB
from core.store import Store, build_base

CLASSES = ["cat", "dog", "bird, small", "7"]  # "7" is a class *name* (id 3)
ODD = 'odd "name"; --'  # a user column whose name tries to break out of its quotes

# One row per image: the table-driven expectations below are read off these columns.
#   id tl bright  width camera  flag   tags        m1 pred score  odd   taken
ROWS = [
    (0, 0, 0.1, 10, "canon", True, ["a"], 0, 0.9, 0, "2021-01-05 10:00:00"),
    (1, 1, 0.2, 20, "nikon", False, ["a", "b"], 0, 0.6, 1, "2021-02-05 10:00:00"),
    (2, 2, 0.3, 30, "it's", True, [], 2, 0.8, 2, "2021-02-06 10:00:00"),
    (3, 3, 0.4, 40, "a,b", None, None, 3, 0.7, 3, None),
    (4, 0, 0.5, 50, None, False, ["b"], 1, 0.4, 4, "2021-03-05 10:00:00"),
    (5, 1, 0.6, 60, "50%", True, ["c, d"], 1, 0.95, 5, "2021-03-06 10:00:00"),
    (6, 2, 0.7, 70, "ünï", False, ["a"], 2, 0.5, 6, "2021-04-05 10:00:00"),
    (7, 3, 0.8, 80, "canon", True, ["b", "a"], 0, 0.3, 7, "2021-04-06 10:00:00"),
    (8, 0, 0.9, 90, "nikon", False, ["e%2Cf"], 0, 0.85, 8, "2021-05-05 10:00:00"),
    (9, 1, float("nan"), 100, "", True, ["a"], 1, 0.65, 9, "2021-05-06 10:00:00"),
    (10, 2, None, 110, "x;--", False, ["b"], 3, 0.45, 10, "2021-06-05 10:00:00"),
    (11, 3, 0.25, 120, "canon", True, ["a"], None, None, 11, "2021-06-06 10:00:00"),
]
ALL = list(range(len(ROWS)))


def multiclass_tables() -> dict:
    cols = list(zip(*ROWS))
    images = pa.table({
        "image_id": pa.array(cols[0], pa.int32()),
        "uri": pa.array([f"/img/{i}.jpg" for i in cols[0]]),
        "width": pa.array(cols[3], pa.int32()),
        "height": pa.array([8] * len(ROWS), pa.int32()),
        "true_label": pa.array(cols[1], pa.int32()),
        "brightness": pa.array(cols[2], pa.float64(), from_pandas=False),  # keeps NaN apart from NULL
        "camera": pa.array(cols[4], pa.string()),
        "flag": pa.array(cols[5], pa.bool_()),
        "tags": pa.array(cols[6], pa.list_(pa.string())),
        ODD: pa.array(cols[9], pa.int64()),
        "taken": pa.array(pd.to_datetime(list(cols[10])), pa.timestamp("us")),
    })
    columns = pd.DataFrame({
        "name": ["image_id", "true_label", "width", "height", "brightness", "camera", "flag", "tags", ODD, "taken"],
        "kind": ["numeric", "categorical", "numeric", "numeric", "numeric", "categorical", "boolean", "list",
                 "numeric", "categorical"],
        "source": ["derived", "derived", "auto", "auto", "auto", "user", "user", "user", "user", "auto"],
        "label": ["Image id", "True label", "Width", "Height", "Brightness", "Camera", "Flag", "Tags", "Odd",
                  "Taken"],
    })
    predicted = [r for r in ROWS if r[7] is not None]
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(len(CLASSES)), len(predicted)).astype(np.float32)
    predictions = pa.table({
        "model_id": pa.array(["m1"] * len(predicted) + ["m2"] * len(ROWS)),
        "image_id": pa.array([r[0] for r in predicted] + [r[0] for r in ROWS], pa.int32()),
        "pred_label": pa.array([r[7] for r in predicted] + [r[1] for r in ROWS], pa.int32()),
        "score": pa.array([r[8] for r in predicted] + [1.0] * len(ROWS), pa.float32()),
        "probs": pa.array([list(p) for p in probs] + [[0.25] * 4] * len(ROWS), pa.list_(pa.float32())),
    })
    models = pd.DataFrame({"model_id": ["m1", "m2"], "name": ["One", "Two"], "task": "multiclass",
                           "params": "{}"})
    canary = pd.DataFrame({"x": [1, 2, 3]})
    return {"images": images, "columns": columns, "predictions": predictions, "models": models,
            "canary": canary}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cohorts") / "mc.duckdb"
    build_base(path, multiclass_tables(), {"task": "multiclass", "classes": CLASSES, "name": "mc"})
    s = Store(path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def catalog(store):
    return C.catalog_of(store)


def manual_catalog() -> Catalog:
    """The catalog the fixture store should yield, written out: the SQL table needs no database."""
    info = [
        ColumnInfo("brightness", "Brightness", "numeric", "number", "auto", nan_is_null=True),
        ColumnInfo("camera", "Camera", "categorical", "text", "user"),
        ColumnInfo("flag", "Flag", "boolean", "boolean", "user"),
        ColumnInfo("height", "Height", "numeric", "number", "auto"),
        ColumnInfo(ODD, "Odd", "numeric", "number", "user"),
        ColumnInfo("tags", "Tags", "list", "text", "user", is_list=True),
        ColumnInfo("taken", "Taken", "categorical", "cast", "auto"),
        ColumnInfo("width", "Width", "numeric", "number", "auto"),
        ColumnInfo("image_id", "Image id", "numeric", "number", "derived"),
        ColumnInfo("true_label", "True label", "categorical", "class", "derived"),
        ColumnInfo("pred_label", "Predicted label", "categorical", "class", "model"),
        ColumnInfo("outcome", "Outcome", "categorical", "outcome", "model"),
        ColumnInfo("error", "Error", "boolean", "boolean", "model"),
        ColumnInfo("score", "Score", "numeric", "number", "model", nan_is_null=True, param_cast="FLOAT"),
    ]
    return Catalog("multiclass", tuple(CLASSES), {c.name: c for c in info}, models=("m1", "m2"))


# query → (condition SQL, params, image ids of model m1)
CASES = [
    ("brightness__lt=0.3", '"brightness" < ?', [0.3], [0, 1, 11]),
    ("brightness__gte=0.8", '"brightness" >= ?', [0.8], [7, 8]),  # NaN is missing, not "above all"
    ("brightness__between=0.2,0.4", '"brightness" BETWEEN ? AND ?', [0.2, 0.4], [1, 2, 3, 11]),
    ("brightness__isnull=true", '"brightness" IS NULL', [], [9, 10]),
    ("brightness__notnull=", '"brightness" IS NOT NULL', [], [0, 1, 2, 3, 4, 5, 6, 7, 8, 11]),
    ("width__in=10,30,999", '"width" = ANY(?)', [[10, 30, 999]], [0, 2]),
    ("width__notin=30,10", 'NOT coalesce("width" = ANY(?), false)', [[10, 30]],
     [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    ("width__ne=20", '"width" IS DISTINCT FROM ?', [20], [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    ("width__in=10,25.5", '"width" = ANY(?)', [[10.0, 25.5]], [0]),
    ("camera__eq=canon", '"camera" = ?', ["canon"], [0, 7, 11]),
    ("camera__ne=canon", '"camera" IS DISTINCT FROM ?', ["canon"], [1, 2, 3, 4, 5, 6, 8, 9, 10]),
    ("camera__in=a%252Cb,nikon", '"camera" = ANY(?)', [["a,b", "nikon"]], [1, 3, 8]),
    ("camera__eq=a,b", '"camera" = ?', ["a,b"], [3]),  # one value: the comma is the value's own
    ("camera__contains=%27", 'contains("camera", ?)', ["'"], [2]),
    ("camera__contains=%25", 'contains("camera", ?)', ["%"], [5]),
    ("camera__eq=", '"camera" = ?', [""], [9]),
    ("camera__eq=%C3%BCn%C3%AF", '"camera" = ?', ["ünï"], [6]),
    ("camera__eq=x%3B--", '"camera" = ?', ["x;--"], [10]),
    ("camera__notin=canon,nikon", 'NOT coalesce("camera" = ANY(?), false)', [["canon", "nikon"]],
     [2, 3, 4, 5, 6, 9, 10]),
    ("flag__eq=true", '"flag" = ?', [True], [0, 2, 5, 7, 9, 11]),
    ("flag__ne=TRUE", '"flag" IS DISTINCT FROM ?', [True], [1, 3, 4, 6, 8, 10]),
    ("tags__contains=a", 'list_contains("tags", ?)', ["a"], [0, 1, 6, 7, 9, 11]),
    ("tags__contains=c%2C%20d", 'list_contains("tags", ?)', ["c, d"], [5]),
    ("tags__in=b,c%252C%20d", 'list_has_any("tags", ?)', [["b", "c, d"]], [1, 4, 5, 7, 10]),
    ("tags__notin=a", 'NOT coalesce(list_has_any("tags", ?), false)', [["a"]], [2, 3, 4, 5, 8, 10]),
    ("tags__isnull=1", 'coalesce(len("tags"), 0) = 0', [], [2, 3]),
    ("tags__notnull=true", 'coalesce(len("tags"), 0) > 0', [], [0, 1, 4, 5, 6, 7, 8, 9, 10, 11]),
    ("true_label__eq=cat", '"true_label" = ?', [0], [0, 4, 8]),
    ("true_label__eq=7", '"true_label" = ?', [3], [3, 7, 11]),  # the class named "7"
    ("true_label__eq=2", '"true_label" = ?', [2], [2, 6, 10]),  # no class named "2": class id 2
    ("true_label__in=dog,bird%252C%20small", '"true_label" = ANY(?)', [[2, 1]], [1, 2, 5, 6, 9, 10]),
    ("pred_label__ne=cat", '"pred_label" IS DISTINCT FROM ?', [0], [2, 3, 4, 5, 6, 9, 10, 11]),
    ("outcome__eq=incorrect", '"outcome" = ?', ["incorrect"], [1, 4, 7, 10]),
    ("outcome__in=correct", '"outcome" = ANY(?)', [["correct"]], [0, 2, 3, 5, 6, 8, 9]),
    ("outcome__isnull=true", '"outcome" IS NULL', [], [11]),
    ("error__eq=true", '"error" = ?', [True], [1, 4, 7, 10]),
    ("score__gt=0.8", '"score" > CAST(? AS FLOAT)', [0.8], [0, 5, 8]),  # FLOAT 0.8 is not above 0.8
    ("score__lte=0.45", '"score" <= CAST(? AS FLOAT)', [0.45], [4, 7, 10]),
    ("image_id__in=5,1,3", '"image_id" = ANY(?)', [[1, 3, 5]], [1, 3, 5]),
    ("image_id__gte=9", '"image_id" >= ?', [9], [9, 10, 11]),
    ("odd%20%22name%22%3B%20--__gt=8", '"odd ""name""; --" > ?', [8], [9, 10, 11]),
    ("taken__contains=2021-02", 'contains(CAST("taken" AS VARCHAR), ?)', ["2021-02"], [1, 2]),
    ("g1.brightness__lt=0.2&g2.camera__eq=nikon&g2.width__gt=50",
     '(("brightness" < ?) OR ("camera" = ? AND "width" > ?))', [0.2, "nikon", 50], [0, 8]),
    ("flag__eq=true&g1.width__lt=30&g2.width__gt=100",
     '"flag" = ? AND (("width" > ?) OR ("width" < ?))', [True, 100, 30], [0, 11]),  # groups sorted
    ("camera__eq=canon&camera__eq=canon&width__gt=5", '"camera" = ? AND "width" > ?', ["canon", 5], [0, 7, 11]),
    ("", "", [], ALL),
]


@pytest.mark.parametrize("query, sql, params, ids", CASES, ids=[c[0] or "everything" for c in CASES])
def test_query_compiles_to_sql(query, sql, params, ids):
    catalog = manual_catalog()
    assert C.where_sql(C.parse_query(query, catalog).cohort, catalog) == (sql, params)


@pytest.mark.parametrize("query, sql, params, ids", CASES, ids=[c[0] or "everything" for c in CASES])
def test_query_selects_images(store, catalog, query, sql, params, ids):
    parsed = C.parse_query(query, catalog)
    selection = C.compile_cohort(parsed, store, model_id="m1")
    assert sorted(r[0] for r in store.rows(*selection)) == ids
    assert C.cohort_count(store, parsed, "m1") == len(ids)
    assert store.rows("SELECT count(*) FROM canary") == [(3,)]


def test_store_catalog_is_the_written_one(catalog):
    manual = manual_catalog()
    assert dict(catalog.columns) == dict(manual.columns)
    assert catalog.models == ("m1", "m2")
    assert catalog.classes == tuple(CLASSES)


ROUND_TRIPS = [
    ("?brightness__lt=.30&camera__eq=canon", "brightness__lt=0.3&camera__eq=canon"),
    ("camera__eq=canon&brightness__lt=0.3", "brightness__lt=0.3&camera__eq=canon"),
    ("true_label__in=1,cat", "true_label__in=cat,dog"),
    ("true_label__in=3", "true_label__in=7"),
    ("g3.width__gt=1&g1.width__lt=0", "g1.width__gt=1&g2.width__lt=0"),
    ("g1.width__gt=1&g2.width__gt=1", "g1.width__gt=1"),
    ("camera__in=b,a,b", "camera__in=a,b"),
    ("brightness__isnull=1", "brightness__isnull=true"),
    ("cohort=3&brightness__lt=.5", "cohort=3&brightness__lt=0.5"),
    ("flag__eq=YES", "flag__eq=true"),
    ("width__eq=+7", "width__eq=7"),
    ("width__eq=1e3", "width__eq=1000.0"),
    ("width__eq=99999999999999999999", "width__eq=1e%2B20"),
    ("camera__eq=a+b", "camera__eq=a%20b"),
    ("camera__eq=a%2Bb", "camera__eq=a%2Bb"),
    ("camera__eq=a,b", "camera__eq=a,b"),
    ("camera__in=a%252Cb", "camera__in=a%252Cb"),
    ("camera__eq=100%25", "camera__eq=100%2525"),
    ("outcome__eq=Correct", "outcome__eq=correct"),
    ("image=5&page=2&view=grid&thr=0.25&conf=0.3&iou=0.50&model=m1&store=demo-multiclass",
     "store=demo-multiclass&model=m1&iou=0.5&conf=0.3&thr=0.25&view=grid&page=2&image=5"),
]


@pytest.mark.parametrize("query, canonical", ROUND_TRIPS)
def test_canonical_round_trip(catalog, query, canonical):
    parsed = C.parse_query(query, catalog)
    assert C.to_query(parsed) == canonical
    again = C.parse_query(canonical, catalog)
    assert again == parsed
    assert C.to_query(again) == canonical
    # As Streamlit holds them (decoded once), the same parameters read back alike.
    assert C.parse_query(C.to_query_params(parsed), catalog) == parsed
    assert C.parse_query(dict(parse_qsl(canonical, keep_blank_values=True)), catalog) == parsed


def test_mapping_with_lists_and_repeated_keys(catalog):
    parsed = C.parse_query({"width__gt": ["1", "5"], "model": "m1"}, catalog)
    assert parsed.cohort.filters == (Filter("width", "gt", 1), Filter("width", "gt", 5))
    assert C.to_query_params(parsed) == {"width__gt": ["1", "5"], "model": "m1"}
    assert C.parse_query(MappingProxyType({"camera__eq": "a,b"}), catalog).cohort.filters == \
        (Filter("camera", "eq", "a,b"),)


ERRORS = [
    ("brigthness__lt=0.3", "brigthness__lt", "unknown column 'brigthness'", "brightness"),
    ("brightness__lt=abc", "brightness__lt", "'abc' is not a number", None),
    ("brightness__lt=nan", "brightness__lt", "'nan' is not a number", None),
    ("brightness__lt=1e999", "brightness__lt", "not a finite number", None),
    ("brightness__lt=1_000", "brightness__lt", "not a number", None),
    ("brightness__lt=%D9%A3", "brightness__lt", "not a number", None),  # Arabic-Indic digit three
    ("brightness__between=1", "brightness__between", "between takes two values", None),
    ("brightness__between=2,1", "brightness__between", "lower bound 2 is above upper bound 1", None),
    ("brightness__like=x", "brightness__like", "unknown operator 'like'", "lt"),
    ("camera__lt=x", "camera__lt", "does not apply to camera (text)", "contains"),
    ("tags__eq=a", "tags__eq", "does not apply to tags (list)", "contains"),
    ("brightness__isnull=false", "brightness__isnull", "isnull takes no value", None),
    ("true_label__eq=kitten", "true_label__eq", "'kitten' is not a class", "dog"),
    ("true_label__eq=9", "true_label__eq", "'9' is not a class", "cat"),
    ("outcome__eq=wrong", "outcome__eq", "'wrong' is not an outcome", "incorrect"),
    ("flag__eq=maybe", "flag__eq", "not true or false", None),
    ("sharpness=3", "sharpness", "unknown parameter 'sharpness'", "model"),
    ("g1.nope__eq=1", "g1.nope__eq", "unknown column 'nope'", "width"),
    ("cohort=x", "cohort", "saved cohort id", None),
    ("cohort=0", "cohort", "saved cohort id", None),
    ("cohort=1&cohort=2", "cohort", "more than once", None),
    ("model=m9", "model", "unknown model 'm9'", "m1"),
    ("model=a/b", "model", "not a valid name", None),
    ("iou=0", "iou", "iou must be in (0, 1]", None),
    ("conf=1.5", "conf", "conf must be in [0, 1]", None),
    ("page=0", "page", "page must be an integer ≥ 1", None),
    ("image=-1", "image", "image must be an integer ≥ 0", None),
    ("model=m1&model=m2", "model", "more than once", None),
    ("page=" + "9" * 5000, "page", "must be an integer", None),  # past Python's int() digit limit
    ("cohort=" + "9" * 5000, "cohort", "saved cohort id", None),
    ("true_label__eq=" + "9" * 5000, "true_label__eq", "is not a class", "cat"),
    ("width__gt=" + "9" * 5000, "width__gt", "not a finite number", None),
]


@pytest.mark.parametrize("query, field, message, choice", ERRORS)
def test_bad_queries_are_clear_errors(catalog, query, field, message, choice):
    with pytest.raises(CohortError) as caught:
        C.parse_query(query, catalog)
    error = caught.value
    assert error.field == field
    assert message in error.message
    if choice is not None:
        assert choice in error.choices
    assert "SELECT" not in str(error) and "Traceback" not in str(error)
    lenient = C.parse_query_lenient(query, catalog)
    assert [e.field for e in lenient.errors] == [field]


def test_lenient_parse_leaves_out_the_bad_parts_and_keeps_the_rest(catalog):
    parsed = C.parse_query_lenient("brightness__lt=abc&width__gt=5&model=m2&iou=7&true_label__eq=zz", catalog)
    assert parsed.cohort == Cohort((Filter("width", "gt", 5),))
    assert parsed.view == ViewState(model="m2")
    assert [e.field for e in parsed.errors] == ["brightness__lt", "iou", "true_label__eq"]
    view_only = C.parse_query_lenient("width__gt=5&page=x", catalog)
    assert view_only.cohort == Cohort((Filter("width", "gt", 5),))
    assert view_only.view == ViewState()


def test_too_many_filters(catalog):
    query = "&".join(f"width__gt={i}" for i in range(C.MAX_FILTERS + 1))
    with pytest.raises(CohortError, match="save the cohort"):
        C.parse_query(query, catalog)


def test_filters_are_canonical_values():
    assert Filter("x", "in", [3, 1, 3]).value == (1, 3)
    assert Filter("x", "isnull", "anything").value is None
    assert Cohort((Filter("b", "eq", 1), Filter("a", "eq", 2), Filter("b", "eq", 1))).filters == \
        (Filter("a", "eq", 2), Filter("b", "eq", 1))
    with pytest.raises(CohortError):
        Filter("x", "between", (1,))
    with pytest.raises(CohortError):
        Filter("x", "nope", 1)
    with pytest.raises(CohortError):
        Filter("x", "in", [])


def test_describe(catalog):
    parsed = C.parse_query("cohort=4&brightness__lt=0.3&camera__in=canon,nikon&true_label__in=bird%252C%20small,cat"
                           "&tags__contains=a&tags__isnull=true&g1.width__between=1,5&g2.flag__eq=true", catalog)
    assert C.describe(parsed, catalog) == [
        "in saved cohort #4",
        "Brightness is less than 0.3",
        "Camera is one of 'canon', 'nikon'",
        "Tags includes 'a'",
        "Tags is empty",
        "True label is one of 'bird, small', cat",
        "either (Flag is true) or (Width is between 1 and 5)",
    ]
    assert C.describe(Cohort()) == ["all images"]
    assert C.describe(C.selection_cohort(range(20)))[0].endswith("… (20 values)")


def test_frame_rows_paging_and_sorting(store, catalog):
    cohort = C.parse_query("width__gt=15", catalog).cohort
    page = C.cohort_rows(store, cohort, "m1", columns=["image_id", "brightness", "outcome"],
                         order_by="-brightness", limit=4, offset=2)
    assert page["image_id"].tolist() == [6, 5, 4, 3]  # 0.9 and 0.8 are on page one
    assert list(page.columns) == ["image_id", "brightness", "outcome"]
    tail = C.cohort_rows(store, cohort, "m1", columns=["image_id"], order_by="brightness", offset=8)
    assert tail["image_id"].tolist() == [8, 9, 10]  # missing values last, ties by image id
    everything = C.cohort_rows(store, Cohort(), "m1")
    assert list(everything.columns) == list(catalog.frame_columns())
    assert everything["image_id"].tolist() == ALL
    assert pd.isna(everything.loc[9, "brightness"]) and pd.isna(everything.loc[10, "brightness"])
    assert everything.loc[11, ["pred_label", "outcome", "error"]].isna().all()
    assert everything.loc[1, "outcome"] == "incorrect" and bool(everything.loc[1, "error"])
    assert everything["tags"].iloc[7].tolist() == ["b", "a"]
    by_score = C.cohort_rows(store, Cohort(), "m1", columns=["tags", "outcome"], order_by=["-score", "width"], limit=3)
    assert [list(t) for t in by_score["tags"]] == [["c, d"], ["a"], ["e%2Cf"]]  # images 5, 0, 8
    assert by_score["outcome"].tolist() == ["correct"] * 3
    with pytest.raises(CohortError, match="at least one column"):
        C.cohort_rows(store, cohort, "m1", columns=[])
    no_model = C.cohort_rows(store, cohort, None, columns=["image_id", "width"])
    assert len(no_model) == 11
    with pytest.raises(CohortError, match="cannot sort by"):
        C.cohort_rows(store, cohort, "m1", order_by="nope")
    with pytest.raises(CohortError, match="non-negative"):
        C.cohort_rows(store, cohort, "m1", limit=-1)
    with pytest.raises(CohortError, match="needs a model"):
        C.cohort_rows(store, C.parse_query("outcome__eq=correct", catalog), None, columns=["image_id"])
    with pytest.raises(CohortError, match="unknown model"):
        C.compile_cohort(cohort, store, model_id="m9")


def test_model_columns_follow_the_model(store, catalog):
    cohort = C.parse_query("outcome__eq=incorrect", catalog)
    assert C.cohort_count(store, cohort, "m2") == 0  # m2 predicts every true label
    assert C.cohort_count(store, cohort, "m1") == 4


def test_metadata_cohort_reads_images_only(store, catalog):
    sql, params = C.compile_cohort(C.parse_query("brightness__lt=0.3", catalog), store, model_id="m1")
    assert "predictions" not in sql and params == [0.3]


def test_selection_pickles_and_unpacks(store, catalog):
    selection = C.compile_cohort(C.parse_query("outcome__eq=incorrect", catalog), store, model_id="m1")
    sql, params = selection
    copy = pickle.loads(pickle.dumps(selection))
    assert tuple(copy) == (sql, params) and copy.filter_columns == ("outcome",)
    assert copy.frame_query(store, "m2", ["image_id"]) is None  # the filter reads m1's outcome
    rows_sql = copy.frame_query(store, "m1", ["image_id"])
    assert sorted(r[0] for r in store.rows(*rows_sql)) == [1, 4, 7, 10]


def test_saved_and_hierarchical_cohorts(store, catalog):
    state = StateDB.for_store(store.paths.base)
    parent = state.create_cohort("bright", C.parse_query("brightness__gte=0.5", catalog).cohort)
    child = state.create_cohort("bright canon", C.parse_query(f"cohort={parent.id}&camera__eq=canon",
                                                              catalog).cohort)
    assert child.parent_id == parent.id and child.query == "camera__eq=canon"
    refined = C.parse_query(f"cohort={child.id}&width__lt=75", catalog)
    assert sorted(r[0] for r in store.rows(*C.compile_cohort(refined, store, model_id="m1"))) == []
    refined = C.parse_query(f"cohort={child.id}&width__lt=85", catalog)
    assert sorted(r[0] for r in store.rows(*C.compile_cohort(refined, store, model_id="m1"))) == [7]
    picked = state.create_cohort("picked", image_ids=[3, 1, 8])
    assert C.cohort_count(store, C.parse_query(f"cohort={picked.id}&width__gt=25", catalog), "m1") == 2
    assert C.describe(C.parse_query(f"cohort={parent.id}", catalog), catalog, state) == \
        [f"in saved cohort 'bright' (#{parent.id})"]
    with pytest.raises(CohortError, match="no saved cohort #999"):
        C.compile_cohort(C.parse_query("cohort=999", catalog), store, model_id="m1")
    # A cycle written behind the state API's back is caught when compiling.
    with sqlite3.connect(state.path) as con:
        con.execute("UPDATE cohorts SET parent_id = ? WHERE id = ?", (child.id, parent.id))
    with pytest.raises(CohortError, match="cycle"):
        C.compile_cohort(C.parse_query(f"cohort={child.id}", catalog), store, model_id="m1")
    with sqlite3.connect(state.path) as con:
        con.execute("UPDATE cohorts SET parent_id = NULL WHERE id = ?", (parent.id,))


def test_summary_and_cli(store, catalog, capsys):
    summary = C.cohort_summary(store, "true_label__in=cat,dog&model=m1")
    assert summary["count"] == 6 and summary["model"] == "m1"
    assert summary["metrics"]["accuracy"] == pytest.approx(4 / 6)  # images 0, 8, 5, 9 of 0, 1, 4, 5, 8, 9
    assert summary["metrics"]["n_missing"] == 0
    assert C.cohort_main([str(store.paths.base), "width__gt=100", "--json", "--model", "m1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 2 and out["metrics"]["n_missing"] == 1 and out["metrics"]["n_evaluated"] == 1
    assert C.cohort_main([str(store.paths.base), "camera__eq=canon"]) == 0
    text = capsys.readouterr().out
    assert "images: 3" in text and "Camera is 'canon'" in text and "accuracy" in text
    assert C.cohort_main([str(store.paths.base), "brightness__lt=x"]) == 2
    err = capsys.readouterr().err
    assert "'x' is not a number" in err and "Traceback" not in err
    assert C.cohort_main([str(store.paths.base / "missing"), ""]) == 2


# --------------------------------------------------------------------------- multilabel


LABELS = ["person", "car", "tree"]
ML_TRUE = [[0], [0, 1], [], [2, 1], [1], [0, 2]]
ML_PROBS = [[0.9, 0.1, 0.2], [0.6, 0.4, 0.1], [0.1, 0.1, 0.1], [0.2, 0.7, 0.8], [0.3, 0.45, 0.6], [0.55, 0.2, 0.7]]


@pytest.fixture(scope="module")
def ml_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ml") / "ml.duckdb"
    n = len(ML_TRUE)
    images = pa.table({"image_id": pa.array(range(n), pa.int32()), "uri": [f"/i/{i}" for i in range(n)],
                       "width": pa.array([5] * n, pa.int32()), "height": pa.array([5] * n, pa.int32()),
                       "true_label": pa.array(ML_TRUE, pa.list_(pa.int32()))})
    predictions = pa.table({"model_id": ["m"] * n, "image_id": pa.array(range(n), pa.int32()),
                            "probs": pa.array(ML_PROBS, pa.list_(pa.float32())),
                            "pred_labels": pa.array([[k for k, p in enumerate(r) if p >= 0.5] for r in ML_PROBS],
                                                    pa.list_(pa.int32()))})
    columns = pd.DataFrame({"name": ["image_id", "true_label"], "kind": ["numeric", "list"],
                            "source": ["derived", "derived"], "label": ["Image id", "True labels"]})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multilabel"], "params": ["{}"]})
    build_base(path, {"images": images, "predictions": predictions, "columns": columns, "models": models},
               {"task": "multilabel", "classes": LABELS, "label_threshold": 0.5})
    s = Store(path)
    yield s
    s.close()


def test_multilabel_frame_at_live_threshold(ml_store):
    catalog = C.catalog_of(ml_store)
    assert catalog.columns["true_label"].is_list and catalog.columns["pred_label"].is_list

    def ids(query, thr):
        parsed = C.parse_query(query, catalog)
        return sorted(r[0] for r in ml_store.rows(*C.compile_cohort(parsed, ml_store, model_id="m",
                                                                       label_threshold=thr)))

    assert ids("true_label__contains=car", 0.5) == [1, 3, 4]
    assert ids("true_label__in=tree,1", 0.5) == [1, 3, 4, 5]
    assert ids("true_label__isnull=true", 0.5) == [2]
    assert ids("pred_label__contains=car", 0.5) == [3]
    assert ids("pred_label__contains=car", 0.4) == [1, 3, 4]
    assert ids("outcome__eq=correct", 0.5) == [0, 2, 3, 5]
    assert ids("outcome__eq=correct", 0.3) == [0, 1, 2, 3, 5]  # image 4 now predicts every label
    assert ids("error__eq=true", 0.5) == [1, 4]
    assert ids("score__gte=0.7", 0.5) == [0, 3, 5]
    frame = C.cohort_rows(ml_store, Cohort(), "m", label_threshold=0.45, columns=["image_id", "pred_label"])
    assert [list(v) for v in frame["pred_label"]] == [[0], [0], [], [1, 2], [1, 2], [0, 2]]
    summary = C.cohort_summary(ml_store, "thr=0.5")
    assert summary["metrics"]["exact_match"] == pytest.approx(4 / 6)


# --------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def det_store(tmp_path_factory):
    """Five toy images: empty, GT only, detection only, a match, a class mix-up (+ a low-score match)."""
    path = tmp_path_factory.mktemp("det") / "det.duckdb"
    box = {"xmin": 10.0, "ymin": 10.0, "xmax": 50.0, "ymax": 50.0}
    gt = pd.DataFrame([{"image_id": 1, "gt_id": 0, "class_id": 0, **box},
                       {"image_id": 3, "gt_id": 1, "class_id": 1, **box},
                       {"image_id": 4, "gt_id": 2, "class_id": 0, **box}])
    gt["area"] = 1600.0
    gt["iscrowd"] = False
    det = pd.DataFrame([{"image_id": 2, "det_id": 0, "class_id": 0, "score": 0.9, **box},
                        {"image_id": 3, "det_id": 1, "class_id": 1, "score": 0.8, **box},
                        {"image_id": 4, "det_id": 2, "class_id": 1, "score": 0.7, **box},
                        {"image_id": 4, "det_id": 3, "class_id": 0, "score": 0.2, **box}])
    det["area"] = 1600.0
    det_matches, gt_matches = match_detections(gt, det)
    for frame in (det, det_matches, gt_matches):
        frame.insert(0, "model_id", "d")
    images = pa.table({"image_id": pa.array(range(5), pa.int32()), "uri": [f"/d/{i}" for i in range(5)],
                       "width": pa.array([64] * 5, pa.int32()), "height": pa.array([64] * 5, pa.int32()),
                       "true_label": pa.array([[], [0], [], [1], [0]], pa.list_(pa.int32()))})
    columns = pd.DataFrame({"name": ["image_id", "true_label"], "kind": ["numeric", "list"],
                            "source": ["derived", "derived"], "label": ["Image id", "True classes"]})
    models = pd.DataFrame({"model_id": ["d"], "name": ["D"], "task": ["detection"], "params": ["{}"]})
    build_base(path, {"images": images, "gt_boxes": gt, "det_boxes": det, "det_matches": det_matches,
                      "gt_matches": gt_matches, "columns": columns, "models": models},
               {"task": "detection", "classes": ["a", "b"], "score_threshold": 0.5})
    s = Store(path)
    yield s
    s.close()


def test_detection_frame_counts(det_store):
    catalog = C.catalog_of(det_store)
    frame = C.cohort_rows(det_store, Cohort(), "d", score_threshold=0.5,
                          columns=["image_id", "n_tp", "n_fp", "n_fn", "outcome", "error", "score", "pred_label"])
    assert frame[["n_tp", "n_fp", "n_fn"]].to_numpy().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0],
                                                                    [0, 1, 1]]
    assert frame["outcome"].tolist() == ["correct", "incorrect", "incorrect", "correct", "incorrect"]
    assert frame["error"].tolist() == [False, True, True, False, True]
    assert [list(v) for v in frame["pred_label"]] == [[], [], [0], [1], [1]]
    assert frame["score"].iloc[4] == pytest.approx(0.7) and pd.isna(frame["score"].iloc[0])
    low = C.cohort_rows(det_store, Cohort(), "d", score_threshold=0.1, columns=["image_id", "n_tp", "n_fn"])
    assert low[["n_tp", "n_fn"]].to_numpy().tolist()[4] == [1, 0]  # the 0.2 detection now counts

    def ids(query, **kw):
        return sorted(r[0] for r in det_store.rows(*C.compile_cohort(C.parse_query(query, catalog), det_store,
                                                                        model_id="d", **kw)))

    assert ids("n_fn__gt=0") == [1, 4]
    assert ids("n_fp__gte=1&true_label__contains=a") == [4]
    assert ids("outcome__eq=correct") == [0, 3]
    assert ids("pred_label__contains=a", score_threshold=0.1) == [2, 4]
    with pytest.raises(CohortError) as caught:
        ids("n_tp__gt=0", iou=0.33)
    assert caught.value.field == "iou"
    summary = C.cohort_summary(det_store, "n_fn__gt=0&iou=0.5")
    assert summary["count"] == 2 and "AP" in summary["metrics"] and "mAP" in summary["metrics"]


def test_store_param_and_odd_text(catalog):
    assert C.read_store_param("?store=demo-multiclass&brightness__lt=x") == "demo-multiclass"
    assert C.read_store_param({"model": "m1"}) is None
    with pytest.raises(CohortError, match="not a valid name"):
        C.read_store_param("store=..%2F..%2Fetc")
    with pytest.raises(CohortError, match="not valid text"):
        C.parse_query({"camera__eq": "\ud800"}, catalog)  # a lone surrogate cannot reach DuckDB
    long_value = "x" * 20000
    parsed = C.parse_query({"camera__contains": long_value}, catalog)
    assert parsed.cohort.filters[0].value == long_value
    with pytest.raises(CohortError) as caught:
        C.parse_query({"brightness__lt": long_value}, catalog)
    assert len(caught.value.message) < 200  # the bad value is shown shortened


def test_large_selections_stay_fast_and_links_stay_short(store, catalog):
    big = C.selection_cohort(range(0, 20000, 2))
    assert C.cohort_count(store, big, "m1") == 6  # 0, 2, …, 10 exist
    sql, params = C.compile_cohort(big, store, model_id="m1")
    assert "?" not in sql and not params and "derived." in sql  # the 10,000 ids: a table of the store, bound once
    state = StateDB.for_store(store.paths.base)
    parsed = C.ParsedQuery(big, ViewState(model="m1"))
    link = state.short_query(parsed)
    assert len(C.to_query(parsed)) > 2000 and link.startswith("cohort=") and link.endswith("&model=m1")
    linked = C.parse_query(link, catalog)
    assert state.get_cohort(linked.cohort.parent_id).image_ids == tuple(range(0, 20000, 2))
    assert C.cohort_count(store, linked, "m1") == 6
    filtered = C.ParsedQuery(Cohort(tuple(Filter("width", "ne", i) for i in range(300, 600))))
    linked = C.parse_query(state.short_query(filtered, name="many"), catalog)
    assert C.cohort_count(store, linked, "m1") == C.cohort_count(store, filtered, "m1") == 12
    assert C.to_query(C.parse_query("width__gt=5", catalog)) == state.short_query(C.parse_query("width__gt=5",
                                                                                                   catalog))


def test_large_value_sets_are_a_table_of_the_store(store, catalog, monkeypatch):
    """Past LARGE_VALUE_SET values, in/notin read the values from a derived table: the same images."""
    odd = tuple(range(1, 2 * C.LARGE_VALUE_SET + 3, 2))  # more values than the limit; ids 1, 3, .., 11 stored
    cases = [(Filter("image_id", "in", odd), [1, 3, 5, 7, 9, 11]),
             (Filter("image_id", "notin", odd), [0, 2, 4, 6, 8, 10]),
             (Filter("camera", "in", ("canon", "nikon", *(f"c{i}" for i in range(C.LARGE_VALUE_SET)))), [0, 1, 7, 8, 11]),
             (Filter("brightness", "notin", (0.1, 0.2, *(i + 0.5 for i in range(C.LARGE_VALUE_SET)))),
              [2, 3, 5, 6, 7, 8, 9, 10, 11])]  # 0.1, 0.2 and 0.5 (image 4) are in the set
    for f, ids in cases:
        sql, params = C.compile_cohort(Cohort((f,)), store, model_id=None, catalog=catalog)
        assert "derived." in sql and all(not isinstance(p, list) or len(p) < 100 for p in params)
        assert sorted(r[0] for r in store.rows(sql, params)) == ids, f
        monkeypatch.setattr(C, "LARGE_VALUE_SET", 10 ** 9)  # the list parameter: the same images
        sql, params = C.compile_cohort(Cohort((f,)), store, model_id=None, catalog=catalog)
        assert "derived." not in sql and sorted(r[0] for r in store.rows(sql, params)) == ids, f
        monkeypatch.undo()
    state = StateDB.for_store(store.paths.base)
    saved = state.create_cohort("odd ones", C.selection_cohort(odd))
    assert C.cohort_count(store, Cohort(parent_id=saved.id), None, state=state) == 6
    assert C.cohort_count(store, Cohort((Filter("flag", "eq", True),), parent_id=saved.id), None, state=state) == 4
    state.delete_cohort(saved.id)


def test_number_sets_sort_as_numbers_and_mixed_sets_by_kind():
    assert Filter("image_id", "in", (5, 3, 3, 10)).value == (3, 5, 10)
    assert Filter("camera", "in", ("b", 2, "a", 1.5)).value == (1.5, 2, "a", "b")
    numbers, texts = Filter("x", "in", (2, 1)), Filter("x", "in", ("a",))
    assert Cohort((texts, numbers)).filters == (numbers, texts)  # keys of either kind compare


def test_numbers_read_rounded_on_screen_and_exact_in_urls():
    from core.cohorts import display_number, format_number

    shown = [display_number(v) for v in (5 / 6, 4 / 3, 0.16699938398692812, 2.0, 12345.678, 0.00012, -1.5)]
    assert shown == ["0.8333", "1.333", "0.167", "2", "12345.7", "0.00012", "-1.5"]
    assert format_number(5 / 6) == "0.8333333333333334"
