"""What-if predictions, robustness sweeps and counterfactual flip strengths.

Everything here re-runs a model the store knows how to build (``models.params``
has a ``loader``; ``core.models.load_model``) on images perturbed by
``core.perturb.perturb``, batched over images and strengths, on CUDA when
present:

- ``what_if``: one image, the original and a perturbed copy in one batch; class
  probabilities, the label set, or boxes with TP / FP / FN at a chosen IoU (the
  perturbed detections matched to the ground truth with
  ``core.matching.match_detections``; geometric perturbations move the ground
  truth with them).
- ``run_sweep``: a cohort's images at a grid of strengths of one perturbation,
  stored as parts (``write_part``) and resumable: (model, image, perturbation,
  level) already stored are skipped. Tables:

  ``robustness``  one row per (model_id, image_id, perturbation, level, run_id):
      ``pred_label``, ``score``, ``probs`` (classification), ``pred_labels``
      (multilabel at the store's label threshold; detection: classes detected at
      the store's score threshold), ``correct`` (at those defaults; multilabel:
      exact match; detection: no FP and no FN at IoU 0.5), ``n_tp``, ``n_fp``,
      ``n_fn`` (detection, same defaults), ``seed``.
  ``robustness_dets``  detection only, one row per detection: ``det_id`` (rank
      in the model's output), ``class_id``, ``score``, and ``rank``,
      ``tp_mask``, ``ignored_mask``, ``area_mask`` as in ``det_matches``.
  ``robustness_gts``  detection only, one row per ground-truth box of the
      (perturbed) image: ``gt_id``, ``class_id``, ``area_mask`` and
      ``match_scores`` (partner score per IoU threshold, NaN when missed), as in
      ``gt_matches``.

  ``run_id`` tells runs apart; readers take the newest run of each key, so two
  sweeps of the same key never count twice.
- ``robustness_curves``: per cohort and strength, the task's metric (accuracy /
  macro F1, exact match / macro F1, mAP at the IoU / COCO AP), computed exactly
  as ``core.metrics`` computes the stored one, and the flip rate: the share of
  images whose prediction (class, label set, or detected class set at the score
  threshold) differs from the stored prediction. ``breaking_points`` gives the
  strength at which each cohort falls below a target.
- ``flip_strengths`` / ``run_counterfactuals``: per image the smallest strength
  (per kind and direction) that changes the prediction, found on a grid of
  strengths and refined by bisection, all images in lockstep; stored in the
  ``counterfactuals`` table (model_id, image_id, perturbation, direction,
  bound, flip_strength (signed, NULL when the prediction never changes up to
  ``bound``), resolution, seed, run_id). ``counterfactual_frame_sql`` turns it
  into one column per kind and direction (``flip_blur``, ``flip_brightness_down``…).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from . import perturb as P
from .errors import EvalError, VisionLensError
from .matching import MAX_DETS, N_AREAS, N_THRESHOLDS, bit_index, match_detections, threshold_index
from .metrics.classification import indicator, multilabel_arrays, multilabel_scores, multiclass_scores
from .metrics.detection import accumulate
from .models import classifier_frame, device_for, image_tensor, load_model
from .store import Store, write_part

log = logging.getLogger(__name__)

TABLE = "robustness"
DETS_TABLE = "robustness_dets"
GTS_TABLE = "robustness_gts"
COUNTERFACTUALS = "counterfactuals"
SNAPSHOTS = "whatif_snapshots"
METRICS = {"multiclass": ("accuracy", "f1_macro"), "multilabel": ("exact_match", "f1_macro"),
           "detection": ("mAP", "AP")}
METRIC_LABELS = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "exact_match": "Exact match",
                 "mAP": "mAP at the IoU", "AP": "COCO AP (IoU .50:.95)"}
DIRECTIONS = {1: "up", -1: "down"}
DEFAULT_BATCH = 64
FLUSH_IMAGES = 4096  # images per written part: few, large parts stay cheap to read
Progress = Callable[[int, int], None]


def _run_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _level(value: float) -> float:
    # Levels are keys: read from a command line or a slider, 0.30000000000000004 and 0.3 are one level.
    return round(float(value), 6)


# --------------------------------------------------------------------------- running a model


@dataclass
class Runner:
    """A store's model, loaded once, with what is needed to turn its outputs into predictions."""

    model_id: str
    task: str
    model: torch.nn.Module
    device: torch.device
    input_size: tuple[int, int] | None
    n_classes: int
    label_threshold: float
    score_threshold: float

    @classmethod
    def load(cls, store: Store, model_id: str, device: str | None = None) -> "Runner":
        """The store's model ``model_id``; EvalError when it cannot be re-run."""
        models = store.query('SELECT params FROM "models" WHERE model_id = ?', [model_id])
        if models.empty:
            raise EvalError(f"unknown model {model_id!r}", field="model", choices=store.model_ids())
        params = json.loads(models["params"].iloc[0] or "{}")
        if not params.get("loader"):
            raise EvalError(f"model {model_id!r} was stored from a predictions file; it cannot be re-run "
                            "(ingest it with --model module:function to enable what-if and robustness)",
                            field="model")
        try:
            model = load_model(params)
        except VisionLensError as error:
            raise EvalError(f"model {model_id!r} cannot be loaded: {error.message}", field="loader") from None
        except (OSError, RuntimeError, TypeError, ValueError) as error:  # the loader's own failure, in its words
            raise EvalError(f"model {model_id!r} cannot be loaded: {error}", field="loader") from None
        dev = device_for(device)
        size = params.get("input_size")
        meta = store.meta()
        return cls(model_id, store.task, model.to(dev), dev, tuple(size) if size else None, len(store.classes),
                   float(meta.get("label_threshold", 0.5)), float(meta.get("score_threshold", 0.5)))

    def images(self, uris: Sequence[str]) -> torch.Tensor:
        """Image files as the model sees them, on the model's device."""
        return image_tensor(list(uris), self.input_size).to(self.device)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> np.ndarray | list[dict[str, np.ndarray]]:
        """Class probabilities (B, C) float32, or per image dicts of numpy detections."""
        out = self.model(x.to(self.device))
        if self.task == "detection":
            return [{"boxes": o["boxes"].float().cpu().numpy().reshape(-1, 4),
                     "scores": o["scores"].float().cpu().numpy().astype(np.float64),
                     "labels": o["labels"].cpu().numpy().astype(np.int32)} for o in out]
        logits = out.float()
        probs = torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=1)
        return probs.cpu().numpy()

    def run(self, images: torch.Tensor, rows: np.ndarray, strengths: Mapping[str, np.ndarray],
            keys: np.ndarray, *, seed: int = 0, batch_size: int = DEFAULT_BATCH) -> np.ndarray | list[dict]:
        """Predictions for ``images[rows]`` perturbed by ``strengths`` (one value per row), in batches."""
        outputs: list = []
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            index = torch.as_tensor(rows[part], device=images.device, dtype=torch.int64)
            chosen = {name: torch.as_tensor(np.asarray(values[part], dtype=np.float32), device=images.device)
                      for name, values in strengths.items()}
            x = P.perturb(images.index_select(0, index), chosen, keys=keys[part], seed=seed)
            if self.task == "detection":
                outputs.extend(self.predict(x))
            else:
                outputs.append(self.predict(x))
        if self.task == "detection":
            return outputs
        return np.concatenate(outputs) if outputs else np.zeros((0, self.n_classes), np.float32)

    def decisions(self, outputs: np.ndarray | list[dict]) -> np.ndarray:
        """(rows, classes) bool: what the model decides at the store's defaults (the predicted
        class; the labels at the label threshold; the classes detected at the score threshold)."""
        if self.task == "multiclass":
            return np.eye(self.n_classes, dtype=bool)[outputs.argmax(axis=1)]
        if self.task == "multilabel":
            return outputs >= np.float32(self.label_threshold)
        out = np.zeros((len(outputs), self.n_classes), dtype=bool)
        for row, o in enumerate(outputs):
            out[row, o["labels"][o["scores"] >= self.score_threshold]] = True
        return out


