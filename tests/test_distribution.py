"""Cohort distributions counted in SQL (``core.distribution``) against the same counts made in pandas
from the cohort's full rows, on a store with odd values: NaN, infinities and NULLs in numbers, empty
and missing lists, more categories than a chart keeps, and ids of no class."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core.cohorts import Cohort, Filter, catalog_of, cohort_rows
from core.distribution import (MAX_CATEGORIES, MAX_COLOUR_BINS, distribution, numeric_bins, point_sample)
from core.errors import CohortError
from core.store import Store, build_base

N = 3000
CLASSES = [f"class {k:02d}" for k in range(40)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(7)
    brightness = rng.normal(0.5, 0.2, N)
    brightness[rng.random(N) < 0.03] = np.nan
    brightness[:3] = [np.inf, -np.inf, 0.5]
    brightness_null = rng.random(N) < 0.02
    brightness_null[:3] = False
    sites = [f"site {k}" for k in rng.zipf(1.6, N) % 45]
    sites = [None if i % 97 == 0 else s for i, s in enumerate(sites)]
    flags = [None if i % 50 == 0 else bool(v) for i, v in enumerate(rng.random(N) < 0.3)]
    objects = rng.integers(0, 12, N)
    tags = [[] if i % 11 == 0 else None if i % 13 == 0 else [f"t{int(t)}" for t in rng.integers(0, 5, rng.integers(1, 4))]
            for i in range(N)]
    true = [[int(k) for k in set(rng.zipf(1.4, rng.integers(0, 4)) % 45)] for _ in range(N)]  # ids ≥ 40: no class
    images = pa.table({
        "image_id": pa.array(range(N), pa.int32()), "uri": [f"/i/{i}.png" for i in range(N)],
        "width": pa.array(rng.integers(8, 500, N), pa.int32()), "height": pa.array([64] * N, pa.int32()),
        "true_label": pa.array(true, pa.list_(pa.int32())),
        "brightness": pa.array(brightness, pa.float64(), mask=brightness_null, from_pandas=False),
        "site": pa.array(sites, pa.string()), "flag": pa.array(flags, pa.bool_()),
        "objects": pa.array(objects, pa.int64()), "tags": pa.array(tags, pa.list_(pa.string())),
    })
    columns = pd.DataFrame({
        "name": ["image_id", "true_label", "width", "height", "brightness", "site", "flag", "objects", "tags"],
        "kind": ["numeric", "list", "numeric", "numeric", "numeric", "categorical", "boolean", "numeric", "list"],
        "source": ["derived", "derived", "auto", "auto", "auto", "user", "user", "user", "user"],
        "label": ["Image id", "True labels", "Width", "Height", "Brightness", "Site", "Flag", "Objects", "Tags"]})
    probs = rng.dirichlet(np.full(len(CLASSES), 0.1), N).astype(np.float32)
    predictions = pa.table({"model_id": ["m"] * N, "image_id": pa.array(range(N), pa.int32()),
                            "probs": pa.array(list(probs), pa.list_(pa.float32())),
                            "pred_labels": pa.array([list(np.flatnonzero(p >= 0.5)) for p in probs],
                                                    pa.list_(pa.int32()))})
    models = pd.DataFrame({"model_id": ["m"], "name": ["M"], "task": ["multilabel"], "params": ["{}"]})
    path = tmp_path_factory.mktemp("distribution") / "ml.duckdb"
    build_base(path, {"images": images, "predictions": predictions, "columns": columns, "models": models},
               {"task": "multilabel", "classes": CLASSES, "label_threshold": 0.5})
    opened = Store(path)
    yield opened
    opened.close()


# --------------------------------------------------------------------------- the same counts, made in pandas


def names(values: pd.Series, info) -> pd.Series:
    def name(value):
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            return "missing"
        if info.values == "class":
            return CLASSES[int(value)] if 0 <= int(value) < len(CLASSES) else "missing"
        if info.values == "boolean":
            return "yes" if value else "no"
        return str(value)
    return pd.Series([name(v) for v in values], index=values.index, dtype=object)


def keep_frequent(values: pd.Series) -> pd.Series:
    counts = values.value_counts()
    if len(counts) <= MAX_CATEGORIES:
        return values
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return values.where(values.isin({v for v, _ in ranked[:MAX_CATEGORIES - 1]}), "other")


def numeric(info) -> bool:
    return info.values == "number" and info.kind != "categorical" and not info.is_list


def expected(store, x, y, color, bins, log_x) -> tuple[pd.DataFrame, int]:
    catalog = catalog_of(store)
    infos = catalog.columns
    rows = cohort_rows(store, Cohort(), "m", columns=list(dict.fromkeys(
        ["image_id", x, *([y] if y != "count" else []), *([color] if color else [])])))
    if numeric(infos[x]):
        values = rows[x].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        if log_x and finite.min() > 0:
            edges = np.geomspace(finite.min(), finite.max(), bins + 1)
        else:
            edges = np.histogram_bin_edges(finite, bins=bins)
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        present = np.isfinite(values)
        frame = pd.DataFrame({"x_start": edges[index], "x_end": edges[index + 1]}, index=rows.index)[present]
        keys = ["x_start", "x_end"]
    else:
        values = rows[x].explode() if infos[x].is_list else rows[x]
        values = values.map(lambda v: None if isinstance(v, float) and np.isnan(v) else v)
        frame = pd.DataFrame({"x": keep_frequent(names(values, infos[x]))}, index=values.index)
        keys = ["x"]
    if color:
        colours = rows[color].loc[frame.index].reset_index(drop=True)
        if numeric(infos[color]):
            numbers = colours.astype(float).where(np.isfinite(colours.astype(float)))
            cut = pd.cut(numbers, bins=min(bins, MAX_COLOUR_BINS))
            frame["color"] = cut.astype(str).where(cut.notna(), "missing").to_numpy()
        else:
            frame["color"] = keep_frequent(names(colours, infos[color])).to_numpy()
        keys.append("color")
    if y == "count":
        out = frame.groupby(keys, sort=True).size().rename("value").reset_index()
    else:
        frame["y"] = rows[y].loc[frame.index].astype(float).to_numpy()
        grouped = frame.groupby(keys, sort=True)["y"]
        out = grouped.mean().rename("value").reset_index().assign(images=grouped.size().to_numpy())
    return out, len(rows)


CASES = [
    ("brightness", "count", None), ("brightness", "count", "site"), ("brightness", "score", "flag"),
    ("width", "count", "brightness"), ("true_label", "count", None), ("true_label", "score", "outcome"),
    ("pred_label", "count", "error"), ("site", "brightness", "width"), ("tags", "count", "objects"),
    ("flag", "objects", "site"), ("outcome", "count", "brightness"), ("objects", "brightness", None),
    ("brightness", "brightness", "outcome"),  # x averaged over its own bins
]


@pytest.mark.parametrize("x, y, color", CASES)
@pytest.mark.parametrize("bins, log_x", [(20, False), (7, True), (11, False)])  # 11: objects on the edges
def test_distribution_equals_the_pandas_counts(store, x, y, color, bins, log_x):
    got = distribution(store, Cohort(), "m", x, y, color, bins=bins, log_x=log_x)
    want, total = expected(store, x, y, color, bins, log_x)
    assert got.images_total == total == N
    assert list(got.table.columns) == list(want.columns)
    assert len(got.table) == len(want), (got.table, want)
    for column in want.columns:
        if column == "value" and y != "count":
            np.testing.assert_allclose(got.table[column].to_numpy(float), want[column].to_numpy(float), rtol=1e-12)
        elif want[column].dtype.kind == "f":
            np.testing.assert_array_equal(got.table[column].to_numpy(float), want[column].to_numpy(float))
        else:
            assert got.table[column].tolist() == want[column].tolist(), column


def test_every_image_is_counted_once_per_list_element_and_rare_values_are_other(store):
    table = distribution(store, Cohort(), "m", "site").table
    assert len(table) == MAX_CATEGORIES and "other" in set(table["x"]) and "missing" in set(table["x"])
    assert table["value"].sum() == N
    sites = sorted(s for s in cohort_rows(store, Cohort(), None, columns=["site"])["site"].dropna().unique())
    for kept in (MAX_CATEGORIES, MAX_CATEGORIES + 1):
        cohort = Cohort((Filter("site", "in", tuple(sites[:kept])),))
        shown = distribution(store, cohort, "m", "site").table["x"].tolist()
        assert shown == (sorted(sites[:kept]) if kept == MAX_CATEGORIES else sorted(shown)), shown
        assert ("other" in shown) == (kept > MAX_CATEGORIES) and len(shown) == MAX_CATEGORIES
    tags = distribution(store, Cohort(), "m", "tags").table
    rows = cohort_rows(store, Cohort(), None, columns=["tags"])["tags"]
    lengths = [0 if t is None or t is pd.NA else len(t) for t in rows]
    assert tags["value"].sum() == sum(max(n, 1) for n in lengths)
    assert dict(zip(tags["x"], tags["value"]))["missing"] == lengths.count(0)


def test_bins_cover_the_finite_values_and_edge_values_fall_right(store):
    """A value on an inner edge goes to the bin it starts; the largest value to the last bin."""
    edges = numeric_bins(0.0, 1.0, 4, log=False)
    np.testing.assert_array_equal(edges, [0, 0.25, 0.5, 0.75, 1.0])
    table = distribution(store, Cohort((Filter("brightness", "between", (0.5, 0.5)),)), "m", "brightness").table
    assert table["value"].tolist() == [1]  # one image, its own bin
    assert len(numeric_bins(float("nan"), float("nan"), 5, log=False)) == 2


def test_a_constant_colour_is_one_colour_named_by_its_value(store):
    width = int(store.query('SELECT min(width) AS w FROM "images"')["w"].iloc[0])
    one_width = Cohort((Filter("width", "eq", width),))
    got = distribution(store, one_width, "m", "site", "count", "width")
    assert set(got.table["color"]) == {str(width)}  # not pandas' widened "(47.952, 48.048]"


def test_a_cohort_counts_its_own_images(store):
    cohort = Cohort((Filter("flag", "eq", True),))
    got = distribution(store, cohort, "m", "flag", "count", "outcome")
    assert set(got.table["x"]) == {"yes"}
    assert got.images_total == got.table["value"].sum() == sum(
        1 for f in cohort_rows(store, Cohort(), None, columns=["flag"])["flag"] if f is not pd.NA and f)


def test_bad_choices_are_clear_errors(store):
    with pytest.raises(CohortError, match="bins"):
        distribution(store, Cohort(), "m", "brightness", bins=0)
    with pytest.raises(CohortError, match="not a number"):
        distribution(store, Cohort(), "m", "brightness", "site")
    with pytest.raises(CohortError, match="list"):
        distribution(store, Cohort(), "m", "brightness", color="tags")
    with pytest.raises(CohortError, match="unknown column"):
        distribution(store, Cohort(), "m", "nope")
    with pytest.raises(CohortError, match="outcome needs a model"):
        distribution(store, Cohort(), None, "brightness", color="outcome")


def test_point_sample_is_seeded_and_in_image_order(store):
    rows, total = point_sample(store, Cohort(), "m", ["brightness"], limit=500)
    again, _ = point_sample(store, Cohort(), "m", ["brightness"], limit=500)
    assert total == N and len(rows) == 500 and rows.equals(again)
    assert rows["image_id"].is_monotonic_increasing and rows["image_id"].nunique() == 500
    everything, total = point_sample(store, Cohort(), "m", ["brightness"], limit=N + 1)
    assert total == N and everything["image_id"].tolist() == list(range(N))
    halves = [int((rows["image_id"] < N / 2).sum()), int((rows["image_id"] >= N / 2).sum())]
    assert min(halves) > 200  # spread over the ids, not the first 500


def test_log_bins_only_when_every_value_is_positive(store):
    table = distribution(store, Cohort(), "m", "width", bins=5, log_x=True).table
    edges = np.append(table["x_start"].to_numpy(), table["x_end"].to_numpy()[-1])
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, ratios[0])
    for a, b in itertools.pairwise(table.itertuples()):
        assert a.x_end == b.x_start
