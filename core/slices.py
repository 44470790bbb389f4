"""Automatic error-slice discovery (SliceLine).

``find_slices(store, model_id)`` looks for metadata slices, conjunctions of up
to ``max_order`` predicates on binned numeric and on categorical columns, where
the model's error rate is much higher than over the whole dataset. Slices are
ranked by SliceLine's score (S. Sagadeeva and M. Boehm, "SliceLine: Fast,
Linear-Algebra-based Slice Finding for ML Model Debugging", SIGMOD 2021)::

    sc(S) = α (ē_S / ē − 1) − (1 − α) (n / |S| − 1)

with ē the overall error rate, ē_S the slice's, n the number of images and α
weighing error against size. As in the paper the lattice is walked level by
level: a slice of level L+1 is built only from level-L parents that are large
enough (|S| ≥ min_size), hold an error, and whose score upper bound can still
beat the current top k; every L-subset of a candidate must have survived
(apriori). An image is an error when the model misclassifies it (multiclass),
does not match its label set exactly at the label threshold (multilabel), or
has any false positive or false negative at the IoU and score thresholds
(detection) — the same ``error`` column the cohort compiler filters on.

Each predicate is one or two cohort filters (a numeric bin ``[lo, hi)`` is
``col__gte=lo&col__lt=hi``), so every slice carries a query string in the
cohort URL grammar that opens exactly its images. Membership is evaluated on
bit-packed columns (one bit per image): a candidate's size and error count are
ANDs and popcounts, vectorised over chunks of candidates.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from .arrow_columns import categorical, numbers
from .cohorts import (Catalog, Cohort, Filter, catalog_of, compile_cohort, display_number, filter_sql, format_number,
                      frame_sql, quote_identifier, to_query)
from .errors import EvalError
from .store import Store

if TYPE_CHECKING:
    from .state import StateDB

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.95  # SliceLine's default weight of the error term
DEFAULT_BINS = 5  # quantile bins per numeric column
MIN_LIFT = 1.1  # a slice's error rate over the overall rate, at least, to be reported
SIGNIFICANT_DIGITS = 3  # bin edges are rounded so query strings stay readable
_CHUNK_BYTES = 16 << 20  # memory for one batch of candidate evaluations (64 MiB was no faster at 1M images)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Predicate:
    """One slicing condition: a column's value or numeric bin, as cohort filters."""

    column: str
    label: str  # human words, e.g. "Brightness < 0.31"
    filters: tuple[Filter, ...]  # a numeric bin is two filters: gte lo, lt hi


@dataclass(frozen=True)
class Slice:
    """A conjunction of predicates with its size, error rate and SliceLine score."""

    predicates: tuple[Predicate, ...]
    size: int
    errors: int
    error_rate: float
    score: float
    query: str

    @property
    def description(self) -> str:
        return " and ".join(p.label for p in self.predicates)

    def to_dict(self) -> dict:
        return {"description": self.description, "predicates": [p.label for p in self.predicates],
                "size": self.size, "errors": self.errors, "error_rate": self.error_rate, "score": self.score,
                "query": self.query}


@dataclass(frozen=True)
class SliceSearch:
    """Bit-packed predicate columns of one dataset and model, ready to search."""

    predicates: tuple[Predicate, ...]
    feature_of: np.ndarray  # (m,) column index of each predicate: two of one column never combine
    bits: np.ndarray  # (m, words) uint64, bit i set when image i satisfies the predicate
    error_bits: np.ndarray  # (words,) uint64
    n: int
    n_errors: int


# --------------------------------------------------------------------------- predicates