# --------------------------------------------------------------------------- detection outcomes


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _gt_of(store: Store, image_ids: np.ndarray) -> pd.DataFrame:
    return store.query(
        'SELECT g.image_id, g.gt_id, g.class_id, g.xmin, g.ymin, g.xmax, g.ymax, g.area, g.iscrowd, '
        'i.width, i.height FROM "gt_boxes" g JOIN "images" i USING (image_id) '
        'WHERE g.image_id IN (SELECT unnest(?)) ORDER BY g.image_id, g.gt_id',
        [[int(i) for i in np.unique(image_ids)]])


def _row_ground_truth(gt: pd.DataFrame, row_images: np.ndarray, rotation: np.ndarray,
                      scale: np.ndarray) -> pd.DataFrame:
    """The GT boxes of each row's image, moved with the row's geometry; ``image_id`` is the row."""
    gt_images = gt["image_id"].to_numpy(np.int64)
    start = np.searchsorted(gt_images, row_images, side="left")
    stop = np.searchsorted(gt_images, row_images, side="right")
    counts = stop - start
    row = np.repeat(np.arange(len(row_images)), counts)
    index = np.repeat(start - np.cumsum(np.r_[0, counts[:-1]]), counts) + np.arange(counts.sum())
    picked = gt.iloc[index]
    boxes = np.array(picked[["xmin", "ymin", "xmax", "ymax"]].to_numpy(np.float64))  # a writable copy
    area = pd.to_numeric(picked["area"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    moved = (rotation[row] != 0) | (scale[row] != 0)
    kept = np.ones(len(row), bool)
    if moved.any():
        width = picked["width"].to_numpy(np.float64)
        height = picked["height"].to_numpy(np.float64)
        for w, h in {(a, b) for a, b in zip(width[moved], height[moved])}:
            same = moved & (width == w) & (height == h)
            boxes[same], kept[same] = P.transform_boxes(boxes[same], rotation[row][same], scale[row][same], w, h)
        area = np.where(moved, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), area)
    frame = pd.DataFrame({
        "image_id": row, "gt_id": np.arange(len(row)), "original_gt_id": picked["gt_id"].to_numpy(np.int64),
        "class_id": picked["class_id"].to_numpy(np.int64), "xmin": boxes[:, 0], "ymin": boxes[:, 1],
        "xmax": boxes[:, 2], "ymax": boxes[:, 3], "area": area,
        "iscrowd": picked["iscrowd"].fillna(False).to_numpy(bool)})
    return frame[kept].reset_index(drop=True)


def _row_detections(outputs: list[dict]) -> pd.DataFrame:
    counts = np.array([len(o["scores"]) for o in outputs], dtype=np.int64)
    boxes = np.concatenate([o["boxes"] for o in outputs]) if len(outputs) else np.zeros((0, 4))
    row = np.repeat(np.arange(len(outputs)), counts)
    return pd.DataFrame({
        "image_id": row, "det_id": np.arange(len(row)),
        "rank_in_row": np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts),
        "class_id": np.concatenate([o["labels"] for o in outputs]).astype(np.int64) if len(outputs) else [],
        "score": np.concatenate([o["scores"] for o in outputs]) if len(outputs) else [],
        "xmin": boxes[:, 0].astype(np.float64), "ymin": boxes[:, 1].astype(np.float64),
        "xmax": boxes[:, 2].astype(np.float64), "ymax": boxes[:, 3].astype(np.float64)})


