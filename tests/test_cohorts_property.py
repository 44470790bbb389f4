"""Property tests of the cohort codec and compiler over 10,900 generated query strings
(600 structured cohorts, 800 hostile strings, 1,000 arbitrary inputs, 250 seeded batches of 34).

Hostile input (quotes, semicolons, SQL comments, percent signs, commas, unicode,
NUL, very long values) either parses or raises CohortError, nothing else; a
parsed query reaches a canonical fixed point; every cohort selects exactly the
images an independent pandas filter selects on the same data; and a canary
table is still there afterwards (values are parameters, identifiers quoted).
"""

from __future__ import annotations

import random
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import cohorts as C
from core.cohorts import Cohort, Filter
from core.errors import CohortError
from core.store import Store, build_base

HOSTILE = ["'", '"', ";", "--", "/*", "*/", "%", "%25", "%2C", "%252C", ",", "&", "=", "+", " ", "\\", "\x00",
           "é", "ünï", "😀", "' OR '1'='1", "'; DROP TABLE canary; --", "\"); DELETE FROM images; --",
           "a" * 3000, "9" * 5000, "1" * 25, "__", "g1.", "?", "#", "\n"]
CLASSES = ["cat", "dog's", "a,b", "50%", "ünï", "7", "x; DROP TABLE canary; --"]
ODD = 'we"ird; --col'
N = 40


WORDS = ["canon", "nikon", "", "it's", "a,b", "50%", "😀", "'; DROP TABLE canary; --", "x%2Cy"]


def dataset() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    words = WORDS
    camera = [None if i % 9 == 4 else words[int(rng.integers(0, len(words)))] for i in range(N)]
    tags = [None if i % 11 == 3 else [words[int(j)] for j in rng.integers(0, len(words), int(rng.integers(0, 3)))]
            for i in range(N)]
    brightness = np.round(rng.random(N), 2)
    brightness[[5, 17]] = np.nan
    pred = [None if i % 13 == 7 else int(rng.integers(0, len(CLASSES))) for i in range(N)]
    score = np.round(rng.random(N), 2).astype(np.float32)
    return pd.DataFrame({
        "image_id": np.arange(N), "true_label": rng.integers(0, len(CLASSES), N), "brightness": brightness,
        "null_brightness": [i in (5, 30) for i in range(N)],  # rows 5 and 30 are NULL, row 17 is NaN
        "width": rng.integers(1, 6, N) * 10, "camera": camera,
        "flag": [None if i % 7 == 2 else bool(rng.random() < 0.5) for i in range(N)],
        "tags": tags, ODD: rng.integers(-3, 3, N), "pred_label": pred,
        "score": [None if p is None else float(s) for p, s in zip(pred, score)],
    })


DATA = dataset()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = DATA
    brightness = [None if null else b for null, b in zip(d["null_brightness"], d["brightness"])]
    images = pa.table({
        "image_id": pa.array(d["image_id"], pa.int32()), "uri": [f"/p/{i}" for i in range(N)],
        "width": pa.array(d["width"], pa.int32()), "height": pa.array([1] * N, pa.int32()),
        "true_label": pa.array(d["true_label"], pa.int32()),
        "brightness": pa.array(brightness, pa.float64(), from_pandas=False),
        "camera": pa.array(d["camera"], pa.string()), "flag": pa.array(d["flag"], pa.bool_()),
        "tags": pa.array(d["tags"], pa.list_(pa.string())), ODD: pa.array(d[ODD], pa.int64()),
    })
    has = d["pred_label"].notna().to_numpy()
    predictions = pa.table({
        "model_id": ["m1"] * int(has.sum()), "image_id": pa.array(d["image_id"][has], pa.int32()),
        "pred_label": pa.array(d["pred_label"][has].astype(int), pa.int32()),
        "score": pa.array(d["score"][has].astype(float), pa.float32()),
    })
    names = ["image_id", "true_label", "brightness", "width", "camera", "flag", "tags", ODD]
    columns = pd.DataFrame({"name": names, "kind": ["numeric", "categorical", "numeric", "numeric", "categorical",
                                                    "boolean", "list", "numeric"],
                            "source": "user", "label": names})
    models = pd.DataFrame({"model_id": ["m1"], "name": ["M1"], "task": ["multiclass"], "params": ["{}"]})
    path = tmp_path_factory.mktemp("prop") / "prop.duckdb"
    build_base(path, {"images": images, "predictions": predictions, "columns": columns, "models": models,
                      "canary": pd.DataFrame({"alive": [1, 2]})}, {"task": "multiclass", "classes": CLASSES})
    store = Store(path)
    catalog = C.catalog_of(store)
    yield store, catalog
    assert store.rows("SELECT count(*) FROM canary") == [(2,)]
    assert store.image_count() == N
    store.close()


