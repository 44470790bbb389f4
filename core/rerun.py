"""Re-running a store's model on perturbed images: what-if, robustness sweeps, flip strengths.

Everything here re-runs a model the store knows how to build (``models.params``
has a ``loader``; ``core.models.load_model``) on images perturbed by
``core.perturb.perturb``, batched over images and strengths, on CUDA when
present, and imports torch; reading what it stored is ``core.robustness``
(no torch), so pages show stored results without loading it:

- ``what_if``: one image, the original and a perturbed copy in one batch; class
  probabilities, the label set, or boxes with TP / FP / FN at a chosen IoU (the
  perturbed detections matched to the ground truth with
  ``core.matching.match_detections``; geometric perturbations move the ground
  truth with them). ``save_snapshot`` stores one as a ``whatif_snapshots`` part.
- ``run_sweep``: a cohort's images at a grid of strengths of one perturbation,
  stored as ``robustness`` parts (and ``robustness_dets`` / ``robustness_gts``
  for detection; ``write_part``) and resumable: (model, image, perturbation,
  level) already stored are skipped.
- ``flip_strengths`` / ``run_counterfactuals``: per image the smallest strength
  (per kind and direction) that changes the prediction, found on a grid of
  strengths and refined by bisection, all images in lockstep; stored in the
  ``counterfactuals`` table.

The tables' columns are described in ``core.robustness``.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from . import perturb as P
from . import perturbation_kinds
from .errors import EvalError, VisionLensError
from .matching import N_THRESHOLDS, bit_index, match_detections, threshold_index
from .metrics.classification import indicator
from .models import classifier_frame, device_for, image_tensor, load_model
from .robustness import COUNTERFACTUALS, DETS_TABLE, GTS_TABLE, SNAPSHOTS, TABLE, Outcome, Progress, describe_outcome
from .store import Store, write_part

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64
FLUSH_IMAGES = 4096  # images per written part: few, large parts stay cheap to read


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
    perturbation_kinds.kind(perturbation)
    wanted = tuple(sorted({_level(perturbation_kinds.check_strength(perturbation, v)) for v in levels}, key=abs))
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
    perturbation_kinds.check_strength(perturbation, bound)
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
    kind = perturbation_kinds.kind(perturbation)
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
