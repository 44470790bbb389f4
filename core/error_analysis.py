"""Error analysis: where in the metadata a model fails, as cohorts one can open.

Two views over one per-image *error frame* (the cohort's images, the chosen
metadata features and an error target, read through the cohort compiler's
frame at the live thresholds):

- ``fit_error_tree``: a scikit-learn decision tree over the features that
  predicts the error. Every node carries its condition path, size, error count
  and error rate, and a cohort (``Cohort`` of URL-grammar filters) that selects
  exactly its images, so a node becomes a bookmarkable cohort.
- ``error_heatmap``: one or two features binned (equal-width or quantile
  numeric bins, one bin per category), each cell with its size, errors, error
  rate and cohort.

Targets (``ErrorTarget``): ``error`` is the frame's ``error`` column (a
misclassified image; multilabel: any label wrong; detection: any false
positive or false negative at the IoU and score thresholds); ``label`` is one
multilabel label wrong (predicted without being true or the reverse); ``rate``
is a detection image's share of wrong objects, (FP + FN) / (TP + FP + FN), fitted
with a regression tree. Images whose target is unknown (no prediction) count
in a node's size but not in its error rate.

Node conditions are made readable and exact: a numeric split is moved to the
shortest decimal that still separates the fitted rows the same way
(``brightness__lte=0.31``), categories are one-hot columns (``site = lab``) or
ordinal codes ordered by error rate (``site ∈ {lab, office}``, the grouping a
tree finds best for a binary target), and a missing value follows the side
scikit-learn sends it to (``… or missing`` becomes OR-ed cohort groups). Node
statistics are counted by applying those conditions to every image of the
frame, so a node's size equals the count of its cohort even when the tree was
fitted on a sample.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from itertools import product
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from .arrow_columns import categorical, columns_of, image_order, numbers
from .cohorts import (Catalog, Cohort, ColumnInfo, Filter, catalog_of, compile_cohort, describe, display_number,
                      frame_sql, quote_identifier)
from .errors import CohortError
from .store import Store

if TYPE_CHECKING:
    from .state import StateDB

log = logging.getLogger(__name__)

DEFAULT_MAX_FIT_ROWS = 100_000  # larger cohorts are fitted on a uniform sample of this many images
MAX_ONEHOT_VALUES = 32  # most frequent categories given a one-hot column; rarer ones share "other"
MAX_HEATMAP_CATEGORIES = 12  # most frequent categories shown as heatmap bins; the rest is one "other" bin
CATEGORICAL_ENCODINGS = ("onehot", "ordinal")
BINNINGS = ("equal", "quantile")
_MISSING_TEXT = "missing"


# --------------------------------------------------------------------------- targets and features


@dataclass(frozen=True)
class ErrorTarget:
    """What the tree predicts: ``error`` (any error), ``label`` (one multilabel label wrong) or
    ``rate`` (a detection image's share of wrong objects)."""

    kind: str = "error"
    label: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("error", "label", "rate"):
            raise CohortError(f"unknown error target {self.kind!r}", field="target",
                              choices=["error", "label", "rate"])
        if (self.kind == "label") != (self.label is not None):
            raise CohortError("a label target needs exactly one label id", field="target")

    @property
    def is_rate(self) -> bool:
        return self.kind == "rate"

    def describe(self, catalog: Catalog) -> str:
        if self.kind == "label":
            return f"label '{catalog.classes[self.label]}' wrong"
        if self.kind == "rate":
            return "share of wrong objects (FP + FN) / (TP + FP + FN)"
        return {"multiclass": "misclassified", "multilabel": "any label wrong",
                "detection": "any false positive or false negative"}.get(catalog.task, "error")


def error_targets(catalog: Catalog) -> list[ErrorTarget]:
    """The targets that make sense for the store's task."""
    if catalog.task == "multilabel":
        return [ErrorTarget()] + [ErrorTarget("label", k) for k in range(len(catalog.classes))]
    if catalog.task == "detection":
        return [ErrorTarget(), ErrorTarget("rate")]
    return [ErrorTarget()]


def _check_target(target: ErrorTarget, catalog: Catalog) -> None:
    if target.kind == "label" and (catalog.task != "multilabel" or not 0 <= target.label < len(catalog.classes)):
        raise CohortError(f"label target {target.label!r} needs a multilabel store and a label id "
                          f"0..{len(catalog.classes) - 1}", field="target")
    if target.kind == "rate" and catalog.task != "detection":
        raise CohortError("the per-image error rate target is for detection stores", field="target")


@dataclass(frozen=True)
class Feature:
    """A metadata column the tree and the heatmap can split on."""

    name: str
    label: str
    kind: str  # numeric | categorical
    values: str  # the catalog's value kind: number, text, boolean, class


def feature_of(info: ColumnInfo, catalog: Catalog) -> Feature | None:
    """The column as a feature, or None when it cannot be one (lists, timestamps, model outputs)."""
    if info.is_list or info.values not in ("number", "text", "boolean", "class") or info.is_identifier:
        return None
    if info.needs_model and not (catalog.task == "multiclass" and info.name in ("pred_label", "score")):
        return None  # error and outcome are the target; detection/multilabel predictions are lists
    kind = "numeric" if info.values == "number" and info.kind != "categorical" else "categorical"
    return Feature(info.name, info.label, kind, info.values)


def available_features(catalog: Catalog) -> list[Feature]:
    """Every column the error analysis can use, metadata first, then labels and predictions."""
    features = [f for info in catalog.columns.values() if (f := feature_of(info, catalog)) is not None]
    order = {"user": 0, "auto": 1, "derived": 2, "model": 3}
    return sorted(features, key=lambda f: (order.get(catalog.columns[f.name].source, 4), f.label.lower()))


def _feature(catalog: Catalog, name: str) -> Feature:
    feature = feature_of(catalog.column(name, field_name="features"), catalog)
    if feature is None:
        raise CohortError(f"{name} cannot be an error-analysis feature", field="features",
                          choices=[f.name for f in available_features(catalog)])
    return feature


# --------------------------------------------------------------------------- the error frame


@dataclass(frozen=True)
class ErrorFrame:
    """One row per image of a cohort: feature values, target and error count.

    ``target`` is 0/1 (or a rate in [0, 1]) with NaN where unknown; ``errors``
    is what a node's error count sums (the target itself, or FP + FN objects).
    """

    image_ids: np.ndarray
    features: pd.DataFrame  # one column per Feature.name, in image order
    specs: tuple[Feature, ...]
    target: np.ndarray
    errors: np.ndarray
    kind: ErrorTarget
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def known(self) -> np.ndarray:
        return ~np.isnan(self.target)

    @property
    def error_rate(self) -> float:
        known = self.known
        return float(self.target[known].mean()) if known.any() else float("nan")

    @property
    def total_errors(self) -> float:
        return float(np.nansum(self.errors))

    def spec(self, name: str) -> Feature:
        for feature in self.specs:
            if feature.name == name:
                return feature
        raise CohortError(f"{name} is not a feature of this error frame", field="features",
                          choices=[f.name for f in self.specs])


def _target_sql(target: ErrorTarget) -> tuple[str, list, str, list]:
    """(target expression, params, error-count expression, params) over the frame ``f``."""
    q = quote_identifier
    if target.kind == "label":
        expr = (f"CAST(list_contains(f.{q('pred_label')}, ?) <> list_contains(f.{q('true_label')}, ?) "
                f"AS DOUBLE)")
        return expr, [target.label, target.label], expr, [target.label, target.label]
    if target.kind == "rate":
        wrong = f"(f.{q('n_fp')} + f.{q('n_fn')})"
        total = f"(f.{q('n_tp')} + f.{q('n_fp')} + f.{q('n_fn')})"
        # An image with nothing to find and nothing found has no wrong objects.
        return (f"CASE WHEN {total} = 0 THEN 0.0 ELSE CAST({wrong} AS DOUBLE) / {total} END", [],
                f"CAST({wrong} AS DOUBLE)", [])
    expr = f"CAST(f.{q('error')} AS DOUBLE)"
    return expr, [], expr, []


_TARGET_COLUMNS = {"error": ("error",), "label": ("true_label", "pred_label"), "rate": ("n_tp", "n_fp", "n_fn")}


def load_error_frame(store: Store, cohort: Cohort, model_id: str, features: Sequence[str],
                     target: ErrorTarget = ErrorTarget(), *, iou: float = 0.5, score_threshold: float = 0.5,
                     label_threshold: float = 0.5, state: "StateDB | None" = None,
                     catalog: Catalog | None = None) -> ErrorFrame:
    """The cohort's images with the chosen features and the target, at the given thresholds."""
    catalog = catalog or catalog_of(store)
    if model_id is None:
        raise CohortError("error analysis needs a model; choose one", field="model", choices=list(catalog.models))
    _check_target(target, catalog)
    names = list(dict.fromkeys(features))
    specs = tuple(_feature(catalog, name) for name in names)
    thresholds = {"iou": iou, "score_threshold": score_threshold, "label_threshold": label_threshold}
    selection, selection_params = compile_cohort(cohort, store, model_id=model_id, state=state, catalog=catalog,
                                                 **thresholds)
    frame, frame_params = frame_sql(store, model_id, catalog=catalog, **thresholds,
                                    columns=["image_id", *names, *_TARGET_COLUMNS[target.kind]])
    target_expr, target_params, errors_expr, errors_params = _target_sql(target)
    q = quote_identifier
    outputs = [f"f.{q('image_id')} AS {q('image_id')}"]
    outputs += [f"f.{q(name)} AS {q(f'c{i}')}" for i, name in enumerate(names)]
    outputs += [f"{target_expr} AS {q('target')}", f"{errors_expr} AS {q('errors')}"]
    sql = f"SELECT {', '.join(outputs)} FROM ({frame}) AS f "
    if cohort.is_global:
        selection_params = []  # every image: no join needed
    else:
        sql += f"SEMI JOIN ({selection}) AS s ON s.{q('image_id')} = f.{q('image_id')} "
    # Put in image order here, not by ``ORDER BY``: DuckDB's sort of a million wide rows, the
    # Arrow result and the columns converted from it all took memory at once.
    table = store.arrow(sql, target_params + errors_params + frame_params + selection_params)
    order = image_order(table)
    columns = columns_of(table)
    del table  # each Arrow column is freed as soon as it is converted
    data = {spec.name: (numbers if spec.kind == "numeric" else categorical)(columns.pop(f"c{i}"), order)
            for i, spec in enumerate(specs)}
    return ErrorFrame(columns.pop("image_id").to_numpy()[order].astype(np.int64),
                      pd.DataFrame(data, columns=names, copy=False), specs, numbers(columns.pop("target"), order),
                      numbers(columns.pop("errors"), order), target, tuple(catalog.classes))


# --------------------------------------------------------------------------- readable numbers


def format_value(value: float) -> str:
    """A number as people write it: integers without ``.0``, otherwise the shortest exact text."""
    value = float(value)
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def _as_filter_number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def readable_threshold(low: float, high: float) -> float:
    """The number with the fewest significant digits in ``[low, high)`` (``low < high``).

    A tree split between the largest value sent left (``low``) and the smallest
    sent right (``high``) can move anywhere in that gap without changing how
    the fitted rows divide, so it moves where it reads best: an integer when
    one fits at that precision (``clutter ≤ 0``), else the candidate nearest
    the middle of the gap.
    """
    if not low < high:
        return float(low)
    middle = (low + high) / 2
    for digits in range(1, 18):
        candidates = set()
        for value in (middle, low, high):
            if value == 0:
                candidates.add(0.0)
                continue
            step = 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1)
            if not step > 0:  # subnormal values: nothing shorter to find at this precision
                continue
            for rounded in (math.floor(value / step), math.ceil(value / step), round(value / step)):
                candidates.add(float(f"{rounded * step:.{digits}g}"))
        fitting = [c for c in candidates if low <= c < high]
        if fitting:
            return min(fitting, key=lambda c: (not c.is_integer(), abs(c - middle)))
    return float(low)