# --------------------------------------------------------------------------- pandas reference


def _float32(value: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(value)


def column_values(name: str) -> np.ndarray:
    d = DATA
    if name == "brightness":
        values = d["brightness"].to_numpy(float).copy()
        values[d["null_brightness"].to_numpy(bool)] = np.nan  # NULL and NaN alike are missing
        return values
    if name == "score":
        return d["score"].to_numpy(dtype=np.float32, na_value=np.nan)
    if name == "outcome":
        return np.array([None if p is None or pd.isna(p) else ("correct" if p == t else "incorrect")
                         for t, p in zip(d["true_label"], d["pred_label"])], dtype=object)
    if name == "error":
        return np.array([None if p is None or pd.isna(p) else bool(p != t)
                         for t, p in zip(d["true_label"], d["pred_label"])], dtype=object)
    return d[name].to_numpy(dtype=object)


def reference_mask(f: Filter) -> np.ndarray:
    values = column_values(f.column)
    missing = np.array([v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) for v in values])
    value = f.value
    if f.column in ("true_label", "pred_label"):
        value = tuple(CLASSES.index(v) for v in value) if isinstance(value, tuple) else \
            (None if value is None else CLASSES.index(value))
    if f.column == "score" and value is not None:
        value = tuple(_float32(v) for v in value) if isinstance(value, tuple) else _float32(value)
    if f.column == "tags":
        lists = [[] if v is None else list(v) for v in values]
        if f.op == "contains":
            return np.array([value in v for v in lists])
        if f.op in ("in", "notin"):
            hit = np.array([any(x in value for x in v) for v in lists])
            return hit if f.op == "in" else ~hit
        empty = np.array([len(v) == 0 for v in lists])
        return empty if f.op == "isnull" else ~empty
    if f.op == "isnull":
        return missing
    if f.op == "notnull":
        return ~missing

    def each(test) -> np.ndarray:
        return np.array([not m and bool(test(v)) for v, m in zip(values, missing)])

    if f.op == "eq":
        return each(lambda v: v == value)
    if f.op == "ne":
        return ~each(lambda v: v == value)
    if f.op in ("lt", "lte", "gt", "gte"):
        compare = {"lt": np.less, "lte": np.less_equal, "gt": np.greater, "gte": np.greater_equal}[f.op]
        return each(lambda v: compare(v, value))
    if f.op == "between":
        return each(lambda v: value[0] <= v <= value[1])
    if f.op == "in":
        return each(lambda v: any(v == x for x in value))
    if f.op == "notin":
        return ~each(lambda v: any(v == x for x in value))
    if f.op == "contains":
        return each(lambda v: value in v)
    raise AssertionError(f.op)


def reference_ids(cohort: Cohort) -> list[int]:
    mask = np.ones(N, bool)
    for f in cohort.filters:
        mask &= reference_mask(f)
    if cohort.groups:
        any_group = np.zeros(N, bool)
        for group in cohort.groups:
            inside = np.ones(N, bool)
            for f in group:
                inside &= reference_mask(f)
            any_group |= inside
        mask &= any_group
    return np.flatnonzero(mask).tolist()


# --------------------------------------------------------------------------- strategies
#
# Values come from pools built once (hostile pieces, the data's own values, seeded random
# unicode and numbers): one draw per value keeps generation cheap enough for 11,000 examples.


def _pools(seed: int = 9) -> tuple[list[str], list[int | float]]:
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in [*range(32, 127), 0, 9, 10, 0xE9, 0xFC, 0x2019, 0x4E2D, 0x1F600, 0xFEFF, 0x202E]]
    texts = HOSTILE + WORDS + CLASSES + [
        "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), int(rng.integers(0, 12))))
        for _ in range(400)]
    numbers: list[int | float] = [0, 1, -1, 3, 10, 20, 30, 50, 2 ** 53, -(2 ** 53), 0.5, 0.25, 0.1, -0.0, 1e-300,
                                  5e-324, 1.7976931348623157e308, 3.4028234e38, 3.5e38, 4e38, -4e38]
    numbers += [int(v) for v in rng.integers(-100, 100, 100)]
    numbers += [float(v) for v in np.round(rng.random(100), int(rng.integers(1, 4)))]
    numbers += [float(v) for v in rng.normal(0, 1e6, 50)]
    return texts, numbers


