"""Likely label errors, found from a model's out-of-sample predictions (confident learning).

Classification (Northcutt et al., "Confident Learning", 2021), in numpy:

- per-class thresholds ``t_j``: the mean predicted probability of class ``j``
  over the images labelled ``j`` (a model's own notion of "confident" for that
  class, so an under-confident class still gets found);
- an image's *confident label* is, among the classes ``k`` with
  ``p_k >= t_k``, the one of highest probability (none when no class clears
  its threshold); (given label, confident label) counts form the confident joint;
- an image off its diagonal (confident label ≠ given label) is flagged, unless
  the model's top class is the given label, ties included (cleanlab never flags those either);
- ``label_quality_score`` is the normalised margin ``(p_y - max_{k≠y} p_k + 1) / 2``
  (or the self-confidence ``p_y``): low = likely wrong; issues sort by it.

Multilabel: each label is its own binary problem (present / absent), with the
two thresholds of that binary confident joint; an image is flagged when some
label is confidently missing or confidently spurious. Its score is the lowest
per-label self-confidence; the suggestion is the label set with those flips.

The stored probabilities come from a model trained on other data, so they are
out-of-sample for the store's images, which confident learning needs.

Detection (from ``det_matches`` / ``gt_matches`` at IoU 0.5, area "all"):
a detection is *confident* when its score is at least its class's threshold,
the mean score of that class's true positives (and at least the store's score
threshold). Per image:

- ``missing_box``: a confident detection overlapping no ground truth of any class (IoU < 0.1)
  and not inside a crowd region: probably an object nobody boxed;
- ``wrong_class``: a confident detection with IoU >= 0.5 to a ground truth of another
  class that no detection of its own class found: the box's class is probably wrong
  (suggested label: the detection's class);
- ``poor_box``: a confident detection whose best same-class IoU is in [0.1, 0.5) with a
  ground truth no detection found: the box is probably badly placed.

``label_quality_score`` is 1 − the highest score among the image's detections
that contradict its labels (false positives at IoU 0.5), 1 without any.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import EvalError
from .store import Store, write_part

log = logging.getLogger(__name__)

TABLE = "label_quality"
SCORE_METHODS = ("normalized_margin", "self_confidence")
DETECTION_KINDS = ("missing_box", "wrong_class", "poor_box")
# IoU below which a detection overlaps no ground truth at all, and the matching IoU (COCO's lowest).
NO_OVERLAP_IOU = 0.1
MATCH_IOU = 0.5


# --------------------------------------------------------------------------- classification


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``t_j`` = mean of ``probs[:, j]`` over images labelled ``j``; +inf for a class nobody has."""
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.inf)


