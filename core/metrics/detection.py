"""Detection metrics for any cohort, at any stored IoU threshold, from stored matches.

Everything here reads the ``det_matches`` / ``gt_matches`` tables written from
``core.matching.match_detections`` (their columns are described there) and never re-matches:

- ``detection_metrics``: the 12 COCO stats, AP at a chosen IoU, per-class AP/AR, 101-point
  precision curves, macro / micro / weighted aggregates. For a cohort it equals pycocotools
  ``COCOeval`` run with ``imgIds`` = the cohort (to 1e-6; ties ordered exactly as pycocotools).
- ``image_objects``: one image's boxes with TP / FP / FN / ignored status, partner and IoU.
- ``confusion_matrix_detection``: GT class x predicted class with a background row/column.
- ``tide_errors``: TIDE error types and their dAP.
- ``evaluate_coco_files`` / ``eval_coco_main``: COCO json files -> the 12 stats (the
  ``visionlens eval-coco`` command), with the same engine.

The accumulation follows pycocotools ``COCOeval.accumulate`` operation for operation where it
matters for floating point (``tp / (fp + tp + eps)``, ``tp / npig``, the precision envelope,
``searchsorted(rc, recThrs, 'left')``), but vectorised over classes: the first detection
reaching recall r is the c-th true positive, c = the least count with c / npig >= r.
A score threshold s means "detections with score < s dropped before matching"; greedy
matching in score order makes that a filter on the stored matches.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import EvalError
from ..matching import (AREA_NAMES, AREA_RANGE_BITS, IOU_THRESHOLDS, MAX_DETS, N_AREAS,
                        N_THRESHOLDS, RECALL_THRESHOLDS, bit_index, match_arrays, score_value,
                        threshold_index)
from ..store import Store, memory_connection, write_part

log = logging.getLogger(__name__)

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
AVERAGES = ("macro", "micro", "weighted")
BACKGROUND = "background"
TIDE_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
_EPS = np.spacing(1)
# Score thresholds whose counts a cohort's evaluation holds (the app's score slider steps);
# any other threshold is counted by one query.
SCORE_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)
# Detections held in memory at once while a cohort is evaluated (about 30 bytes each).
CHUNK_DETECTIONS = 2_000_000
# The tp_mask / ignored_mask bits of area 'all' (every IoU threshold).
_AREA_ALL_BITS = (1 << N_THRESHOLDS) - 1
_MAX_DET = MAX_DETS[-1]
# ignored_mask of an unmatched detection, indexed by its area_mask: all thresholds of the
# area ranges its area lies outside.
_UNMATCHED_IGNORED = np.array(
    [AREA_RANGE_BITS[[not (inside >> a) & 1 for a in range(N_AREAS)]].sum()
     for inside in range(1 << N_AREAS)], dtype=np.int64)


# --------------------------------------------------------------------------- accumulation


@dataclass(frozen=True)
class Accumulated:
    """pycocotools' ``eval`` arrays at maxDets 100: precision, scores (T, R, K, A); recall
    (T, K, A, M) at maxDets 1, 10, 100.

    -1 marks a class without counted GT in that area range (or a combination not computed).
    """

    precision: np.ndarray
    scores: np.ndarray
    recall: np.ndarray


def _recall_counts(n_gt: np.ndarray) -> np.ndarray:
    """(K, A) GT counts -> (K, A, R): least TP count c with c / n_gt >= recall threshold r."""
    n = n_gt.astype(np.float64)[..., None, None]
    base = np.maximum(np.floor(RECALL_THRESHOLDS[:, None] * n) - 1, 0)
    cand = base + np.arange(4)
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = cand / n >= RECALL_THRESHOLDS[:, None]
    first = np.argmax(reach, axis=-1)
    return np.take_along_axis(cand, first[..., None], axis=-1)[..., 0].astype(np.int64)


def _mask_bytes(masks: np.ndarray) -> np.ndarray:
    """The little-endian bytes of int64 masks (8 per mask): a bit is then one strided byte test."""
    return np.ascontiguousarray(masks, dtype="<i8").view(np.uint8)


def _bit_flags(mask_bytes: np.ndarray, bit: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bit ``bit`` of each mask (``_mask_bytes``), as booleans."""
    return np.not_equal(mask_bytes[bit >> 3::8] & np.uint8(1 << (bit & 7)), 0, out=out)