@dataclass(frozen=True)
class Matched:
    """Detections and ground truth of some rows, matched; ``image_id`` holds the row number."""

    dets: pd.DataFrame  # row, det_id (in row), class_id, score, boxes, rank, masks, match ious (T lists)
    gts: pd.DataFrame  # row, gt_id (original), class_id, boxes, iscrowd, area_mask, match scores / ious
    n_rows: int

    def counts(self, iou: float, score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row TP, FP, FN at a stored IoU and a score threshold (as ``core.matching``'s image counts)."""
        bit = bit_index(threshold_index(iou), 0)
        d = self.dets[self.dets["score"].to_numpy() >= score_threshold]
        tp = ((d["tp_mask"].to_numpy() >> bit) & 1).astype(bool)
        fp = (((d["tp_mask"].to_numpy() | d["ignored_mask"].to_numpy()) >> bit) & 1) == 0
        rows = d["image_id"].to_numpy(np.int64)
        return (np.bincount(rows[tp], minlength=self.n_rows), np.bincount(rows[fp], minlength=self.n_rows),
                np.bincount(self.gts["image_id"].to_numpy(np.int64)[self.missed(iou, score_threshold)],
                            minlength=self.n_rows))

    def missed(self, iou: float, score_threshold: float) -> np.ndarray:
        t = threshold_index(iou)
        scores = self.match_scores()[:, t]
        counted = (self.gts["area_mask"].to_numpy(np.int64) & 1) == 1
        return counted & ~(scores >= score_threshold)

    def match_scores(self) -> np.ndarray:
        return np.array(self.gts["match_scores"].tolist(), dtype=np.float64).reshape(-1, N_THRESHOLDS)


def match_rows(outputs: list[dict], gt: pd.DataFrame, row_images: np.ndarray, rotation: np.ndarray,
               scale: np.ndarray) -> Matched:
    """Match each row's detections to its image's (moved) ground truth with ``match_detections``."""
    dets = _row_detections(outputs)
    truth = _row_ground_truth(gt, row_images, rotation, scale)
    det_matches, gt_matches = match_detections(truth, dets)
    det_matches = det_matches.sort_values("det_id", kind="stable").reset_index(drop=True)
    gt_matches = gt_matches.sort_values("gt_id", kind="stable").reset_index(drop=True)
    dets = dets.assign(rank=det_matches["rank"].to_numpy(), tp_mask=det_matches["tp_mask"].to_numpy(),
                       ignored_mask=det_matches["ignored_mask"].to_numpy(),
                       area_mask=det_matches["area_mask"].to_numpy(),
                       match_gt_ids=det_matches["match_gt_ids"].to_numpy(),
                       match_ious=det_matches["match_ious"].to_numpy(),
                       best_same_iou=det_matches["best_same_iou"].to_numpy())
    gts = truth.assign(area_mask=gt_matches["area_mask"].to_numpy(),
                       match_det_ids=gt_matches["match_det_ids"].to_numpy(),
                       match_scores=gt_matches["match_scores"].to_numpy(),
                       match_ious=gt_matches["match_ious"].to_numpy())
    return Matched(dets, gts, len(row_images))


def objects(matched: Matched, row: int, iou: float, score_threshold: float) -> pd.DataFrame:
    """One row's boxes as ``core.metrics.detection.image_objects`` lists them: kind, id, class_id,
    score, box, status (tp / fp / fn / ignored), iou."""
    t = threshold_index(iou)
    bit = bit_index(t, 0)
    d = matched.dets[(matched.dets["image_id"] == row) & (matched.dets["score"] >= score_threshold)]
    tp = ((d["tp_mask"].to_numpy() >> bit) & 1).astype(bool)
    ignored = ((d["ignored_mask"].to_numpy() >> bit) & 1).astype(bool)
    partner_iou = np.array([m[t] for m in d["match_ious"]], dtype=np.float64) if len(d) else np.zeros(0)
    matched_any = np.array([m[t] >= 0 for m in d["match_gt_ids"]], dtype=bool) if len(d) else np.zeros(0, bool)
    det_frame = pd.DataFrame({
        "kind": "det", "id": d["rank_in_row"].to_numpy(), "class_id": d["class_id"].to_numpy(),
        "score": d["score"].to_numpy(), "xmin": d["xmin"].to_numpy(), "ymin": d["ymin"].to_numpy(),
        "xmax": d["xmax"].to_numpy(), "ymax": d["ymax"].to_numpy(),
        "status": np.where(tp, "tp", np.where(ignored, "ignored", "fp")),
        "iou": np.where(matched_any, partner_iou, d["best_same_iou"].to_numpy(np.float64))})
    g = matched.gts[matched.gts["image_id"] == row]
    scores = np.array(g["match_scores"].tolist(), dtype=np.float64).reshape(-1, N_THRESHOLDS)[:, t]
    ious = np.array(g["match_ious"].tolist(), dtype=np.float64).reshape(-1, N_THRESHOLDS)[:, t]
    found = scores >= score_threshold
    gt_frame = pd.DataFrame({
        "kind": "gt", "id": g["original_gt_id"].to_numpy(), "class_id": g["class_id"].to_numpy(),
        "score": np.nan, "xmin": g["xmin"].to_numpy(), "ymin": g["ymin"].to_numpy(),
        "xmax": g["xmax"].to_numpy(), "ymax": g["ymax"].to_numpy(),
        "status": np.where(g["iscrowd"].to_numpy(bool), "ignored", np.where(found, "tp", "fn")),
        "iou": np.where(found, ious, np.nan)})
    frame = pd.concat([det_frame.sort_values(["score", "id"], ascending=[False, True]), gt_frame],
                      ignore_index=True)
    frame["status"] = frame["status"].astype(object)
    return frame


# --------------------------------------------------------------------------- what-if of one image


@dataclass(frozen=True)
class Outcome:
    """A prediction of one image: decided labels (class ids), probabilities or boxes."""

    labels: tuple[int, ...]
    probs: np.ndarray | None = None
    score: float | None = None
    boxes: pd.DataFrame | None = None  # detection: ``objects`` at the chosen IoU and score threshold
    counts: tuple[int, int, int] | None = None  # detection: TP, FP, FN


@dataclass(frozen=True)
class WhatIf:
    """One image before and after a perturbation, as the model saw it and what it decided."""

    image_id: int
    settings: P.Settings
    original_image: np.ndarray  # (H, W, 3) uint8, the model's input
    perturbed_image: np.ndarray
    original: Outcome
    perturbed: Outcome

    @property
    def flipped(self) -> bool:
        return self.original.labels != self.perturbed.labels


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def what_if(runner: Runner, store: Store, image_id: int, settings: P.Settings, *, iou: float = 0.5,
            score_threshold: float | None = None, label_threshold: float | None = None,
            seed: int = 0) -> WhatIf:
    """Run the model on image ``image_id`` and on its perturbed copy (one batch of two)."""
    rows = store.query('SELECT uri FROM "images" WHERE image_id = ?', [int(image_id)])
    if rows.empty:
        raise EvalError(f"no image {image_id} in the store", field="image_id")
    image = runner.images([str(rows["uri"].iloc[0])])
    strengths = P.table([P.Settings(), settings], device=image.device)
    x = P.perturb(image.expand(2, -1, -1, -1), strengths, keys=[image_id, image_id], seed=seed)
    outputs = runner.predict(x)
    label_threshold = runner.label_threshold if label_threshold is None else float(label_threshold)
    score_threshold = runner.score_threshold if score_threshold is None else float(score_threshold)
    if runner.task == "detection":
        gt = _gt_of(store, np.array([image_id]))
        matched = match_rows(outputs, gt, np.array([image_id, image_id]), np.array([0.0, settings.rotation]),
                             np.array([0.0, settings.scale]))
        tp, fp, fn = matched.counts(iou, score_threshold)
        outcomes = []
        for row, o in enumerate(outputs):
            kept = o["scores"] >= score_threshold
            outcomes.append(Outcome(tuple(sorted({int(c) for c in o["labels"][kept]})),
                                    score=float(o["scores"].max()) if len(o["scores"]) else None,
                                    boxes=objects(matched, row, iou, score_threshold),
                                    counts=(int(tp[row]), int(fp[row]), int(fn[row]))))
    elif runner.task == "multilabel":
        outcomes = [Outcome(tuple(int(k) for k in np.flatnonzero(p >= np.float32(label_threshold))), probs=p,
                            score=float(p.max())) for p in outputs]
    else:
        outcomes = [Outcome((int(p.argmax()),), probs=p, score=float(p.max())) for p in outputs]
    return WhatIf(int(image_id), settings, _uint8(x[0]), _uint8(x[1]), outcomes[0], outcomes[1])


def describe_outcome(outcome: Outcome, classes: Sequence[str], task: str) -> str:
    """``three (0.912)``, ``{one, seven}`` or ``2 TP, 1 FP, 0 FN``: a prediction in words."""
    names = [classes[k] if 0 <= k < len(classes) else str(k) for k in outcome.labels]
    if task == "multiclass":
        return f"{names[0]} ({outcome.score:.3f})"
    if task == "multilabel":
        return "{" + ", ".join(names) + "}"
    tp, fp, fn = outcome.counts
    return f"{tp} TP, {fp} FP, {fn} FN ({', '.join(names) or 'nothing'} detected)"


def save_snapshot(store_path: str | Path, result: WhatIf, *, model_id: str, classes: Sequence[str],
                  task: str) -> str:
    """Store the perturbed image, its settings and both predictions as a ``whatif_snapshots``
    part; returns the one-line note that describes it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(result.perturbed_image).save(buffer, format="PNG")
    before, after = (describe_outcome(o, classes, task) for o in (result.original, result.perturbed))
    line = f"What-if ({model_id}): {result.settings.describe()} → {after}, was {before}"
    write_part(store_path, SNAPSHOTS, pd.DataFrame({
        "model_id": [model_id], "image_id": np.array([result.image_id], np.int32),
        "settings": [json.dumps(result.settings.changed(), sort_keys=True)], "note": [line],
        "png": [buffer.getvalue()], "created_at": [pd.Timestamp.now(tz="UTC").isoformat()]}))
    return line


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepSummary:
    model_id: str
    perturbation: str
    levels: tuple[float, ...]
    n_images: int
    rows_written: int
    rows_skipped: int
    seconds: float


def cohort_image_ids(store: Store, queries: Sequence[str], model_id: str | None) -> np.ndarray:
    """Image ids in any of the cohort query strings (all images when there are none)."""
    from .cohorts import catalog_of, compile_cohort, parse_query
    from .state import StateDB

    if not queries:
        return store.query('SELECT image_id FROM "images" ORDER BY image_id')["image_id"].to_numpy(np.int64)
    catalog = catalog_of(store)
    state = StateDB.for_store(store.paths.base)
    ids = []
    for query in queries:
        parsed = parse_query(query, catalog)
        selection = compile_cohort(parsed.cohort, store, model_id=model_id, state=state, catalog=catalog,
                                   **parsed.view.thresholds(catalog))
        ids.append(store.query(f"SELECT image_id FROM ({selection[0]}) AS s", selection[1])["image_id"]
                   .to_numpy(np.int64))
    return np.unique(np.concatenate(ids))


def _done(store: Store, model_id: str, perturbation: str) -> pd.DataFrame:
    if not store.has_table(TABLE):
        return pd.DataFrame({"image_id": np.zeros(0, np.int64), "level": np.zeros(0)})
    return store.query(f'SELECT DISTINCT image_id, level FROM "{TABLE}" WHERE model_id = ? AND perturbation = ?',
                       [model_id, perturbation])


def _image_groups(store: Store, image_ids: np.ndarray, runner: Runner) -> list[tuple[np.ndarray, list[str]]]:
    """(ids, uris) per batchable group: all images when the model has an input size, else by size."""
    frame = store.query('SELECT image_id, uri, width, height FROM "images" WHERE image_id IN (SELECT unnest(?)) '
                        'ORDER BY image_id', [[int(i) for i in image_ids]])
    if runner.input_size is not None:
        return [(frame["image_id"].to_numpy(np.int64), frame["uri"].astype(str).tolist())]
    return [(g["image_id"].to_numpy(np.int64), g["uri"].astype(str).tolist())
            for _, g in frame.groupby(["width", "height"], sort=True)]


def sweep_frames(runner: Runner, store: Store, image_ids: np.ndarray, images: torch.Tensor, rows: np.ndarray,
                 levels: np.ndarray, perturbation: str, *, seed: int = 0, batch_size: int = DEFAULT_BATCH,
                 run_id: str | None = None) -> dict[str, pd.DataFrame]:
    """Rows of ``robustness`` (and for detection ``robustness_dets`` / ``robustness_gts``) for
    ``images[rows]`` at ``levels`` (one per row) of ``perturbation``."""
    run_id = run_id or _run_id()
    row_images = image_ids[rows]
    outputs = runner.run(images, rows, {perturbation: levels}, row_images, seed=seed, batch_size=batch_size)
    base = {"model_id": runner.model_id, "image_id": row_images.astype(np.int32), "perturbation": perturbation,
            "level": levels.astype(np.float64), "run_id": run_id, "seed": np.int32(seed)}
    if runner.task in ("multiclass", "multilabel"):
        preds = classifier_frame(row_images, outputs, task=runner.task, threshold=runner.label_threshold)
        truth = store.arrow('SELECT image_id, true_label FROM "images" WHERE image_id IN (SELECT unnest(?)) '
                            "ORDER BY image_id", [[int(i) for i in np.unique(row_images)]])
        at = np.searchsorted(truth.column("image_id").to_numpy(), row_images)
        frame = pd.DataFrame(base)
        frame["probs"] = preds["probs"].to_numpy()
        if runner.task == "multiclass":
            frame["pred_label"] = preds["pred_label"].to_numpy()
            frame["score"] = preds["score"].to_numpy()
            true = pd.array(truth.column("true_label").to_pandas(), dtype="Int64")[at]
            frame["correct"] = pd.array(preds["pred_label"].to_numpy(), dtype="Int64") == true  # NA: unlabelled
        else:
            frame["pred_labels"] = preds["pred_labels"].to_numpy()
            true = indicator(truth.column("true_label"), runner.n_classes)[at]
            frame["correct"] = ((outputs >= np.float32(runner.label_threshold)) == true).all(axis=1)
        return {TABLE: frame}
    gt = _gt_of(store, row_images)
    rotation = levels.astype(np.float64) if perturbation == "rotation" else np.zeros(len(rows))
    scale = levels.astype(np.float64) if perturbation == "scale" else np.zeros(len(rows))
    matched = match_rows(outputs, gt, row_images, rotation, scale)
    tp, fp, fn = matched.counts(0.5, runner.score_threshold)
    row_of, class_of = np.nonzero(runner.decisions(outputs))
    frame = pd.DataFrame(base)
    frame["pred_labels"] = pd.arrays.ArrowExtensionArray(
        _list_array(class_of.astype(np.int32), np.bincount(row_of, minlength=len(rows)), pa.int32()))
    frame["score"] = np.array([o["scores"].max() if len(o["scores"]) else np.nan for o in outputs])
    frame["n_tp"], frame["n_fp"], frame["n_fn"] = tp.astype(np.int32), fp.astype(np.int32), fn.astype(np.int32)
    frame["correct"] = (fp + fn) == 0
    d, g = matched.dets, matched.gts
    det_rows = d["image_id"].to_numpy(np.int64)
    dets = pd.DataFrame({
        "model_id": runner.model_id, "image_id": row_images[det_rows].astype(np.int32),
        "perturbation": perturbation, "level": levels[det_rows].astype(np.float64), "run_id": run_id,
        "det_id": d["rank_in_row"].to_numpy(np.int32), "class_id": d["class_id"].to_numpy(np.int32),
        "score": d["score"].to_numpy(np.float64), "rank": d["rank"].to_numpy(np.int32),
        "tp_mask": d["tp_mask"].to_numpy(np.int64), "ignored_mask": d["ignored_mask"].to_numpy(np.int64),
        "area_mask": d["area_mask"].to_numpy(np.int64)})
    gt_rows = g["image_id"].to_numpy(np.int64)
    scores = matched.match_scores()
    gts = pd.DataFrame({
        "model_id": runner.model_id, "image_id": row_images[gt_rows].astype(np.int32),
        "perturbation": perturbation, "level": levels[gt_rows].astype(np.float64), "run_id": run_id,
        "gt_id": g["original_gt_id"].to_numpy(np.int32), "class_id": g["class_id"].to_numpy(np.int32),
        "area_mask": g["area_mask"].to_numpy(np.int64),
        "match_scores": pd.arrays.ArrowExtensionArray(
            _list_array(scores.reshape(-1), np.full(len(scores), N_THRESHOLDS), pa.float64()))})
    return {TABLE: frame, DETS_TABLE: dets, GTS_TABLE: gts}


def _rerun_inputs(store_path, model_id: str | None, device, runner: "Runner | None",
                  cohorts: Sequence[str]) -> tuple[Store, str, "Runner", np.ndarray]:
    """The store, the model to re-run (default its first), its runner and the cohorts' images."""
    store = Store(store_path)
    model_id = model_id or (store.model_ids() or [None])[0]
    if model_id is None:
        raise EvalError("the store has no model to re-run", field="model")
    runner = runner or Runner.load(store, model_id, device)
    return store, model_id, runner, cohort_image_ids(store, cohorts, model_id)


def run_sweep(store_path: str | Path, perturbation: str, levels: Sequence[float], *, model_id: str | None = None,
              cohorts: Sequence[str] = (), device: str | None = None, batch_size: int = DEFAULT_BATCH,
              seed: int = 0, chunk_images: int = 256, flush_images: int = FLUSH_IMAGES,
              progress: Progress | None = None, runner: Runner | None = None) -> SweepSummary:
    """Run the model over the cohorts' images at every level of ``perturbation``; store parts.

    Resumable: (model, image, perturbation, level) already stored are skipped, and
    results are written every ``flush_images`` images, so an interrupted sweep loses
    at most that much work.
    """
    started = time.perf_counter()
    P.kind(perturbation)
    wanted = tuple(sorted({_level(P.check_strength(perturbation, v)) for v in levels}, key=abs))
    if not wanted:
        raise EvalError("give at least one level", field="levels")
    store, model_id, runner, image_ids = _rerun_inputs(store_path, model_id, device, runner, cohorts)
    done = _done(store, model_id, perturbation)
    keys = pd.DataFrame({"image_id": np.repeat(image_ids, len(wanted)), "level": np.tile(wanted, len(image_ids))})
    done = pd.DataFrame({"image_id": done["image_id"].to_numpy(np.int64),
                         "level": done["level"].map(_level).to_numpy(np.float64), "done": True})
    keys = keys.merge(done, on=["image_id", "level"], how="left")
    pending = keys[keys["done"].isna()]
    skipped = len(keys) - len(pending)
    pending_levels = pending.groupby("image_id", sort=True)["level"].agg(list)
    todo_ids = pending_levels.index.to_numpy(np.int64)
    written, finished = 0, 0
    buffers: dict[str, list[pd.DataFrame]] = {}
    buffered_images = 0
    run_id = _run_id()

    def flush() -> None:
        nonlocal buffered_images
        for table_name, frames in buffers.items():
            if frames:
                write_part(store.paths.base, table_name, pd.concat(frames, ignore_index=True))
        buffers.clear()
        buffered_images = 0

    if progress:
        progress(0, len(todo_ids))
    for group_ids, group_uris in _image_groups(store, todo_ids, runner):
        for start in range(0, len(group_ids), chunk_images):
            ids = group_ids[start:start + chunk_images]
            images = runner.images(group_uris[start:start + chunk_images])
            per_image = pending_levels.loc[ids].tolist()
            rows = np.repeat(np.arange(len(ids)), [len(v) for v in per_image])
            row_levels = np.array([lv for v in per_image for lv in v], dtype=np.float64)
            frames = sweep_frames(runner, store, ids, images, rows, row_levels, perturbation, seed=seed,
                                  batch_size=batch_size, run_id=run_id)
            for table_name, frame in frames.items():
                buffers.setdefault(table_name, []).append(frame)
            written += len(rows)
            finished += len(ids)
            buffered_images += len(ids)
            if buffered_images >= flush_images:
                flush()
            if progress:
                progress(finished, len(todo_ids))
    flush()
    return SweepSummary(model_id, perturbation, wanted, len(image_ids), written, skipped,
                        time.perf_counter() - started)


# --------------------------------------------------------------------------- curves


def _latest(table: str, keys: str) -> str:
    # The newest run of each key: a key swept twice counts once.
    return f'SELECT * FROM "{table}" WHERE model_id = ? AND perturbation = ? ' \
           f"QUALIFY dense_rank() OVER (PARTITION BY {keys} ORDER BY run_id DESC) = 1"


def _cohort_filter(selection: tuple[str, list] | None, column: str = "image_id") -> tuple[str, str, list]:
    """(WITH clause, condition on ``column``, params) restricting rows to a selection's images."""
    if selection is None:
        return "", "", []
    sql, params = selection
    return f"WITH vl_sel AS ({sql}) ", f"AND {column} IN (SELECT image_id FROM vl_sel)", list(params)


def swept(store: Store, model_id: str) -> pd.DataFrame:
    """What is stored: perturbation, level, images (one row per perturbation and level)."""
    if not store.has_table(TABLE):
        return pd.DataFrame({"perturbation": [], "level": [], "images": []})
    return store.query(f'SELECT perturbation, level, count(DISTINCT image_id) AS images FROM "{TABLE}" '
                       "WHERE model_id = ? GROUP BY perturbation, level ORDER BY perturbation, abs(level)", [model_id])


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _classification_levels(store: Store, model_id: str, perturbation: str, selection, label_threshold: float
                           ) -> list[dict]:
    head, where, params = _cohort_filter(selection, "r.image_id")
    n_classes = len(store.classes)
    if store.task == "multiclass":
        frame = store.query(
            f"{head}SELECT r.level, i.true_label, r.pred_label, p.pred_label AS reference "
            f"FROM ({_latest(TABLE, 'image_id, level')}) AS r JOIN images AS i USING (image_id) "
            f'LEFT JOIN (SELECT image_id, pred_label FROM "predictions" WHERE model_id = ?) AS p USING (image_id) '
            f"WHERE true {where}",
            params + [model_id, perturbation, model_id])
        out = []
        for level, rows in frame.groupby("level", sort=True):
            known = rows["true_label"].notna().to_numpy()
            y_true = rows["true_label"].to_numpy()[known].astype(np.int64)
            y_pred = rows["pred_label"].to_numpy()[known].astype(np.int64)
            scores = multiclass_scores(y_true, y_pred, n_classes)
            has_ref = rows["reference"].notna().to_numpy()
            flips = rows["pred_label"].to_numpy()[has_ref] != rows["reference"].to_numpy()[has_ref]
            out.append({"level": float(level), "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"],
                        "flip_rate": float(flips.mean()) if len(flips) else float("nan"), "images": len(rows)})
        return out
    table = store.arrow(
        f"{head}SELECT r.image_id, r.level, i.true_label, r.probs FROM ({_latest(TABLE, 'image_id, level')}) AS r "
        f"JOIN images AS i USING (image_id) WHERE true {where} "
        f"ORDER BY r.level, r.image_id", params + [model_id, perturbation])
    levels = table.column("level").to_numpy()
    ids = table.column("image_id").to_numpy().astype(np.int64)
    y_true = indicator(table.column("true_label"), n_classes)
    probs = table.column("probs").combine_chunks()
    values = probs.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_classes)
    y_pred = values >= values.dtype.type(label_threshold)
    ref_ids, _, ref_pred, _ = multilabel_arrays(store, model_id, selection, label_threshold)
    position = pd.Series(np.arange(len(ref_ids)), index=ref_ids.astype(np.int64))
    out = []
    for level in np.unique(levels):
        mine = levels == level
        scores = multilabel_scores(y_true[mine], y_pred[mine])
        where_ref = position.reindex(ids[mine]).to_numpy()
        has_ref = ~np.isnan(where_ref)
        flips = (y_pred[mine][has_ref] != ref_pred[where_ref[has_ref].astype(np.int64)]).any(axis=1)
        out.append({"level": float(level), "exact_match": scores["exact_match"], "f1_macro": scores["f1_macro"],
                    "flip_rate": float(flips.mean()) if len(flips) else float("nan"), "images": int(mine.sum())})
    return out