def confident_labels(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image, the most probable class among those at or above their threshold; -1 when none is."""
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    best = masked.argmax(axis=1)
    return np.where(above.any(axis=1), best, -1)


def confident_joint(labels: np.ndarray, confident: np.ndarray, n_classes: int) -> np.ndarray:
    """``C[i, j]``: images labelled ``i`` whose confident label is ``j`` (images without one left out)."""
    keep = confident >= 0
    flat = labels[keep] * n_classes + confident[keep]
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def label_scores(probs: np.ndarray, labels: np.ndarray, method: str = "normalized_margin") -> np.ndarray:
    """Per-image label quality in [0, 1]: low means the given label is likely wrong."""
    if method not in SCORE_METHODS:
        raise EvalError(f"unknown score method {method!r}", field="method", choices=list(SCORE_METHODS))
    rows = np.arange(len(labels))
    given = probs[rows, labels]
    if method == "self_confidence":
        return given.astype(np.float64)
    others = probs.copy()
    others[rows, labels] = -np.inf
    return ((given - others.max(axis=1) + 1.0) / 2.0).astype(np.float64)


def multiclass_issues(probs: np.ndarray, labels: np.ndarray, method: str = "normalized_margin") -> pd.DataFrame:
    """``label_issue``, ``label_quality_score``, ``suggested_label`` (-1 when none) per row."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise EvalError(f"probabilities of shape {probs.shape} do not match {len(labels)} labels", field="probs")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise EvalError(f"labels must lie in 0..{probs.shape[1] - 1}", field="true_label")
    thresholds = class_thresholds(probs, labels)
    confident = confident_labels(probs, thresholds)
    # Ties count for the given label: a model that cannot tell the classes apart flags nothing.
    given_is_top = probs[np.arange(len(labels)), labels] >= probs.max(axis=1, initial=-np.inf)
    issue = (confident >= 0) & (confident != labels) & ~given_is_top
    return pd.DataFrame({
        "label_issue": issue,
        "label_quality_score": label_scores(probs, labels, method),
        "suggested_label": np.where(issue, confident, -1).astype(np.int32),
    })


def multilabel_issues(probs: np.ndarray, present: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Per row ``label_issue``, ``label_quality_score``, ``missing`` and ``extra`` (some label confidently
    missing / spurious); and the suggested label sets as a boolean matrix.

    Label ``k`` of an image is confidently present when ``p_k`` reaches the mean
    ``p_k`` of the images that have it, confidently absent when ``1 - p_k``
    reaches the mean ``1 - p_k`` of those that lack it; when both hold the larger wins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if probs.shape != present.shape:
        raise EvalError(f"probabilities of shape {probs.shape} do not match labels of shape {present.shape}",
                        field="probs")
    n_have = present.sum(axis=0)
    n_lack = len(present) - n_have
    with np.errstate(invalid="ignore", divide="ignore"):
        t_present = np.where(n_have > 0, (probs * present).sum(axis=0) / n_have, np.inf)
        t_absent = np.where(n_lack > 0, ((1 - probs) * ~present).sum(axis=0) / n_lack, np.inf)
    sure_present = probs >= t_present
    sure_absent = (1 - probs) >= t_absent
    confident_present = sure_present & (~sure_absent | (probs >= 1 - probs))
    confident_absent = sure_absent & ~confident_present
    # As for one class: a flip the model's own 0.5 decision disagrees with is not suggested.
    missing = ~present & confident_present & (probs > 0.5)
    extra = present & confident_absent & (probs < 0.5)
    self_confidence = np.where(present, probs, 1 - probs)
    score = self_confidence.min(axis=1) if probs.shape[1] else np.ones(len(probs))
    return pd.DataFrame({
        "label_issue": (missing | extra).any(axis=1),
        "label_quality_score": score,
        "missing": missing.any(axis=1),
        "extra": extra.any(axis=1),
    }), (present | missing) & ~extra


# --------------------------------------------------------------------------- reading the store


def _list_matrix(column: pa.ChunkedArray, width: int, what: str) -> np.ndarray:
    """A list column of equal-length rows as an (n, width) float array."""
    array = column.combine_chunks()
    lengths = array.value_lengths().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != width)
    if len(bad):
        raise EvalError(f"{what} of row {int(bad[0])} has {lengths[bad[0]]} values, expected {width}", field=what)
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(array), width)


def _multi_hot(column: pa.ChunkedArray, width: int) -> np.ndarray:
    array = column.combine_chunks()
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(array)), lengths)
    keep = (values >= 0) & (values < width)
    hot = np.zeros((len(array), width), dtype=bool)
    hot[rows[keep], values[keep]] = True
    return hot


def _nullable_ids(values: np.ndarray) -> pd.Series:
    """Class ids with -1 read as missing."""
    values = np.asarray(values, dtype=np.int64)
    return pd.Series(np.where(values >= 0, values, 0), dtype="Int32").mask(values < 0)


def _kind_names(flags: np.ndarray, names: tuple[str, ...]) -> pd.Series:
    """Comma-joined names of the set flags per row (missing when none), via one lookup per bit pattern."""
    codes = (flags.astype(np.int64) << np.arange(len(names))).sum(axis=1)
    table = np.array([",".join(n for b, n in enumerate(names) if code >> b & 1) or None
                      for code in range(1 << len(names))], dtype=object)
    return pd.Series(table[codes], dtype="string")


def _label_lists(hot: np.ndarray, keep: np.ndarray) -> pd.Series:
    """Rows of a boolean matrix as sorted class-id lists (missing where ``keep`` is false)."""
    rows, cols = np.nonzero(hot)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(hot)))]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int32)),
                                     mask=pa.array(~np.asarray(keep, dtype=bool)))
    return pd.Series(lists, dtype=pd.ArrowDtype(pa.list_(pa.int32())))


def _check_model(store: Store, model_id: str) -> None:
    if model_id not in store.model_ids():
        raise EvalError(f"unknown model {model_id!r}", field="model", choices=store.model_ids())


def has_probabilities(store: Store, model_id: str) -> bool:
    """Whether ``model_id`` stored class probabilities (``probs``) for some image: a classification
    model's label quality needs them; a model ingested from a table without them has none."""
    return "probs" in store.table_columns("predictions") and bool(store.scalar(
        'SELECT count(*) FROM "predictions" WHERE "model_id" = ? AND "probs" IS NOT NULL', [model_id]))