TEXT_POOL, NUMBER_POOL = _pools()
texts = st.sampled_from(TEXT_POOL)
numbers = st.sampled_from(NUMBER_POOL)
VALUES = {
    "number": numbers, "text": texts, "boolean": st.booleans(), "class": st.sampled_from(CLASSES),
    "outcome": st.sampled_from(C.OUTCOMES),
}
FILTER_COLUMNS = ["image_id", "true_label", "brightness", "width", "camera", "flag", "tags", ODD,
                  "pred_label", "score", "outcome", "error"]


@st.composite
def filters(draw, catalog):
    info = catalog.columns[draw(st.sampled_from(FILTER_COLUMNS))]
    op = draw(st.sampled_from(info.ops))
    arity = C.OPERATORS[op].arity
    values = VALUES[info.values]
    if arity == "none":
        return Filter(info.name, op)
    if arity == "one":
        return Filter(info.name, op, draw(values))
    if arity == "two":
        return Filter(info.name, op, tuple(sorted((draw(numbers), draw(numbers)))))
    return Filter(info.name, op, tuple(draw(st.lists(values, min_size=1, max_size=3))))


def cohorts(catalog):
    one = filters(catalog)
    return st.builds(Cohort, st.lists(one, max_size=3).map(tuple),
                     st.lists(st.lists(one, min_size=1, max_size=2).map(tuple), max_size=2).map(tuple))


def keys(catalog):
    filter_keys = [quote(f"{prefix}{column}__{op}", safe="")
                   for prefix in ("", "g1.", "g2.", "g10.", "g0.", "G1.")
                   for column in [*sorted(catalog.columns), "nope", ""]
                   for op in [*C.OPERATORS, "like", ""]]
    others = [*C.VIEW_KEYS, "cohort", "", "=", "&", "__", "g1.__", "%", "%zz", "brightness__lt__gt"]
    return st.sampled_from(filter_keys + others * 20)


def raw_values():
    items = [quote(t, safe="") for t in TEXT_POOL] + HOSTILE + [str(n) for n in NUMBER_POOL] \
        + [quote(c, safe="") for c in CLASSES] + ["true", "false", "correct", "incorrect", "m1", "0.5", "", "%2C"]
    return st.lists(st.sampled_from(items), min_size=1, max_size=3).map(",".join)


def queries(catalog):
    pairs = st.lists(st.tuples(keys(catalog), raw_values()), max_size=4)
    return pairs.map(lambda ps: "&".join(f"{k}={v}" for k, v in ps))


def check_codec(catalog, parsed) -> None:
    """Canonical fixed point, in the URL form and the Streamlit-mapping form."""
    canonical = C.to_query(parsed)
    again = C.parse_query(canonical, catalog)
    assert again.cohort == parsed.cohort and again.view == parsed.view
    assert C.to_query(again) == canonical
    assert C.parse_query(C.to_query_params(parsed), catalog) == again


def check_against_pandas(store, cohorts_: list[Cohort]) -> None:
    """Every cohort selects what the pandas reference selects (one DuckDB statement for all)."""
    runnable = [c for c in cohorts_ if c.parent_id is None]
    for c in cohorts_:
        if c.parent_id is not None:
            with pytest.raises(CohortError, match="no saved cohort"):
                C.compile_cohort(c, store, model_id="m1")
    if not runnable:
        return
    selections = [C.compile_cohort(c, store, model_id="m1") for c in runnable]
    sql = " UNION ALL ".join(f"SELECT {k} AS k, image_id FROM ({s[0]}) AS s{k}" for k, s in enumerate(selections))
    got: dict[int, list[int]] = {k: [] for k in range(len(runnable))}
    for k, image_id in store.rows(sql, [p for s in selections for p in s[1]]):
        got[k].append(image_id)
    for k, c in enumerate(runnable):
        assert sorted(got[k]) == reference_ids(c), C.to_query(c)


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def values_of(cohort: Cohort) -> list:
    return [f.value for f in cohort.filters] + [f.value for g in cohort.groups for f in g]