def _plane_flags(masks: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(len(bits), n) booleans: bit ``bits[p]`` of each mask, one contiguous row per plane."""
    mask_bytes = _mask_bytes(masks)
    out = np.empty((len(bits), len(masks)), bool)
    for p, bit in enumerate(np.asarray(bits).tolist()):
        _bit_flags(mask_bytes, bit, out=out[p])
    return out


def accumulate(det_class: np.ndarray, det_rank: np.ndarray, det_tp_mask: np.ndarray,
               det_ignored_mask: np.ndarray, det_area_mask: np.ndarray, det_score: np.ndarray,
               n_gt: np.ndarray, *, areas: tuple[int, ...] = tuple(range(N_AREAS)),
               thresholds: tuple[int, ...] = tuple(range(N_THRESHOLDS))) -> Accumulated:
    """COCO accumulate over detections given in pycocotools order.

    ``det_class`` are class indices 0..K-1, and the detections are sorted by class index, then
    score descending, then image id, then rank (``order_key`` order); detections ranked >= 100
    are left out here. Masks as stored in ``det_matches``. ``n_gt`` (K, A) counts non-ignored
    GTs per class and area range.

    Only true positives matter for the precision envelope (its maxima lie on them). The
    detections counted (TP or FP) before each come from one cumulative sum per area range
    (an unmatched detection counts exactly when its own area is in range) corrected at the
    few detections whose counted flag differs from that (true positives of a GT in range
    whose own area is not, detections matched to ignored GTs). Each (area, threshold) plane
    then walks only its own true positives and corrections, so the work is one pass over the
    detections plus one over each plane's true positives.
    """
    columns = (det_class, det_rank, det_score, det_tp_mask, det_ignored_mask, det_area_mask)
    keep = det_rank < _MAX_DET
    if not keep.all():
        columns = tuple(c[keep] for c in columns)
    cls, rank, score, tp_mask, ig_mask, area_mask = columns
    n_gt = np.asarray(n_gt, dtype=np.int64)
    n_classes = n_gt.shape[0]
    n_recall = len(RECALL_THRESHOLDS)
    shape = (N_THRESHOLDS, n_recall, n_classes, N_AREAS)
    precision, scores = np.full(shape, -1.0), np.full(shape, -1.0)
    recall = np.full((N_THRESHOLDS, n_classes, N_AREAS, len(MAX_DETS)), -1.0)
    if n_classes == 0:
        return Accumulated(precision, scores, recall)
    plane_area = np.repeat(np.asarray(areas, dtype=np.int64), len(thresholds))
    plane_t = np.tile(np.asarray(thresholds, dtype=np.int64), len(areas))
    bits = plane_area * N_THRESHOLDS + plane_t
    plane_bits = int(np.sum(np.left_shift(np.int64(1), bits)))
    # Only the planes' bits matter below: the narrowest type holding them (the micro ranking's
    # ten bits fit 16-bit masks, a fifth of the memory of ten million int64s).
    mask_type = np.int16 if plane_bits < 2 ** 15 else np.int64
    tp_mask, ig_mask = ((m & plane_bits).astype(mask_type, copy=False) for m in (tp_mask, ig_mask))
    class_keys = np.arange(n_classes)
    if np.iinfo(cls.dtype).max >= n_classes:  # keys of cls's own type: searchsorted then copies nothing
        class_keys = class_keys.astype(cls.dtype)
    class_start = np.searchsorted(cls, class_keys)
    n_det = np.diff(np.r_[class_start, len(cls)])  # cls is sorted
    first_score = np.where(n_det > 0, score[np.minimum(class_start, len(score) - 1)], 0.0) \
        if len(score) else np.zeros(n_classes)
    needed = _recall_counts(n_gt)  # (K, A, R)
    rank_below = {m: rank < m for m in MAX_DETS[:-1]}

    # Counted detections up to each position if every detection were unmatched: per area.
    # (Entry i counts positions < i.)
    base_cum = {int(a): _prefix_counts((area_mask >> a) & 1) for a in np.unique(plane_area)}
    # Detections counted where "unmatched" says not, or the reverse, at some plane.
    counted_bits = ~ig_mask & plane_bits
    differs = counted_bits ^ (~_UNMATCHED_IGNORED & plane_bits).astype(mask_type)[area_mask]
    corrected = np.flatnonzero(differs)
    corrected_flags = _plane_flags(differs[corrected], bits)
    corrected_sign = np.where(_plane_flags(counted_bits[corrected], bits), 1, -1)
    tp_dets = np.flatnonzero(tp_mask & plane_bits)
    tp_flags = _plane_flags(tp_mask[tp_dets], bits)

    for p, (a, t) in enumerate(zip(plane_area.tolist(), plane_t.tolist())):
        gt_k = n_gt[:, a]
        valid = gt_k > 0
        cum = base_cum[a]
        fix_pos = corrected[corrected_flags[p]]
        fix_sign = corrected_sign[p][corrected_flags[p]]
        fix_before_class = np.r_[0, np.cumsum(fix_sign)][np.searchsorted(fix_pos, class_start)]
        hits = tp_dets[tp_flags[p]]  # this plane's true positives, in order (so by class)
        bounds = np.searchsorted(hits, np.r_[class_start, len(cls)])
        tp_n = np.diff(bounds)
        tp_first = bounds[:-1]
        count = np.arange(1, len(hits) + 1, dtype=np.float64) - np.repeat(tp_first, tp_n)
        # Counted detections from the class's first one up to each hit: the "unmatched" count
        # plus the corrections up to the hit (added where each correction falls among the hits).
        fix_at = np.bincount(np.searchsorted(hits, fix_pos), weights=fix_sign, minlength=len(hits) + 1)
        upto = (cum[hits + 1] + np.cumsum(fix_at[:len(hits)])
                - np.repeat(cum[class_start] + fix_before_class, tp_n))
        # pycocotools: tp / (fp + tp + eps), fp + tp being the counted detections so far.
        pr = count / (upto + _EPS)
        safe_gt = np.maximum(gt_k, 1)
        for m_i, m in enumerate(MAX_DETS):
            if m == _MAX_DET:
                found = tp_n
            else:
                below = np.r_[0, np.cumsum(rank_below[m][hits])]
                found = below[bounds[1:]] - below[bounds[:-1]]
            recall[t, :, a, m_i] = np.where(valid, found / safe_gt, -1.0)

        need = needed[:, a, :]  # (K, R)
        idx = np.maximum(need, 1) - 1
        ok = valid[:, None] & (idx < tp_n[:, None])
        at = tp_first[:, None] + idx
        q = np.full(need.shape, -np.inf)
        if ok.any():
            # Max precision from each recall point to the next, then the envelope (max over the
            # rest of the class) as a suffix max over recall points.
            q[ok] = np.maximum.reduceat(pr, at[ok])
        q = np.maximum.accumulate(q[:, ::-1], axis=1)[:, ::-1]
        precision[t, :, :, a] = np.where(valid[:, None], np.where(ok, q, 0.0), -1.0).T
        # Recall 0 points at the class's first detection whatever it is (searchsorted -> 0).
        s = np.zeros(need.shape)
        s[ok] = score[hits[at[ok]]]
        s = np.where((need == 0) & (n_det[:, None] > 0), first_score[:, None], s)
        scores[t, :, :, a] = np.where(valid[:, None], s, -1.0).T
    return Accumulated(precision, scores, recall)


def _prefix_counts(flags: np.ndarray) -> np.ndarray:
    """Entry i: how many of ``flags[:i]`` are set (length n + 1)."""
    dtype = np.int32 if len(flags) < 2 ** 31 else np.int64
    out = np.empty(len(flags) + 1, dtype)
    out[0] = 0
    np.cumsum(flags.astype(dtype, copy=False), out=out[1:])
    return out


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def coco_stats(acc: Accumulated) -> dict[str, float]:
    """The 12 numbers of ``COCOeval.summarize`` (bbox), keyed by ``STAT_KEYS``."""
    p, r = acc.precision, acc.recall
    t50, t75 = threshold_index(0.5), threshold_index(0.75)
    area = {name: i for i, name in enumerate(AREA_NAMES)}
    m100 = len(MAX_DETS) - 1
    values = [
        _mean_valid(p[:, :, :, area["all"]]),
        _mean_valid(p[t50, :, :, area["all"]]),
        _mean_valid(p[t75, :, :, area["all"]]),
        _mean_valid(p[:, :, :, area["small"]]),
        _mean_valid(p[:, :, :, area["medium"]]),
        _mean_valid(p[:, :, :, area["large"]]),
        _mean_valid(r[:, :, area["all"], 0]),
        _mean_valid(r[:, :, area["all"], 1]),
        _mean_valid(r[:, :, area["all"], m100]),
        _mean_valid(r[:, :, area["small"], m100]),
        _mean_valid(r[:, :, area["medium"], m100]),
        _mean_valid(r[:, :, area["large"], m100]),
    ]
    return dict(zip(STAT_KEYS, values))


def _gt_counts(class_index: np.ndarray, area_mask: np.ndarray, weight: np.ndarray,
               n_classes: int) -> np.ndarray:
    """(K, A) non-ignored GT counts from per-GT (or per-group) area masks."""
    out = np.zeros((n_classes, N_AREAS), np.int64)
    for a in range(N_AREAS):
        counted = ((area_mask >> a) & 1).astype(bool)
        out[:, a] = np.bincount(class_index[counted], weights=weight[counted],
                                minlength=n_classes).astype(np.int64)
    return out


# --------------------------------------------------------------------------- store queries


def _cohort_clause(selection: tuple[str, list] | None) -> tuple[str, list]:
    if selection is None:
        return "", []
    sql, params = selection
    return f" AND image_id IN (SELECT image_id FROM ({sql}) AS vl_cohort)", list(params)


def _check_model(store, model_id: str) -> None:
    if "tp_mask" not in store.table_columns("det_matches"):
        raise EvalError("this store holds no detection matches (is it a detection dataset?)",
                        file=str(store.paths.base), field="task")
    ids = store.model_ids()
    if model_id not in ids:
        raise EvalError(f"unknown model {model_id!r}", field="model", choices=ids)


def _class_ids(store, classes: list[int] | None) -> np.ndarray:
    known = np.arange(len(store.classes))
    if classes is None:
        return known
    chosen = np.unique(np.asarray(list(classes), dtype=np.int64))
    unknown = np.setdiff1d(chosen, known)
    if len(unknown):
        raise EvalError(f"unknown class id {int(unknown[0])}", field="classes",
                        choices=known.tolist())
    return chosen


def _fetch(store, sql: str, params: list) -> dict[str, np.ndarray]:
    table = store.arrow(sql, params)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _class_index(class_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into class_ids, whether the value is one of them)."""
    values = values.astype(np.int64)
    if len(class_ids) and class_ids[0] == 0 and class_ids[-1] == len(class_ids) - 1:
        # All classes 0..K-1 (the default): the id is the index.
        return np.clip(values, 0, len(class_ids) - 1), (values >= 0) & (values < len(class_ids))
    index = np.minimum(np.searchsorted(class_ids, values), max(len(class_ids) - 1, 0))
    inside = (class_ids[index] == values) if len(class_ids) else np.zeros(len(values), bool)
    return index, inside


def _cohort_dets(store, model_id, selection, class_ids, columns: str,
                 class_range: tuple[int, int] | None = None) -> dict:
    """The cohort's detections within maxDets, of the chosen classes (read only from
    ``class_range``, inclusive, when given)."""
    where, params = _cohort_clause(selection)
    if class_range is not None:
        where, params = " AND class_id BETWEEN ? AND ?" + where, [*class_range, *params]
    sql = f"SELECT {columns} FROM det_matches WHERE model_id = ? AND rank < {_MAX_DET}{where}"
    rows = _fetch(store, sql, [model_id, *params])
    _, inside = _class_index(class_ids, rows["class_id"])
    return rows if inside.all() else {k: v[inside] for k, v in rows.items()}


def _cohort_gt_counts(store, model_id, selection, class_ids) -> np.ndarray:
    where, params = _cohort_clause(selection)
    rows = _fetch(store, "SELECT class_id, area_mask, count(*) AS n FROM gt_matches "
                         f"WHERE model_id = ?{where} GROUP BY class_id, area_mask",
                  [model_id, *params])
    index, inside = _class_index(class_ids, rows["class_id"])
    return _gt_counts(index[inside], rows["area_mask"].astype(np.int64)[inside],
                      rows["n"].astype(np.float64)[inside], len(class_ids))


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class CohortEvaluation:
    """A cohort's COCO evaluation at every stored IoU threshold and area range.

    Everything ``detection_metrics`` reports except the counts at the score threshold: the
    IoU threshold only picks a plane of these arrays, so a page that caches this changes
    either threshold by re-reading those counts alone (``operating_counts``).
    """

    model_id: str
    class_ids: np.ndarray     # the evaluated classes (COCO catIds)
    n_gt: np.ndarray          # (K, A) counted GTs per class and area range
    per_class: Accumulated    # one ranking per class
    micro: Accumulated        # every class's detections in one ranking (area all)
    grid_tp: np.ndarray       # (T, K, len(SCORE_GRID)) true positives (area all) scored >= each grid value
    grid_fp: np.ndarray       # (T, K, len(SCORE_GRID)) false positives, likewise

    def counts_at(self, t: int, score: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(true positives, false positives) per class at threshold index ``t`` and ``score``;
        None when ``score`` is not a grid value."""
        at = np.flatnonzero(SCORE_GRID == score)
        return (self.grid_tp[t, :, at[0]], self.grid_fp[t, :, at[0]]) if len(at) else None


def evaluate_cohort(store, model_id: str, selection: tuple[str, list] | None, *,
                    classes: list[int] | None = None) -> CohortEvaluation:
    """Accumulate a cohort's stored matches, COCO style, once for every threshold and area.

    ``selection`` is ``(sql, params)`` of a SELECT with an ``image_id`` column (None: all
    images); ``classes`` restricts the evaluated classes (COCO ``catIds``).

    Classes are ranked independently, so they are read a group at a time (at most
    ``CHUNK_DETECTIONS`` detections, unless one class holds more): memory stays bounded
    whatever the size of the cohort. The micro ranking keeps, of each detection, only what
    area 'all' needs (11 bytes). Every image and every class: read from the store when
    ``store_evaluations`` has written it (``precompute`` and ingest do).
    """
    _check_model(store, model_id)
    class_ids = _class_ids(store, classes)
    if _whole_store(store, selection, class_ids):
        stored = stored_evaluation(store, model_id)
        if stored is not None:
            return stored
    n_gt = _cohort_gt_counts(store, model_id, selection, class_ids)
    n_classes = len(class_ids)
    precision = np.full((N_THRESHOLDS, len(RECALL_THRESHOLDS), n_classes, N_AREAS), -1.0)
    scores = precision.copy()
    recall = np.full((N_THRESHOLDS, n_classes, N_AREAS, len(MAX_DETS)), -1.0)
    grid_tp = np.zeros((N_THRESHOLDS, n_classes, len(SCORE_GRID)), np.int64)
    grid_fp = grid_tp.copy()
    micro_parts = []
    if _match_counts(store, model_id)[0] <= CHUNK_DETECTIONS:  # all fit: no need to count per class
        groups = [(0, n_classes)]
    else:
        groups = _class_groups(_cohort_det_counts(store, model_id, selection, class_ids), CHUNK_DETECTIONS)
    for lo, hi in groups:
        group = class_ids[lo:hi]
        d = _in_key_order(_cohort_dets(store, model_id, selection, group,
                                       # Narrow types: a million images bring ten million detections.
                                       "CAST(class_id AS INTEGER) AS class_id, CAST(rank AS SMALLINT) AS rank, "
                                       "tp_mask, ignored_mask, CAST(area_mask AS UTINYINT) AS area_mask, score, "
                                       "order_key", class_range=(int(group[0]), int(group[-1]))))
        cls, _ = _class_index(group, d["class_id"])
        acc = accumulate(cls, d["rank"], d["tp_mask"], d["ignored_mask"], d["area_mask"], d["score"],
                         n_gt[lo:hi])
        precision[:, :, lo:hi], scores[:, :, lo:hi], recall[:, lo:hi] = acc.precision, acc.scores, acc.recall
        grid_tp[:, lo:hi], grid_fp[:, lo:hi] = _grid_counts(cls, d["score"], d["tp_mask"], d["ignored_mask"],
                                                            len(group))
        micro_parts.append({"rank": d["rank"], "score": d["score"], "area_mask": d["area_mask"] & 1,
                            **{k: (d[k] & _AREA_ALL_BITS).astype(np.int16) for k in ("tp_mask", "ignored_mask")}})
        del d, cls
    return CohortEvaluation(model_id, class_ids, n_gt, Accumulated(precision, scores, recall),
                            _micro_accumulate(micro_parts, n_gt), grid_tp, grid_fp)


# --------------------------------------------------------------------------- persisted evaluations

EVALUATIONS_TABLE = "evaluations"
# Bump whenever evaluate_cohort's results change: evaluations persisted before are then recomputed.
EVALUATION_VERSION = 1
EVALUATION_ARRAYS = ("class_ids", "n_gt", "precision", "scores", "recall", "micro_precision", "micro_scores",
                      "micro_recall", "grid_tp", "grid_fp")


def _whole_store(store, selection: tuple[str, list] | None, class_ids: np.ndarray) -> bool:
    from ..cohorts import ALL_IMAGES_SQL

    every_image = selection is None or (selection[0] == ALL_IMAGES_SQL and not selection[1])
    return every_image and len(class_ids) == len(store.classes)


def _match_counts(store, model_id: str) -> tuple[int, int]:
    """(stored detection matches, stored GT matches) of a model: milliseconds at ten million."""
    return store.rows('SELECT (SELECT count(*) FROM "det_matches" WHERE model_id = ?), '
                      '(SELECT count(*) FROM "gt_matches" WHERE model_id = ?)', [model_id, model_id])[0]


def stored_evaluation(store, model_id: str) -> CohortEvaluation | None:
    """The persisted all-images evaluation of ``model_id``, if it is current: written by this
    ``EVALUATION_VERSION`` over the matches the store holds now."""
    if not store.has_table(EVALUATIONS_TABLE):
        return None
    n_det, n_gt = _match_counts(store, model_id)
    rows = store.rows(
        f'SELECT name, dtype, shape, data FROM "{EVALUATIONS_TABLE}" WHERE model_id = ? AND version = ? '
        'AND n_detections = ? AND n_ground_truths = ?', [model_id, EVALUATION_VERSION, n_det, n_gt])
    arrays = {name: np.frombuffer(data, dtype=dtype).reshape(shape).copy() for name, dtype, shape, data in rows}
    if set(arrays) != set(EVALUATION_ARRAYS):
        return None
    return CohortEvaluation(model_id, arrays["class_ids"], arrays["n_gt"],
                            Accumulated(arrays["precision"], arrays["scores"], arrays["recall"]),
                            Accumulated(arrays["micro_precision"], arrays["micro_scores"], arrays["micro_recall"]),
                            arrays["grid_tp"], arrays["grid_fp"])


def store_evaluations(store_path) -> list[str]:
    """Evaluate on every image each detection model whose persisted evaluation is missing or
    stale, and write them as one store part; returns those models.

    At ten million detections an evaluation takes seconds; persisted, the pages that open on
    all images (model overview, compare) read it in milliseconds.
    """
    store = Store(store_path)
    try:
        if store.task != "detection":
            return []
        rows = []
        for model_id in store.model_ids():
            counts = _match_counts(store, model_id)
            if not counts[1] or stored_evaluation(store, model_id) is not None:
                continue  # not matched yet, or done
            evaluation = evaluate_cohort(store, model_id, None)
            arrays = {"class_ids": evaluation.class_ids, "n_gt": evaluation.n_gt,
                      "precision": evaluation.per_class.precision, "scores": evaluation.per_class.scores,
                      "recall": evaluation.per_class.recall, "micro_precision": evaluation.micro.precision,
                      "micro_scores": evaluation.micro.scores, "micro_recall": evaluation.micro.recall,
                      "grid_tp": evaluation.grid_tp, "grid_fp": evaluation.grid_fp}
            rows += [{"model_id": model_id, "version": EVALUATION_VERSION, "n_detections": counts[0],
                      "n_ground_truths": counts[1], "name": name, "dtype": array.dtype.str,
                      "shape": list(array.shape), "data": np.ascontiguousarray(array).tobytes()}
                     for name, array in arrays.items()]
    finally:
        store.close()
    if not rows:
        return []
    write_part(store_path, EVALUATIONS_TABLE, pa.Table.from_pylist(rows, schema=_EVALUATIONS_SCHEMA))
    return sorted({row["model_id"] for row in rows})


_EVALUATIONS_SCHEMA = pa.schema([("model_id", pa.string()), ("version", pa.int32()), ("n_detections", pa.int64()),
                                 ("n_ground_truths", pa.int64()), ("name", pa.string()), ("dtype", pa.string()),
                                 ("shape", pa.list_(pa.int64())), ("data", pa.binary())])


# Distinct keys filling at least 1/8 of their range are sorted by one scatter over the range, sparser
# ones by argsort (the two cost about the same near there, measured at a million keys).
_SCATTER_DENSITY = 8


def _in_key_order(rows: dict[str, np.ndarray], key: str = "order_key", *,
                  drop: bool = True) -> dict[str, np.ndarray]:
    """``rows`` sorted by their distinct integer ``key`` (dropped unless ``drop`` is false).

    Sorted here rather than by the query's ORDER BY: numpy takes a fraction of DuckDB's time. A class
    group's keys are (a subset of) one range of a model's order keys: a dense one is put in order by
    a linear scatter.
    """
    keys = rows.pop(key) if drop else rows[key]
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return rows
    keys = keys - keys.min()
    span = int(keys.max()) + 1
    if span <= _SCATTER_DENSITY * len(keys):
        slots = np.full(span, -1, np.int64)
        slots[keys] = np.arange(len(keys))
        order = slots[slots >= 0]
    else:
        order = np.argsort(keys)
    return {name: values[order] for name, values in rows.items()}


def _cohort_det_counts(store, model_id, selection, class_ids) -> np.ndarray:
    """Detections (within maxDets) per class of ``class_ids`` in the cohort."""
    where, params = _cohort_clause(selection)
    rows = _fetch(store, f"SELECT class_id, count(*) AS n FROM det_matches WHERE model_id = ? "
                         f"AND rank < {_MAX_DET}{where} GROUP BY class_id", [model_id, *params])
    index, inside = _class_index(class_ids, rows["class_id"])
    counts = np.zeros(len(class_ids), np.int64)
    counts[index[inside]] = rows["n"][inside]
    return counts


def _class_groups(det_counts: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) index ranges of classes holding at most ``limit`` detections each
    (a class holding more is a group of its own)."""
    groups, start, held = [], 0, 0
    for k, n in enumerate(det_counts.tolist()):
        if held and held + n > limit:
            groups.append((start, k))
            start, held = k, 0
        held += n
    return groups + [(start, len(det_counts))]


def _micro_accumulate(parts: list[dict[str, np.ndarray]], n_gt: np.ndarray) -> Accumulated:
    """Every class's detections (``parts``: class groups in COCO order) in one ranking, area all:
    by score descending; equal scores keep the class-major COCO order (class, image, rank), so
    the result is deterministic."""
    d = {k: np.concatenate([p.pop(k) for p in parts]) if parts else np.zeros(0) for k in
         ("rank", "score", "area_mask", "tp_mask", "ignored_mask")}
    order = np.argsort(-d["score"], kind="stable")  # class runs already descend: a merge of runs
    d = {k: d.pop(k)[order] for k in list(d)}
    return accumulate(np.zeros(len(order), np.int8), d["rank"], d["tp_mask"], d["ignored_mask"], d["area_mask"],
                      d["score"], n_gt.sum(axis=0, keepdims=True), areas=(0,))


def _grid_counts(cls: np.ndarray, score: np.ndarray, tp_mask: np.ndarray, ignored_mask: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, K, G) true and false positive counts (area all) of the detections scored at least each
    ``SCORE_GRID`` value, from detections in COCO order (maxDets 100).

    Within a class the detections run by score descending, so those kept at a threshold are a
    prefix of the class's run: each count is a difference of two positions among the plane's
    true (false) positives.
    """
    bounds = np.searchsorted(cls, np.arange(n_classes + 1))
    descending = -score.astype(np.float64)  # ascending within each class: searchsorted works per run
    ends = np.stack([lo + np.searchsorted(descending[lo:hi], -SCORE_GRID, side="right")
                     for lo, hi in zip(bounds[:-1], bounds[1:])]) if n_classes else \
        np.zeros((0, len(SCORE_GRID)), np.int64)
    tp_bytes, decided_bytes = _mask_bytes(tp_mask), _mask_bytes(tp_mask | ignored_mask)
    out = []
    for mask_bytes, wanted in ((tp_bytes, True), (decided_bytes, False)):
        counts = np.empty((N_THRESHOLDS, n_classes, len(SCORE_GRID)), np.int64)
        for t in range(N_THRESHOLDS):  # area 'all': bit t
            flags = _bit_flags(mask_bytes, bit_index(t, 0))
            positions = np.flatnonzero(flags if wanted else ~flags)
            counts[t] = (np.searchsorted(positions, ends)
                         - np.searchsorted(positions, bounds[:-1])[:, None])
        out.append(counts)
    return out[0], out[1]


def operating_counts(store, model_id: str, selection: tuple[str, list] | None, class_ids: np.ndarray,
                     iou: float, score_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) per class of ``class_ids`` at ``iou`` (area all, maxDets
    100) among the cohort's detections scored at least ``score_threshold``."""
    bit = bit_index(threshold_index(iou), 0)
    where, params = _cohort_clause(selection)
    rows = _fetch(store, (
        "SELECT class_id, count(*) FILTER ((tp_mask >> ?) & 1 = 1) AS n_tp, "
        "count(*) FILTER (((tp_mask | ignored_mask) >> ?) & 1 = 0) AS n_fp FROM det_matches "
        f"WHERE model_id = ? AND rank < {_MAX_DET} AND score >= ?{where} GROUP BY class_id"),
        [bit, bit, model_id, score_value(score_threshold), *params])
    index, inside = _class_index(class_ids, rows["class_id"])
    n_tp, n_fp = np.zeros(len(class_ids), np.int64), np.zeros(len(class_ids), np.int64)
    n_tp[index[inside]] = rows["n_tp"][inside]
    n_fp[index[inside]] = rows["n_fp"][inside]
    return n_tp, n_fp


def pr_curves(evaluation: CohortEvaluation, iou: float) -> dict[int, dict[str, np.ndarray]]:
    """class_id -> 101-point ``recall`` / ``precision`` / ``scores`` at ``iou``, area all,
    maxDets 100 (pycocotools' ``eval['precision']``), for the classes with GT."""
    t = threshold_index(iou)
    acc = evaluation.per_class
    return {int(k): {"recall": RECALL_THRESHOLDS.copy(), "precision": acc.precision[t, :, i, 0].copy(),
                     "scores": acc.scores[t, :, i, 0].copy()}
            for i, k in enumerate(evaluation.class_ids) if evaluation.n_gt[i, 0] > 0}


def detection_metrics(store, model_id: str, selection: tuple[str, list] | None, *,
                      iou: float | None = None, score_threshold: float = 0.0,
                      classes: list[int] | None = None, average: str = "macro",
                      evaluation: CohortEvaluation | None = None) -> dict:
    """COCO metrics of ``model_id`` on a cohort, from stored matches.

    ``selection`` is ``(sql, params)`` of a SELECT with an ``image_id`` column (None: all
    images). ``iou`` (default 0.5) must be a stored threshold; ``classes`` restricts the
    evaluated classes (COCO ``catIds``). AP, AR and the curves rank every detection, as
    pycocotools does; ``score_threshold`` is the operating point: the counts, precision,
    recall and F1 count only detections scored at least that (greedy matching in score
    order means a kept detection's match does not depend on the dropped ones).
    ``evaluation``: this cohort's ``evaluate_cohort`` result, when the caller holds it (then
    only the counts at the score threshold are read).

    Returns a dict with the 12 COCO stats (keys ``STAT_KEYS``, macro over classes with GT, -1
    when undefined, as pycocotools), ``mAP`` (AP at ``iou``, averaged as ``average``:
    'macro' = mean over classes with GT (COCO), 'weighted' = weighted by GT count, 'micro' =
    one ranking of all classes' detections against all GTs), ``aggregates`` (each averaging
    -> AP, AP at iou, AR100, precision / recall / F1 at iou and score threshold),
    ``per_class`` (DataFrame: class_id, name, n_gt, n_tp, n_fp, n_fn, precision, recall, f1 at
    iou and score threshold; AP, AP50, AP75, AP_iou, AR100; -1 where no GT) and ``curves``
    (``pr_curves`` at iou).
    """
    t = threshold_index(0.5 if iou is None else iou)
    score = score_value(score_threshold)
    if average not in AVERAGES:
        raise EvalError(f"unknown average {average!r}", field="average", choices=list(AVERAGES))
    if evaluation is None:
        evaluation = evaluate_cohort(store, model_id, selection, classes=classes)
    elif evaluation.model_id != model_id or not np.array_equal(evaluation.class_ids, _class_ids(store, classes)):
        raise EvalError("the evaluation given is of another model or set of classes", field="evaluation")
    class_ids, n_gt = evaluation.class_ids, evaluation.n_gt
    n_tp, n_fp = evaluation.counts_at(t, score) or \
        operating_counts(store, model_id, selection, class_ids, IOU_THRESHOLDS[t], score)
    result: dict = dict(coco_stats(evaluation.per_class))
    columns = _per_class(evaluation.per_class, n_tp, n_fp, n_gt, t)
    aggregates = _aggregates(columns, _micro(evaluation.micro, n_tp, n_fp, n_gt, t))
    names = store.classes
    per_class = pd.DataFrame({"class_id": class_ids.astype(np.int64),
                              "name": [names[k] for k in class_ids], **columns})
    result.update({
        "model_id": model_id, "iou": float(IOU_THRESHOLDS[t]), "score_threshold": score,
        "average": average, "mAP": aggregates[average]["AP_iou"],
        "aggregates": aggregates, "per_class": per_class,
        "curves": pr_curves(evaluation, IOU_THRESHOLDS[t]),
    })
    return result


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


_AGGREGATED = ("AP", "AP_iou", "AR100", "precision", "recall", "f1")


def _per_class(acc, n_tp, n_fp, n_gt, t) -> dict[str, np.ndarray]:
    has_gt = n_gt[:, 0] > 0

    def ap(p):  # p: (..., K) -> per class mean over the leading axes, -1 without GT
        return np.where(has_gt, p.reshape(-1, p.shape[-1]).mean(axis=0), -1.0)

    precision = _ratio(n_tp, n_tp + n_fp)
    recall = _ratio(n_tp, n_gt[:, 0])
    return {
        "n_gt": n_gt[:, 0], "n_tp": n_tp, "n_fp": n_fp, "n_fn": n_gt[:, 0] - n_tp,
        "precision": precision, "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "AP": ap(acc.precision[:, :, :, 0]),
        "AP50": ap(acc.precision[threshold_index(0.5), :, :, 0]),
        "AP75": ap(acc.precision[threshold_index(0.75), :, :, 0]),
        "AP_iou": ap(acc.precision[t, :, :, 0]),
        "AR100": ap(acc.recall[:, :, 0, -1]),
    }


def _micro(acc, n_tp, n_fp, n_gt, t) -> dict:
    """All classes' detections in one ranking against all GTs (area all)."""
    tp, fp, total = int(n_tp.sum()), int(n_fp.sum()), int(n_gt[:, 0].sum())
    if total == 0:  # no object: recall is 0/0, and every figure undefined, as the macro average has it
        return {k: -1.0 for k in _AGGREGATED}
    p, r = float(_ratio(tp, tp + fp)), float(_ratio(tp, total))
    return {"AP": _mean_valid(acc.precision[:, :, 0, 0]),
            "AP_iou": _mean_valid(acc.precision[t, :, 0, 0]),
            "AR100": _mean_valid(acc.recall[:, 0, 0, -1]),
            "precision": p, "recall": r, "f1": float(_ratio(2 * p * r, p + r))}


def _aggregates(columns: dict[str, np.ndarray], micro: dict) -> dict:
    with_gt = columns["n_gt"] > 0
    out = {}
    for name in ("macro", "weighted"):
        if not with_gt.any():
            out[name] = {k: -1.0 for k in _AGGREGATED}
            continue
        weights = columns["n_gt"][with_gt].astype(float) if name == "weighted" else None
        out[name] = {k: float(np.average(columns[k][with_gt], weights=weights))
                     for k in _AGGREGATED}
    out["micro"] = micro
    return out


# --------------------------------------------------------------------------- one image


def image_objects(store, model_id: str, image_id: int, iou: float,
                  score_threshold: float) -> pd.DataFrame:
    """Every box of one image with its outcome at ``iou`` (area all, maxDets 100).

    Columns: kind ('det' | 'gt'), id (det_id / gt_id), class_id, score (NaN for GT), xmin,
    ymin, xmax, ymax, status, partner_id, iou. Detections below ``score_threshold`` are left
    out. Detection status: 'tp', 'fp', or 'ignored' (matched a crowd region, or beyond the 100
    best of its class); GT status: 'tp', 'fn', or 'ignored' (crowd). partner_id is the matched
    box (NA when unmatched); iou is the partner's IoU, for an unmatched detection its best IoU
    with a GT of its class (0 if none), NaN for an unmatched GT.
    """
    _check_model(store, model_id)
    t = threshold_index(iou)
    score = score_value(score_threshold)
    bit = bit_index(t, 0)
    dets = store.query(
        "SELECT 'det' AS kind, m.det_id AS id, m.class_id, m.score, "
        "b.xmin, b.ymin, b.xmax, b.ymax, "
        "CASE WHEN (m.tp_mask >> ?) & 1 = 1 THEN 'tp' "
        "     WHEN (m.ignored_mask >> ?) & 1 = 1 THEN 'ignored' ELSE 'fp' END AS status, "
        "CASE WHEN m.match_gt_ids[?] >= 0 THEN m.match_gt_ids[?] END AS partner_id, "
        "CASE WHEN m.match_gt_ids[?] >= 0 THEN m.match_ious[?] ELSE m.best_same_iou END AS iou "
        "FROM det_matches m JOIN det_boxes b USING (model_id, image_id, det_id) "
        "WHERE m.model_id = ? AND m.image_id = ? AND m.score >= ? ORDER BY m.score DESC, m.det_id",
        [bit, bit, t + 1, t + 1, t + 1, t + 1, model_id, int(image_id), score])
    gts = store.query(
        "SELECT 'gt' AS kind, m.gt_id AS id, m.class_id, CAST(NULL AS DOUBLE) AS score, "
        "b.xmin, b.ymin, b.xmax, b.ymax, "
        "CASE WHEN (m.area_mask & 1) = 0 THEN 'ignored' "
        "     WHEN m.match_det_ids[?] >= 0 AND m.match_scores[?] >= ? THEN 'tp' ELSE 'fn' END "
        "     AS status, "
        "CASE WHEN m.match_det_ids[?] >= 0 AND m.match_scores[?] >= ? THEN m.match_det_ids[?] END "
        "     AS partner_id, "
        "CASE WHEN m.match_det_ids[?] >= 0 AND m.match_scores[?] >= ? THEN m.match_ious[?] END "
        "     AS iou "
        "FROM gt_matches m JOIN gt_boxes b USING (image_id, gt_id) "
        "WHERE m.model_id = ? AND m.image_id = ? ORDER BY m.gt_id",
        [t + 1, t + 1, score, t + 1, t + 1, score, t + 1, t + 1, t + 1, score, t + 1,
         model_id, int(image_id)])
    frame = pd.concat([dets, gts], ignore_index=True)
    frame["partner_id"] = frame["partner_id"].astype("Int64")
    frame["iou"] = frame["iou"].astype(float)
    frame["score"] = frame["score"].astype(float)
    return frame


def image_ground_truth(store, image_id: int) -> pd.DataFrame:
    """One image's ground-truth boxes (a store without a model has no matches to read them from):
    id (gt_id), class_id, xmin, ymin, xmax, ymax, iscrowd."""
    return store.query('SELECT gt_id AS id, class_id, xmin, ymin, xmax, ymax, iscrowd FROM "gt_boxes" '
                       'WHERE image_id = ? ORDER BY gt_id', [int(image_id)])


# --------------------------------------------------------------------------- errors


def _error_inputs(store, model_id, selection, iou, score_threshold):
    """Counted detections and counted GTs (area 'all': not crowd) of a cohort at (iou, score):
    detections in COCO order (class, score descending, image, rank: ``order_key``), GTs by gt_id."""
    _check_model(store, model_id)
    t = threshold_index(iou)
    score = score_value(score_threshold)
    bit = bit_index(t, 0)
    where, params = _cohort_clause(selection)
    dets = _in_key_order(_fetch(store, (
        "SELECT image_id, det_id, class_id, score, rank, "
        "(tp_mask >> ?) & 1 = 1 AS tp, best_same_gt_id, best_same_iou, best_other_gt_id, "
        "best_other_class_id, best_other_iou, order_key FROM det_matches "
        f"WHERE model_id = ? AND score >= ? AND ((tp_mask | ~ignored_mask) >> ?) & 1 = 1{where}"),
        [bit, model_id, score, bit, *params]))
    gts = _in_key_order(_counted_gts(store, model_id, t, where, params, dets["det_id"][dets["tp"]],
                                     "image_id, gt_id, class_id"), "gt_id", drop=False)
    return t, score, dets, gts


def _counted_gts(store, model_id, t, where, params, tp_det_ids, columns) -> dict[str, np.ndarray]:
    """``columns`` of the cohort's counted GTs (area 'all': not crowd), with ``matched`` at IoU
    threshold ``t`` given the true positives' det_ids at the chosen score threshold.

    A GT is matched when its partner at ``t`` is one of those true positives (the partner's score
    is its match score): one list column read rather than two."""
    gts = _fetch(store, (f"SELECT {columns}, coalesce(match_det_ids[?], -1) AS partner FROM gt_matches "
                         f"WHERE model_id = ? AND (area_mask & 1) = 1{where}"), [t + 1, model_id, *params])
    gts["matched"] = _is_in(gts.pop("partner"), tp_det_ids)
    return gts


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default) -> np.ndarray:
    """values[keys == query] for each query (keys unique), ``default`` where absent."""
    if len(keys) == 0:
        return np.full(len(query), default)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, query), len(keys) - 1)
    return np.where(sorted_keys[pos] == query, values[order][pos], default)