def _detection_levels(store: Store, model_id: str, perturbation: str, selection, iou: float,
                      score_threshold: float) -> list[dict]:
    head, where, params = _cohort_filter(selection)
    t = threshold_index(iou)
    n_classes = len(store.classes)
    runs = f"SELECT image_id, level, run_id FROM ({_latest(TABLE, 'image_id, level')}) WHERE true {where}"
    images = store.query(f"{head}{runs}", params + [model_id, perturbation])
    dets = store.query(
        f"{head}SELECT d.image_id, d.level, d.class_id, d.score, d.rank, d.tp_mask, d.ignored_mask, d.area_mask "
        f'FROM "{DETS_TABLE}" AS d JOIN ({runs}) AS r USING (image_id, level, run_id) '
        f"WHERE d.model_id = ? AND d.perturbation = ? AND d.score >= ? AND d.rank < ?",
        params + [model_id, perturbation, model_id, perturbation, float(score_threshold), MAX_DETS[-1]])
    gts = store.query(
        f'{head}SELECT g.image_id, g.level, g.class_id, g.area_mask FROM "{GTS_TABLE}" AS g '
        f"JOIN ({runs}) AS r USING (image_id, level, run_id) WHERE g.model_id = ? AND g.perturbation = ?",
        params + [model_id, perturbation, model_id, perturbation])
    flips = store.query(
        f"{head}SELECT r.level, coalesce(rd.classes, CAST([] AS INTEGER[])) "
        f"<> coalesce(sd.classes, CAST([] AS INTEGER[])) AS flipped FROM ({runs}) AS r "
        f"LEFT JOIN (SELECT image_id, level, run_id, list_sort(list_distinct(list(class_id))) AS classes "
        f'FROM "{DETS_TABLE}" WHERE model_id = ? AND perturbation = ? AND score >= ? GROUP BY ALL) AS rd '
        f"USING (image_id, level, run_id) "
        f"LEFT JOIN (SELECT image_id, list_sort(list_distinct(list(class_id))) AS classes "
        f'FROM "det_boxes" WHERE model_id = ? AND score >= ? GROUP BY ALL) AS sd USING (image_id)',
        params + [model_id, perturbation, model_id, perturbation, float(score_threshold), model_id,
                  float(score_threshold)])
    out = []
    for level in np.unique(images["level"].to_numpy()):
        d = dets[dets["level"] == level]
        g = gts[gts["level"] == level]
        cls = d["class_id"].to_numpy(np.int64)
        order = np.lexsort((d["rank"].to_numpy(), d["image_id"].to_numpy(), -d["score"].to_numpy(), cls))
        n_gt = np.zeros((n_classes, N_AREAS), np.int64)
        area = g["area_mask"].to_numpy(np.int64)
        for a in range(N_AREAS):
            counted = ((area >> a) & 1).astype(bool)
            n_gt[:, a] = np.bincount(g["class_id"].to_numpy(np.int64)[counted], minlength=n_classes)[:n_classes]
        acc = accumulate(cls[order], d["rank"].to_numpy(np.int64)[order], d["tp_mask"].to_numpy(np.int64)[order],
                         d["ignored_mask"].to_numpy(np.int64)[order], d["area_mask"].to_numpy(np.int64)[order],
                         d["score"].to_numpy(np.float64)[order], n_gt)
        flipped = flips.loc[flips["level"] == level, "flipped"].to_numpy(bool)
        out.append({"level": float(level), "mAP": _mean_valid(acc.precision[t, :, :, 0]),
                    "AP": _mean_valid(acc.precision[:, :, :, 0]),
                    "flip_rate": float(flipped.mean()) if len(flipped) else float("nan"),
                    "images": int((images["level"] == level).sum())})
    return out


