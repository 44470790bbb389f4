"""COCO-exact matching of detections to ground truth, once for every threshold and area range.

Semantics are those of pycocotools ``COCOeval.evaluateImg`` (bbox), reproduced exactly:

- per image and class, detections are ranked by score, highest first
  (``np.argsort(-score, kind='mergesort')``: equal scores keep input order, which here is
  ascending ``det_id``; ingest assigns det ids in input order, as ``loadRes`` does);
  only the first 100 (maxDets) take part, the rest are dropped;
- ground truths are taken non-ignored first (stable, ascending ``gt_id``); a crowd GT is always
  ignored, a GT whose ``area`` lies outside the area range is ignored for that range;
- each detection, in rank order, takes the GT with the highest IoU >= ``min(t, 1 - 1e-10)``
  among the GTs not yet taken (crowd GTs can be taken again and again); a non-ignored GT always
  wins over an ignored one; among equal IoUs the later GT wins (pycocotools' ``<`` test);
- box IoU is computed from ``x, y, w, h`` exactly as pycocotools' ``bbIou`` does; against a
  crowd GT the union is the detection's own area;
- a detection matched to an ignored GT is ignored; an unmatched detection whose area (w * h)
  lies outside the area range is ignored.

Because a detection's match depends only on higher-ranked detections of its image and class,
matching once with maxDets = 100 gives maxDets 1 and 10 by rank, and dropping the detections
below a score threshold never changes the matches of those above it (greedy in score order).
So the stored masks answer every metric for any cohort, stored threshold and score threshold
without re-matching.

Stored results (``match_detections``), one row per detection / per ground truth:

``det_matches``
    ``image_id``, ``det_id``, ``class_id``, ``score``;
    ``rank`` (0-based rank within image and class; rank >= 100 never counts);
    ``order_key`` (position in the pycocotools accumulate order: class, score descending,
    image_id, rank; a cohort sorted by it is in COCO order);
    ``tp_mask`` / ``ignored_mask`` (BIGINT bit masks: bit ``a * 10 + t`` is set when the
    detection is a true positive / is ignored at IoU threshold ``IOU_THRESHOLDS[t]`` and area
    range ``AREA_RANGES[a]``; a detection with neither bit is a false positive; detections
    ranked >= 100 have every ignored bit set);
    ``area_mask`` (bit ``a`` set when the detection's own area w * h lies in area range ``a``;
    an unmatched detection is ignored exactly in the ranges outside it);
    ``match_gt_ids`` / ``match_ious`` (10-element lists for area 'all': partner ``gt_id`` or -1,
    partner IoU or NaN, per threshold; a crowd partner is listed too, the detection is then
    ignored);
    ``best_same_gt_id`` / ``best_same_iou`` (the non-crowd GT of the same class with the highest
    IoU, -1 / 0.0 if none), ``best_other_gt_id`` / ``best_other_class_id`` /
    ``best_other_iou`` (the same over non-crowd GTs of other classes): used for TIDE errors
    and the confusion matrix.

``gt_matches``
    ``image_id``, ``gt_id``, ``class_id``, ``iscrowd``, ``area``;
    ``area_mask`` (bit ``a`` set when the GT counts, i.e. is not ignored, in area range ``a``);
    ``match_det_ids`` / ``match_scores`` / ``match_ious`` (10-element lists for area 'all':
    the partner detection's ``det_id`` (-1 if none or if the GT is a crowd region), its score
    and IoU (NaN if none)). A GT is missed at threshold t and score threshold s exactly when
    it counts and ``match_det_ids[t] = -1 OR match_scores[t] < s``.

List columns are Arrow-backed (``pd.ArrowDtype``) so they go to DuckDB/Parquet unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import EvalError

log = logging.getLogger(__name__)

# Exactly pycocotools' Params.setDetParams values (linspace, not arange: see its comment).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
AREA_RANGES = {"all": (0.0 ** 2, 1e5 ** 2), "small": (0.0 ** 2, 32.0 ** 2),
               "medium": (32.0 ** 2, 96.0 ** 2), "large": (96.0 ** 2, 1e5 ** 2)}
AREA_NAMES = tuple(AREA_RANGES)
MAX_DETS = (1, 10, 100)
N_THRESHOLDS = len(IOU_THRESHOLDS)
N_AREAS = len(AREA_RANGES)
N_BITS = N_THRESHOLDS * N_AREAS
ALL_BITS = (1 << N_BITS) - 1
# The bits of all thresholds of one area range, per area range.
AREA_RANGE_BITS = np.array(
    [((1 << N_THRESHOLDS) - 1) << (a * N_THRESHOLDS) for a in range(N_AREAS)], dtype=np.int64)

_AREA_LO = np.array([r[0] for r in AREA_RANGES.values()])
_AREA_HI = np.array([r[1] for r in AREA_RANGES.values()])
# pycocotools compares against min(t, 1 - 1e-10) so that IoU 1.0 is never required.
_EFFECTIVE_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
# Bound the (det, gt) pairs held at once when IoUs over whole images are computed.
_PAIR_CHUNK = 4_000_000


def threshold_index(iou: float) -> int:
    """Index of ``iou`` among the stored thresholds; anything else is an EvalError."""
    try:
        value = float(iou)
    except (TypeError, ValueError):
        value = float("nan")
    hits = np.flatnonzero(np.abs(IOU_THRESHOLDS - value) < 1e-9)
    if len(hits) != 1:
        raise EvalError(f"IoU threshold {iou!r} is not one of the stored thresholds",
                        field="iou", choices=[round(float(t), 2) for t in IOU_THRESHOLDS])
    return int(hits[0])


def score_value(score_threshold: float) -> float:
    """A score threshold as a float; anything that is not a number is an EvalError."""
    try:
        value = float(score_threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if np.isnan(value):
        raise EvalError(f"score threshold {score_threshold!r} is not a number",
                        field="score_threshold")
    return value


def bit_index(t: int, area: int = 0) -> int:
    """Bit of ``tp_mask`` / ``ignored_mask`` for threshold index ``t`` and area index ``area``."""
    return area * N_THRESHOLDS + t


# --------------------------------------------------------------------------- array engine


@dataclass(frozen=True)
class MatchResult:
    """Matching results as arrays aligned with the input order of detections and GTs."""

    det_rank: np.ndarray          # int64 (D,)
    det_order_key: np.ndarray     # int64 (D,)
    det_tp_mask: np.ndarray       # int64 (D,)
    det_ignored_mask: np.ndarray  # int64 (D,)
    det_area_mask: np.ndarray     # int64 (D,): bit a set when the det's area is in range a
    det_match_gt: np.ndarray      # int64 (D, T): GT index (input order) at area 'all', -1 none
    det_match_iou: np.ndarray     # float64 (D, T), NaN none
    gt_area_mask: np.ndarray      # int64 (G,)
    gt_match_det: np.ndarray      # int64 (G, T): det index at area 'all', -1 none or crowd
    gt_match_iou: np.ndarray      # float64 (G, T)
    overlaps: dict | None         # best same/other-class GT per det (see match_arrays)


def pair_indices(det_keys: np.ndarray, gt_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (det, gt) index pair with equal keys; ordered by det, then by GT input order."""
    gt_order = np.argsort(gt_keys, kind="stable")
    sorted_keys = gt_keys[gt_order]
    lo = np.searchsorted(sorted_keys, det_keys, "left")
    counts = np.searchsorted(sorted_keys, det_keys, "right") - lo
    total = int(counts.sum())
    det_idx = np.repeat(np.arange(len(det_keys)), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    gt_idx = gt_order[np.repeat(lo, counts) + within]
    return det_idx, gt_idx


def box_iou_pairs(det_xywh: np.ndarray, gt_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes, operation for operation as pycocotools' ``bbIou``."""
    dx, dy, dw, dh = det_xywh.T
    gx, gy, gw, gh = gt_xywh.T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    det_area = dw * dh
    union = np.where(crowd, det_area, det_area + gw * gh - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _keys(det_image, det_class, gt_image, gt_class):
    """Dense integer keys for (image, class) shared by dets and GTs."""
    _, image_codes = np.unique(np.concatenate([det_image, gt_image]), return_inverse=True)
    _, class_codes = np.unique(np.concatenate([det_class, gt_class]), return_inverse=True)
    n_classes = int(class_codes.max()) + 1 if len(class_codes) else 1
    keys = image_codes.astype(np.int64) * n_classes + class_codes
    n_det = len(det_image)
    return image_codes[:n_det], image_codes[n_det:], keys[:n_det], keys[n_det:]


def match_arrays(det_image: np.ndarray, det_class: np.ndarray, det_score: np.ndarray,
                 det_xywh: np.ndarray, gt_image: np.ndarray, gt_class: np.ndarray,
                 gt_xywh: np.ndarray, gt_area: np.ndarray, gt_crowd: np.ndarray,
                 *, overlaps: bool = True) -> MatchResult:
    """Match detections to GTs for all thresholds and area ranges (pycocotools rules).

    Input order breaks ties: between equal scores, and between GTs with equal IoU.
    With ``overlaps`` also find, per detection, the best non-crowd GT of its own class and of
    any other class in its image (``best_same_*``, ``best_other_*``; IoU 0 and index -1 if none).
    """
    det_image = np.asarray(det_image)
    gt_image = np.asarray(gt_image)
    det_class = np.asarray(det_class, dtype=np.int64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    det_score = np.asarray(det_score, dtype=np.float64)
    det_xywh = np.asarray(det_xywh, dtype=np.float64).reshape(-1, 4)
    gt_xywh = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    gt_area = np.asarray(gt_area, dtype=np.float64)
    gt_crowd = np.asarray(gt_crowd, dtype=bool)
    n_det, n_gt = len(det_image), len(gt_image)
    max_det = MAX_DETS[-1]

    det_img_code, gt_img_code, det_key, gt_key = _keys(det_image, det_class, gt_image, gt_class)

    # Rank within (image, class): score descending, ties in input order (mergesort semantics).
    by_group = np.lexsort((np.arange(n_det), -det_score, det_key))
    sorted_keys = det_key[by_group]
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1] if n_det else \
        np.zeros(0, np.int64)
    group_start = np.repeat(starts, np.diff(np.r_[starts, n_det]))
    rank = np.empty(n_det, np.int64)
    rank[by_group] = np.arange(n_det) - group_start

    # pycocotools' accumulate order: class, score descending, image (sorted ids), rank.
    order = np.lexsort((rank, det_img_code, -det_score, det_class))
    order_key = np.empty(n_det, np.int64)
    order_key[order] = np.arange(n_det)

    # GT ignore flags per area range; det out-of-range flags (det area = w * h as in loadRes).
    gt_ignored = gt_crowd[:, None] | (gt_area[:, None] < _AREA_LO) | (gt_area[:, None] > _AREA_HI)
    det_area = det_xywh[:, 2] * det_xywh[:, 3]
    det_outside = (det_area[:, None] < _AREA_LO) | (det_area[:, None] > _AREA_HI)

    # Candidate pairs: same image and class, det within maxDets, IoU reaching the lowest threshold.
    live = np.flatnonzero(rank < max_det)
    pair_det, pair_gt = pair_indices(det_key[live], gt_key)
    pair_det = live[pair_det]
    pair_iou = box_iou_pairs(det_xywh[pair_det], gt_xywh[pair_gt], gt_crowd[pair_gt])
    keep = pair_iou >= _EFFECTIVE_THRESHOLDS.min()
    pair_det, pair_gt, pair_iou = pair_det[keep], pair_gt[keep], pair_iou[keep]

    matched_gt, matched_iou, cand_dets = _greedy(pair_det, pair_gt, pair_iou, rank,
                                                 gt_ignored, gt_crowd, n_gt)

    # Per det: masks over (area, threshold). Unmatched everywhere unless a candidate: ignored
    # exactly in the area ranges its own area lies outside; beyond maxDets: ignored everywhere.
    tp_mask = np.zeros(n_det, np.int64)
    ignored_mask = (det_outside * AREA_RANGE_BITS).sum(axis=1).astype(np.int64)
    has = matched_gt >= 0
    partner_ignored = gt_ignored[np.where(has, matched_gt, 0), np.arange(N_AREAS)[None, :, None]]
    tp_mask[cand_dets] = _pack_bits(has & ~partner_ignored)
    ignored_mask[cand_dets] = _pack_bits(np.where(has, partner_ignored,
                                                  det_outside[cand_dets][:, :, None]))
    ignored_mask[rank >= max_det] = ALL_BITS
    det_match_gt = np.full((n_det, N_THRESHOLDS), -1, np.int64)
    det_match_iou = np.full((n_det, N_THRESHOLDS), np.nan)
    det_match_gt[cand_dets] = matched_gt[:, 0, :]
    det_match_iou[cand_dets] = matched_iou[:, 0, :]

    gt_match_det = np.full((n_gt, N_THRESHOLDS), -1, np.int64)
    gt_match_iou = np.full((n_gt, N_THRESHOLDS), np.nan)
    rows, ts = np.nonzero(has[:, 0, :])
    partners = matched_gt[rows, 0, ts]
    solid = ~gt_crowd[partners]
    gt_match_det[partners[solid], ts[solid]] = cand_dets[rows[solid]]
    gt_match_iou[partners[solid], ts[solid]] = matched_iou[rows[solid], 0, ts[solid]]

    area_bits = (~gt_ignored).astype(np.int64) << np.arange(N_AREAS)
    return MatchResult(
        det_rank=rank, det_order_key=order_key,
        det_tp_mask=tp_mask, det_ignored_mask=ignored_mask,
        det_area_mask=((~det_outside).astype(np.int64) << np.arange(N_AREAS)).sum(axis=1),
        det_match_gt=det_match_gt, det_match_iou=det_match_iou,
        gt_area_mask=area_bits.sum(axis=1),
        gt_match_det=gt_match_det, gt_match_iou=gt_match_iou,
        overlaps=_best_overlaps(det_img_code, det_class, det_xywh, gt_img_code, gt_class,
                                gt_xywh, gt_crowd) if overlaps else None,
    )


def _greedy(pair_det, pair_gt, pair_iou, rank, gt_ignored, gt_crowd, n_gt):
    """The evaluateImg loop, vectorised across groups, thresholds and area ranges.

    Iterates over detection rank (at most maxDets times); in one iteration every group has at
    most one detection, so their choices never compete for a GT. Returns, for each candidate
    detection (one with a pair), the chosen GT index and IoU per (area, threshold), -1 / NaN if
    none, and the candidate detections' indices.
    """
    shape = (N_AREAS, N_THRESHOLDS)
    cand_dets = np.unique(pair_det)
    matched_gt = np.full((len(cand_dets),) + shape, -1, np.int64)
    matched_iou = np.full((len(cand_dets),) + shape, np.nan)
    if len(pair_det) == 0:
        return matched_gt, matched_iou, cand_dets
    slot = np.searchsorted(cand_dets, pair_det)
    by_rank = np.argsort(rank[pair_det], kind="stable")
    pair_rank = rank[pair_det][by_rank]
    bounds = np.r_[0, np.flatnonzero(np.diff(pair_rank)) + 1, len(by_rank)]
    taken = np.zeros((n_gt,) + shape, bool)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = by_rank[lo:hi]
        gts, ious, slots = pair_gt[sel], pair_iou[sel], slot[sel]
        seg = np.r_[0, np.flatnonzero(np.diff(slots)) + 1]
        seg_of_pair = np.repeat(np.arange(len(seg)), np.diff(np.r_[seg, len(sel)]))
        free = ~taken[gts] | gt_crowd[gts][:, None, None]
        cand = free & (ious[:, None, None] >= _EFFECTIVE_THRESHOLDS)
        ign = gt_ignored[gts][:, :, None]
        regular = cand & ~ign
        # A non-ignored GT always beats an ignored one (the `break` in evaluateImg).
        any_regular = np.logical_or.reduceat(regular, seg, axis=0)
        usable = np.where(any_regular[seg_of_pair], regular, cand & ign)
        value = np.where(usable, ious[:, None, None], -1.0)
        best = np.maximum.reduceat(value, seg, axis=0)
        # Among equal IoUs the last GT in order wins (pycocotools' `<` comparison).
        is_best = usable & (value == best[seg_of_pair])
        pos = np.where(is_best, np.arange(len(sel))[:, None, None], -1)
        chosen = np.maximum.reduceat(pos, seg, axis=0)
        hit = chosen >= 0
        picked = np.where(hit, chosen, 0)
        gt_pick = np.where(hit, gts[picked], -1)
        rows = slots[seg]
        matched_gt[rows] = gt_pick
        matched_iou[rows] = np.where(hit, ious[picked], np.nan)
        r_i, a_i, t_i = np.nonzero(hit)
        taken[gt_pick[r_i, a_i, t_i], a_i, t_i] = True
    return matched_gt, matched_iou, cand_dets


def _pack_bits(flags: np.ndarray) -> np.ndarray:
    """(N, A, T) booleans -> int64 with bit a * T + t."""
    n = len(flags)
    packed = np.packbits(flags.reshape(n, N_BITS), axis=1, bitorder="little")
    out = np.zeros((n, 8), np.uint8)
    out[:, :packed.shape[1]] = packed
    return out.view("<i8").reshape(n).astype(np.int64)


def _best_overlaps(det_img, det_class, det_xywh, gt_img, gt_class, gt_xywh, gt_crowd) -> dict:
    """Best non-crowd GT of the same class and of another class, per detection (in its image)."""
    n_det = len(det_img)
    best = {"same_gt": np.full(n_det, -1, np.int64), "same_iou": np.zeros(n_det),
            "other_gt": np.full(n_det, -1, np.int64), "other_iou": np.zeros(n_det)}
    solid = np.flatnonzero(~gt_crowd)
    if n_det == 0 or len(solid) == 0:
        return best
    per_image = np.bincount(gt_img[solid], minlength=int(det_img.max()) + 1)
    # Chunks of detections whose pair count stays bounded.
    cum = np.cumsum(per_image[det_img])
    cuts = np.searchsorted(cum, np.arange(1, cum[-1] // _PAIR_CHUNK + 1) * _PAIR_CHUNK)
    bounds = np.unique(np.r_[0, cuts, n_det])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        d, g = pair_indices(det_img[lo:hi], gt_img[solid])
        if len(d) == 0:
            continue
        g = solid[g]
        iou = box_iou_pairs(det_xywh[d + lo], gt_xywh[g], np.zeros(len(d), bool))
        same = det_class[d + lo] == gt_class[g]
        # Pairs come grouped by det, GTs in input order: per det, the highest IoU and the
        # first GT reaching it (np.argmax semantics, as TIDE).
        starts = np.r_[0, np.flatnonzero(np.diff(d)) + 1]
        dets = d[starts] + lo
        positions = np.arange(len(d))
        for name, mask in (("same", same), ("other", ~same)):
            value = np.where(mask, iou, -1.0)
            top = np.maximum.reduceat(value, starts)
            first = np.minimum.reduceat(
                np.where(value == np.repeat(top, np.diff(np.r_[starts, len(d)])), positions,
                         len(d)), starts)
            hit = top > 0
            best[f"{name}_gt"][dets[hit]] = g[first[hit]]
            best[f"{name}_iou"][dets[hit]] = top[hit]
    return best


# --------------------------------------------------------------------------- frames API

_GT_REQUIRED = ("image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax")
_DET_REQUIRED = ("image_id", "det_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax")


def _check_frame(frame: pd.DataFrame, required: tuple[str, ...], table: str, id_col: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise EvalError(f"{table} lacks column(s) {', '.join(missing)}", file=table,
                        field=missing[0])
    ids = frame[id_col].to_numpy()
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise EvalError(f"duplicate {id_col} {ids[dup][0]!r}", file=table, row=ids[dup][0],
                        field=id_col)
    numeric = [c for c in required if c not in ("image_id", id_col, "class_id")]
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise EvalError(f"non-finite value {frame[col].iloc[int(np.argmax(bad))]!r}",
                            file=table, row=ids[bad][0], field=col)
    for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
        neg = frame[hi].to_numpy(float) < frame[lo].to_numpy(float)
        if neg.any():
            raise EvalError(f"{hi} is smaller than {lo} (negative box size)", file=table,
                            row=ids[neg][0], field=hi)


def _list_column(values: np.ndarray, dtype: pa.DataType) -> pd.arrays.ArrowExtensionArray:
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    flat = pa.array(values.reshape(-1), type=dtype, from_pandas=False)
    return pd.arrays.ArrowExtensionArray(pa.ListArray.from_arrays(offsets, flat))


def match_detections(gt_boxes: pd.DataFrame, det_boxes: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match one model's detections to ground truth; returns (det_matches, gt_matches).

    Inputs as the store's ``gt_boxes`` / ``det_boxes`` (pixel xyxy; a ``model_id`` column is
    ignored). Boxes are read as pycocotools reads ``[xmin, ymin, xmax - xmin, ymax - ymin]``;
    GT ``area`` (null -> box area) decides area ranges, a detection's own w * h does.
    Columns of the results are described in the module docstring; rows follow ascending
    ``det_id`` / ``gt_id``.
    """
    _check_frame(gt_boxes, _GT_REQUIRED, "gt_boxes", "gt_id")
    _check_frame(det_boxes, _DET_REQUIRED, "det_boxes", "det_id")
    gt = gt_boxes.sort_values("gt_id", kind="stable")
    det = det_boxes.sort_values("det_id", kind="stable")

    def xywh(frame):
        box = frame[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=float)
        return np.column_stack([box[:, 0], box[:, 1], box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]])

    gt_xywh, det_xywh = xywh(gt), xywh(det)
    gt_area = (pd.to_numeric(gt["area"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
               if "area" in gt.columns else np.full(len(gt), np.nan))
    gt_area = np.where(np.isnan(gt_area), gt_xywh[:, 2] * gt_xywh[:, 3], gt_area)
    gt_crowd = (gt["iscrowd"].fillna(False).to_numpy(dtype=bool) if "iscrowd" in gt.columns
                else np.zeros(len(gt), bool))
    det_image = det["image_id"].to_numpy(dtype=np.int64)
    gt_image = gt["image_id"].to_numpy(dtype=np.int64)
    det_class = det["class_id"].to_numpy(dtype=np.int64)
    gt_class = gt["class_id"].to_numpy(dtype=np.int64)
    det_score = det["score"].to_numpy(dtype=float)

    log.debug("matching %d detections to %d GT boxes", len(det), len(gt))
    res = match_arrays(det_image, det_class, det_score, det_xywh, gt_image, gt_class, gt_xywh,
                       gt_area, gt_crowd, overlaps=True)
    det_ids = det["det_id"].to_numpy(dtype=np.int64)
    gt_ids = gt["gt_id"].to_numpy(dtype=np.int64)
    ov = res.overlaps

    def ids_of(index, ids):
        return np.where(index >= 0, ids[np.maximum(index, 0)] if len(ids) else -1, -1)

    det_matches = pd.DataFrame({
        "image_id": det_image, "det_id": det_ids, "class_id": det_class, "score": det_score,
        "rank": res.det_rank.astype(np.int32), "order_key": res.det_order_key,
        "tp_mask": res.det_tp_mask, "ignored_mask": res.det_ignored_mask,
        "area_mask": res.det_area_mask,
        "match_gt_ids": _list_column(ids_of(res.det_match_gt, gt_ids), pa.int64()),
        "match_ious": _list_column(res.det_match_iou, pa.float64()),
        "best_same_gt_id": ids_of(ov["same_gt"], gt_ids),
        "best_same_iou": ov["same_iou"],
        "best_other_gt_id": ids_of(ov["other_gt"], gt_ids),
        "best_other_class_id": np.where(ov["other_gt"] >= 0,
                                        gt_class[np.maximum(ov["other_gt"], 0)] if len(gt_class)
                                        else -1, -1),
        "best_other_iou": ov["other_iou"],
    })
    partner_scores = np.where(res.gt_match_det >= 0,
                              det_score[np.maximum(res.gt_match_det, 0)] if len(det_score)
                              else np.nan, np.nan)
    gt_matches = pd.DataFrame({
        "image_id": gt_image, "gt_id": gt_ids, "class_id": gt_class,
        "iscrowd": gt_crowd, "area": gt_area, "area_mask": res.gt_area_mask,
        "match_det_ids": _list_column(ids_of(res.gt_match_det, det_ids), pa.int64()),
        "match_scores": _list_column(partner_scores, pa.float64()),
        "match_ious": _list_column(res.gt_match_iou, pa.float64()),
    })
    return det_matches, gt_matches


# --------------------------------------------------------------------------- per-image counts

# A counted GT is found at threshold t and score threshold s exactly when its partner at t is a true
# positive scored >= s, and each true positive has one counted partner: so an image's misses are
# its counted GTs less its true positives. That reads no list column and no per-threshold GT data,
# and one aggregate over both tables' rows is cheaper than two and a join.
_IMAGE_COUNTS_SQL = """
SELECT CAST(image_id AS INTEGER) AS image_id, CAST(sum(tp) AS INTEGER) AS n_tp,
       CAST(sum(fp) AS INTEGER) AS n_fp, CAST(sum(gt) - sum(tp) AS INTEGER) AS n_fn
FROM (
    SELECT image_id, CAST((tp_mask >> ?) & 1 AS TINYINT) AS tp,
           CAST(((tp_mask | ignored_mask) >> ?) & 1 = 0 AS TINYINT) AS fp, CAST(0 AS TINYINT) AS gt
    FROM det_matches WHERE model_id = ? AND score >= ?
    UNION ALL
    SELECT image_id, 0, 0, 1 FROM gt_matches WHERE model_id = ? AND (area_mask & 1) = 1)
GROUP BY image_id
"""


def image_counts_params(model_id: str, iou: float, score_threshold: float) -> tuple[str, list]:
    """Per-image TP/FP/FN (area 'all', maxDets 100) of a model at a stored IoU and a score threshold.

    Returns ``(sql, params)`` (``store.query(*result)``). Columns: image_id, n_tp, n_fp, n_fn.
    Counts equal matching only the detections with score >= ``score_threshold``. Images
    without counted detections or GTs are absent: LEFT JOIN and coalesce to 0.
    """
    t = threshold_index(iou)
    score = score_value(score_threshold)
    bit = bit_index(t, 0)
    return _IMAGE_COUNTS_SQL, [bit, bit, model_id, score, model_id]