def _is_in(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is one of ``pool``, by binary search (``np.isin`` hashes, several
    times slower on a million integers)."""
    if not len(pool):
        return np.zeros(len(values), bool)
    pool = np.sort(pool)
    return pool[np.minimum(np.searchsorted(pool, values), len(pool) - 1)] == values


def _first_per_key(keys: np.ndarray) -> np.ndarray:
    """True for the first occurrence of each key (arrays already in priority order)."""
    _, first = np.unique(keys, return_index=True)
    flag = np.zeros(len(keys), bool)
    flag[first] = True
    return flag


def confusion_matrix_detection(store, model_id: str, selection: tuple[str, list] | None,
                               iou: float, score_threshold: float) -> pd.DataFrame:
    """GT class (rows) x predicted class (columns) counts, with a background row and column.

    At ``iou`` (area all, maxDets 100) and ``score_threshold``, over the cohort; crowd GTs and
    ignored detections (matched to a crowd region) are left out. Each counted detection falls
    in exactly one cell of its column and each non-crowd GT in exactly one cell of its row:

    - a true positive: (its class, its class);
    - a missed GT that is the best-overlapping other-class GT of false positives with IoU >=
      ``iou``: (GT class, class of the highest-scored such detection) -- a class confusion,
      one per GT;
    - any other false positive: (background, its class);
    - any other missed GT: (its class, background).

    So column sums are the detection counts per class, row sums the GT counts per class; the
    background row holds FPs that are not confusions, the background column FNs that are not.
    """
    _check_model(store, model_id)
    t = threshold_index(iou)
    score = score_value(score_threshold)
    bit = bit_index(t, 0)
    where, cohort = _cohort_clause(selection)
    # One scan of each table, of the fewest columns (a scan decodes each column it reads over all the
    # model's rows, ten million at a million images); the candidates are ranked here.
    dets = _fetch(store, (
        "SELECT det_id, class_id, score, (tp_mask >> ?) & 1 = 1 AS tp, "
        "NOT tp AND best_other_gt_id >= 0 AND best_other_iou >= ? AS candidate, best_other_gt_id, "
        "best_other_class_id FROM det_matches "
        f"WHERE model_id = ? AND score >= ? AND ((tp_mask | ~ignored_mask) >> ?) & 1 = 1{where}"),
        [bit, float(IOU_THRESHOLDS[t]), model_id, score, bit, *cohort])
    tp = dets["tp"].astype(bool)
    gts = _counted_gts(store, model_id, t, where, cohort, dets["det_id"][tp], "gt_id, class_id")
    det_cls = dets["class_id"].astype(np.int64)
    missed = ~gts["matched"]
    missed_ids = gts["gt_id"][missed]
    # A missed GT is the confusion of its highest-scored candidate (ties: lower det_id).
    candidates = np.flatnonzero(dets["candidate"])
    candidates = candidates[_is_in(dets["best_other_gt_id"][candidates], missed_ids)]
    candidates = candidates[np.lexsort((dets["det_id"][candidates], -dets["score"][candidates]))]
    confusions = candidates[_first_per_key(dets["best_other_gt_id"][candidates])]
    other_fp = ~tp
    other_fp[confusions] = False
    other_missed = ~_is_in(missed_ids, dets["best_other_gt_id"][confusions])
    names = list(store.classes)
    n = len(names)
    # Background is the last row and column.
    truth = np.concatenate([det_cls[tp], dets["best_other_class_id"][confusions].astype(np.int64),
                            np.full(int(other_fp.sum()), n),
                            gts["class_id"][missed][other_missed].astype(np.int64)])
    predicted = np.concatenate([det_cls[tp], det_cls[confusions], det_cls[other_fp],
                                np.full(int(other_missed.sum()), n)])
    matrix = np.bincount(truth * (n + 1) + predicted, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
    labels = names + [BACKGROUND]
    return pd.DataFrame(matrix, index=pd.Index(labels, name="ground truth"),
                        columns=pd.Index(labels, name="predicted"))


def _macro_ap_at(det_cls, det_score, det_tp, n_gt_k, classes_with_gt, t):
    """Macro AP (101-point) at one threshold for a (possibly fixed-up) set of counted dets, given
    in COCO order (class, score descending, image, rank)."""
    n_gt = np.zeros((len(n_gt_k), N_AREAS), np.int64)
    n_gt[:, 0] = n_gt_k
    bit = bit_index(t, 0)
    # Only counted detections come here: none ignored, all "inside" every area range. The narrowest
    # types that hold that (the bit of area 'all' is below 16): TIDE calls this nine times.
    n = len(det_cls)
    acc = accumulate(det_cls, np.zeros(n, np.int8), det_tp.astype(np.int16) << bit, np.zeros(n, np.int16),
                     np.full(n, (1 << N_AREAS) - 1, np.uint8), det_score, n_gt, areas=(0,), thresholds=(t,))
    per_class = acc.precision[t, :, :, 0].mean(axis=0)
    # A class whose every GT was "fixed away" keeps its place in the mean with AP 0.
    per_class = np.where(n_gt_k > 0, per_class, 0.0)
    return float(per_class[classes_with_gt].mean()) if classes_with_gt.any() else -1.0


def _score_order(score: np.ndarray, image: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Positions of detections given in COCO order, sorted by score descending, then image, then
    rank (COCO order less the class).

    A stable sort merges the class runs (each already descends); equal scores then keep class order,
    so only those are sorted again by (image, rank): a full lexsort costs twenty times more.
    """
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    tied = ranked[1:] == ranked[:-1]
    if tied.any():
        members = np.flatnonzero(np.r_[tied, False] | np.r_[False, tied])
        ties = order[members]
        group = np.cumsum(np.r_[False, ranked[members][1:] != ranked[members][:-1]])
        order[members] = ties[np.lexsort((rank[ties], image[ties], group))]
    return order


def _regroup_by_class(by_score: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``by_score`` (positions in ``_score_order``) grouped by ``classes`` of those positions: COCO
    order for any class labels. A stable sort of small integers is a radix sort."""
    labels = classes[by_score]
    if len(labels) and labels.min() >= np.iinfo(np.int16).min and labels.max() <= np.iinfo(np.int16).max:
        labels = labels.astype(np.int16)
    return by_score[np.argsort(labels, kind="stable")]


def tide_errors(store, model_id: str, selection: tuple[str, list] | None, *, iou: float = 0.5,
                background_iou: float = 0.1, score_threshold: float = 0.0) -> dict:
    """TIDE (Bolya et al., ECCV 2020) error counts and dAP, on a cohort, from stored matches.

    Formulation (following the TIDE toolbox, on our COCO matching):

    - Base: COCO matching at ``iou`` = t_f (area all, maxDets 100, crowd matches ignored) of
      the detections with score >= ``score_threshold``; AP = macro 101-point AP at t_f over the
      classes with GT in the cohort (= ``detection_metrics(...)['mAP']`` at score threshold 0;
      above it, the AP of the detections kept).
    - Each false positive gets the first type that applies, in TIDE's order, with IoU_same /
      IoU_other its best IoU with a non-crowd GT of its own / another class:
      Loc: t_b <= IoU_same <= t_f; Cls: IoU_other >= t_f; Dupe: IoU_same >= t_f (that GT is
      already matched by a higher-scored detection); Bkg: max(IoU_same, IoU_other) <= t_b;
      Both: otherwise. t_b = ``background_iou``.
    - Fixes, one type at a time, then AP again: Cls -> the detection takes the GT's class and
      becomes its true positive, Loc -> it becomes the true positive of its best same-class GT,
      each only if that GT is unmatched and this detection is the highest-scored Cls/Loc error
      on it (ties: lower det_id), otherwise it is removed; Dupe, Bkg, Both -> removed;
      Miss -> every missed GT not targeted by such a fixable Cls/Loc error is removed from the
      GT count. dAP = max(AP_fixed - AP_base, 0) (TIDE clamps binning noise).
    - Special: FalsePos removes every false positive, FalseNeg removes every missed GT.
    - A class whose GT count falls to 0 under a fix keeps AP 0 in the mean.

    Returns {'iou', 'background_iou', 'score_threshold', 'ap', 'errors': DataFrame(type, count,
    dAP), 'special': {'FalsePos': dAP, 'FalseNeg': dAP}, 'det_errors': DataFrame(image_id,
    det_id, class_id, score, error, target_gt_id, fixable; COCO order), 'missed_gt_ids': array}.
    """
    t, score, dets, gts = _error_inputs(store, model_id, selection, iou, score_threshold)
    t_f = float(IOU_THRESHOLDS[t])
    t_b = float(background_iou)
    if not 0 < t_b < t_f:
        raise EvalError(f"background IoU must lie strictly between 0 and {t_f}",
                        field="background_iou")
    n_classes = len(store.classes)
    det_cls = dets["class_id"].astype(np.int64)
    det_score = dets["score"].astype(np.float64)
    det_image = dets["image_id"].astype(np.int64)
    det_rank = dets["rank"].astype(np.int64)
    tp = dets["tp"].astype(bool)
    same_iou, other_iou = dets["best_same_iou"], dets["best_other_iou"]
    gt_id, gt_cls = gts["gt_id"].astype(np.int64), gts["class_id"].astype(np.int64)
    gt_matched = gts["matched"].astype(bool)
    n_gt_k = np.bincount(gt_cls, minlength=n_classes)
    classes_with_gt = n_gt_k > 0

    fp = ~tp
    loc = fp & (same_iou >= t_b) & (same_iou <= t_f)
    cls_err = fp & ~loc & (other_iou >= t_f)
    dupe = fp & ~loc & ~cls_err & (same_iou >= t_f)
    bkg = fp & ~loc & ~cls_err & ~dupe & (np.maximum(same_iou, other_iou) <= t_b)
    both = fp & ~loc & ~cls_err & ~dupe & ~bkg
    target = np.where(loc, dets["best_same_gt_id"], np.where(cls_err, dets["best_other_gt_id"], -1))
    target = target.astype(np.int64)
    target_cls = np.where(loc, det_cls, dets["best_other_class_id"]).astype(np.int64)
    usable = (loc | cls_err) & ~_lookup(gt_id, gt_matched, target, True)
    usable_idx = np.flatnonzero(usable)
    # The highest-scored error on a GT (ties: lower det_id) is the one a fix moves onto it.
    usable_idx = usable_idx[np.lexsort((dets["det_id"][usable_idx], -det_score[usable_idx]))]
    fixable = np.zeros(len(tp), bool)
    fixable[usable_idx[_first_per_key(target[usable_idx])]] = True
    missed = ~gt_matched & ~_is_in(gt_id, target[usable])

    base = _macro_ap_at(det_cls, det_score, tp, n_gt_k, classes_with_gt, t)
    by_score = _score_order(det_score, det_image, det_rank)

    def fixed_ap(error: np.ndarray, relabel: bool = False, gt_drop=None) -> float:
        keep = ~error | fixable
        new_cls = np.where(error & fixable & relabel, target_cls, det_cls)
        new_tp = tp | (error & fixable)
        n_gt = n_gt_k - (np.bincount(gt_cls[gt_drop], minlength=n_classes) if gt_drop is not None
                         else 0)
        if relabel:  # relabelled detections move to another class's ranking: COCO order again
            kept = _regroup_by_class(by_score[keep[by_score]], new_cls)
        else:
            kept = np.flatnonzero(keep)
        return _macro_ap_at(new_cls[kept], det_score[kept], new_tp[kept], n_gt, classes_with_gt, t)

    def without(dropped: np.ndarray) -> float:
        kept = ~dropped
        return _macro_ap_at(det_cls[kept], det_score[kept], tp[kept], n_gt_k, classes_with_gt, t)

    nothing = np.zeros(len(tp), bool)
    gains = {
        "Cls": fixed_ap(cls_err, relabel=True),
        "Loc": fixed_ap(loc),
        "Both": without(both),
        "Dupe": without(dupe),
        "Bkg": without(bkg),
        "Miss": fixed_ap(nothing, gt_drop=missed),
    }
    counts = {"Cls": int(cls_err.sum()), "Loc": int(loc.sum()), "Both": int(both.sum()),
              "Dupe": int(dupe.sum()), "Bkg": int(bkg.sum()), "Miss": int(missed.sum())}
    special = {
        "FalsePos": without(~tp) - base,
        "FalseNeg": fixed_ap(nothing, gt_drop=~gt_matched) - base,
    }
    error_name = np.select([cls_err, loc, both, dupe, bkg], ["Cls", "Loc", "Both", "Dupe", "Bkg"],
                           default="")
    return {
        "iou": t_f, "background_iou": t_b, "score_threshold": score, "ap": base,
        "errors": pd.DataFrame({"type": list(TIDE_ERRORS),
                                "count": [counts[k] for k in TIDE_ERRORS],
                                "dAP": [max(gains[k] - base, 0.0) for k in TIDE_ERRORS]}),
        "special": special,
        "det_errors": pd.DataFrame({
            "image_id": det_image[fp], "det_id": dets["det_id"].astype(np.int64)[fp],
            "class_id": det_cls[fp], "score": det_score[fp], "error": error_name[fp],
            "target_gt_id": target[fp], "fixable": fixable[fp]}),
        "missed_gt_ids": gt_id[missed],
    }


# --------------------------------------------------------------------------- COCO json files


@dataclass(frozen=True)
class CocoArrays:
    """A COCO ground truth and results pair as arrays (file order kept for tie-breaking)."""

    image_ids: np.ndarray
    category_ids: np.ndarray
    gt_image: np.ndarray
    gt_category: np.ndarray
    gt_xywh: np.ndarray
    gt_area: np.ndarray
    gt_crowd: np.ndarray
    det_image: np.ndarray
    det_category: np.ndarray
    det_xywh: np.ndarray
    det_score: np.ndarray


def _json_list(doc: dict, key: str, path: str, required: bool = True) -> list:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise EvalError(f"'{key}' must be a list", file=path, field=key)
    return value


_REQUIRED = object()


def _records_field(records: list, field: str, path: str, what: str, default=_REQUIRED) -> list:
    """``record[field]`` for every record; a missing field names the first record lacking it."""
    try:
        if default is _REQUIRED:
            return [r[field] for r in records]
        return [r.get(field, default) for r in records]
    except (KeyError, TypeError, AttributeError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise EvalError(f"{what} {i} is not an object", file=path, row=i) from None
            if default is _REQUIRED and field not in r:
                raise EvalError(f"{what} {i} has no '{field}'", file=path, row=i,
                                field=field) from None
        raise


def _numbers(values: list, path: str, what: str, field: str, *, integer: bool = False,
             width: int | None = None) -> np.ndarray:
    """Convert a list of JSON values to float64, naming the first bad record on failure."""
    if not values:
        return np.zeros((0,) if width is None else (0, width))
    try:
        arr = np.asarray(values, dtype=np.float64)
        if width is not None and arr.shape != (len(values), width):
            raise ValueError
    except (TypeError, ValueError):
        for i, v in enumerate(values):
            try:
                ok = np.asarray(v, dtype=np.float64).shape == (() if width is None else (width,))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                shape = "a number" if width is None else f"a list of {width} numbers"
                raise EvalError(f"{what} {i}: '{field}' must be {shape}, got {v!r}", file=path,
                                row=i, field=field) from None
        raise
    _check_finite(arr, path, what, field, integer=integer)
    return arr


def _check_finite(arr: np.ndarray, path: str, what: str, field: str, *,
                  integer: bool = False) -> None:
    bad = ~np.isfinite(arr) if arr.ndim == 1 else ~np.isfinite(arr).all(axis=1)
    if integer:
        bad |= np.isfinite(arr) & (arr != np.round(arr))
    if bad.any():
        i = int(np.argmax(bad))
        kind = "an integer" if integer else "finite"
        raise EvalError(f"{what} {i}: '{field}' must be {kind}, got {arr[i].tolist()!r}",
                        file=path, row=i, field=field)


def _unique_ids(ids: np.ndarray, path: str, what: str) -> None:
    values, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1][0]
        where = np.flatnonzero(ids == dup)
        raise EvalError(f"duplicate {what} id {int(dup)} (records {where[0]} and {where[1]})",
                        file=path, row=int(where[1]), field="id")


def _known(ids: np.ndarray, known: np.ndarray, path: str, what: str, field: str) -> None:
    bad = ~np.isin(ids, known)
    if bad.any():
        i = int(np.argmax(bad))
        kind = "image" if field == "image_id" else "category"
        raise EvalError(f"{what} {i} refers to unknown {kind} {int(ids[i])}", file=path, row=i,
                        field=field)


def _check_boxes(xywh: np.ndarray, path: str, what: str) -> None:
    _check_finite(xywh, path, what, "bbox")
    negative = (xywh[:, 2] < 0) | (xywh[:, 3] < 0)
    if negative.any():
        i = int(np.argmax(negative))
        raise EvalError(f"{what} {i}: 'bbox' has a negative width or height "
                        f"{xywh[i].tolist()}", file=path, row=i, field="bbox")


def _load_gt(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except OSError as exc:
        raise EvalError(f"cannot read ground truth: {exc.strerror}", file=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"not valid JSON: {exc}", file=path) from exc
    if not isinstance(doc, dict):
        raise EvalError("a COCO ground truth file holds one object with 'images', "
                        "'annotations' and 'categories'", file=path)
    images = _json_list(doc, "images", path)
    cats = _json_list(doc, "categories", path)
    anns = _json_list(doc, "annotations", path, required=False)
    image_ids = _numbers(_records_field(images, "id", path, "image"), path, "image", "id",
                         integer=True)
    cat_ids = _numbers(_records_field(cats, "id", path, "category"), path, "category", "id",
                       integer=True)
    _unique_ids(image_ids, path, "image")
    _unique_ids(cat_ids, path, "category")
    ann_ids = _numbers(_records_field(anns, "id", path, "annotation"), path, "annotation", "id",
                       integer=True)
    _unique_ids(ann_ids, path, "annotation")
    if (ann_ids == 0).any():
        log.warning("%s: annotation %d has id 0; pycocotools counts a detection matched to it "
                    "as a false positive (it reads id 0 as 'unmatched'), VisionLens as a true "
                    "positive", path, int(np.argmax(ann_ids == 0)))
    gt_image = _numbers(_records_field(anns, "image_id", path, "annotation"), path, "annotation",
                        "image_id", integer=True)
    gt_cat = _numbers(_records_field(anns, "category_id", path, "annotation"), path,
                      "annotation", "category_id", integer=True)
    xywh = _numbers(_records_field(anns, "bbox", path, "annotation"), path, "annotation", "bbox",
                    width=4).reshape(-1, 4)
    _check_boxes(xywh, path, "annotation")
    # A missing (or null) area is the box area.
    raw_area = _records_field(anns, "area", path, "annotation", default=None)
    absent = np.array([v is None for v in raw_area], dtype=bool)
    area = _numbers([0.0 if v is None else v for v in raw_area], path, "annotation", "area")
    area = np.where(absent, xywh[:, 2] * xywh[:, 3], area)
    crowd = _numbers(_records_field(anns, "iscrowd", path, "annotation", default=0), path,
                     "annotation", "iscrowd", integer=True)
    _known(gt_image, image_ids, path, "annotation", "image_id")
    _known(gt_cat, cat_ids, path, "annotation", "category_id")
    return {"image_ids": image_ids.astype(np.int64), "category_ids": cat_ids.astype(np.int64),
            "gt_image": gt_image.astype(np.int64), "gt_category": gt_cat.astype(np.int64),
            "gt_xywh": xywh, "gt_area": area, "gt_crowd": crowd != 0}


_RESULTS_SQL = (
    "SELECT image_id, category_id, bbox, score, len(bbox) AS n_box "
    "FROM read_json(?, format = 'array', "
    "columns = {image_id: 'DOUBLE', category_id: 'DOUBLE', bbox: 'DOUBLE[]', score: 'DOUBLE'})")


@functools.cache
def _json_reader():
    """One in-memory DuckDB for reading results files; opening one costs far more than a read."""
    return memory_connection()


def _load_results(path: str, image_ids: np.ndarray, cat_ids: np.ndarray) -> dict:
    """A COCO results file (a JSON list of {image_id, category_id, bbox, score}), in file order.

    Read by DuckDB's JSON reader (C++, several threads), then checked field by field.
    """
    if not Path(path).is_file():
        raise EvalError("results file not found", file=path)
    cursor = _json_reader().cursor()
    try:
        table = cursor.sql(_RESULTS_SQL, params=[str(path)]).to_arrow_table()
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"not a COCO results list: {first}", file=path) from exc
    finally:
        cursor.close()
    cols = {}
    for field in ("image_id", "category_id", "score", "n_box"):
        column = table.column(field)
        if column.null_count:
            i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            name = "bbox" if field == "n_box" else field
            raise EvalError(f"detection {i} has no '{name}'", file=path, row=i, field=name)
        cols[field] = column.to_numpy()
    short = cols["n_box"] != 4
    if short.any():
        i = int(np.argmax(short))
        raise EvalError(f"detection {i}: 'bbox' must be a list of 4 numbers", file=path, row=i,
                        field="bbox")
    flat = table.column("bbox").combine_chunks().flatten()
    if flat.null_count:
        i = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // 4
        raise EvalError(f"detection {i}: 'bbox' holds a null", file=path, row=i, field="bbox")
    xywh = flat.to_numpy().reshape(-1, 4)
    _check_finite(cols["image_id"], path, "detection", "image_id", integer=True)
    _check_finite(cols["category_id"], path, "detection", "category_id", integer=True)
    _check_finite(cols["score"], path, "detection", "score")
    _check_boxes(xywh, path, "detection")
    _known(cols["image_id"], image_ids, path, "detection", "image_id")
    _known(cols["category_id"], cat_ids, path, "detection", "category_id")
    return {"det_image": cols["image_id"].astype(np.int64),
            "det_category": cols["category_id"].astype(np.int64),
            "det_xywh": xywh, "det_score": cols["score"].astype(np.float64)}


def load_coco_files(gt_json_path, dets_json_path) -> CocoArrays:
    """Read and check a COCO ground truth file and a COCO results file (EvalError if bad)."""
    gt = _load_gt(str(gt_json_path))
    dets = _load_results(str(dets_json_path), gt["image_ids"], gt["category_ids"])
    return CocoArrays(**gt, **dets)


def evaluate_coco_arrays(data: CocoArrays) -> Accumulated:
    """Match and accumulate a COCO pair (all images, all categories), as ``COCOeval``."""
    res = match_arrays(data.det_image, data.det_category, data.det_score, data.det_xywh,
                       data.gt_image, data.gt_category, data.gt_xywh, data.gt_area,
                       data.gt_crowd, overlaps=False)
    cats = np.unique(data.category_ids)
    order = np.argsort(res.det_order_key)
    n_gt = _gt_counts(np.searchsorted(cats, data.gt_category), res.gt_area_mask,
                      np.ones(len(data.gt_category)), len(cats))
    return accumulate(np.searchsorted(cats, data.det_category[order]), res.det_rank[order],
                      res.det_tp_mask[order], res.det_ignored_mask[order],
                      res.det_area_mask[order], data.det_score[order], n_gt)


def evaluate_coco_files(gt_json_path, dets_json_path) -> dict[str, float]:
    """The 12 COCO bbox stats for a ground truth json and a results json (as pycocotools)."""
    data = load_coco_files(gt_json_path, dets_json_path)
    log.info("evaluating %d detections against %d GT boxes on %d images", len(data.det_score),
             len(data.gt_image), len(data.image_ids))
    return coco_stats(evaluate_coco_arrays(data))


_SUMMARY_LINES = (
    (1, None, "all", 100), (1, 0.5, "all", 100), (1, 0.75, "all", 100), (1, None, "small", 100),
    (1, None, "medium", 100), (1, None, "large", 100), (0, None, "all", 1), (0, None, "all", 10),
    (0, None, "all", 100), (0, None, "small", 100), (0, None, "medium", 100),
    (0, None, "large", 100),
)


def summary_lines(stats: dict[str, float]) -> list[str]:
    """The 12 lines pycocotools' ``summarize`` prints, for ``stats``."""
    lines = []
    for key, (is_ap, thr, area, max_dets) in zip(STAT_KEYS, _SUMMARY_LINES):
        title = "Average Precision" if is_ap else "Average Recall"
        kind = "(AP)" if is_ap else "(AR)"
        iou_text = (f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if thr is None
                    else f"{thr:0.2f}")
        lines.append(f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | "
                     f"maxDets={max_dets:>3d} ] = {stats[key]:0.3f}")
    return lines


def eval_coco_main(argv: list[str] | None = None) -> int:
    """``visionlens eval-coco GT.json DETS.json [--json]``; exit 0, or 1 for bad input files."""
    parser = argparse.ArgumentParser(
        prog="visionlens eval-coco",
        description="COCO bbox evaluation (equal to pycocotools COCOeval) of a results file.")
    parser.add_argument("gt", help="COCO ground truth json (images, annotations, categories)")
    parser.add_argument("dets", help="COCO results json: a list of "
                                     "{image_id, category_id, bbox, score}")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the 12 stats")
    args = parser.parse_args(argv)
    try:
        stats = evaluate_coco_files(args.gt, args.dets)
    except EvalError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    text = json.dumps(stats) if args.json else "\n".join(summary_lines(stats))
    sys.stdout.write(text + "\n")
    return 0