def _round_edges(edges: np.ndarray) -> np.ndarray:
    """Interior bin edges rounded to a tenth of the narrowest bin (readable, still ordered)."""
    if len(edges) == 0:
        return edges
    gaps = np.diff(edges)
    gaps = gaps[gaps > 0]
    step = float(gaps.min()) / 10 if len(gaps) else abs(float(edges[0])) / 10 or 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return np.unique(np.round(edges, decimals))


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class _Categories:
    """A categorical feature's values: codes 0..k-1 for the vocabulary, k for missing."""

    vocab: tuple  # distinct present values, sorted (class ids as ints)
    codes: np.ndarray  # int64 per row
    has_missing: bool

    @property
    def missing_code(self) -> int:
        return len(self.vocab)


def _categories(values: pd.Series) -> _Categories:
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    codes = np.asarray(codes, dtype=np.int64)
    vocab = tuple(uniques.tolist())
    missing = codes < 0
    codes[missing] = len(vocab)
    return _Categories(vocab, codes, bool(missing.any()))


def _value_for_filter(value: object, feature: Feature, classes: Sequence[str]) -> object:
    if feature.values == "class":
        return classes[int(value)]
    if feature.values == "boolean":
        return bool(value)
    if feature.values == "number":
        return _as_filter_number(value)
    return str(value)


