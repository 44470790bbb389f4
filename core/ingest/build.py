"""Turn a validated dataset and model outputs into a store.

Readers (coco, voc, imagefolder, table) produce a ``Dataset``; predictions come
as ``ModelRun``s. ``build_store`` computes image metadata and thumbnails,
detection matches and outcomes, the filterable-column catalog, and writes the
base atomically. ``add_model`` adds a further model to an existing store as
Parquet parts, never touching the base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import store as store_mod
from ..errors import IngestError
from ..exif import QUARTER_TURNS, orientation_codes, turn_boxes
from ..metrics.detection import store_evaluations

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "detection")
Progress = Callable[[str, int, int], None]

# Columns of ``images`` that are identifiers or payloads, not filters.
_NOT_FILTERABLE = {"uri", "thumbnail"}
_LABELS = {
    "image_id": "Image id", "true_label": "True label", "width": "Width (px)",
    "height": "Height (px)", "file_size": "File size (bytes)", "aspect_ratio": "Aspect ratio",
    "brightness": "Brightness", "contrast": "Contrast", "sharpness": "Sharpness",
    "noise": "Noise", "colorfulness": "Colorfulness",
}


@dataclass
class Dataset:
    """Images with their ground truth, before metadata is computed."""

    name: str
    task: str
    classes: list[str]
    images: pd.DataFrame  # image_id, uri, true_label, user metadata columns
    gt_boxes: pd.DataFrame | None = None  # detection only
    extra_meta: dict = field(default_factory=dict)
    # image_id, width, height as the annotation file gives them (COCO): the frame its boxes are in
    declared_sizes: pd.DataFrame | None = None


@dataclass
class ModelRun:
    """One model's outputs over a dataset's images (image ids of that dataset)."""

    model_id: str
    name: str
    params: dict = field(default_factory=dict)
    predictions: pd.DataFrame | None = None  # classification tasks
    det_boxes: pd.DataFrame | None = None  # detection


@dataclass
class BuildReport:
    path: Path
    images: int
    skipped: list[IngestError]
    upright_images: int = 0  # EXIF-turned images whose boxes came in the upright frame (now stored frame)


def _show(value: object) -> str:
    """A value as the user wrote it: numpy scalars as plain numbers, strings quoted."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise IngestError(f"unknown task {task!r}", field="task", choices=list(TASKS))


def _column_kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    non_null = series.dropna()
    if len(non_null) and isinstance(non_null.iloc[0], (list, tuple, np.ndarray)):
        return "list"
    return "categorical"


def column_catalog(images: pd.DataFrame, user_columns: set[str], task: str) -> pd.DataFrame:
    """The whitelist of filterable image columns with kind, source and label."""
    rows = []
    for name in images.columns:
        if name in _NOT_FILTERABLE:
            continue
        if name == "true_label":
            kind = "categorical" if task == "multiclass" else "list"
        else:
            kind = _column_kind(images[name])
        source = "user" if name in user_columns else ("derived" if name in ("image_id", "true_label") else "auto")
        label = _LABELS.get(name) or name.replace("_", " ").capitalize()
        rows.append({"name": name, "kind": kind, "source": source, "label": label})
    return pd.DataFrame(rows, columns=["name", "kind", "source", "label"])


