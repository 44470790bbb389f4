"""Slice discovery: SliceLine's search equals brute force, planted slices are found, queries round-trip."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from core.cohorts import Cohort, Filter, catalog_of, cohort_count, parse_query
from core.errors import EvalError
from core.slices import (MIN_LIFT, Predicate, SliceSearch, find_slices, numeric_predicates, pack_bits,
                         score_upper_bound, search_slices, sliceable_columns, slices_main, sliceline_score,
                         store_search)
from core.store import Store, build_base

CLASSES = ["cat", "dog", "bird"]


def _catalog_rows(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"name": c, "kind": k, "source": "derived" if c in ("image_id", "true_label") else "user",
                          "label": c.replace("_", " ").capitalize()} for c, k in kinds.items()])


def planted_store(path, *, n: int = 3000, seed: int = 0, missing_predictions: int = 0):
    """site B AND low brightness → 80 % errors; 10 % everywhere else.

    Brightness is uniform on a 1/1000 grid so its quintile edges are round
    numbers and the planted boundary (0.2) is exactly a bin edge.
    """
    rng = np.random.default_rng(seed)
    site = rng.choice(["A", "B", "C"], n)
    camera = rng.choice(["cam1", "cam2"], n)
    brightness = (rng.permutation(n) % 1000) / 1000.0
    contrast = rng.random(n)
    # 18 % below 0.153, 6 % exactly float32(0.153) (which is below 0.153 in float64), the rest above:
    # the lowest quintile edge rounds to 0.153 and holds stored values.
    slot = np.arange(n) % 50
    exposure = np.where(slot < 9, rng.integers(0, 153, n) / 1000,
                        np.where(slot < 12, 0.153, rng.integers(154, 1000, n) / 1000)).astype(np.float32)
    true = rng.integers(0, len(CLASSES), n)
    planted = (site == "B") & (brightness < 0.2)
    wrong = rng.random(n) < np.where(planted, 0.8, 0.1)
    pred = np.where(wrong, (true + 1) % len(CLASSES), true)
    images = pd.DataFrame({
        "image_id": np.arange(n, dtype=np.int32), "uri": [f"/img/{i}.png" for i in range(n)],
        "width": np.full(n, 64, np.int32), "height": np.full(n, 64, np.int32),
        "true_label": true.astype(np.int32), "site": site, "camera": camera,
        "brightness": brightness.astype(np.float32), "contrast": contrast, "exposure": exposure,
    })
    kinds = {"image_id": "numeric", "true_label": "categorical", "width": "numeric", "height": "numeric",
             "site": "categorical", "camera": "categorical", "brightness": "numeric", "contrast": "numeric",
             "exposure": "numeric"}
    keep = np.arange(missing_predictions, n)
    predictions = pd.DataFrame({"model_id": "m1", "image_id": keep.astype(np.int32),
                                "pred_label": pred[keep].astype(np.int32),
                                "score": np.full(len(keep), 0.9, np.float32)})
    outcomes = pd.DataFrame({"model_id": "m1", "image_id": keep.astype(np.int32), "correct": ~wrong[keep]})
    models = pd.DataFrame({"model_id": ["m1"], "name": ["model one"], "task": ["multiclass"], "params": ["{}"]})
    build_base(path, {"images": images, "columns": _catalog_rows(images, kinds), "models": models,
                      "predictions": predictions, "outcomes": outcomes},
               {"task": "multiclass", "classes": CLASSES, "name": "planted"})
    return Store(path), planted, wrong


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("slices") / "planted.duckdb")


# --------------------------------------------------------------------------- pure pieces


def _brute_force(masks, feature_of, errors, min_size, max_order):
    n, n_errors = len(errors), int(errors.sum())
    found = []
    for order in range(1, max_order + 1):
        for combo in itertools.combinations(range(len(masks)), order):
            if len(set(feature_of[list(combo)])) < order:
                continue
            inside = masks[list(combo)].all(axis=0)
            size, errs = int(inside.sum()), int((inside & errors).sum())
            if size >= min_size and errs > 0:
                score = float(sliceline_score(size, errs, n, n_errors))
                if score > 0 and errs / size >= MIN_LIFT * n_errors / n:
                    found.append((score, combo, size, errs))
    return sorted(found, key=lambda f: -f[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_equals_brute_force(seed):
    """Pruning by size and score bound never drops a slice of the true top k."""
    rng = np.random.default_rng(seed)
    n = 2000
    features = [rng.integers(0, k, n) for k in (3, 4, 2, 5, 3)]
    masks, feature_of = [], []
    for f, values in enumerate(features):
        for v in np.unique(values):
            masks.append(values == v)
            feature_of.append(f)
    masks, feature_of = np.array(masks), np.array(feature_of)
    hot = (features[0] == 1) & (features[1] == 2)
    errors = rng.random(n) < np.where(hot, 0.6, 0.15)
    predicates = tuple(Predicate(f"c{f}", f"c{f}", (Filter(f"c{f}", "eq", i),)) for i, f in enumerate(feature_of))
    search = SliceSearch(predicates, feature_of, pack_bits(masks), pack_bits(errors[None])[0], n,
                         int(errors.sum()))
    got = search_slices(search, max_order=3, min_size=25, top_k=8)
    expected = _brute_force(masks, feature_of, errors, 25, 3)[:8]
    assert [round(g[3], 9) for g in got] == [round(e[0], 9) for e in expected]
    assert got[0][0] == expected[0][1] and got[0][1:3] == expected[0][2:4]
    assert set(got[0][0]) == {int(np.flatnonzero((feature_of == 0))[1]), int(np.flatnonzero(feature_of == 1)[2])}


def test_score_matches_paper_formula():
    # sc = α(ē_s/ē − 1) − (1−α)(n/|S| − 1) with n=1000, 100 errors, slice 50 images with 30 errors.
    expected = 0.95 * ((30 / 50) / 0.1 - 1) - 0.05 * (1000 / 50 - 1)
    assert sliceline_score(50, 30, 1000, 100) == pytest.approx(expected)


def test_upper_bound_dominates_every_sub_slice():
    n, n_errors, min_size = 1000, 150, 10
    for size, errors in [(200, 40), (50, 50), (400, 5), (12, 3)]:
        bound = float(score_upper_bound(size, errors, n, n_errors, min_size))
        best = max(float(sliceline_score(s, e, n, n_errors))
                   for s in range(min_size, size + 1) for e in range(0, min(errors, s) + 1))
        assert bound == pytest.approx(best)


def test_numeric_bins_are_disjoint_and_round():
    values = np.r_[np.linspace(0, 1, 1001), [np.nan] * 20]
    found = numeric_predicates("brightness", "Brightness", values, bins=5)
    masks = np.array([m for _, m in found])
    assert (masks.sum(axis=0) == 1).all()  # every image in exactly one bin
    assert [p.label for p, _ in found] == ["Brightness < 0.2", "0.2 ≤ Brightness < 0.4", "0.4 ≤ Brightness < 0.6",
                                           "0.6 ≤ Brightness < 0.8", "Brightness ≥ 0.8", "Brightness is missing"]
    assert found[1][0].filters == (Filter("brightness", "gte", 0.2), Filter("brightness", "lt", 0.4))


def test_few_distinct_values_become_equalities():
    found = numeric_predicates("width", "Width", np.array([640, 640, 320, 1024.0]), bins=5)
    assert [f.filters for f, _ in found] == [(Filter("width", "eq", 320),), (Filter("width", "eq", 640),),
                                             (Filter("width", "eq", 1024),)]
    # Read rounded, filtered exactly.
    found = numeric_predicates("aspect_ratio", "Aspect ratio", np.array([5 / 6, 5 / 6, 4 / 3]), bins=5)
    assert [f.label for f, _ in found] == ["Aspect ratio = 0.8333", "Aspect ratio = 1.333"]
    assert found[0][0].filters == (Filter("aspect_ratio", "eq", 5 / 6),)


# --------------------------------------------------------------------------- on a store


def test_planted_slice_is_rank_one_and_round_trips(planted):
    store, mask, wrong = planted
    found = find_slices(store, "m1")
    assert found, "no slice found"
    top = found[0]
    assert {(f.column, f.op, f.value) for p in top.predicates for f in p.filters} == {
        ("site", "eq", "B"), ("brightness", "lt", 0.2)}
    assert top.size == int(mask.sum())
    assert top.errors == int((mask & wrong).sum())
    assert top.error_rate > 0.6
    assert top.query == "brightness__lt=0.2&site__eq=B"
    catalog = catalog_of(store)
    for s in found:
        parsed = parse_query(s.query, catalog)
        assert cohort_count(store, parsed, "m1") == s.size
        assert cohort_count(store, parse_query(s.query + "&error__eq=true", catalog), "m1") == s.errors
    scores = [s.score for s in found]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # width and height are 64 everywhere: a predicate on them would only repeat a slice in more words
    assert not {"width", "height"} & {p.column for s in found for p in s.predicates}


def test_slices_within_a_cohort_are_counted_in_it(planted):
    store, _, _ = planted
    catalog = catalog_of(store)
    in_b = parse_query("site__eq=B", catalog).cohort
    found = find_slices(store, "m1", cohort=in_b)
    top = found[0]
    # Within site B, brightness alone singles the planted images out (edges from the cohort's own values);
    # the link holds the cohort too.
    [(condition,)] = [p.filters for p in top.predicates]
    assert (condition.column, condition.op) == ("brightness", "lt") and abs(condition.value - 0.2) < 0.01
    assert top.query == f"brightness__lt={condition.value}&site__eq=B" and top.error_rate > 0.6
    for s in found:
        assert cohort_count(store, parse_query(s.query, catalog), "m1") == s.size
        assert all(p.column != "site" for p in s.predicates)  # the cohort's own condition splits nothing


def test_every_predicate_count_is_its_cohort_count(tmp_path):
    """Bin edges land on stored FLOAT values: membership must follow the compiler's comparison exactly."""
    store, _, _ = planted_store(tmp_path / "p.duckdb", n=1500, seed=3)
    catalog = catalog_of(store)
    search, all_evaluated, _ = store_search(store, catalog, "m1", sliceable_columns(catalog),
                                            {"iou": 0.5, "score_threshold": 0.5, "label_threshold": 0.5})
    assert all_evaluated and Filter("exposure", "lt", 0.153) in {f for p in search.predicates for f in p.filters}
    sizes = np.bitwise_count(search.bits).sum(axis=1)
    for predicate, size in zip(search.predicates, sizes):
        assert cohort_count(store, Cohort(predicate.filters), "m1") == size, predicate.label


