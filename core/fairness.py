"""Metrics per group of one or more features, with the gap between groups.

``group_metrics(frame, features)`` takes a per-image frame (as
``core.cohorts.cohort_rows`` returns), groups it by the features (numeric
ones binned into equal-width or quantile bins, missing values a group of
their own) and computes each metric per group. ``difference`` and ``ratio``
are fairlearn's ``MetricFrame.difference()`` / ``ratio()`` with method
``between_groups``: largest minus smallest group value, smallest over largest.
Only groups holding images are listed (fairlearn adds empty combinations of
several features as NaN rows, which its difference and ratio skip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .cohorts import Cohort, ParsedQuery, catalog_of, cohort_rows
from .error_analysis import numeric_edges
from .errors import EvalError
from .metrics.classification import multiclass_scores
from .store import Store

BINNINGS = ("equal", "quantile")
MISSING = "(missing)"
Metric = Callable[[np.ndarray, np.ndarray], float]


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def _averaged(key: str) -> Metric:
    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return multiclass_scores(y_true, y_pred)[key] if len(y_true) else float("nan")
    metric.__name__ = key
    return metric


METRICS: dict[str, Metric] = {
    "accuracy": _accuracy,
    "error_rate": lambda y_true, y_pred: 1.0 - _accuracy(y_true, y_pred),
    "precision_macro": _averaged("precision_macro"),
    "recall_macro": _averaged("recall_macro"),
    "f1_macro": _averaged("f1_macro"),
    "f1_weighted": _averaged("f1_weighted"),
}


@dataclass(frozen=True)
class GroupMetrics:
    """``by_group``: one row per group (index: the features) with ``count`` and each metric;
    ``overall``, ``difference`` and ``ratio``: one value per metric."""

    by_group: pd.DataFrame
    overall: pd.Series
    difference: pd.Series
    ratio: pd.Series


def _interval_names(edges: np.ndarray) -> list[str]:
    """"[a, b)", "[b, c)", …, "[y, z]" with as few significant digits as keep the names distinct."""
    last = len(edges) - 2
    for digits in (4, 6, 8, 17):
        texts = [f"{e:.{digits}g}" for e in edges]
        names = [f"[{texts[i]}, {texts[i + 1]}{']' if i == last else ')'}" for i in range(len(edges) - 1)]
        if len(set(names)) == len(names):
            return names
    return names


def group_labels(values: pd.Series, bins: int = 4, binning: str = "equal") -> pd.Series:
    """Ordered categorical group labels: numeric values binned, others as they are.

    Bins are left-closed, the last also holds the maximum: ``bins`` equal-width
    bins between the minimum and the maximum, or ``bins`` quantile bins (edges
    that coincide are merged), with the error heat map's rounded edges
    (``error_analysis.numeric_edges``), so a group holds the images of the
    heat map's column and of the cohort it becomes. Numbers with at most
    ``bins`` distinct values stay as they are. Missing values get the label
    ``(missing)``, last.
    """
    if binning not in BINNINGS:
        raise EvalError(f"unknown binning {binning!r}", field="binning", choices=list(BINNINGS))
    if bins < 1:
        raise EvalError(f"bins must be at least 1, got {bins}", field="bins")
    series = pd.Series(values).reset_index(drop=True)
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if numeric and series.nunique(dropna=True) > bins:
        floats = series.to_numpy(dtype=np.float64, na_value=np.nan)
        present = floats[~np.isnan(floats)]
        inner = numeric_edges(floats, bins, binning)
        codes = np.searchsorted(inner, floats, side="right")
        codes[np.isnan(floats)] = -1
        edges = np.concatenate([[present.min()], inner, [present.max()]])
        labels = pd.Series(pd.Categorical.from_codes(codes, categories=_interval_names(edges)))
    else:
        def text(v: object) -> str:
            if numeric and float(v).is_integer():
                return str(int(v))  # 3.0 read from a nullable column is the group "3"
            return str(v)

        order = sorted(series.dropna().unique().tolist(), key=lambda v: (str(type(v)), v))
        names = list(dict.fromkeys(text(v) for v in order))
        labels = pd.Series(pd.Categorical(series.map(lambda v: None if pd.isna(v) else text(v)), categories=names))
    if labels.isna().any():
        labels = labels.cat.add_categories([MISSING]).fillna(MISSING)
    return labels.cat.as_ordered()


def _metric_functions(metrics: Sequence[str] | Mapping[str, Metric]) -> dict[str, Metric]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out = {}
    for name in metrics:
        if name not in METRICS:
            raise EvalError(f"unknown metric {name!r}", field="metrics", choices=list(METRICS))
        out[name] = METRICS[name]
    return out


def group_metrics(frame: pd.DataFrame, features: str | Sequence[str],
                  metrics: Sequence[str] | Mapping[str, Metric] = ("accuracy", "error_rate"), *,
                  y_true: str = "true_label", y_pred: str = "pred_label", bins: int = 4,
                  binning: str = "equal") -> GroupMetrics:
    """Each metric per group of ``features`` of a per-image frame, with between-group gaps.

    ``metrics``: names from ``METRICS`` or a mapping name → ``f(y_true, y_pred)``.
    Rows whose ``y_pred`` is missing (no prediction) are left out.
    """
    features = [features] if isinstance(features, str) else list(features)
    if not features:
        raise EvalError("group by at least one feature", field="features")
    for name in [*features, y_true, y_pred]:
        if name not in frame.columns:
            raise EvalError(f"frame has no column {name!r}", field=name, choices=list(frame.columns))
    frame = frame[frame[y_pred].notna()].reset_index(drop=True)
    functions = _metric_functions(metrics)
    truth, predicted = frame[y_true].to_numpy(), frame[y_pred].to_numpy()
    groups = pd.DataFrame({f: group_labels(frame[f], bins, binning) for f in features})
    rows = []
    for key, positions in groups.groupby(features, observed=True, sort=True).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(features, key))
        row["count"] = len(positions)
        row.update({name: fn(truth[positions], predicted[positions]) for name, fn in functions.items()})
        rows.append(row)
    by_group = pd.DataFrame(rows, columns=[*features, "count", *functions])
    for f in features:
        by_group[f] = pd.Categorical(by_group[f], categories=groups[f].cat.categories, ordered=True)
    by_group = by_group.sort_values(features).set_index(features)
    values = by_group[list(functions)].astype("float64")
    overall = pd.Series({name: fn(truth, predicted) for name, fn in functions.items()}, dtype="float64")
    return GroupMetrics(by_group, overall, values.max() - values.min(), values.min() / values.max())


def cohort_group_metrics(store: Store, cohort: Cohort | ParsedQuery, model_id: str, features: str | Sequence[str],
                         metrics: Sequence[str] | Mapping[str, Metric] | None = None, *, bins: int = 4,
                         binning: str = "equal", **thresholds: float) -> GroupMetrics:
    """``group_metrics`` of a cohort's images for one model.

    Multiclass groups compare true and predicted classes (any metric);
    multilabel and detection groups compare each image's outcome with
    "correct" (accuracy and error rate are then the share of correct images).
    """
    features = [features] if isinstance(features, str) else list(features)
    catalog = catalog_of(store)
    columns = list(dict.fromkeys(["image_id", "true_label", "pred_label", "outcome", *features]))
    rows = cohort_rows(store, cohort, model_id, columns=columns, catalog=catalog, **thresholds)
    if catalog.task == "multiclass":
        return group_metrics(rows, features, metrics or ("accuracy", "error_rate", "f1_macro"),
                             bins=bins, binning=binning)
    chosen = metrics or ("accuracy", "error_rate")
    if not isinstance(chosen, Mapping) and set(chosen) - {"accuracy", "error_rate"}:
        raise EvalError(f"{catalog.task} groups compare outcomes: choose accuracy or error_rate",
                        field="metrics", choices=["accuracy", "error_rate"])
    rows = rows.assign(vl_expected="correct", vl_outcome=rows["outcome"])
    return group_metrics(rows, features, chosen, y_true="vl_expected", y_pred="vl_outcome", bins=bins,
                         binning=binning)