def _value_text(value: object, feature: Feature, classes: Sequence[str]) -> str:
    shown = _value_for_filter(value, feature, classes)
    if isinstance(shown, bool):
        return "true" if shown else "false"
    if isinstance(shown, (int, float)):
        return format_value(shown)
    return str(shown)


def _category_filters(feature: Feature, cats: _Categories, allowed: frozenset[int],
                      classes: Sequence[str]) -> list[Filter]:
    """The fewest filters selecting exactly the images whose category code is in ``allowed``."""
    name = feature.name
    keep = [c for c in range(len(cats.vocab)) if c in allowed]
    drop = [c for c in range(len(cats.vocab)) if c not in allowed]
    values = lambda codes: tuple(_value_for_filter(cats.vocab[c], feature, classes) for c in codes)  # noqa: E731
    # Missing values only constrain the form when the column holds some.
    missing = (cats.missing_code in allowed) if cats.has_missing else None
    if not drop:
        return [Filter(name, "notnull")] if missing is False else []
    if not keep:
        return [Filter(name, "isnull")]
    options: list[list[Filter]] = []
    if missing is not False:  # ne / notin keep missing values
        options.append([Filter(name, "ne", values(drop)[0])] if len(drop) == 1
                       else [Filter(name, "notin", values(drop))])
    if missing is not True:
        options.append([Filter(name, "eq", values(keep)[0])] if len(keep) == 1
                       else [Filter(name, "in", values(keep))])
    if missing is False and feature.values != "boolean":
        options.append([Filter(name, "ne", values(drop)[0]) if len(drop) == 1
                        else Filter(name, "notin", values(drop)), Filter(name, "notnull")])
    size = lambda fs: sum(len(f.value) if isinstance(f.value, tuple) else 1 for f in fs)  # noqa: E731
    return min(options, key=size)