def test_options_and_bad_input(planted):
    store, _, _ = planted
    only_one = find_slices(store, "m1", max_order=1, top_k=3)
    assert len(only_one) <= 3 and all(len(s.predicates) == 1 for s in only_one)
    camera_only = find_slices(store, "m1", columns=["camera", "contrast"])
    assert all(p.column in ("camera", "contrast") for s in camera_only for p in s.predicates)
    with pytest.raises(EvalError, match="unknown model 'nope'") as info:
        find_slices(store, "nope")
    assert info.value.choices == ["m1"]
    with pytest.raises(EvalError, match="cannot slice on column 'uri'"):
        find_slices(store, "m1", columns=["uri"])


def test_missing_predictions_are_left_out(tmp_path):
    store, _, _ = planted_store(tmp_path / "partial.duckdb", n=1500, seed=3, missing_predictions=100)
    found = find_slices(store, "m1", top_k=3)
    assert found and all(s.query.endswith("error__notnull=true") for s in found)
    catalog = catalog_of(store)
    for s in found:
        assert cohort_count(store, parse_query(s.query, catalog), "m1") == s.size


@pytest.mark.parametrize("error_rate", [0.0, 1.0])
def test_uniform_errors_give_no_slice(error_rate):
    """No errors, or nothing but errors: no slice is worse than the whole."""
    masks = np.array([np.arange(100) < 50, np.arange(100) >= 50])
    errors = np.full(100, error_rate == 1.0)
    predicates = tuple(Predicate("c", "c", (Filter("c", "eq", i),)) for i in range(2))
    search = SliceSearch(predicates, np.array([0, 0]), pack_bits(masks), pack_bits(errors[None])[0], 100,
                         int(errors.sum()))
    assert search_slices(search, min_size=10) == []