def robustness_curves(store: Store, model_id: str, perturbation: str,
                      cohorts: Mapping[str, tuple[str, list] | None], *, iou: float = 0.5,
                      score_threshold: float = 0.0, label_threshold: float = 0.5) -> pd.DataFrame:
    """One row per cohort and stored level: the task's metrics, ``flip_rate`` and ``images``.

    ``cohorts`` maps a name to a selection (``(sql, params)`` of ``SELECT image_id``,
    e.g. ``core.cohorts.compile_cohort``; None for every image). Metrics cover the
    cohort's swept images and equal ``core.metrics`` on the same images and
    thresholds at level 0 (no perturbation).
    """
    P.kind(perturbation)
    columns = ["cohort", "level", *METRICS[store.task], "flip_rate", "images"]
    if not store.has_table(TABLE):
        return pd.DataFrame(columns=columns)
    rows = []
    for name, selection in cohorts.items():
        if store.task == "detection":
            levels = _detection_levels(store, model_id, perturbation, selection, iou, score_threshold)
        else:
            levels = _classification_levels(store, model_id, perturbation, selection, label_threshold)
        rows.extend({"cohort": name, **entry} for entry in levels)
    return pd.DataFrame(rows, columns=columns)


def breaking_points(curves: pd.DataFrame, metric: str, target: float) -> pd.DataFrame:
    """Per cohort the strength at which ``metric`` first falls below ``target``, interpolated
    linearly between the stored levels (ordered by magnitude); ``strength`` is 0 when even the
    unperturbed metric is below, NaN when it never falls below."""
    out = []
    for cohort, rows in curves.groupby("cohort", sort=False):
        rows = rows.iloc[np.argsort(np.abs(rows["level"].to_numpy()), kind="stable")]
        levels, values = rows["level"].to_numpy(float), rows[metric].to_numpy(float)
        below = np.flatnonzero(values < target)
        if not len(below):
            strength = float("nan")
        elif below[0] == 0:
            strength = float(levels[0])
        else:
            i = below[0]
            fraction = (values[i - 1] - target) / (values[i - 1] - values[i])
            strength = float(levels[i - 1] + fraction * (levels[i] - levels[i - 1]))
        out.append({"cohort": cohort, "strength": strength})
    return pd.DataFrame(out, columns=["cohort", "strength"])