def _classification(store: Store, model_id: str, method: str) -> pd.DataFrame:
    if not has_probabilities(store, model_id):
        raise EvalError(f"model {model_id!r} stored no class probabilities ('probs'); label quality needs them: "
                        "ingest its predictions with a probs column (one probability per class, in class order)",
                        field="probs")
    n_classes = len(store.classes)
    data = store.arrow(
        'SELECT i."image_id", i."true_label", p."probs" FROM "images" AS i '
        'JOIN "predictions" AS p ON p."image_id" = i."image_id" AND p."model_id" = ? '
        'WHERE i."true_label" IS NOT NULL AND p."probs" IS NOT NULL ORDER BY i."image_id"', [model_id])
    image_ids = data.column("image_id").to_numpy().astype(np.int32)
    probs = _list_matrix(data.column("probs"), n_classes, "probs")
    if store.task == "multiclass":
        labels = data.column("true_label").to_numpy().astype(np.int64)
        frame = multiclass_issues(probs, labels, method)
        frame["issue_kind"] = _kind_names(frame["label_issue"].to_numpy()[:, None], ("wrong_label",))
        frame["suggested_label"] = _nullable_ids(frame["suggested_label"].to_numpy())
    else:
        frame, suggested = multilabel_issues(probs, _multi_hot(data.column("true_label"), n_classes))
        frame["issue_kind"] = _kind_names(np.stack([frame["missing"], frame["extra"]], axis=1),
                                          ("missing_label", "extra_label"))
        frame["suggested_label"] = _label_lists(suggested, frame["label_issue"].to_numpy())
        frame = frame.drop(columns=["missing", "extra"])
    frame.insert(0, "image_id", image_ids)
    return frame[["image_id", "label_issue", "label_quality_score", "suggested_label", "issue_kind"]]


def detection_thresholds(store: Store, model_id: str) -> dict[int, float]:
    """Per class: the mean score of its true positives at IoU 0.5, at least the store's score threshold."""
    floor = float(store.meta().get("score_threshold", 0.5))
    rows = store.rows('SELECT "class_id", avg("score") FROM "det_matches" WHERE "model_id" = ? '
                      'AND ("tp_mask" & 1) <> 0 GROUP BY 1', [model_id])
    return {int(c): max(floor, float(s)) for c, s in rows}


def _detection(store: Store, model_id: str) -> pd.DataFrame:
    thresholds = detection_thresholds(store, model_id)
    floor = float(store.meta().get("score_threshold", 0.5))
    # Bit 0 of the masks is IoU 0.5, area "all"; list element 1 is threshold 0.5.
    dets = store.query(
        'SELECT d."image_id", d."class_id", d."score", (d."tp_mask" & 1) <> 0 AS tp, '
        '(d."ignored_mask" & 1) <> 0 AS ignored, d."best_same_iou", d."best_same_gt_id", '
        'd."best_other_iou", d."best_other_gt_id", '
        'coalesce(gs."match_det_ids"[1] = -1 OR gs."match_scores"[1] < ?, false) AS same_gt_missed, '
        'coalesce(go."match_det_ids"[1] = -1 OR go."match_scores"[1] < ?, false) AS other_gt_missed '
        'FROM "det_matches" AS d '
        'LEFT JOIN "gt_matches" AS gs ON gs."model_id" = d."model_id" AND gs."image_id" = d."image_id" '
        'AND gs."gt_id" = d."best_same_gt_id" '
        'LEFT JOIN "gt_matches" AS go ON go."model_id" = d."model_id" AND go."image_id" = d."image_id" '
        'AND go."gt_id" = d."best_other_gt_id" '
        'WHERE d."model_id" = ? AND d."rank" < 100', [floor, floor, model_id])
    image_ids = store.query('SELECT "image_id" FROM "images" ORDER BY 1')["image_id"].to_numpy().astype(np.int32)
    score = dets["score"].to_numpy(np.float64)
    class_id = dets["class_id"].to_numpy(np.int64)
    # A class with no true positive at all: its confident bar is the store's score threshold.
    bars = np.full(int(max([*thresholds, int(class_id.max(initial=-1))])) + 1, floor)
    bars[list(thresholds)] = list(thresholds.values())
    bar = bars[class_id]
    confident = score >= bar
    tp, ignored = dets["tp"].to_numpy(bool), dets["ignored"].to_numpy(bool)
    same_iou = dets["best_same_iou"].to_numpy(np.float64)
    other_iou = dets["best_other_iou"].to_numpy(np.float64)
    false_positive = ~tp & ~ignored
    missing_box = confident & false_positive & (same_iou < NO_OVERLAP_IOU) & (other_iou < NO_OVERLAP_IOU)
    wrong_class = confident & false_positive & (other_iou >= MATCH_IOU) & dets["other_gt_missed"].to_numpy(bool)
    poor_box = (confident & false_positive & (same_iou >= NO_OVERLAP_IOU) & (same_iou < MATCH_IOU)
                & dets["same_gt_missed"].to_numpy(bool))
    row = np.searchsorted(image_ids, dets["image_id"].to_numpy(np.int32))
    n = len(image_ids)

    def per_image(mask: np.ndarray) -> np.ndarray:
        return np.bincount(row[mask], minlength=n) > 0

    flags = {"missing_box": per_image(missing_box), "wrong_class": per_image(wrong_class),
             "poor_box": per_image(poor_box)}
    worst = np.zeros(n)
    np.maximum.at(worst, row[false_positive], score[false_positive])
    # Suggested class: the wrong-class detection of highest score in its image.
    suggested = np.full(n, -1, dtype=np.int64)
    picked = np.flatnonzero(wrong_class)
    picked = picked[np.lexsort((-score[picked], row[picked]))]
    first = np.concatenate([[True], row[picked][1:] != row[picked][:-1]]) if len(picked) else np.zeros(0, bool)
    suggested[row[picked[first]]] = class_id[picked[first]]
    issue = flags["missing_box"] | flags["wrong_class"] | flags["poor_box"]
    return pd.DataFrame({
        "image_id": image_ids,
        "label_issue": issue,
        "label_quality_score": 1.0 - np.clip(worst, 0.0, 1.0),
        "suggested_label": _nullable_ids(suggested),
        "issue_kind": _kind_names(np.stack([flags[k] for k in DETECTION_KINDS], axis=1), DETECTION_KINDS),
    })