def _validate_images(dataset: Dataset) -> None:
    _check_task(dataset.task)
    images = dataset.images
    for col in ("image_id", "uri", "true_label"):
        if col not in images.columns:
            raise IngestError(f"images table lacks column {col!r}", field=col)
    dup = images["uri"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise IngestError(f"duplicate image {_show(images['uri'].iloc[row])}", row=row, field="uri")
    dup = images["image_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise IngestError(f"duplicate image id {_show(images['image_id'].iloc[row])}", row=row, field="image_id")
    n_classes = len(dataset.classes)
    labels = images["true_label"]
    if dataset.task == "multiclass":
        values = pd.to_numeric(labels, errors="coerce")
        bad = values.isna() | (values < 0) | (values >= n_classes)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise IngestError(f"label {_show(labels.iloc[row])} is not a class id 0..{n_classes - 1}",
                              row=row, field="true_label")
    elif dataset.task == "multilabel":
        for row, value in enumerate(labels):
            ids = np.asarray(value if value is not None else [], dtype=np.int64).ravel()
            if ((ids < 0) | (ids >= n_classes)).any():
                raise IngestError(f"labels {list(ids)} contain a class id outside 0..{n_classes - 1}",
                                  row=row, field="true_label")


def _remap(frame: pd.DataFrame | None, id_map: dict[int, int]) -> pd.DataFrame | None:
    """Move rows onto the dense image ids; rows of images that were skipped go."""
    if frame is None:
        return None
    mapped = frame["image_id"].map(id_map)
    frame = frame[mapped.notna()].copy()
    frame["image_id"] = mapped[mapped.notna()].astype(np.int32)
    return frame.reset_index(drop=True)


def _check_prediction_ids(frame: pd.DataFrame, known: set[int], model_id: str, what: str) -> None:
    unknown = ~frame["image_id"].isin(known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise IngestError(f"{what} of model {model_id!r} for image id {_show(frame['image_id'].iloc[row])} "
                          "which is not in the dataset", row=row, field="image_id")


def _classification_rows(task: str, images: pd.DataFrame, run: ModelRun, n_classes: int,
                         threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """predictions and outcomes rows for one classification model."""
    if run.predictions is None:
        raise IngestError(f"model {run.model_id!r} has no predictions", field="predictions")
    preds = run.predictions.copy()
    dup = preds["image_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise IngestError(f"model {run.model_id!r} predicts image {_show(preds['image_id'].iloc[row])} twice",
                          row=row, field="image_id")
    if "probs" in preds.columns:
        lengths = preds["probs"].map(lambda p: len(p) if p is not None else 0)
        bad = lengths != n_classes
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise IngestError(f"probs has {_show(lengths.iloc[row])} values, expected {n_classes}",
                              row=row, field="probs")
        probs = np.stack(preds["probs"].to_numpy()).astype(np.float32)
        if not np.isfinite(probs).all():
            row = int(np.flatnonzero(~np.isfinite(probs).all(axis=1))[0])
            raise IngestError("probs has a non-finite value", row=row, field="probs")
        preds["probs"] = list(probs)
    truth = images.set_index("image_id")["true_label"]
    if task == "multiclass":
        if "pred_label" not in preds.columns:
            if "probs" not in preds.columns:
                raise IngestError("predictions need pred_label or probs", field="pred_label")
            preds["pred_label"] = probs.argmax(axis=1)
        if "score" not in preds.columns:
            preds["score"] = probs.max(axis=1) if "probs" in preds.columns else np.nan
        bad = (preds["pred_label"] < 0) | (preds["pred_label"] >= n_classes)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise IngestError(f"predicted class id {_show(preds['pred_label'].iloc[row])} outside 0..{n_classes - 1}",
                              row=row, field="pred_label")
        preds["pred_label"] = preds["pred_label"].astype(np.int32)
        preds["score"] = preds["score"].astype(np.float32)
        correct = preds["pred_label"].to_numpy() == truth.loc[preds["image_id"]].to_numpy()
    else:
        if "pred_labels" not in preds.columns:
            if "probs" not in preds.columns:
                raise IngestError("multilabel predictions need pred_labels or probs", field="pred_labels")
            preds["pred_labels"] = [np.flatnonzero(p >= threshold).astype(np.int32) for p in probs]
        preds["pred_labels"] = [np.asarray(v if v is not None else [], dtype=np.int32)
                                for v in preds["pred_labels"]]
        true_sets = truth.loc[preds["image_id"]].to_numpy()
        correct = np.array([set(np.asarray(t, dtype=np.int64).tolist()) == set(p.tolist())
                            for t, p in zip(true_sets, preds["pred_labels"])], dtype=bool)
    preds.insert(0, "model_id", run.model_id)
    preds["image_id"] = preds["image_id"].astype(np.int32)
    outcomes = pd.DataFrame({"model_id": run.model_id, "image_id": preds["image_id"], "correct": correct})
    return preds, outcomes


def _detection_rows(gt_boxes: pd.DataFrame, run: ModelRun, n_classes: int
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from ..matching import match_detections

    if run.det_boxes is None:
        raise IngestError(f"model {run.model_id!r} has no detections", field="det_boxes")
    dets = validate_boxes(run.det_boxes.copy(), n_classes, what=f"detections of {run.model_id!r}",
                          id_col="det_id", scored=True)
    det_matches, gt_matches = match_detections(gt_boxes, dets)
    for frame in (dets, det_matches, gt_matches):
        if "model_id" in frame.columns:
            frame.drop(columns="model_id", inplace=True)
        frame.insert(0, "model_id", run.model_id)
    return dets, det_matches, gt_matches


def validate_boxes(frame: pd.DataFrame, n_classes: int, *, what: str, id_col: str,
                   scored: bool) -> pd.DataFrame:
    """Check box rows: finite coordinates, xmax >= xmin, known classes, unique ids."""
    needed = ["image_id", "class_id", "xmin", "ymin", "xmax", "ymax"] + (["score"] if scored else [])
    for col in needed:
        if col not in frame.columns:
            raise IngestError(f"{what} lack column {col!r}", field=col)
    if id_col not in frame.columns:
        frame[id_col] = np.arange(len(frame), dtype=np.int32)
    coords = frame[["xmin", "ymin", "xmax", "ymax"] + (["score"] if scored else [])].to_numpy(np.float64)
    finite = np.isfinite(coords)
    if not finite.all():
        row, col = map(int, np.argwhere(~finite)[0])
        raise IngestError(f"{what}: non-finite value", row=row,
                          field=(["xmin", "ymin", "xmax", "ymax", "score"])[col])
    for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
        bad = frame[hi].to_numpy() < frame[lo].to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise IngestError(f"{what}: {hi} < {lo}", row=row, field=hi)
    bad = (frame["class_id"] < 0) | (frame["class_id"] >= n_classes)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise IngestError(f"{what}: class id {_show(frame['class_id'].iloc[row])} outside 0..{n_classes - 1}",
                          row=row, field="class_id")
    dup = frame[id_col].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise IngestError(f"{what}: duplicate {id_col} {_show(frame[id_col].iloc[row])}", row=row, field=id_col)
    if "area" not in frame.columns:
        frame["area"] = (frame["xmax"] - frame["xmin"]) * (frame["ymax"] - frame["ymin"])
    frame["image_id"] = frame["image_id"].astype(np.int32)
    frame["class_id"] = frame["class_id"].astype(np.int32)
    frame[id_col] = frame[id_col].astype(np.int32)
    for col in ("xmin", "ymin", "xmax", "ymax", "area") + (("score",) if scored else ()):
        frame[col] = frame[col].astype(np.float64)
    return frame


def _models_rows(task: str, runs: list[ModelRun]) -> pd.DataFrame:
    return pd.DataFrame({
        "model_id": [r.model_id for r in runs],
        "name": [r.name or r.model_id for r in runs],
        "task": task,
        "params": [json.dumps(r.params) for r in runs],
    }, columns=["model_id", "name", "task", "params"])


def _model_tables(task: str, images: pd.DataFrame, gt_boxes: pd.DataFrame | None,
                  runs: list[ModelRun], n_classes: int, threshold: float) -> dict[str, pd.DataFrame]:
    known = set(images["image_id"].tolist())
    tables: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        if not run.model_id or not str(run.model_id).replace("-", "").replace("_", "").isalnum():
            raise IngestError(f"model id {run.model_id!r} must be letters, digits, - or _", field="model_id")
        if task == "detection":
            if run.det_boxes is not None:
                _check_prediction_ids(run.det_boxes, known, run.model_id, "detection")
            dets, dm, gm = _detection_rows(gt_boxes, run, n_classes)
            tables.setdefault("det_boxes", []).append(dets)
            tables.setdefault("det_matches", []).append(dm)
            tables.setdefault("gt_matches", []).append(gm)
        else:
            if run.predictions is not None:
                _check_prediction_ids(run.predictions, known, run.model_id, "prediction")
            preds, outcomes = _classification_rows(task, images, run, n_classes, threshold)
            tables.setdefault("predictions", []).append(preds)
            tables.setdefault("outcomes", []).append(outcomes)
    out = {name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()}
    if runs:
        out["models"] = _models_rows(task, runs)
    return out


def build_store(out_path: str | Path, dataset: Dataset, models: list[ModelRun] | None = None, *,
                skip_bad: bool = False, threshold: float | None = None,
                progress: Progress | None = None, exif_boxes: str = "auto") -> BuildReport:
    """Compute everything the app needs and write the base atomically.

    With ``skip_bad`` unreadable images are dropped (and their boxes and
    predictions with them) and reported; otherwise the first one raises.
    Nothing is written unless every step succeeds. Boxes given in the images'
    upright frame (``boxes_given_upright``; ``exif_boxes``) are stored in their
    stored frame, as are the boxes of predictions read from a file with them.
    """
    from ..metadata import compute_metadata

    models = list(models or [])
    _validate_images(dataset)
    seen = set()
    for run in models:
        if run.model_id in seen:
            raise IngestError(f"model id {run.model_id!r} given twice", field="model_id")
        seen.add(run.model_id)
    task, n_classes = dataset.task, len(dataset.classes)
    if threshold is None:
        threshold = 0.5
    images = dataset.images.reset_index(drop=True)
    gt_boxes = dataset.gt_boxes
    if task == "detection":
        gt_boxes = validate_boxes((gt_boxes if gt_boxes is not None else pd.DataFrame(
            columns=["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax"])).copy(),
            n_classes, what="ground-truth boxes", id_col="gt_id", scored=False)
        if "iscrowd" not in gt_boxes.columns:
            gt_boxes["iscrowd"] = False
        gt_boxes["iscrowd"] = gt_boxes["iscrowd"].fillna(False).astype(bool)
        _check_prediction_ids(gt_boxes, set(images["image_id"].tolist()), "ground truth", "box")

    def meta_progress(done: int, total: int) -> None:
        if progress:
            progress("metadata", done, total)

    metadata, problems = compute_metadata(images["uri"].tolist(), skip_bad=skip_bad, progress=meta_progress)
    skipped = {k: list(v) for k, v in (dataset.extra_meta.get(SKIPPED_META) or {}).items()}
    if problems:
        bad_uris = {p.file for p in problems}
        keep = ~images["uri"].isin(bad_uris).to_numpy()
        # Remembered so a predictions file added later drops their rows as this build did.
        skipped["uris"] = sorted({*skipped.get("uris", ()), *images["uri"][~keep]})
        if "source_id" in images.columns:
            skipped["source_ids"] = sorted({*skipped.get("source_ids", ()),
                                            *images["source_id"][~keep].astype(np.int64).tolist()})
        images = images[keep].reset_index(drop=True)
        metadata = metadata.reset_index(drop=True)
    if len(metadata) != len(images):
        raise IngestError(f"metadata rows ({len(metadata)}) do not match images ({len(images)})")
    # Dense ids 0..n-1 as the schema promises; inputs may carry any integer ids.
    id_map = {int(old): new for new, old in enumerate(images["image_id"].tolist())}
    images["image_id"] = np.arange(len(images), dtype=np.int32)
    gt_boxes = _remap(gt_boxes, id_map)
    all_ids = set(dataset.images["image_id"].tolist())
    runs = [ModelRun(r.model_id, r.name, r.params,
                     _remap_checked(r.predictions, all_ids, id_map, r.model_id, "prediction"),
                     _remap_checked(r.det_boxes, all_ids, id_map, r.model_id, "detection"))
            for r in models]

    user_columns = set(dataset.images.columns) - {"image_id", "uri", "true_label"}
    thumbnails = pd.DataFrame({"image_id": images["image_id"], "jpeg": metadata["thumbnail"].to_numpy()})
    meta_cols = metadata.drop(columns=["thumbnail"])
    overlap = set(meta_cols.columns) & set(images.columns)
    images = pd.concat([images.drop(columns=list(overlap)), meta_cols], axis=1)
    if task == "multiclass":
        images["true_label"] = images["true_label"].astype(np.int32)
    elif task == "multilabel":
        images["true_label"] = [np.asarray(v if v is not None else [], dtype=np.int32) for v in images["true_label"]]
    else:
        present = gt_boxes.groupby("image_id")["class_id"].agg(lambda s: np.unique(s.to_numpy()).astype(np.int32))
        images["true_label"] = [present.get(i, np.zeros(0, np.int32)) for i in images["image_id"]]
    ordered = ["image_id", "uri", "width", "height", "true_label"]
    images = images[ordered + [c for c in images.columns if c not in ordered]]
    upright = task == "detection" and boxes_given_upright(images, _remap(dataset.declared_sizes, id_map), exif_boxes)
    if upright:
        # Models and maps see the stored pixels: the boxes move there (a re-run model's are there already).
        gt_boxes = turn_to_stored(gt_boxes, images)
        runs = [r if r.params.get("loader") else
                ModelRun(r.model_id, r.name, r.params, r.predictions, turn_to_stored(r.det_boxes, images))
                for r in runs]

    # Timestamps (EXIF dates) are kept as ISO text: ordered like time, filterable like a category.
    for name in images.columns:
        if pd.api.types.is_datetime64_any_dtype(images[name]):
            images[name] = images[name].dt.strftime("%Y-%m-%dT%H:%M:%S").astype(object)
    if progress:
        progress("models", 0, len(runs))
    tables = _model_tables(task, images, gt_boxes, runs, n_classes, threshold)
    if progress:
        progress("models", len(runs), len(runs))
    tables.update({"images": images, "thumbnails": thumbnails,
                   "columns": column_catalog(images, user_columns, task)})
    if gt_boxes is not None:
        tables["gt_boxes"] = gt_boxes[["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax",
                                       "area", "iscrowd"]]
    meta = {"task": task, "classes": list(dataset.classes), "name": dataset.name,
            "label_threshold" if task == "multilabel" else "score_threshold": threshold}
    meta.update(dataset.extra_meta)
    meta[SKIPPED_META] = skipped
    if upright:
        meta[UPRIGHT_META] = True
    if progress:
        progress("writing", 0, 1)
    paths = store_mod.build_base(out_path, tables, meta)
    if task == "detection" and runs:
        if progress:
            progress("evaluating", 0, 1)
        store_evaluations(paths.base)
    for problem in problems:
        log.warning("skipped: %s", problem)
    turned = int((orientation_codes(images["exif_orientation"]) != 1).sum()) \
        if upright and "exif_orientation" in images.columns else 0
    return BuildReport(paths.base, len(images), list(problems), turned)


def _remap_checked(frame: pd.DataFrame | None, all_ids: set[int], id_map: dict[int, int],
                   model_id: str, what: str) -> pd.DataFrame | None:
    """Reject rows for images the dataset never had, then follow the renumbering."""
    if frame is None:
        return None
    _check_prediction_ids(frame, all_ids, model_id, what)
    return _remap(frame, id_map)


# store meta: images of the dataset that were skipped ({"uris": [...], "source_ids": [...]})
SKIPPED_META = "skipped_images"
UPRIGHT_META = "boxes_given_upright"  # store meta: the dataset's boxes came in the upright frame
EXIF_BOXES = ("auto", "stored", "upright")


def boxes_given_upright(images: pd.DataFrame, declared: pd.DataFrame | None, mode: str = "auto") -> bool:
    """Whether a detection dataset's boxes are in its images' upright frame (EXIF orientation
    applied, as most annotation tools show a photo) rather than their stored pixels'.

    ``mode`` "stored" or "upright" says so; "auto" asks the annotation file: an image stored
    w x h with orientation 5-8 (a quarter turn) that it declares h x w was annotated upright.
    Without such an image, or with as many saying the opposite, the stored frame (as COCO and
    torchvision read images).
    """
    if mode not in EXIF_BOXES:
        raise IngestError(f"unknown EXIF box frame {mode!r}", field="exif_boxes", choices=list(EXIF_BOXES))
    if mode != "auto":
        return mode == "upright"
    if declared is None or "exif_orientation" not in images.columns:
        return False
    sizes = images[["image_id", "width", "height", "exif_orientation"]].merge(
        declared, on="image_id", suffixes=("", "_declared"))
    quarter = np.isin(orientation_codes(sizes["exif_orientation"]), QUARTER_TURNS) & \
        (sizes["width"] != sizes["height"]).to_numpy()
    upright = quarter & (sizes["width_declared"] == sizes["height"]).to_numpy() & \
        (sizes["height_declared"] == sizes["width"]).to_numpy()
    stored = quarter & (sizes["width_declared"] == sizes["width"]).to_numpy() & \
        (sizes["height_declared"] == sizes["height"]).to_numpy()
    if upright.any() and stored.any():
        log.warning("%d quarter-turned images were annotated upright and %d as stored: taking the majority",
                    int(upright.sum()), int(stored.sum()))
    return int(upright.sum()) > int(stored.sum())


def turn_to_stored(boxes: pd.DataFrame | None, images: pd.DataFrame) -> pd.DataFrame | None:
    """Boxes given in the upright frame moved to the stored one (``images``: image_id, width,
    height, exif_orientation)."""
    if boxes is None or boxes.empty or "exif_orientation" not in images.columns:
        return boxes
    sizes = images.set_index("image_id").loc[boxes["image_id"].to_numpy()]
    corners = ["xmin", "ymin", "xmax", "ymax"]
    boxes = boxes.copy()
    boxes[corners] = turn_boxes(boxes[corners].to_numpy(), sizes["width"].to_numpy(), sizes["height"].to_numpy(),
                                sizes["exif_orientation"].to_numpy(), to_upright=False)
    return boxes


def add_model(store_path: str | Path, run: ModelRun, *, threshold: float | None = None) -> None:
    """Add one model's outputs to an existing store as parts (the base stays as it is)."""
    store = store_mod.Store(store_path)
    try:
        if run.model_id in store.model_ids():
            raise IngestError(f"model {run.model_id!r} is already in the store", field="model_id",
                              choices=store.model_ids())
        task, n_classes = store.task, len(store.classes)
        images = store.query('SELECT image_id, true_label FROM "images" ORDER BY image_id')
        gt_boxes = store.query('SELECT * FROM "gt_boxes"') if task == "detection" else None
        if store.meta().get(UPRIGHT_META) == "true" and run.det_boxes is not None and not run.params.get("loader"):
            # Read from a file like the dataset's boxes, so in the same (upright) frame.
            orientation = '"exif_orientation"' if "exif_orientation" in store.table_columns("images") else "1"
            sizes = store.query(f'SELECT image_id, width, height, {orientation} AS exif_orientation FROM "images"')
            run = ModelRun(run.model_id, run.name, run.params, run.predictions, turn_to_stored(run.det_boxes, sizes))
        if threshold is None:
            threshold = float(store.meta().get("label_threshold", 0.5))
    finally:
        store.close()
    if task == "multilabel":
        images["true_label"] = [np.asarray(v, dtype=np.int32) for v in images["true_label"]]
    tables = _model_tables(task, images, gt_boxes, [run], n_classes, threshold)
    # models last: a reader that sees the model also sees its rows.
    for table in sorted(t for t in tables if t != "models"):
        store_mod.write_part(store_path, table, tables[table])
    store_mod.write_part(store_path, "models", tables["models"])
    if task == "detection":
        store_evaluations(store_path)