# --------------------------------------------------------------------------- counterfactuals


def flip_strengths(runner: Runner, images: torch.Tensor, keys: np.ndarray, perturbation: str, bound: float, *,
                   grid: int = 8, steps: int = 10, seed: int = 0,
                   batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, float]:
    """The smallest strength in (0, ``bound``] (signed like ``bound``) that changes each image's
    decision, NaN where none on the grid does; and the resolution (|bound| / grid / 2**steps).

    ``grid`` evenly spaced strengths find the first change, then ``steps`` bisections
    narrow it, every image in the same batched pass: the value returned changes the
    prediction, ``resolution`` less does not (between the grid point before it and it).
    """
    P.check_strength(perturbation, bound)
    if bound == 0:
        raise EvalError("the search bound must not be 0", field="bound")
    n = images.shape[0]
    reference = runner.decisions(runner.run(images, np.arange(n), {perturbation: np.zeros(n)}, keys, seed=seed,
                                            batch_size=batch_size))
    fractions = np.arange(1, grid + 1) / grid
    rows = np.repeat(np.arange(n), grid)
    strengths = np.tile(fractions, n) * bound
    decided = runner.decisions(runner.run(images, rows, {perturbation: strengths}, keys[rows], seed=seed,
                                          batch_size=batch_size))
    changed = (decided != reference[rows]).any(axis=1).reshape(n, grid)
    found = changed.any(axis=1)
    first = changed.argmax(axis=1)
    high = np.where(found, fractions[first], np.nan)
    low = np.where(found, np.where(first > 0, fractions[np.maximum(first - 1, 0)], 0.0), np.nan)
    active = np.flatnonzero(found)
    for _ in range(steps if len(active) else 0):
        middle = (low[active] + high[active]) / 2
        decided = runner.decisions(runner.run(images, active, {perturbation: middle * bound}, keys[active],
                                              seed=seed, batch_size=batch_size))
        flips = (decided != reference[active]).any(axis=1)
        high[active] = np.where(flips, middle, high[active])
        low[active] = np.where(flips, low[active], middle)
    return high * bound, abs(bound) / grid / 2 ** steps