def _category_text(feature: Feature, cats: _Categories, codes: Sequence[int], classes: Sequence[str]) -> str:
    shown = [_MISSING_TEXT if c == cats.missing_code else _value_text(cats.vocab[c], feature, classes)
             for c in sorted(codes) if c != cats.missing_code or cats.has_missing]
    if len(shown) == 1:
        return f"{feature.label} = {shown[0]}"
    listed = ", ".join(shown[:6]) + (f", … ({len(shown)} values)" if len(shown) > 6 else "")
    return f"{feature.label} ∈ {{{listed}}}"


# --------------------------------------------------------------------------- path conditions


@dataclass(frozen=True)
class _Interval:
    """A numeric feature's constraint on a path: lo < x ≤ hi, and whether missing values belong."""

    lo: float | None = None
    hi: float | None = None
    missing: bool = True


def _numeric_filters(feature: Feature, interval: _Interval, has_missing: bool) -> tuple[list[Filter], list]:
    """(AND-ed filters, alternatives) for one numeric feature's interval on a path."""
    name = feature.name
    bounds = []
    if interval.lo is not None:
        bounds.append(Filter(name, "gt", _as_filter_number(interval.lo)))
    if interval.hi is not None:
        bounds.append(Filter(name, "lte", _as_filter_number(interval.hi)))
    if not has_missing:
        return bounds, []
    if not interval.missing:
        return (bounds or [Filter(name, "notnull")]), []
    if not bounds:
        return [], []
    return [], [tuple(bounds), (Filter(name, "isnull"),)]


def combine(base: Cohort, part: Cohort) -> Cohort:
    """``base`` AND ``part`` as one cohort (OR-groups of both multiplied out; base's saved parent kept)."""
    if base.groups and part.groups:
        groups = tuple(a + b for a, b in product(base.groups, part.groups))
    else:
        groups = base.groups or part.groups
    return Cohort(base.filters + part.filters, groups, base.parent_id)