def _plain(value: float) -> int | float:
    """Whole numbers as int, so the query reads ``width__lt=640``, not ``640.0``."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    return np.array([float(f"{v:.{digits}g}") for v in values], dtype=np.float64)


def bin_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray | None:
    """Quantile edges rounded to a few significant digits, or None when ``bins`` values or fewer occur.

    Rounding keeps query strings readable (``brightness__lt=0.31``); edges
    that rounding pushes onto or past the extremes are dropped, since their
    bins would be empty.
    """
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    distinct = np.unique(present)
    if len(distinct) <= bins:
        return None
    edges = np.unique(_round_significant(np.quantile(present, np.arange(1, bins) / bins)))
    return edges[(edges > distinct[0]) & (edges <= distinct[-1])]


def numeric_predicates(column: str, label: str, values: np.ndarray, *, bins: int = DEFAULT_BINS,
                       codes: np.ndarray | None = None, edges: np.ndarray | None = None
                       ) -> list[tuple[Predicate, np.ndarray]]:
    """Quantile bins ``[lo, hi)`` of a numeric column, with missing values as a bin of their own.

    A column with at most ``bins`` distinct values gets one equality predicate
    per value instead. ``codes`` (the number of edges each value is at or
    above, from ``bin_codes_sql``) makes membership follow the cohort
    compiler's own comparison, so a slice's size is its cohort's count to the
    image; without it, values are compared with the edges in float64. ``edges``: ``bin_edges(values,
    bins)``, which ``codes`` count, when the caller has it.
    """
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    out: list[tuple[Predicate, np.ndarray]] = []
    if edges is None:
        edges = bin_edges(values, bins)
    if edges is None:
        for v in np.unique(values[present]):
            value = _plain(v)
            out.append((Predicate(column, f"{label} = {display_number(value)}", (Filter(column, "eq", value),)),
                        values == v))
    else:
        if codes is None:
            codes = np.searchsorted(edges, values, side="right")
        bounds = [-math.inf, *edges.tolist(), math.inf]
        for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            filters = []
            if lo != -math.inf:
                filters.append(Filter(column, "gte", _plain(lo)))
            if hi != math.inf:
                filters.append(Filter(column, "lt", _plain(hi)))
            if lo == -math.inf:
                words = f"{label} < {format_number(_plain(hi))}"
            elif hi == math.inf:
                words = f"{label} ≥ {format_number(_plain(lo))}"
            else:
                words = f"{format_number(_plain(lo))} ≤ {label} < {format_number(_plain(hi))}"
            out.append((Predicate(column, words, tuple(filters)), present & (codes == index)))
    if not present.all():
        out.append((Predicate(column, f"{label} is missing", (Filter(column, "isnull"),)), ~present))
    return out


def bin_codes_sql(column: str, edges: np.ndarray, catalog: Catalog) -> tuple[str, list]:
    """SQL over a frame counting the edges a value is at or above, with the compiler's ``gte`` filters."""
    parts, params = [], []
    for edge in edges:
        fragment, fragment_params = filter_sql(Filter(column, "gte", _plain(edge)), catalog)
        parts.append(f"CAST(coalesce(({fragment}), false) AS INTEGER)")
        params += fragment_params
    return " + ".join(parts) or "0", params


