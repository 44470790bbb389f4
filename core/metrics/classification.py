"""Multiclass and multilabel metrics over a cohort, equal to scikit-learn.

Store functions take a *selection* (``(sql, params)`` of ``SELECT image_id``
from ``core.cohorts.compile_cohort``; None for every image), let DuckDB count
(true, predicted) pairs or fetch label lists as Arrow, and hand arrays to the
pure numpy cores below, which tests check against scikit-learn:

- averages follow ``precision_recall_fscore_support``: a class with nothing
  to divide by scores 0 (``zero_division`` "warn"), macro and weighted
  averages run over the classes present in the truth or the predictions
  (scikit-learn's default ``labels``) unless ``labels`` is given, and micro
  sums the counts;
- multilabel predictions are ``probs >= label_threshold`` compared in the
  probabilities' stored precision (float32: the threshold rounded to float32,
  as numpy compares a float32 array with a Python float), exactly as the cohort
  compiler compares them, so both agree on every image.

Images of the selection without a prediction by the model are not scored;
``n_missing`` counts them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..cohorts import Selection, quote_identifier as q, shared_frame
from ..errors import EvalError
from ..store import Store

NORMALIZATIONS = (None, "true", "pred", "all")


# --------------------------------------------------------------------------- numpy cores


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    if len(values) == 0:
        return float("nan")
    if weights is None or float(np.sum(weights)) == 0.0:
        return float(np.mean(values))  # all-zero weights: scikit-learn falls back to the plain mean
    return float(np.average(values, weights=weights))


def _prf(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> dict:
    """Per-label and averaged precision / recall / F1 from per-label counts."""
    precision, recall = _divide(tp, pred), _divide(tp, true)
    f1 = _divide(2.0 * tp, true + pred)
    tp_sum, pred_sum, true_sum = tp.sum(), pred.sum(), true.sum()
    micro_p, micro_r = float(_divide(tp_sum, pred_sum)), float(_divide(tp_sum, true_sum))
    out = {
        "precision_macro": _mean(precision), "recall_macro": _mean(recall), "f1_macro": _mean(f1),
        "precision_micro": micro_p, "recall_micro": micro_r,
        "f1_micro": float(_divide(2.0 * tp_sum, true_sum + pred_sum)),
        "precision_weighted": _mean(precision, true), "recall_weighted": _mean(recall, true),
        "f1_weighted": _mean(f1, true),
    }
    if len(tp) == 0:
        out.update({k: float("nan") for k in ("precision_micro", "recall_micro", "f1_micro")})
    return out


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows true class, columns predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise EvalError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    for name, values in (("true label", y_true), ("predicted label", y_pred)):
        if len(values) and (values.min() < 0 or values.max() >= n_classes):
            raise EvalError(f"{name} outside 0..{n_classes - 1}", field=name)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def present_labels(cm: np.ndarray) -> np.ndarray:
    """Classes occurring in the truth or the predictions (scikit-learn's default ``labels``)."""
    return np.flatnonzero((cm.sum(axis=0) + cm.sum(axis=1)) > 0)


def scores_from_confusion(cm: np.ndarray, labels: Sequence[int] | None = None) -> dict:
    """accuracy, macro / micro / weighted P, R, F1 and per-class arrays from a confusion matrix.

    Per-class arrays (``precision``, ``recall``, ``f1``, ``support``,
    ``predicted``) cover every class; the averages cover ``labels``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    labels = present_labels(cm) if labels is None else np.asarray(labels, dtype=np.int64)
    tp_all, pred_all, true_all = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    total = int(cm.sum())
    out = {"accuracy": float(np.trace(cm) / total) if total else float("nan"), "n": total,
           "labels": labels.tolist()}
    out.update(_prf(tp_all[labels], pred_all[labels], true_all[labels]))
    out.update({"precision": _divide(tp_all, pred_all), "recall": _divide(tp_all, true_all),
                "f1": _divide(2.0 * tp_all, true_all + pred_all), "support": true_all, "predicted": pred_all})
    return out


def multiclass_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None,
                      labels: Sequence[int] | None = None) -> dict:
    """``scores_from_confusion`` of integer label arrays."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if n_classes is None:
        n_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    return scores_from_confusion(confusion_counts(y_true, y_pred, n_classes), labels)


def normalize_confusion(cm: np.ndarray, normalize: str | None) -> np.ndarray:
    """As ``sklearn.metrics.confusion_matrix(normalize=...)``: rows, columns or all sum to 1 (empty → 0)."""
    if normalize not in NORMALIZATIONS:
        raise EvalError(f"unknown normalisation {normalize!r}", field="normalize", choices=list(NORMALIZATIONS))
    cm = np.asarray(cm)
    if normalize is None:
        return cm
    if normalize == "true":
        return _divide(cm, cm.sum(axis=1, keepdims=True))
    if normalize == "pred":
        return _divide(cm, cm.sum(axis=0, keepdims=True))
    return _divide(cm, cm.sum())


def multilabel_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Exact match, Hamming loss and per-label / macro / micro / weighted P, R, F1 of indicator matrices."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise EvalError(f"indicator shapes differ: {y_true.shape} vs {y_pred.shape}")
    n = y_true.shape[0]
    tp = (y_true & y_pred).sum(axis=0)
    pred, true = y_pred.sum(axis=0), y_true.sum(axis=0)
    out = {
        "exact_match": float((y_true == y_pred).all(axis=1).mean()) if n else float("nan"),
        "hamming_loss": float((y_true != y_pred).mean()) if y_true.size else float("nan"),
        "n": n,
    }
    out.update(_prf(tp, pred, true))
    out.update({"precision": _divide(tp, pred), "recall": _divide(tp, true), "f1": _divide(2.0 * tp, true + pred),
                "support": true, "predicted": pred})
    return out


def indicator(lists: pa.Array | pa.ChunkedArray, n_labels: int) -> np.ndarray:
    """(rows, n_labels) bool from an Arrow list-of-integers column (null rows: no labels)."""
    array = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    out = np.zeros((len(array), n_labels), dtype=bool)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(values):
        if values.min() < 0 or values.max() >= n_labels:
            raise EvalError(f"label id outside 0..{n_labels - 1}", field="labels")
        out[array.value_parent_indices().to_numpy(zero_copy_only=False), values] = True
    return out


# --------------------------------------------------------------------------- store functions


def _with_selection(selection: Selection | tuple[str, list] | None) -> tuple[str, str, list]:
    """(WITH clause, restriction of images ``i`` to it, params)."""
    if selection is None:
        return "", "", []
    sql, params = selection
    return (f"WITH sel AS ({sql}) ",
            f"WHERE i.{q('image_id')} IN (SELECT {q('image_id')} FROM sel)", list(params))


def _check_model(store: Store, model_id: str) -> None:
    models = store.model_ids()
    if model_id not in models:
        raise EvalError(f"unknown model {model_id!r}", field="model", choices=models)


def _pair_counts(store: Store, model_id: str, selection: Selection | tuple[str, list] | None,
                 *, with_missing: bool) -> tuple[np.ndarray, int]:
    """Confusion counts over every class and (``with_missing``) the number of
    selected images without a prediction (else 0)."""
    _check_model(store, model_id)
    n_classes = len(store.classes)
    pairs = "SELECT true_label, pred_label, count(*) FROM ({rows}) AS r " \
            "WHERE true_label IS NOT NULL AND pred_label IS NOT NULL GROUP BY ALL"
    rows_sql = selection.frame_query(store, model_id, ["true_label", "pred_label"]) \
        if isinstance(selection, Selection) else None
    if rows_sql is not None:
        # One pass over the cohort's frame; the NOT NULL filter lets DuckDB make the join inner.
        rows = store.rows(pairs.format(rows=rows_sql[0]), rows_sql[1])
    else:
        head, restrict, params = _with_selection(selection)
        rows = store.rows(
            head + pairs.format(rows=f"SELECT i.{q('true_label')} AS true_label, p.{q('pred_label')} AS pred_label "
                                     f"FROM {q('images')} AS i JOIN {q('predictions')} AS p "
                                     f"ON p.{q('image_id')} = i.{q('image_id')} AND p.{q('model_id')} = ? {restrict}"),
            params + [model_id])
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    if rows:
        counts = np.array(rows, dtype=np.int64)
        np.add.at(cm, (counts[:, 0], counts[:, 1]), counts[:, 2])
    missing = 0
    if with_missing:
        total = store.image_count() if selection is None else \
            int(store.scalar(f"SELECT count(*) FROM ({selection[0]}) AS s", selection[1]))
        missing = total - int(cm.sum())
    return cm, missing


def classification_metrics(store: Store, model_id: str, selection: Selection | None = None, *,
                           labels: Sequence[int] | None = None) -> dict:
    """Multiclass metrics of one model over a selection.

    Keys: ``accuracy``, ``precision|recall|f1`` × ``_macro|_micro|_weighted``,
    ``n_evaluated``, ``n_missing``, ``labels`` (class ids averaged over),
    ``per_class`` (DataFrame: class_id, class, precision, recall, f1, support,
    predicted) and ``confusion`` (counts, every class).
    """
    cm, missing = _pair_counts(store, model_id, selection, with_missing=True)
    return _metrics_from_counts(store, cm, missing, labels)


def classification_metrics_of_cohorts(store: Store, model_id: str,
                                      selections: Sequence[Selection | None]) -> list[dict]:
    """``classification_metrics`` of each selection (the model overview's table), all counted
    in two scans of one frame when they can share it, else one by one."""
    shared = shared_frame(store, model_id, selections, ["true_label", "pred_label"]) if len(selections) > 1 else None
    if shared is None:
        return [classification_metrics(store, model_id, s) for s in selections]
    _check_model(store, model_id)
    frame, params, conditions = shared
    tallies = ", ".join(f"count(*) FILTER (WHERE {condition})" for condition, _ in conditions)
    condition_params = [p for _, values in conditions for p in values]
    rows = store.rows(f"WITH f AS ({frame}) SELECT true_label, pred_label, {tallies} FROM f "
                      "WHERE true_label IS NOT NULL AND pred_label IS NOT NULL GROUP BY ALL",
                      params + condition_params)
    n_classes = len(store.classes)
    confusions = np.zeros((len(selections), n_classes, n_classes), dtype=np.int64)
    if rows:
        counts = np.array(rows, dtype=np.int64)
        confusions[:, counts[:, 0], counts[:, 1]] = counts[:, 2:].T  # GROUP BY: each pair once
    # The images of each cohort, predicted or not (those the pairs lack are the missing ones).
    images, image_params, _ = shared_frame(store, model_id, selections, ["image_id"])
    totals = store.rows(f"WITH f AS ({images}) SELECT {tallies} FROM f", image_params + condition_params)[0]
    return [_metrics_from_counts(store, cm, int(total) - int(cm.sum())) for cm, total in zip(confusions, totals)]


def _metrics_from_counts(store: Store, cm: np.ndarray, missing: int, labels: Sequence[int] | None = None) -> dict:
    scores = scores_from_confusion(cm, labels)
    per_class = pd.DataFrame({
        "class_id": np.arange(len(cm)), "class": store.classes,
        "precision": scores.pop("precision"), "recall": scores.pop("recall"), "f1": scores.pop("f1"),
        "support": scores.pop("support"), "predicted": scores.pop("predicted"),
    })
    scores["n_evaluated"] = scores.pop("n")
    scores.update({"n_missing": missing, "per_class": per_class, "confusion": cm})
    return scores


def _class_indices(classes: Sequence[str | int] | None, names: list[str]) -> list[int]:
    if classes is None:
        return list(range(len(names)))
    out = []
    for c in classes:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < len(names):
            out.append(int(c))
        elif c in names:
            out.append(names.index(c))
        else:
            raise EvalError(f"{c!r} is not a class", field="classes", choices=names)
    return out


def confusion_matrix(store: Store, model_id: str, selection: Selection | None = None,
                     normalize: str | None = None, classes: Sequence[str | int] | None = None) -> pd.DataFrame:
    """Confusion matrix (rows: true class, columns: predicted class) as scikit-learn's with
    ``labels=classes`` (default every class, in class-id order) and ``normalize``."""
    if normalize not in NORMALIZATIONS:
        raise EvalError(f"unknown normalisation {normalize!r}", field="normalize", choices=list(NORMALIZATIONS))
    names = list(store.classes)
    index = _class_indices(classes, names)
    cm, _ = _pair_counts(store, model_id, selection, with_missing=False)
    sub = normalize_confusion(cm[np.ix_(index, index)], normalize)
    shown = [names[i] for i in index]
    return pd.DataFrame(sub, index=pd.Index(shown, name="true"), columns=pd.Index(shown, name="predicted"))


def multilabel_arrays(store: Store, model_id: str, selection: Selection | None = None,
                      label_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(image_ids, true indicator, predicted indicator, n_missing) of the selection's predicted images.

    Predictions are ``probs >= label_threshold`` (in the probs' precision), or the stored
    ``pred_labels`` where a prediction has no probabilities.
    """
    _check_model(store, model_id)
    n_labels = len(store.classes)
    has_probs = "probs" in store.table_columns("predictions")
    head, restrict, params = _with_selection(selection)
    probs = f"p.{q('probs')}" if has_probs else "CAST(NULL AS FLOAT[])"
    table = store.arrow(
        f"{head}SELECT i.{q('image_id')} AS image_id, i.{q('true_label')} AS t, {probs} AS probs, "
        f"p.{q('pred_labels')} AS stored, p.{q('image_id')} IS NOT NULL AS predicted "
        f"FROM {q('images')} AS i LEFT JOIN {q('predictions')} AS p "
        f"ON p.{q('image_id')} = i.{q('image_id')} AND p.{q('model_id')} = ? {restrict} ORDER BY i.{q('image_id')}",
        params + [model_id])
    predicted = table.column("predicted").to_numpy(zero_copy_only=False).astype(bool)
    missing = int((~predicted).sum())
    table = table.filter(pa.array(predicted))
    y_true = indicator(table.column("t"), n_labels)
    y_pred = indicator(table.column("stored"), n_labels)
    probs_col = table.column("probs").combine_chunks()
    live = pc.is_valid(probs_col).to_numpy(zero_copy_only=False).astype(bool)
    if live.any():
        lengths = pc.list_value_length(probs_col).to_numpy(zero_copy_only=False)[live]
        if (lengths != n_labels).any():
            raise EvalError(f"probs of model {model_id!r} do not have {n_labels} values", field="probs")
        values = probs_col.filter(pa.array(live)).flatten().to_numpy(zero_copy_only=False)
        # In the probabilities' own precision, as the cohort compiler and numpy compare them.
        y_pred[live] = values.reshape(-1, n_labels) >= values.dtype.type(label_threshold)
    image_ids = table.column("image_id").to_numpy(zero_copy_only=False)
    return image_ids, y_true, y_pred, missing


def multilabel_metrics(store: Store, model_id: str, selection: Selection | None = None,
                       label_threshold: float = 0.5) -> dict:
    """Multilabel metrics of one model over a selection at a live label threshold.

    Keys: ``exact_match``, ``hamming_loss``, ``precision|recall|f1`` ×
    ``_macro|_micro|_weighted``, ``n_evaluated``, ``n_missing``,
    ``label_threshold`` and ``per_label`` (DataFrame).
    """
    _, y_true, y_pred, missing = multilabel_arrays(store, model_id, selection, label_threshold)
    scores = multilabel_scores(y_true, y_pred)
    per_label = pd.DataFrame({
        "class_id": np.arange(y_true.shape[1]), "class": store.classes,
        "precision": scores.pop("precision"), "recall": scores.pop("recall"), "f1": scores.pop("f1"),
        "support": scores.pop("support"), "predicted": scores.pop("predicted"),
    })
    scores["n_evaluated"] = scores.pop("n")
    scores.update({"n_missing": missing, "label_threshold": float(label_threshold), "per_label": per_label})
    return scores