def test_a_slice_of_nearly_every_image_is_not_reported():
    """Its score is positive (its rate is a hair above the whole's) but it is no error slice."""
    masks = np.array([np.arange(1000) < 998, np.arange(1000) >= 998])
    errors = (np.arange(1000) % 2 == 0) & masks[0]
    predicates = tuple(Predicate("c", "c", (Filter("c", "eq", i),)) for i in range(2))
    search = SliceSearch(predicates, np.array([0, 0]), pack_bits(masks), pack_bits(errors[None])[0], 1000,
                         int(errors.sum()))
    assert sliceline_score(998, 499, 1000, 499) > 0
    assert search_slices(search, min_size=1) == []


def test_cli_json(planted, capsys):
    store, _, _ = planted
    assert slices_main([str(store.paths.base), "--json", "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "m1" and len(out["slices"]) == 2
    assert out["slices"][0]["query"] == "brightness__lt=0.2&site__eq=B"
    assert slices_main([str(store.paths.base)]) == 0
    text = capsys.readouterr().out
    assert "1. Brightness < 0.2 and Site = B" in text and "?brightness__lt=0.2&site__eq=B" in text


# --------------------------------------------------------------------------- on the demo

# The multiclass demo, smaller than `visionlens demo` builds it (about 20 s of CPU): 1000 images,
# models trained on 1500 scenes each. tests/test_label_quality.py uses the same build.
# Columns core/demo.py builds to hurt accuracy (site: the dim warehouse; camera: blur and noise;
# small digits; stray strokes; occluding patches) and the image measurements that read them
# directly (dim light, low contrast, sensor noise, blur).
NUISANCE_COLUMNS = {"site", "camera", "digit_size", "clutter", "occluded"}
NUISANCE_MEASUREMENTS = {"brightness", "contrast", "noise", "sharpness"}


def columns_of(found) -> list[set[str]]:
    return [{p.column for p in s.predicates} for s in found]


def test_demo_nuisance_factors_are_the_top_slices(demo_multiclass):
    """The baseline never saw dim scenes: its worst slice is the dim warehouse; every top slice of
    both models is made of the nuisance factors the demo builds in (or direct measurements of them)."""
    store = demo_multiclass
    overall = {m: store.scalar('SELECT avg(CAST(NOT correct AS DOUBLE)) FROM "outcomes" WHERE model_id = ?', [m])
               for m in ("baseline", "candidate")}
    baseline = find_slices(store, "baseline", top_k=5)
    candidate = find_slices(store, "candidate", top_k=5)
    assert len(baseline) == 5 and len(candidate) == 5
    top = baseline[0]
    assert any(f.column == "site" and f.value == "warehouse" for p in top.predicates for f in p.filters), \
        top.description
    assert top.error_rate >= 2 * overall["baseline"], (top.error_rate, overall["baseline"])
    assert columns_of(candidate)[0] & NUISANCE_COLUMNS, candidate[0].description
    for found in (baseline, candidate):
        for columns, s in zip(columns_of(found), found):
            assert columns & (NUISANCE_COLUMNS | NUISANCE_MEASUREMENTS), s.description