def run_counterfactuals(store_path: str | Path, perturbation: str, *, bounds: Sequence[float] | None = None,
                        model_id: str | None = None, cohorts: Sequence[str] = (), device: str | None = None,
                        batch_size: int = DEFAULT_BATCH, grid: int = 8, steps: int = 10, seed: int = 0,
                        chunk_images: int = 256, progress: Progress | None = None,
                        runner: Runner | None = None) -> int:
    """Flip strengths of the cohorts' images for ``perturbation`` in each direction of
    ``bounds`` (default the kind's), stored as ``counterfactuals`` parts; resumable. Returns
    the number of rows written."""
    kind = P.kind(perturbation)
    bounds = tuple(kind.bounds if bounds is None else bounds)
    store, model_id, runner, image_ids = _rerun_inputs(store_path, model_id, device, runner, cohorts)
    done: set[tuple[int, int]] = set()
    if store.has_table(COUNTERFACTUALS):
        rows = store.rows(f'SELECT DISTINCT image_id, direction FROM "{COUNTERFACTUALS}" '
                          "WHERE model_id = ? AND perturbation = ?", [model_id, perturbation])
        done = {(int(i), int(d)) for i, d in rows}
    written, frames = 0, []
    run_id = _run_id()
    total = len(image_ids) * len(bounds)
    finished = 0
    for bound in bounds:
        direction = 1 if bound > 0 else -1
        todo = np.array([i for i in image_ids if (int(i), direction) not in done], dtype=np.int64)
        finished += len(image_ids) - len(todo)
        for group_ids, group_uris in _image_groups(store, todo, runner):
            for start in range(0, len(group_ids), chunk_images):
                ids = group_ids[start:start + chunk_images]
                images = runner.images(group_uris[start:start + chunk_images])
                strength, resolution = flip_strengths(runner, images, ids, perturbation, bound, grid=grid,
                                                      steps=steps, seed=seed, batch_size=batch_size)
                frames.append(pd.DataFrame({
                    "model_id": model_id, "image_id": ids.astype(np.int32), "perturbation": perturbation,
                    "direction": np.int8(direction), "bound": float(bound),
                    "flip_strength": pd.array(np.where(np.isnan(strength), None, strength), dtype="Float64"),
                    "resolution": resolution, "seed": np.int32(seed), "run_id": run_id}))
                written += len(ids)
                finished += len(ids)
                if progress:
                    progress(finished, total)
    if frames:
        write_part(store.paths.base, COUNTERFACTUALS, pd.concat(frames, ignore_index=True))
    return written