@examples(600)
@given(data=st.data())
def test_generated_cohorts_round_trip_and_match_pandas(env, data):
    store, catalog = env
    cohort = data.draw(cohorts(catalog))
    view = data.draw(st.builds(C.ViewState, model=st.sampled_from([None, "m1"]), iou=st.sampled_from([None, 0.5]),
                               page=st.sampled_from([None, 1, 7]), image=st.sampled_from([None, 0, 10 ** 6])))
    query = C.to_query(cohort, view)
    parsed = C.parse_query(query, catalog)
    assert (parsed.cohort, parsed.view) == (cohort, view)
    assert len(query) < 2048 or any(len(str(v)) > 200 for v in values_of(cohort))
    check_codec(catalog, parsed)
    check_against_pandas(store, [cohort])


@examples(800)
@given(data=st.data())
def test_hostile_query_strings_parse_or_fail_cleanly(env, data):
    store, catalog = env
    query = data.draw(queries(catalog))
    lenient = C.parse_query_lenient(query, catalog)
    try:
        parsed = C.parse_query(query, catalog)
    except CohortError as error:
        assert lenient.errors and lenient.errors[0].message == error.message
        assert "SELECT" not in str(error)
        return
    assert not lenient.errors and lenient.cohort == parsed.cohort
    check_codec(catalog, parsed)
    check_against_pandas(store, [parsed.cohort])


@examples(1000)
@given(query=st.one_of(st.text(max_size=200), st.binary(max_size=100).map(lambda b: quote(b, safe="=&,")),
                       st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=20),
                                                                       st.lists(st.text(max_size=5), max_size=3)),
                                       max_size=4)))
def test_any_input_is_a_query_or_a_cohort_error(env, query):
    store, catalog = env
    try:
        parsed = C.parse_query(query, catalog)
    except CohortError:
        parsed = None
    lenient = C.parse_query_lenient(query, catalog)
    assert (parsed is None) == bool(lenient.errors)
    if parsed is not None:
        check_codec(catalog, parsed)
        check_against_pandas(store, [parsed.cohort])


BATCH = 34


def seeded_queries(seed: int, catalog) -> list[str]:
    """A batch of query strings: well-formed filters written by the codec, then hand-written
    and mangled ones (raw hostile values, wrong escaping, stray separators, unknown keys)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(BATCH):
        pieces = []
        for _ in range(rnd.randint(0, 4)):
            info = catalog.columns[rnd.choice(FILTER_COLUMNS)]
            op = rnd.choice(info.ops)
            arity = C.OPERATORS[op].arity
            pool = {"number": NUMBER_POOL, "text": TEXT_POOL, "boolean": [True, False], "class": CLASSES,
                    "outcome": list(C.OUTCOMES)}[info.values]
            count = {"none": 0, "one": 1, "two": 2, "many": rnd.randint(1, 3)}[arity]
            values = sorted(rnd.choice(NUMBER_POOL) for _ in range(2)) if arity == "two" else \
                [rnd.choice(pool) for _ in range(count)]
            value = None if arity == "none" else (values[0] if arity == "one" else tuple(values))
            piece = C.to_query(Cohort((Filter(info.name, op, value),)))
            roll = rnd.random()
            if roll < 0.15:  # the raw value, not escaped at all
                piece = f"{piece.split('=', 1)[0]}={','.join(str(v) for v in values)}"
            elif roll < 0.25:
                piece = piece.replace("=", rnd.choice(["", "==", "=%3D", "&="]), 1)
            elif roll < 0.35:
                piece = rnd.choice(["g1.", "g2.", "g3."]) + piece
            elif roll < 0.4:
                piece = f"{rnd.choice(list(C.VIEW_KEYS) + ['cohort', 'x'])}={quote(rnd.choice(TEXT_POOL), safe='')}"
            pieces.append(piece)
        out.append(rnd.choice(["", "?"]) + "&".join(pieces))
    return out


@examples(250)
@given(seed=st.integers(0, 2 ** 63))
def test_seeded_query_batches(env, seed):
    """8,500 more query strings: 250 seeds × 34, checked like the others, SQL in one batch per seed."""
    store, catalog = env
    parsed_cohorts = []
    for query in seeded_queries(seed, catalog):
        lenient = C.parse_query_lenient(query, catalog)
        try:
            parsed = C.parse_query(query, catalog)
        except CohortError as error:
            assert lenient.errors[0].message == error.message
            continue
        assert not lenient.errors
        check_codec(catalog, parsed)
        parsed_cohorts.append(parsed.cohort)
    check_against_pandas(store, parsed_cohorts)