def categorical_predicates(column: str, label: str, values: pd.Series, *, min_size: int
                           ) -> list[tuple[Predicate, np.ndarray]]:
    """One equality predicate per value held by at least ``min_size`` images (rarer ones cannot slice)."""
    series = pd.Series(values).reset_index(drop=True)
    missing = series.isna().to_numpy()
    codes, uniques = pd.factorize(series, sort=True)
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    out: list[tuple[Predicate, np.ndarray]] = []
    for code in np.flatnonzero(counts >= min_size):
        value = uniques[code]
        value = value.item() if hasattr(value, "item") else value  # numpy scalars → Python, as parsing gives
        shown = ("true" if value else "false") if isinstance(value, bool) else \
            display_number(value) if isinstance(value, float) else value
        out.append((Predicate(column, f"{label} = {shown}", (Filter(column, "eq", value),)), codes == code))
    if missing.sum() >= min_size:
        out.append((Predicate(column, f"{label} is missing", (Filter(column, "isnull"),)), missing))
    return out


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """(m, n) bool → (m, ceil(n / 64)) uint64, bit i of row j = masks[j, i]."""
    masks = np.atleast_2d(np.asarray(masks, dtype=bool))
    m, n = masks.shape
    padded = np.zeros((m, -(-n // 64) * 64), dtype=bool)
    padded[:, :n] = masks
    return np.packbits(padded, axis=1, bitorder="little").view(np.uint64)


# --------------------------------------------------------------------------- SliceLine


def sliceline_score(size: np.ndarray, errors: np.ndarray, n: int, n_errors: int,
                    alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """SliceLine's score of slices with ``size`` images of which ``errors`` are errors."""
    size = np.asarray(size, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    mean_error = n_errors / n
    with np.errstate(divide="ignore", invalid="ignore"):
        score = alpha * ((errors / size) / mean_error - 1) - (1 - alpha) * (n / size - 1)
    return np.where(size > 0, score, -np.inf)


def score_upper_bound(size: np.ndarray, errors: np.ndarray, n: int, n_errors: int, min_size: int,
                      alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The best score any sub-slice of a slice (``size``, ``errors``) of at least ``min_size`` can reach.

    A sub-slice has size s ∈ [min_size, size] and at most min(errors, s) errors
    (errors are 0/1). For fixed s the score grows with the error count, and
    with s = min(errors, s') it is monotone in s on each side of s = errors, so
    the maximum is at s ∈ {min_size, errors, size} (clamped), as in SliceLine.
    """
    size = np.asarray(size, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    best = np.full(size.shape, -np.inf)
    for s in (np.full(size.shape, float(min_size)), errors, size):
        s = np.clip(s, min_size, size)
        feasible = size >= min_size
        score = sliceline_score(s, np.minimum(errors, s), n, n_errors, alpha)
        best = np.where(feasible, np.maximum(best, score), best)
    return best


def _popcount(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def _evaluate(search: SliceSearch, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and error counts of slices given as (c, L) predicate indices."""
    c, order = members.shape
    words = search.bits.shape[1]
    sizes = np.empty(c, dtype=np.int64)
    errors = np.empty(c, dtype=np.int64)
    step = max(1, _CHUNK_BYTES // max(1, words * 8 * (order + 1)))
    for start in range(0, c, step):
        block = members[start:start + step]
        inside = np.bitwise_and.reduce(search.bits[block], axis=1)  # (b, words)
        sizes[start:start + step] = _popcount(inside)
        errors[start:start + step] = _popcount(inside & search.error_bits)
    return sizes, errors


def _keys(members: np.ndarray, m: int) -> np.ndarray:
    """One int64 per sorted predicate tuple (m ** L stays far below 2 ** 63 for L ≤ 3)."""
    key = np.zeros(len(members), dtype=np.int64)
    for j in range(members.shape[1]):
        key = key * m + members[:, j]
    return key


def _children(parents: np.ndarray, feature_of: np.ndarray, m: int) -> np.ndarray:
    """Level L+1 candidates from sorted level-L parents (apriori join on the first L-1 predicates)."""
    count, order = parents.shape
    if count < 2:
        return np.zeros((0, order + 1), dtype=np.int64)
    parents = parents[np.lexsort(parents.T[::-1])]
    prefix = _keys(parents[:, :-1], m) if order > 1 else np.zeros(count, dtype=np.int64)
    # Pairs only within a block of equal prefix (contiguous after sorting): each
    # parent pairs with the parents after it up to its block's end.
    block_start = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
    block_end = np.r_[block_start[1:], count]
    end_of = np.repeat(block_end, block_end - block_start)
    partners = end_of - np.arange(count) - 1
    left = np.repeat(np.arange(count), partners)
    first = np.cumsum(partners) - partners
    right = left + 1 + (np.arange(len(left)) - np.repeat(first, partners))
    cand = np.concatenate([parents[left], parents[right][:, -1:]], axis=1)
    features = feature_of[cand]
    distinct_features = (np.diff(np.sort(features, axis=1), axis=1) != 0).all(axis=1)
    cand = cand[distinct_features]
    if order > 1 and len(cand):
        parent_keys = np.sort(_keys(parents, m))
        for drop in range(order + 1):
            subset = np.delete(cand, drop, axis=1)
            cand = cand[np.isin(_keys(subset, m), parent_keys, assume_unique=False)]
            if not len(cand):
                break
    return cand


def search_slices(search: SliceSearch, *, max_order: int = 3, min_size: int, top_k: int = 10,
                  alpha: float = DEFAULT_ALPHA) -> list[tuple[tuple[int, ...], int, int, float]]:
    """SliceLine over prepared predicates: the top-k (members, size, errors, score), best first, of
    the slices whose error rate is at least ``MIN_LIFT`` times the overall rate."""
    n, n_errors = search.n, search.n_errors
    m = len(search.predicates)
    if n == 0 or n_errors == 0 or m == 0:
        return []
    found_members: list[np.ndarray] = []
    found_stats: list[np.ndarray] = []  # columns: size, errors, score

    def threshold() -> float:
        if not found_stats:
            return 0.0
        scores = np.concatenate([s[:, 2] for s in found_stats])
        if len(scores) < top_k:
            return 0.0
        return max(0.0, float(np.partition(scores, len(scores) - top_k)[len(scores) - top_k]))

    members = np.arange(m, dtype=np.int64)[:, None]
    for level in range(1, max_order + 1):
        if level > 1:
            members = _children(members, search.feature_of, m)
            if not len(members):
                break
            # A child lies inside each parent: the parents' smallest size and error count bound it.
            parent_keys = _keys(prev_members, m)
            by_key = np.argsort(parent_keys)
            sorted_keys, sorted_stats = parent_keys[by_key], prev_stats[by_key]
            bounds = np.full((len(members), 2), np.inf)
            for drop in range(level):
                where = np.searchsorted(sorted_keys, _keys(np.delete(members, drop, axis=1), m))
                bounds = np.minimum(bounds, sorted_stats[where])
            keep = score_upper_bound(bounds[:, 0], bounds[:, 1], n, n_errors, min_size, alpha) > threshold()
            members, parent_size = members[keep], bounds[keep, 0]
            if not len(members):
                break
        else:
            parent_size = np.full(len(members), n + 1)
        sizes, errors = _evaluate(search, members)
        scores = sliceline_score(sizes, errors, n, n_errors, alpha)
        # A child as large as one of its parents is that parent's images in more words
        # (and so are its own children): neither reported nor expanded.
        valid = (sizes >= min_size) & (errors > 0) & (sizes < parent_size)
        # Reported only clearly above the overall rate: a positive score alone lets a slice of nearly
        # every image through at x1.00.
        good = valid & (scores > 0) & (errors * n >= MIN_LIFT * n_errors * sizes)
        if good.any():
            found_members.append(np.pad(members[good], ((0, 0), (0, max_order - level)), constant_values=-1))
            found_stats.append(np.stack([sizes[good], errors[good], scores[good]], axis=1).astype(np.float64))
        # Parents for the next level: big enough, holding errors, able to beat the top k.
        expandable = valid & (score_upper_bound(sizes, errors, n, n_errors, min_size, alpha) > threshold())
        prev_members = members[expandable]
        prev_stats = np.stack([sizes, errors], axis=1)[expandable]
        members = prev_members
        log.debug("level %d: %d evaluated, %d expandable", level, len(sizes), len(members))
    if not found_stats:
        return []
    all_members = np.concatenate(found_members)
    stats = np.concatenate(found_stats)
    # Best score first; ties: larger slice, then fewer predicates, then predicate order (stable output).
    order_len = (all_members >= 0).sum(axis=1)
    keys = [all_members[:, j] for j in range(max_order - 1, -1, -1)]
    rank = np.lexsort(keys + [order_len, -stats[:, 0], -stats[:, 2]])[:top_k]
    return [(tuple(int(x) for x in all_members[i] if x >= 0), int(stats[i, 0]), int(stats[i, 1]),
             float(stats[i, 2])) for i in rank]


# --------------------------------------------------------------------------- store entry point


def default_min_size(n: int) -> int:
    """SliceLine's default support: 1 % of the images, and never fewer than 10."""
    return max(10, math.ceil(0.01 * n))


def sliceable_columns(catalog: Catalog) -> list[str]:
    """Image columns a slice may use: scalar numbers, flags, text and the true class.

    Model columns (the error itself, scores) and identifiers are left out;
    list columns and types compared as text (timestamps) are too, since a
    quantile or equality on them would not read as a cohort filter.
    """
    return sorted(name for name, info in catalog.columns.items()
                  if info.source != "model" and not info.is_identifier and not info.is_list
                  and info.values in ("number", "boolean", "text", "class"))


class _SearchBuilder:
    """Predicates gathered column by column, each kept bit-packed (1/8 of a bool mask) as soon as found."""

    def __init__(self, errors: np.ndarray, min_size: int):
        self.errors, self.min_size, self.n = np.asarray(errors, dtype=bool), min_size, len(errors)
        self.predicates: list[Predicate] = []
        self.packed: list[np.ndarray] = []
        self.feature_of: list[int] = []

    def add(self, feature: int, found: list[tuple[Predicate, np.ndarray]]) -> None:
        for predicate, mask in found:
            # Smaller predicates can never be part of a slice; one holding every image says nothing.
            if self.min_size <= mask.sum() < self.n:
                self.predicates.append(predicate)
                self.packed.append(pack_bits(np.asarray(mask, dtype=bool)[None, :])[0])
                self.feature_of.append(feature)

    def search(self) -> SliceSearch:
        bits = np.stack(self.packed) if self.packed else np.zeros((0, -(-self.n // 64)), dtype=np.uint64)
        return SliceSearch(tuple(self.predicates), np.array(self.feature_of, dtype=np.int64), bits,
                           pack_bits(self.errors[None, :])[0], self.n, int(self.errors.sum()))


def _categories_of(name: str, values: pd.Series, catalog: Catalog, min_size: int
                   ) -> list[tuple[Predicate, np.ndarray]]:
    info = catalog.columns[name]
    if info.values == "class":
        # Class names in the query: parsing reads a name before an id.
        values = values.map(lambda v: None if pd.isna(v) else catalog.classes[int(v)])
    return categorical_predicates(name, info.label, values, min_size=min_size)


def store_search(store: Store, catalog: Catalog, model_id: str, columns: list[str], thresholds: dict, *,
                 min_size: int | None = None, bins: int = DEFAULT_BINS,
                 within: np.ndarray | None = None) -> tuple[SliceSearch, bool, int]:
    """The search over a model's evaluated images (of ``within``, image ids, when given): (search, whether every
    such image was evaluated, min size).

    One column at a time, so a million images never hold more than one column's
    values: its values (for the quantile edges), then the compiler's own filters
    put each value in its bin, and its predicates are kept as bits.
    """
    q = quote_identifier

    def by_image(name: str, expression: str = "", params: Sequence = ()) -> pa.ChunkedArray:
        sql, frame_params = frame_sql(store, model_id, columns=["image_id", name], catalog=catalog, **thresholds)
        return store.arrow(f"SELECT {expression or 'f.' + q(name)} FROM ({sql}) AS f ORDER BY f.{q('image_id')}",
                           [*params, *frame_params]).column(0)

    error = by_image("error")
    evaluated = error.is_valid().to_numpy(zero_copy_only=False)
    if within is not None:
        members = np.isin(by_image("image_id").to_numpy(), within)
        evaluated = evaluated[members]
        rows = np.flatnonzero(members)[evaluated]
    else:
        rows = np.flatnonzero(evaluated)
    errors = error.fill_null(False).to_numpy(zero_copy_only=False)[rows]
    size_floor = default_min_size(len(rows)) if min_size is None else max(1, int(min_size))
    builder = _SearchBuilder(errors, size_floor)
    for feature, name in enumerate(columns):
        if catalog.columns[name].values != "number":
            values = pd.Series(categorical(by_image(name), rows))
            builder.add(feature, _categories_of(name, values, catalog, size_floor))
            continue
        values = numbers(by_image(name), rows)
        edges, codes = bin_edges(values, bins), None
        if edges is not None and len(edges):
            text, code_params = bin_codes_sql(name, edges, catalog)
            codes = by_image(name, text, code_params).to_numpy()[rows]
        builder.add(feature, numeric_predicates(name, catalog.columns[name].label, values, bins=bins, codes=codes,
                                                edges=edges))
    return builder.search(), bool(evaluated.all()), size_floor


def find_slices(store: Store | str, model_id: str | None = None, *, iou: float = 0.5,
                score_threshold: float | None = None, label_threshold: float | None = None, max_order: int = 3,
                min_size: int | None = None, top_k: int = 10, columns: list[str] | None = None,
                alpha: float = DEFAULT_ALPHA, bins: int = DEFAULT_BINS, cohort: Cohort | None = None,
                state: StateDB | None = None) -> list[Slice]:
    """The ``top_k`` metadata slices with the highest SliceLine score for one model.

    ``model_id`` defaults to the store's first model; thresholds to the
    store's defaults. ``columns`` limits the search to some columns (default:
    every sliceable column). ``cohort`` (with ``state`` for saved cohorts)
    limits it to the cohort's images: rates and sizes are then the cohort's, and
    each slice's query is the cohort's and the slice's conditions. Images the
    model has no prediction for are left out; then each slice's query also says
    ``error__notnull=true`` so its count is the slice's size.
    """
    if not isinstance(store, Store):
        store = Store(store)
    catalog = catalog_of(store)
    model_id = _resolve_model(catalog, model_id)
    if max_order < 1:
        raise EvalError(f"max_order must be at least 1, got {max_order}", field="max_order")
    if top_k < 1:
        raise EvalError(f"top_k must be at least 1, got {top_k}", field="top_k")
    allowed = sliceable_columns(catalog)
    if columns is None:
        columns = allowed
    else:
        for name in columns:
            if name not in allowed:
                raise EvalError(f"cannot slice on column {name!r}", field="columns", choices=allowed)
        columns = list(dict.fromkeys(columns))
    thresholds = {"iou": iou,
                  "score_threshold": catalog.default_score_threshold if score_threshold is None else score_threshold,
                  "label_threshold": catalog.default_label_threshold if label_threshold is None else label_threshold}
    cohort = cohort if cohort is not None and not cohort.is_global else None
    within = None
    if cohort is not None:
        sql, params = compile_cohort(cohort, store, model_id=model_id, state=state, catalog=catalog, **thresholds)
        within = store.arrow(f"SELECT image_id FROM ({sql}) AS c", params).column(0).to_numpy()
    search, all_evaluated, size_floor = store_search(store, catalog, model_id, columns, thresholds,
                                                     min_size=min_size, bins=bins, within=within)
    log.info("slices: %d images, %d errors, %d predicates over %d columns",
             search.n, search.n_errors, len(search.predicates), len(columns))
    found = search_slices(search, max_order=max_order, min_size=size_floor, top_k=top_k, alpha=alpha)
    suffix = "" if all_evaluated else "&error__notnull=true"
    out = []
    for members, size, errors, score in found:
        predicates = tuple(search.predicates[i] for i in members)
        conditions = tuple(f for p in predicates for f in p.filters)
        query = to_query(cohort.with_filters(*conditions) if cohort is not None else Cohort(conditions)) + suffix
        out.append(Slice(predicates, size, errors, errors / size, score, query))
    return out


def _resolve_model(catalog: Catalog, model_id: str | None) -> str:
    if not catalog.models:
        raise EvalError("the store has no model to find error slices of", field="model")
    if model_id is None:
        return catalog.models[0]
    if model_id not in catalog.models:
        raise EvalError(f"unknown model {model_id!r}", field="model", choices=list(catalog.models))
    return model_id


def slices_main(argv: list[str] | None = None) -> int:
    """``visionlens slices STORE [--model M] [--json]``."""
    parser = argparse.ArgumentParser(prog="visionlens slices", description="ranked error slices (SliceLine)")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--model", help="model id (default: the model added to the store first)")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold (detection)")
    parser.add_argument("--top", type=int, default=10, help="number of slices (default 10)")
    parser.add_argument("--max-order", type=int, default=3, help="most predicates per slice (default 3)")
    parser.add_argument("--min-size", type=int, help="fewest images in a slice (default 1%% of images, ≥ 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    store = Store(args.store)
    model_id = _resolve_model(catalog_of(store), args.model)
    found = find_slices(store, model_id, iou=args.iou, top_k=args.top, max_order=args.max_order,
                        min_size=args.min_size)
    if args.json:
        sys.stdout.write(json.dumps({"store": store.name, "model": model_id,
                                     "slices": [s.to_dict() for s in found]}) + "\n")
        return 0
    if not found:
        sys.stdout.write(f"no slice of {store.name} has an error rate clearly above the overall rate "
                         f"for model {model_id}\n")
        return 0
    lines = [f"error slices of {store.name}, model {model_id} (SliceLine score, best first)"]
    for rank, s in enumerate(found, start=1):
        lines += [f"{rank:2d}. {s.description}",
                  f"    {s.size} images, error rate {s.error_rate:.1%}, score {s.score:.3f}",
                  f"    ?{s.query}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
