"""Derived cohort columns (label quality, counterfactual flips, review status) and the pushed-down page query.

Each derived column is checked against a pandas reference read straight from the
table it comes from; each page of ``cohort_rows`` against the unpushed query (the
whole frame from ``frame_sql``, filtered, sorted and cut) on the same store.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import cohorts as C
from core.cohorts import Cohort, Filter
from core.errors import CohortError
from core.label_quality import write_label_quality
from core.state import StateDB
from core.store import Store, write_part
from core.synthetic import build_synthetic_store

N_IMAGES = 400
MODEL = "baseline"


def ids_of(store: Store, query: str, model_id: str | None = MODEL) -> list[int]:
    catalog = C.catalog_of(store)
    sql, params = C.compile_cohort(C.parse_query(query, catalog), store, model_id=model_id)
    return sorted(int(r[0]) for r in store.rows(sql, params))


def expected(mask: pd.Series) -> list[int]:
    return sorted(int(i) for i in mask[mask.fillna(False).astype(bool)].index)


def write_flips(store_path, rng: np.random.Generator, run_id: str, images: np.ndarray) -> None:
    """Counterfactual rows as ``core.rerun.run_counterfactuals`` writes them: blur (unsigned) and
    brightness down; about a third never flip (NULL)."""
    frames = []
    for perturbation, direction, bound in (("blur", 1, 8.0), ("brightness", -1, -1.0)):
        strength = rng.uniform(0.0, abs(bound), len(images)) * np.sign(bound)
        never = rng.random(len(images)) < 0.35
        frames.append(pd.DataFrame({
            "model_id": MODEL, "image_id": images.astype(np.int32), "perturbation": perturbation,
            "direction": np.int8(direction), "bound": bound,
            "flip_strength": pd.array(np.where(never, None, strength), dtype="Float64"),
            "resolution": 0.01, "seed": np.int32(0), "run_id": run_id}))
    write_part(store_path, "counterfactuals", pd.concat(frames, ignore_index=True))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A multiclass and a detection store, each with two label-quality runs and two counterfactual runs."""
    folder = tmp_path_factory.mktemp("derived")
    out = {}
    for task in ("multiclass", "detection"):
        path = build_synthetic_store(folder / f"{task}.duckdb", task=task, n_images=N_IMAGES, dets_per_image=4,
                                     seed=3)
        rng = np.random.default_rng(7)
        # An older run with other values: readers must take the latest computed_at.
        older, _ = write_label_quality(path, MODEL)
        older = older.copy()
        older["label_issue"] = ~older["label_issue"]
        older["label_quality_score"] = 1.0 - older["label_quality_score"]
        older["computed_at"] = older["computed_at"] - pd.Timedelta(days=1)
        write_part(path, "label_quality", older)
        latest, _ = write_label_quality(path, MODEL)
        all_ids = np.arange(N_IMAGES)
        write_flips(path, rng, "00000000000000000001-old", all_ids)
        write_flips(path, rng, "00000000000000000002-new", all_ids[: N_IMAGES // 2])
        out[task] = (Store(path), latest.set_index("image_id"))
    yield out
    for store, _ in out.values():
        store.close()


def flips_reference(store: Store) -> pd.DataFrame:
    """Per image and column, |flip_strength| of the newest run of each (image, kind, direction)."""
    table = store.query('SELECT * FROM "counterfactuals" WHERE model_id = ?', [MODEL])
    newest = table[table["run_id"] == table.groupby(["image_id", "perturbation", "direction"])["run_id"]
                   .transform("max")].copy()
    newest["column"] = np.where(newest["perturbation"] == "blur", "flip_blur", "flip_brightness_down")
    newest["value"] = newest["flip_strength"].abs().astype(float)
    wide = newest.pivot(index="image_id", columns="column", values="value")
    return wide.reindex(range(N_IMAGES))


@pytest.mark.parametrize("task", ["multiclass", "detection"])
def test_label_quality_columns_filter_like_pandas(stores, task):
    store, latest = stores[task]
    catalog = C.catalog_of(store)
    assert catalog.columns["label_issue"].values == "boolean"
    assert catalog.columns["label_quality_score"].values == "number"
    assert catalog.columns["label_issue"].needs_model
    issue = latest["label_issue"].reindex(range(N_IMAGES))
    score = latest["label_quality_score"].reindex(range(N_IMAGES)).astype(float)
    assert issue.any() and not issue.fillna(True).all()  # both values occur: the filter can fail
    assert ids_of(store, "label_issue__eq=true") == expected(issue == True)  # noqa: E712
    assert ids_of(store, "label_issue__eq=false") == expected(issue == False)  # noqa: E712
    cut = float(score.median())
    assert ids_of(store, f"label_quality_score__lt={cut!r}") == expected(score < cut)
    assert ids_of(store, f"label_quality_score__gte={cut!r}&label_issue__eq=false") == \
        expected((score >= cut) & (issue == False))  # noqa: E712
    # Sorted by score, lowest (likeliest wrong) first: the same order as pandas, ties by image id.
    rows = C.cohort_rows(store, Cohort(), MODEL, columns=["image_id", "label_quality_score"],
                         order_by="label_quality_score", limit=10)
    reference = score.dropna().reset_index().sort_values(["label_quality_score", "image_id"]).head(10)
    assert rows["image_id"].tolist() == reference["image_id"].tolist()
    np.testing.assert_allclose(rows["label_quality_score"], reference["label_quality_score"])


@pytest.mark.parametrize("task", ["multiclass", "detection"])
def test_flip_columns_filter_like_pandas(stores, task):
    store, _ = stores[task]
    catalog = C.catalog_of(store)
    assert [c for c in catalog.derived if c.startswith("flip_")] == ["flip_blur", "flip_brightness_down"]
    reference = flips_reference(store)
    blur, down = reference["flip_blur"], reference["flip_brightness_down"]
    assert ids_of(store, "flip_blur__lte=1.5") == expected(blur <= 1.5)
    assert ids_of(store, "flip_blur__isnull=true") == expected(blur.isna())  # never flips within the bound
    assert ids_of(store, "flip_brightness_down__between=0.2,0.6&flip_blur__gt=4") == \
        expected(down.between(0.2, 0.6) & (blur > 4))
    frame = C.cohort_rows(store, Cohort(), MODEL, columns=["image_id", "flip_blur", "flip_brightness_down"])
    np.testing.assert_allclose(frame["flip_blur"].to_numpy(float), blur.to_numpy(float))
    np.testing.assert_allclose(frame["flip_brightness_down"].to_numpy(float), down.to_numpy(float))
    # The newest run wins where two exist (the first half of the images).
    assert not np.allclose(blur.iloc[: N_IMAGES // 2].fillna(-1), blur.iloc[N_IMAGES // 2:].fillna(-1).values)


def test_derived_columns_round_trip_and_describe(stores):
    store, _ = stores["detection"]
    catalog = C.catalog_of(store)
    query = ("flip_blur__lte=1.5&g1.label_issue__eq=true&g2.label_quality_score__lt=0.25"
             "&g2.flip_brightness_down__isnull=true&model=baseline")
    parsed = C.parse_query(query, catalog)
    canonical = C.to_query(parsed)
    assert C.parse_query(canonical, catalog) == parsed
    assert C.to_query(C.parse_query(C.to_query_params(parsed), catalog)) == canonical
    assert canonical == ("flip_blur__lte=1.5&g1.flip_brightness_down__isnull=true&g1.label_quality_score__lt=0.25"
                         "&g2.label_issue__eq=true&model=baseline")
    assert C.describe(parsed, catalog)[0].startswith("Flips under blur")
    with pytest.raises(CohortError) as caught:
        C.parse_query("label_issue__eq=maybe", catalog)
    assert caught.value.field == "label_issue__eq"
    with pytest.raises(CohortError, match="needs a model"):
        C.compile_cohort(parsed.cohort, store, model_id=None)


def test_columns_absent_without_their_tables(tmp_path):
    path = build_synthetic_store(tmp_path / "plain.duckdb", task="multiclass", n_images=30, seed=1)
    store = Store(path)
    try:
        catalog = C.catalog_of(store)
        assert not catalog.derived
        for column in ("label_issue", "label_quality_score", "flip_blur", C.REVIEW_STATUS):
            assert column not in catalog.columns and column not in catalog.frame_columns()
        with pytest.raises(CohortError) as caught:
            C.parse_query("label_issue__eq=true", catalog)
        assert caught.value.field == "label_issue__eq"
        # Frames that read none of them join none of their tables, in a store that has them too.
        sql, _ = C.frame_sql(store, MODEL, columns=["image_id", "outcome", "brightness"], catalog=catalog)
        assert "label_quality" not in sql and "counterfactuals" not in sql and "unnest" not in sql
    finally:
        store.close()


def test_frames_join_derived_tables_only_when_read(stores):
    store, _ = stores["detection"]
    catalog = C.catalog_of(store)
    assert {"label_issue", "flip_blur"} <= set(catalog.frame_columns())
    sql, _ = C.frame_sql(store, MODEL, columns=["image_id", "outcome", "n_fp"], catalog=catalog)
    assert "label_quality" not in sql and "counterfactuals" not in sql
    sql, _ = C.frame_sql(store, MODEL, columns=["image_id", "flip_blur"], catalog=catalog)
    assert "counterfactuals" in sql and "label_quality" not in sql and "det_matches" not in sql


def test_review_status_is_a_fresh_categorical_column(tmp_path):
    path = build_synthetic_store(tmp_path / "reviews.duckdb", task="multiclass", n_images=60, seed=2)
    store = Store(path)
    state = StateDB.for_store(path)
    try:
        assert C.REVIEW_STATUS not in C.catalog_of(store).columns  # no review yet: no column
        assert C.catalog_of(store).reviews_key == ""
        statuses = {3: "open", 5: "reviewed", 8: "fixed", 13: "reviewed", 21: "fixed"}
        for image_id, status in statuses.items():
            state.set_review("image", image_id, status=status)
        state.set_review("image", 34, note="look again")  # a note alone opens a review
        statuses[34] = "open"
        catalog = C.catalog_of(store)
        info = catalog.columns[C.REVIEW_STATUS]
        assert info.kind == "categorical" and not info.needs_model
        status = pd.Series(statuses).reindex(range(60))
        assert ids_of(store, "review_status__eq=reviewed", None) == expected(status == "reviewed")
        assert ids_of(store, "review_status__in=fixed,open") == expected(status.isin(["fixed", "open"]))
        # Unreviewed images have no status: "not fixed" keeps them, "is missing" finds them.
        assert ids_of(store, "review_status__notin=fixed") == expected(status != "fixed")
        assert ids_of(store, "review_status__isnull=true") == expected(status.isna())
        assert ids_of(store, "review_status__eq=open&outcome__eq=incorrect") == sorted(
            set(expected(status == "open")) & set(ids_of(store, "outcome__eq=incorrect")))
        with pytest.raises(CohortError) as caught:
            C.parse_query("review_status__eq=done", catalog)
        assert caught.value.choices == ["open", "reviewed", "fixed"]
        assert C.to_query(C.parse_query("review_status__in=reviewed,fixed", catalog)) == \
            "review_status__in=fixed,reviewed"
        # A status changed (as the app's review buttons do) shows on the next catalog: new key, new rows.
        key, count = catalog.reviews_key, C.cohort_count(store, C.parse_query("review_status__eq=fixed",
                                                                              catalog).cohort, None)
        state.set_review("image", 5, status="fixed")
        state.set_review("image", 40, status="fixed")
        fresh = C.catalog_of(store)
        assert fresh.reviews_key != key
        fixed = C.parse_query("review_status__eq=fixed", fresh).cohort
        assert C.cohort_count(store, fixed, None) == count + 2
        assert C.cohort_rows(store, fixed, None, columns=["image_id"])["image_id"].tolist() == [5, 8, 21, 40]
        assert C.catalog_of(store) is C.catalog_of(store)  # unchanged state and files: the cached catalog
    finally:
        store.close()


# --------------------------------------------------------------------------- pushed-down pages


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def unpushed_page(store: Store, cohort: Cohort, model_id: str | None, columns: list[str], order: list[str],
                  limit: int | None, offset: int) -> list[list]:
    """The page as the whole frame would give it: every image aggregated, then filtered, sorted and cut."""
    catalog = C.catalog_of(store)
    frame, params = C.frame_sql(store, model_id, catalog=catalog)
    where, where_params = C.where_sql(cohort, catalog)
    q = C.quote_identifier
    terms = [(o.lstrip("-"), o.startswith("-")) for o in order] + [("image_id", False)]
    sql = (f"SELECT {', '.join(q(c) for c in columns)} FROM ({frame}) AS f"
           + (f" WHERE {where}" if where else "")
           + " ORDER BY " + ", ".join(f"{q(n)} {'DESC' if d else 'ASC'} NULLS LAST" for n, d in terms))
    extra = []
    if limit is not None:
        sql += " LIMIT ?"
        extra.append(limit)
    sql += " OFFSET ?"
    frame = store.query(sql, params + where_params + extra + [offset])
    return [[_plain(v) for v in row] for row in frame.itertuples(index=False)], frame.dtypes.astype(str).tolist()


def pushed_page(store: Store, cohort: Cohort, model_id: str | None, columns: list[str], order: list[str],
                limit: int | None, offset: int) -> list[list]:
    frame = C.cohort_rows(store, cohort, model_id, columns=columns, order_by=order, limit=limit, offset=offset)
    assert list(frame.columns) == columns
    return [[_plain(v) for v in row] for row in frame.itertuples(index=False)], frame.dtypes.astype(str).tolist()


COHORTS = [
    "",
    "outcome__eq=incorrect",
    "outcome__eq=correct&brightness__lt=0.5",
    "brightness__lt=0.45&site__in=lab,warehouse",
    "g1.brightness__lt=0.3&g2.score__gt=0.7&clutter__gte=1",
    "g1.brightness__lt=0.3&g2.camera__eq=phone&error__eq=true",
    "label_issue__eq=true&occluded__eq=false",
    "flip_blur__lte=4&brightness__gt=0.4",
]


@pytest.mark.parametrize("task,first_window", [("multiclass", C.FIRST_WINDOW), ("detection", 16)])
def test_pushed_page_equals_the_whole_frame_page(stores, task, first_window, monkeypatch):
    # A window smaller than the store makes pages sorted by image columns widen it, up to every image.
    monkeypatch.setattr(C, "FIRST_WINDOW", first_window)
    store, _ = stores[task]
    catalog = C.catalog_of(store)
    card = {"multiclass": ["image_id", "true_label", "pred_label", "score", "outcome"],
            "detection": ["image_id", "outcome", "n_tp", "n_fp", "n_fn", "pred_label", "flip_blur"]}[task]
    orders = [["-image_id"], ["-score"], ["brightness", "-n_fp" if task == "detection" else "outcome"],
              ["label_quality_score"]]
    checked = 0
    for index, query in enumerate(COHORTS):
        cohort = C.parse_query(query, catalog).cohort
        total = C.cohort_count(store, cohort, MODEL)
        assert total == len(pushed_page(store, cohort, MODEL, ["image_id"], ["image_id"], None, 0)[0])
        pages = [(["image_id"], 24, 0), (["image_id"], 7, max(total - 3, 0)), (["image_id"], 5, total + 1),
                 (orders[index % 4], 24, 0), (orders[(index + 1) % 4], 24, 24), (orders[(index + 2) % 4], None, 5)]
        for order, limit, offset in pages:
            got = pushed_page(store, cohort, MODEL, card, order, limit, offset)
            assert got == unpushed_page(store, cohort, MODEL, card, order, limit, offset), (query, order, offset)
            checked += len(got[0])
    assert checked > 500  # the pages hold rows: equality is no accident of empty pages


def test_pushed_page_through_saved_cohorts(stores):
    store, _ = stores["detection"]
    state = StateDB.for_store(store.paths.base)
    catalog = C.catalog_of(store)
    parent = state.create_cohort("dim", C.parse_query("brightness__lt=0.55", catalog).cohort)
    cohort = Cohort((Filter("outcome", "eq", "incorrect"),), parent_id=parent.id)
    columns = ["image_id", "outcome", "n_fp", "n_fn"]
    expanded = Cohort((Filter("outcome", "eq", "incorrect"), Filter("brightness", "lt", 0.55)))
    for limit, offset in ((24, 0), (24, 48)):
        for order in (["-n_fn"], ["brightness"]):
            got = pushed_page(store, cohort, MODEL, columns, order, limit, offset)
            assert got[0] and got == unpushed_page(store, expanded, MODEL, columns, order, limit, offset)


def joined_outcome_counts(store: Store, cohort: Cohort, model_id: str, thresholds: dict) -> dict:
    """The reference: every image's outcome from the whole frame, joined to the cohort's selection."""
    catalog = C.catalog_of(store)
    selection, selection_params = C.compile_cohort(cohort, store, model_id=model_id, catalog=catalog, **thresholds)
    frame, frame_params = C.frame_sql(store, model_id, columns=["image_id", "outcome"], catalog=catalog, **thresholds)
    counts = store.query(f'SELECT f."outcome", count(*) AS n FROM ({frame}) AS f JOIN ({selection}) AS s '
                         f'USING ("image_id") GROUP BY 1', [*frame_params, *selection_params])
    return {(None if pd.isna(o) else str(o)): int(n) for o, n in zip(counts["outcome"], counts["n"])}


@pytest.mark.parametrize("task", ["multiclass", "detection"])
def test_outcome_counts_equal_the_whole_frame_counts(stores, task):
    store, _ = stores[task]
    catalog = C.catalog_of(store)
    settings = [{"iou": 0.5, "score_threshold": 0.5, "label_threshold": 0.5},
                {"iou": 0.75, "score_threshold": 0.3, "label_threshold": 0.5}]
    for thresholds in settings:
        for query in COHORTS:
            cohort = C.parse_query(query, catalog).cohort
            counts = C.cohort_outcome_counts(store, cohort, MODEL, catalog=catalog, **thresholds)
            assert counts == joined_outcome_counts(store, cohort, MODEL, thresholds), (query, thresholds)
            # Each count is its section's size, as the explorer pages it.
            for outcome in ("correct", "incorrect"):
                section = C.cohort_count(store, cohort.with_filters(Filter("outcome", "eq", outcome)), MODEL,
                                         catalog=catalog, **thresholds)
                assert counts.get(outcome, 0) == section, (query, outcome)
            assert sum(counts.values()) == C.cohort_count(store, cohort, MODEL, catalog=catalog, **thresholds)
    # A metadata cohort holds both outcomes: the equality above is no accident of empty sections.
    both = C.cohort_outcome_counts(store, C.parse_query(COHORTS[3], catalog).cohort, MODEL, catalog=catalog)
    assert both.get("correct", 0) > 0 and both.get("incorrect", 0) > 0


def test_outcome_counts_through_saved_cohorts_and_without_a_model(stores):
    store, _ = stores["detection"]
    state = StateDB.for_store(store.paths.base)
    catalog = C.catalog_of(store)
    parent = state.create_cohort("bright", C.parse_query("brightness__gt=0.5", catalog).cohort)
    cohort = Cohort((Filter("site", "in", ("lab", "warehouse")),), parent_id=parent.id)
    expanded = Cohort((Filter("site", "in", ("lab", "warehouse")), Filter("brightness", "gt", 0.5)))
    thresholds = {"iou": 0.5, "score_threshold": 0.5, "label_threshold": 0.5}
    got = C.cohort_outcome_counts(store, cohort, MODEL, state=state, catalog=catalog)
    assert got == joined_outcome_counts(store, expanded, MODEL, thresholds) and sum(got.values()) > 0
    assert C.cohort_outcome_counts(store, expanded, None, catalog=catalog) == {
        None: C.cohort_count(store, expanded, None, catalog=catalog)}