def _cohort_from_parts(filters: list[Filter], alternatives: list[list[tuple[Filter, ...]]]) -> Cohort:
    groups: tuple = ()
    if alternatives:
        groups = tuple(tuple(f for part in choice for f in part) for choice in product(*alternatives))
    return Cohort(tuple(filters), groups)


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class TreeSettings:
    """Decision-tree settings. ``min_samples_leaf`` counts images of the fitted rows."""

    max_depth: int = 4
    max_leaves: int = 16
    min_samples_leaf: int = 20
    categorical: str = "onehot"  # onehot | ordinal (categories ordered by error rate)
    max_fit_rows: int = DEFAULT_MAX_FIT_ROWS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.categorical not in CATEGORICAL_ENCODINGS:
            raise CohortError(f"unknown categorical encoding {self.categorical!r}", field="categorical",
                              choices=list(CATEGORICAL_ENCODINGS))
        for name, low in (("max_depth", 1), ("max_leaves", 2), ("min_samples_leaf", 1), ("max_fit_rows", 10)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise CohortError(f"{name} must be an integer ≥ {low}, got {value!r}", field=name)


@dataclass(frozen=True)
class TreeNode:
    """One node: where it is, what selects it, and how wrong the model is there."""

    node_id: int
    parent_id: int | None
    children: tuple[int, int] | None
    depth: int
    split: str | None  # the condition on the edge from the parent, e.g. "Brightness ≤ 0.31"
    cohort: Cohort  # the node's own filters (combine with the analysed cohort to open it)
    conditions: tuple[str, ...]  # the path as sentences, one per feature
    size: int
    evaluated: int
    errors: float
    error_rate: float
    error_share: float  # this node's errors / all errors

    @property
    def is_leaf(self) -> bool:
        return self.children is None


@dataclass(frozen=True)
class ErrorTree:
    nodes: tuple[TreeNode, ...]  # root first, then in breadth-first order
    features: tuple[Feature, ...]
    target: ErrorTarget
    settings: TreeSettings
    n_images: int
    n_fitted: int  # images the tree was fitted on (a sample when fewer than the evaluated images)
    n_evaluated: int
    error_rate: float
    total_errors: float
    importances: dict[str, float] = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return self.n_fitted < self.n_evaluated

    @property
    def root(self) -> TreeNode:
        return self.nodes[0]

    def node(self, node_id: int) -> TreeNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise CohortError(f"no tree node {node_id}", field="node", choices=[n.node_id for n in self.nodes])

    def leaves(self) -> list[TreeNode]:
        return [n for n in self.nodes if n.is_leaf]


@dataclass(frozen=True)
class _Column:
    """One column of the matrix the tree sees."""

    feature: Feature
    encoding: str  # numeric | onehot | ordinal
    code: int = -1  # onehot: the category code this column flags
    rank: np.ndarray | None = None  # ordinal: rank of each category code (missing last index)


def _ordinal_ranks(cats: _Categories, target: np.ndarray) -> np.ndarray:
    """Rank of each category code by mean target (ties: more images first, then code)."""
    k = cats.missing_code + 1
    known = ~np.isnan(target)
    counts = np.bincount(cats.codes, minlength=k)
    known_counts = np.bincount(cats.codes[known], minlength=k)
    sums = np.bincount(cats.codes[known], weights=target[known], minlength=k)
    means = np.where(known_counts > 0, sums / np.maximum(known_counts, 1), np.inf)
    order = np.lexsort((np.arange(k), -counts, means))
    ranks = np.empty(k, dtype=np.int64)
    ranks[order] = np.arange(k)
    return ranks


def _design(frame: ErrorFrame, categorical: str, rows: np.ndarray
            ) -> tuple[np.ndarray, list[_Column], dict[str, _Categories]]:
    """The float32 matrix of ``rows`` the tree is fitted on (NaN = missing number), its columns,
    and every categorical feature's codes over all rows."""
    meta: list[_Column] = []
    categories: dict[str, _Categories] = {}
    for feature in frame.specs:
        if feature.kind == "numeric":
            meta.append(_Column(feature, "numeric"))
            continue
        cats = _categories(frame.features[feature.name])
        categories[feature.name] = cats
        if categorical == "ordinal":
            meta.append(_Column(feature, "ordinal", rank=_ordinal_ranks(cats, frame.target)))
            continue
        counts = np.bincount(cats.codes, minlength=cats.missing_code + 1)[: cats.missing_code]
        frequent = np.argsort(-counts, kind="stable")[:MAX_ONEHOT_VALUES]
        meta += [_Column(feature, "onehot", code=int(c)) for c in sorted(frequent) if counts[c] > 0]
    matrix = np.empty((len(rows), len(meta)), dtype=np.float32)
    for j, column in enumerate(meta):
        name = column.feature.name
        if column.encoding == "numeric":
            matrix[:, j] = frame.features[name].to_numpy(dtype=np.float64)[rows]
        elif column.encoding == "ordinal":
            matrix[:, j] = column.rank[categories[name].codes[rows]]
        else:
            matrix[:, j] = categories[name].codes[rows] == column.code
    return matrix, meta, categories


def _fit_rows(frame: ErrorFrame, max_rows: int, seed: int) -> np.ndarray:
    rows = np.flatnonzero(frame.known)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return rows


def fit_error_tree(frame: ErrorFrame, settings: TreeSettings = TreeSettings(), *,
                   catalog: Catalog | None = None) -> ErrorTree:
    """Fit a decision tree predicting ``frame``'s target from its features.

    At most ``settings.max_fit_rows`` images with a known target are fitted
    (a seeded uniform sample beyond that); node statistics cover every image.
    """
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    if not frame.specs:
        raise CohortError("choose at least one feature for the tree", field="features")
    classes = catalog.classes if catalog is not None else frame.classes
    fit = _fit_rows(frame, settings.max_fit_rows, settings.seed)
    matrix, meta, categories = _design(frame, settings.categorical, fit)
    kwargs = dict(max_depth=settings.max_depth, max_leaf_nodes=settings.max_leaves,
                  min_samples_leaf=settings.min_samples_leaf, random_state=settings.seed)
    model = DecisionTreeRegressor(**kwargs) if frame.kind.is_rate else DecisionTreeClassifier(**kwargs)
    if len(fit):
        model.fit(matrix, frame.target[fit])
        tree = model.tree_
        left, right = tree.children_left, tree.children_right
        split_feature, split_value = tree.feature, tree.threshold
        missing_left = getattr(tree, "missing_go_to_left", np.zeros(tree.node_count, dtype=np.uint8))
        fitted_path = model.decision_path(matrix).tocsc()
    else:  # no image with a known target: the tree is its root
        left = right = np.array([-1])
        split_feature, split_value, missing_left, fitted_path = np.array([-2]), np.array([0.0]), np.array([0]), None

    missing_numeric = {f.name: bool(np.isnan(frame.features[f.name].to_numpy(dtype=np.float64)).any())
                       for f in frame.specs if f.kind == "numeric"}
    total_errors = frame.total_errors
    known = frame.known
    nodes: list[TreeNode] = []
    # (sklearn node, parent, depth, edge text, rows of the frame, numeric intervals, allowed category codes)
    queue = [(0, None, 0, None, np.arange(len(frame)), {}, {})]
    while queue:
        node, parent, depth, split, rows, intervals, allowed = queue.pop(0)
        filters: list[Filter] = []
        alternatives: list = []
        for feature in frame.specs:
            if feature.name in intervals:
                found, alternative = _numeric_filters(feature, intervals[feature.name],
                                                      missing_numeric[feature.name])
                filters += found
                if alternative:
                    alternatives.append(alternative)
            elif feature.name in allowed:
                filters += _category_filters(feature, categories[feature.name], allowed[feature.name], classes)
        cohort = _cohort_from_parts(filters, alternatives)
        node_known = known[rows]
        evaluated = int(node_known.sum())
        errors = float(np.nansum(frame.errors[rows]))
        rate = float(frame.target[rows][node_known].mean()) if evaluated else float("nan")
        is_leaf = left[node] == -1
        children = None if is_leaf else (int(left[node]), int(right[node]))
        nodes.append(TreeNode(int(node), parent, children, depth, split, cohort,
                              tuple(describe(cohort, catalog)) if not cohort.is_global else (),
                              len(rows), evaluated, errors, rate,
                              errors / total_errors if total_errors else 0.0))
        if is_leaf:
            continue
        column = meta[split_feature[node]]
        feature = column.feature
        if column.encoding == "numeric":
            values = frame.features[feature.name].to_numpy(dtype=np.float64)
            go_missing_left = bool(missing_left[node])
            threshold = _numeric_threshold(values, fit, fitted_path, left[node], right[node], split_value[node])
            row_values = values[rows]
            go_left = (row_values <= threshold) | (np.isnan(row_values) & go_missing_left)
            current = intervals.get(feature.name, _Interval())
            left_interval = replace(current, hi=threshold if current.hi is None else min(current.hi, threshold),
                                    missing=current.missing and go_missing_left)
            right_interval = replace(current, lo=threshold if current.lo is None else max(current.lo, threshold),
                                     missing=current.missing and not go_missing_left)
            suffix = " or missing" if missing_numeric[feature.name] else ""
            texts = (f"{feature.label} ≤ {format_value(threshold)}" + (suffix if go_missing_left else ""),
                     f"{feature.label} > {format_value(threshold)}" + ("" if go_missing_left else suffix))
            left_state = ({**intervals, feature.name: left_interval}, allowed)
            right_state = ({**intervals, feature.name: right_interval}, allowed)
        else:
            cats = categories[feature.name]
            codes = cats.codes[rows]
            current = allowed.get(feature.name, frozenset(range(cats.missing_code + 1)))
            if column.encoding == "onehot":
                go_left = codes != column.code
                left_codes, right_codes = current - {column.code}, current & {column.code}
                value = _value_text(cats.vocab[column.code], feature, classes)
                texts = (f"{feature.label} ≠ {value}", f"{feature.label} = {value}")
            else:
                cut = math.floor(split_value[node])
                go_left = column.rank[codes] <= cut
                below = frozenset(int(c) for c in np.flatnonzero(column.rank <= cut))
                left_codes, right_codes = current & below, current - below
                texts = (_category_text(feature, cats, left_codes, classes),
                         _category_text(feature, cats, right_codes, classes))
            left_state = (intervals, {**allowed, feature.name: frozenset(left_codes)})
            right_state = (intervals, {**allowed, feature.name: frozenset(right_codes)})
        queue.append((left[node], int(node), depth + 1, texts[0], rows[go_left], *left_state))
        queue.append((right[node], int(node), depth + 1, texts[1], rows[~go_left], *right_state))

    importances: dict[str, float] = {}
    if len(fit):
        for column, weight in zip(meta, model.feature_importances_):
            importances[column.feature.name] = importances.get(column.feature.name, 0.0) + float(weight)
    return ErrorTree(tuple(nodes), frame.specs, frame.kind, settings, len(frame), len(fit), int(known.sum()),
                     frame.error_rate, total_errors, importances)


def _numeric_threshold(values: np.ndarray, fit: np.ndarray, fitted_path, left: int, right: int,
                       fallback: float) -> float:
    """The readable threshold that divides the node's fitted rows exactly as scikit-learn did."""
    fitted = values[fit]
    left_rows = fitted_path[:, left].indices
    right_rows = fitted_path[:, right].indices
    lows = fitted[left_rows]
    highs = fitted[right_rows]
    lows, highs = lows[~np.isnan(lows)], highs[~np.isnan(highs)]
    if not len(lows) or not len(highs):
        return float(fallback)
    return readable_threshold(float(lows.max()), float(highs.min()))


# --------------------------------------------------------------------------- the heatmap


@dataclass(frozen=True)
class HeatmapAxis:
    """One binned feature: a bin code per image, and per bin its label and cohort."""

    feature: Feature
    labels: tuple[str, ...]
    cohorts: tuple[Cohort, ...]
    codes: np.ndarray
    edges: tuple[float, ...] = ()  # numeric interior edges: bins (-inf, e1), [e1, e2), …, [ek, inf)


@dataclass(frozen=True)
class ErrorHeatmap:
    x: HeatmapAxis
    y: HeatmapAxis | None
    cells: pd.DataFrame  # x, y (bin indices), x_label, y_label, size, evaluated, errors, error_rate, cohort
    target: ErrorTarget
    error_rate: float


def numeric_edges(values: np.ndarray, bins: int, binning: str) -> np.ndarray:
    """Interior edges of ``bins`` equal-width or quantile bins over the present values (rounded)."""
    present = values[~np.isnan(values)]
    if binning == "equal":
        edges = np.linspace(present.min(), present.max(), bins + 1)[1:-1]
    else:
        edges = np.quantile(present, np.arange(1, bins) / bins)
    edges = _round_edges(np.unique(edges))
    # An edge at or below the minimum would leave the first bin empty.
    return edges[(edges > present.min()) & (edges <= present.max())]


def bin_numeric(feature: Feature, values: np.ndarray, bins: int, binning: str) -> HeatmapAxis:
    """Bins ``< e1``, ``e1–e2`` …, ``≥ ek`` (one per value when there are few values); missing last."""
    if binning not in BINNINGS:
        raise CohortError(f"unknown binning {binning!r}", field="binning", choices=list(BINNINGS))
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    distinct = np.unique(values[~missing])
    name, label = feature.name, feature.label
    labels: list[str] = []
    cohorts: list[Cohort] = []
    edges: tuple[float, ...] = ()
    if len(distinct) <= bins:
        codes = np.searchsorted(distinct, values)
        for value in distinct:
            labels.append(display_number(value))
            cohorts.append(Cohort((Filter(name, "eq", _as_filter_number(value)),)))
    else:
        cuts = numeric_edges(values, bins, binning)
        edges = tuple(float(e) for e in cuts)
        codes = np.searchsorted(cuts, values, side="right")
        bounds = [None, *edges, None]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            filters = []
            if lo is not None:
                filters.append(Filter(name, "gte", _as_filter_number(lo)))
            if hi is not None:
                filters.append(Filter(name, "lt", _as_filter_number(hi)))
            labels.append(f"< {format_value(hi)}" if lo is None else
                          f"≥ {format_value(lo)}" if hi is None else f"{format_value(lo)} – {format_value(hi)}")
            cohorts.append(Cohort(tuple(filters)))
    codes = np.asarray(codes, dtype=np.int64)
    if missing.any():
        codes[missing] = len(labels)
        labels.append(_MISSING_TEXT)
        cohorts.append(Cohort((Filter(name, "isnull"),)))
    log.debug("binned %s (%s) into %d bins", label, binning, len(labels))
    return HeatmapAxis(feature, tuple(labels), tuple(cohorts), codes, edges)


def bin_categorical(feature: Feature, values: pd.Series, classes: Sequence[str],
                    max_categories: int = MAX_HEATMAP_CATEGORIES) -> HeatmapAxis:
    """One bin per category (the most frequent ``max_categories``), then "other", then missing."""
    cats = _categories(pd.Series(values).reset_index(drop=True))
    counts = np.bincount(cats.codes, minlength=cats.missing_code + 1)[: cats.missing_code]
    shown = sorted(int(c) for c in np.argsort(-counts, kind="stable")[:max_categories] if counts[c] > 0)
    bin_of = np.full(cats.missing_code + 1, len(shown), dtype=np.int64)
    bin_of[shown] = np.arange(len(shown))
    labels = [_value_text(cats.vocab[c], feature, classes) for c in shown]
    cohorts = [Cohort(tuple(_category_filters(feature, cats, frozenset({c}), classes))) for c in shown]
    rest = [c for c in range(cats.missing_code) if c not in shown and counts[c] > 0]
    if rest:
        labels.append("other")
        cohorts.append(Cohort(tuple(_category_filters(feature, cats, frozenset(rest), classes))))
    if cats.has_missing:
        bin_of[cats.missing_code] = len(labels)
        labels.append(_MISSING_TEXT)
        cohorts.append(Cohort((Filter(feature.name, "isnull"),)))
    return HeatmapAxis(feature, tuple(labels), tuple(cohorts), bin_of[cats.codes])


def bin_feature(frame: ErrorFrame, name: str, bins: int = 5, binning: str = "equal") -> HeatmapAxis:
    """One feature of the frame binned for the heatmap (or for per-group tables)."""
    if isinstance(bins, bool) or int(bins) != bins or not 2 <= bins <= 100:
        raise CohortError(f"bins must be an integer from 2 to 100, got {bins!r}", field="bins")
    feature = frame.spec(name)
    if feature.kind == "numeric":
        return bin_numeric(feature, frame.features[name].to_numpy(dtype=np.float64), int(bins), binning)
    return bin_categorical(feature, frame.features[name], frame.classes)


def error_heatmap(frame: ErrorFrame, x: str, y: str | None = None, *, bins: int = 5,
                  binning: str = "equal") -> ErrorHeatmap:
    """Size, errors and error rate of every (x bin, y bin) cell holding images."""
    x_axis = bin_feature(frame, x, bins, binning)
    y_axis = bin_feature(frame, y, bins, binning) if y is not None else None
    ny = len(y_axis.labels) if y_axis is not None else 1
    flat = x_axis.codes * ny + (y_axis.codes if y_axis is not None else 0)
    n_cells = len(x_axis.labels) * ny
    known = frame.known
    size = np.bincount(flat, minlength=n_cells)
    evaluated = np.bincount(flat[known], minlength=n_cells)
    errors = np.bincount(flat, weights=np.nan_to_num(frame.errors), minlength=n_cells)
    target_sum = np.bincount(flat[known], weights=frame.target[known], minlength=n_cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(evaluated > 0, target_sum / np.maximum(evaluated, 1), np.nan)
    cells = np.flatnonzero(size > 0)
    xi, yi = cells // ny, cells % ny
    cohorts = [x_axis.cohorts[i] if y_axis is None else combine(x_axis.cohorts[i], y_axis.cohorts[j])
               for i, j in zip(xi, yi)]
    table = pd.DataFrame({
        "x": xi, "y": yi,
        "x_label": [x_axis.labels[i] for i in xi],
        "y_label": [y_axis.labels[j] for j in yi] if y_axis is not None else [""] * len(cells),
        "size": size[cells], "evaluated": evaluated[cells], "errors": errors[cells], "error_rate": rate[cells],
        "cohort": cohorts,
    })
    return ErrorHeatmap(x_axis, y_axis, table, frame.kind, frame.error_rate)