def counterfactual_column(perturbation: str, direction: int) -> str:
    """The cohort column of a kind and direction: ``flip_blur``, ``flip_brightness_down``…"""
    kind = P.kind(perturbation)
    return f"flip_{perturbation}_{DIRECTIONS[direction]}" if kind.signed else f"flip_{perturbation}"


def _counterfactual_pairs(store: Store) -> list[tuple[str, int]]:
    if not store.has_table(COUNTERFACTUALS):
        return []
    pairs = store.rows(f'SELECT DISTINCT perturbation, direction FROM "{COUNTERFACTUALS}" ORDER BY ALL')
    return [(p, int(d)) for p, d in pairs if p in P.KINDS]


def counterfactual_columns(store: Store) -> list[tuple[str, str]]:
    """(column, label) per stored kind and direction, e.g. ``("flip_blur", "Flips under blur at
    (sigma, px)")``: the cohort columns ``counterfactual_frame_sql`` provides."""
    out = []
    for perturbation, direction in _counterfactual_pairs(store):
        kind = P.KINDS[perturbation]
        way = f" ({DIRECTIONS[direction]})" if kind.signed else ""
        out.append((counterfactual_column(perturbation, direction),
                    f"Flips under {kind.label.lower()}{way} at ({kind.unit})"))
    return out


def counterfactual_frame_sql(store: Store, model_id: str) -> tuple[str, list, list[str]]:
    """``(sql, params, columns)``: one row per image of ``model_id`` with a column per stored kind
    and direction (``counterfactual_column``): the magnitude of the smallest strength that
    flips the prediction, NULL when none does up to the searched bound (newest run of each key).
    Empty SQL when the store has no counterfactuals."""
    pairs = _counterfactual_pairs(store)
    if not pairs:
        return "", [], []
    columns = [counterfactual_column(p, d) for p, d in pairs]
    pivot = ", ".join(f'max(abs(flip_strength)) FILTER (WHERE perturbation = ? AND direction = ?) AS "{c}"'
                      for c in columns)
    params: list = [v for pair in pairs for v in pair]
    sql = (f"SELECT image_id{', ' if pivot else ''}{pivot} FROM (SELECT * FROM \"{COUNTERFACTUALS}\" "
           "WHERE model_id = ? QUALIFY dense_rank() OVER (PARTITION BY image_id, perturbation, direction "
           "ORDER BY run_id DESC) = 1) GROUP BY image_id")
    return sql, params + [model_id], columns


def counterfactuals(store: Store, model_id: str) -> pd.DataFrame:
    """One row per image with a flip column per stored kind and direction (see
    ``counterfactual_frame_sql``)."""
    sql, params, _ = counterfactual_frame_sql(store, model_id)
    if not sql:
        return pd.DataFrame({"image_id": []})
    return store.query(f"SELECT * FROM ({sql}) ORDER BY image_id", params)


# --------------------------------------------------------------------------- command line


def parse_levels(text: str) -> list[float]:
    """``0, 1.5,3`` → [0.0, 1.5, 3.0]; EvalError naming the field otherwise."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"levels must be numbers separated by commas, got {text!r}", field="levels") from None


def _bar(label: str) -> Progress:
    def draw(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return draw


def robustness_main(argv: list[str] | None = None) -> int:
    """``visionlens robustness STORE --perturb KIND --levels 0,1,2,4 [--cohort QUERY]... [--model M]
    [--device cpu|cuda] [--counterfactual]``."""
    parser = argparse.ArgumentParser(prog="visionlens robustness",
                                     description="re-run a model on perturbed images: robustness curves per "
                                                 "cohort and per-image flip strengths (resumable)")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--perturb", required=True, help=f"one of {', '.join(P.KINDS)} (comma-separated for several)")
    parser.add_argument("--levels", help="strengths, comma-separated (default: the kind's six levels)")
    parser.add_argument("--cohort", action="append", default=[],
                        help="cohort query string; repeat for several (default: every image)")
    parser.add_argument("--model", help="model id (default: the store's first)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--counterfactual", action="store_true",
                        help="also find each image's smallest flipping strength (bisection)")
    parser.add_argument("--no-sweep", action="store_true", help="only the counterfactual search")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.perturb.split(",") if k.strip()]
    for name in kinds:
        P.kind(name)
    if args.levels and len(kinds) > 1:
        raise EvalError("--levels applies to one perturbation at a time", field="levels")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1", field="batch-size")
    store = Store(args.store)
    model_id = args.model or (store.model_ids() or [None])[0]
    runner = Runner.load(store, model_id, args.device) if model_id else None
    if runner is None:
        raise EvalError("the store has no model to re-run", field="model")
    for name in kinds:
        if not args.no_sweep:
            levels = parse_levels(args.levels) if args.levels else list(P.KINDS[name].levels)
            summary = run_sweep(args.store, name, levels, model_id=model_id, cohorts=args.cohort,
                                batch_size=args.batch_size, seed=args.seed, runner=runner,
                                progress=_bar(f"{name} sweep"))
            rate = summary.rows_written / summary.seconds if summary.seconds else float("nan")
            print(f"{name}: {summary.rows_written} image-levels computed, {summary.rows_skipped} already stored "
                  f"({summary.n_images} images x {len(summary.levels)} levels; {rate:.1f} image-levels/s "
                  f"on {runner.device})")
            _print_curves(Store(args.store), model_id, name, args.cohort)
        if args.counterfactual:
            n = run_counterfactuals(args.store, name, model_id=model_id, cohorts=args.cohort,
                                    batch_size=args.batch_size, seed=args.seed, runner=runner,
                                    progress=_bar(f"{name} flip search"))
            print(f"{name}: flip strengths of {n} image-directions stored")
    return 0


def _print_curves(store: Store, model_id: str, perturbation: str, queries: Sequence[str]) -> None:
    from .cohorts import catalog_of, compile_cohort, parse_query

    catalog = catalog_of(store)
    selections: dict[str, tuple[str, list] | None] = {"all images": None}
    for query in queries:
        parsed = parse_query(query, catalog)
        selections[query] = compile_cohort(parsed.cohort, store, model_id=model_id, catalog=catalog,
                                           **parsed.view.thresholds(catalog))
    thresholds = {"iou": 0.5, "score_threshold": 0.0 if store.task == "detection" else catalog.default_score_threshold,
                  "label_threshold": catalog.default_label_threshold}
    curves = robustness_curves(store, model_id, perturbation, selections, **thresholds)
    metric = METRICS[store.task][0]
    for name, rows in curves.groupby("cohort", sort=False):
        points = ", ".join(f"{lv:g}: {v:.3f} (flips {f:.1%})"
                           for lv, v, f in zip(rows["level"], rows[metric], rows["flip_rate"]))
        print(f"  {name}: {metric} {points}")