def label_quality(store: Store, model_id: str, *, method: str = "normalized_margin") -> pd.DataFrame:
    """``image_id, label_issue, label_quality_score, suggested_label, issue_kind``, one row per
    image with a label and a prediction, ordered by image id."""
    _check_model(store, model_id)
    if store.task in ("multiclass", "multilabel"):
        return _classification(store, model_id, method)
    if store.task == "detection":
        return _detection(store, model_id)
    raise EvalError(f"label quality does not apply to task {store.task!r}", field="task")


def write_label_quality(store_path: str | os.PathLike, model_id: str | None = None, *,
                        method: str = "normalized_margin") -> tuple[pd.DataFrame, str]:
    """Compute and write a ``label_quality`` part; returns the rows and the model.

    Rows carry ``model_id`` and ``computed_at`` (UTC): a rerun adds a part, and
    readers take each model's latest run (``latest_sql``).
    """
    store = Store(store_path)
    try:
        model_id = model_id or _default_model(store)
        frame = label_quality(store, model_id, method=method)
    finally:
        store.close()
    frame.insert(0, "model_id", pd.Series([model_id] * len(frame), dtype="string"))
    frame["computed_at"] = pd.Timestamp.now(tz="UTC")
    write_part(store_path, TABLE, frame)
    log.info("label quality of %s: %d of %d images flagged", model_id, int(frame["label_issue"].sum()), len(frame))
    return frame, model_id


def latest_sql(table: str, model_id: str) -> tuple[str, list]:
    """``(sql, params)`` selecting ``table``'s rows of ``model_id``'s latest run."""
    return (f'SELECT * FROM "{table}" WHERE "model_id" = ? AND "computed_at" = '
            f'(SELECT max("computed_at") FROM "{table}" WHERE "model_id" = ?)', [model_id, model_id])


def _default_model(store: Store) -> str:
    models = store.model_ids()
    if not models:
        raise EvalError("this store has no model predictions; add a model first", field="model")
    return models[0]


def label_quality_main(argv: list[str] | None = None) -> int:
    """``visionlens label-quality STORE [--model M] [--method normalized_margin|self_confidence] [--json]``."""
    parser = argparse.ArgumentParser(prog="visionlens label-quality",
                                     description="flag likely label errors from a model's predictions")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--model", help="model id (default: the model added to the store first)")
    parser.add_argument("--method", choices=SCORE_METHODS, default="normalized_margin",
                        help="classification score: normalised margin (default) or self-confidence")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)
    frame, model_id = write_label_quality(args.store, args.model, method=args.method)
    flagged = int(frame["label_issue"].sum())
    summary = {"model": model_id, "images": len(frame), "flagged": flagged,
               "kinds": {str(k): int(v) for k, v in frame["issue_kind"].dropna().value_counts().items()}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"model {model_id}: {flagged:,} of {len(frame):,} images flagged as likely label errors "
              f"(table {TABLE})")
    return 0
