"""Synthetic stores of any size, for scale benchmarks and load tests.

``build_synthetic_store(out, task=..., n_images=...)`` writes a complete store
(images with metadata, two models' predictions and outcomes, or GT boxes,
detections and COCO matches) in seconds to minutes, with no image decoding
and no model: every table is drawn with vectorised numpy and handed to
``core.store.build_base`` as Arrow. Every image's ``uri`` is the same small
JPEG written beside the store and every thumbnail is that JPEG's bytes, so a
million-image store holds a million rows of data, not a million files.

Errors are not uniform: they depend on brightness, camera, occlusion and
(for detection) object size, and the candidate model is better on dark
images, so error analysis, slices and the compare page find real structure.

Detections are drawn and matched (``core.matching.match_detections``) in
chunks of images, staged as Parquet and streamed into the base, so Python
holds about one chunk of detections at a time (DuckDB's write buffers come
on top while the base is written). ``order_key``, the one matching column
that ranks detections across images, is recomputed over each whole model
(``core.distributed.order_key_transform``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from .distributed import StagedTables, order_key_transform, staging_folder
from .errors import IngestError
from .ingest.build import column_catalog
from .matching import match_detections
from .metrics.detection import store_evaluations
from .store import StorePaths, build_base

log = logging.getLogger(__name__)

TASKS = ("multiclass", "detection")
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SITES = ("lab", "office", "warehouse", "outdoor")
CAMERAS = ("dslr", "phone", "webcam")
MODELS = (("baseline", "Baseline (synthetic)"), ("candidate", "Candidate (synthetic)"))
IMAGE_SIZES = np.array([[640, 480], [800, 600], [1024, 768], [1280, 720], [480, 640]], np.int32)
# Images matched at once: about dets_per_image x this many detections in memory per chunk.
MATCH_CHUNK_IMAGES = 50_000
USER_COLUMNS = ("site", "camera", "clutter", "occluded")
Progress = Callable[[str, int, int], None]


def shared_jpeg(side: int) -> bytes:
    """A small grey gradient JPEG: the one picture every synthetic image shows."""
    ramp = np.linspace(40, 215, side, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                       np.full((side, side), 128, np.float32)], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def list_array(values: np.ndarray, offsets: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    """Arrow list column from flat values and ``n + 1`` offsets."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=dtype))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def image_table(rng: np.random.Generator, n: int, uri: str) -> dict[str, np.ndarray]:
    """Per-image metadata columns, in the store's column order (true_label added by the caller)."""
    size = IMAGE_SIZES[rng.integers(0, len(IMAGE_SIZES), n)]
    site = rng.integers(0, len(SITES), n)
    # The warehouse is dim, outdoor bright: metadata that correlates with a user column.
    brightness = np.clip(rng.beta(4, 4, n) - np.where(site == 2, 0.2, 0.0) + np.where(site == 3, 0.1, 0.0),
                         0.0, 1.0)
    camera = rng.integers(0, len(CAMERAS), n)
    return {
        "image_id": np.arange(n, dtype=np.int32),
        "uri": np.full(n, uri, dtype=object),
        "width": size[:, 0], "height": size[:, 1],
        "file_size": (size[:, 0].astype(np.int64) * size[:, 1] * rng.uniform(0.15, 0.45, n)).astype(np.int64),
        "brightness": brightness,
        "contrast": rng.gamma(4.0, 0.04, n),
        "sharpness": np.where(camera == 1, rng.gamma(2.0, 4.0, n), rng.gamma(6.0, 5.0, n)),
        "noise": np.where(camera == 2, rng.gamma(6.0, 2.0, n), rng.gamma(2.0, 1.5, n)),
        "colorfulness": rng.gamma(3.0, 12.0, n),
        "aspect_ratio": size[:, 0] / size[:, 1],
        "site": np.array(SITES, dtype=object)[site],
        "camera": np.array(CAMERAS, dtype=object)[camera],
        "clutter": rng.poisson(1.5, n).astype(np.int32),
        "occluded": rng.random(n) < 0.12,
    }


def _difficulty(images: dict[str, np.ndarray]) -> np.ndarray:
    """Log-odds of a mistake per image, before the model's own skill."""
    return (2.5 * np.clip(0.35 - images["brightness"], 0, None) / 0.35
            + 0.04 * images["noise"] + 0.9 * images["occluded"] + 0.15 * images["clutter"])


def _classification_models(rng: np.random.Generator, images: dict[str, np.ndarray], truth: np.ndarray,
                           n_classes: int) -> tuple[pa.Table, pa.Table]:
    n = len(truth)
    difficulty = _difficulty(images)
    dark = np.clip(0.35 - images["brightness"], 0, None) / 0.35
    predictions, outcomes = [], []
    for index, (model_id, _) in enumerate(MODELS):
        # The candidate standardises exposure: most of the dark-image penalty goes away.
        logit = -2.6 + difficulty - (index * 2.0 * dark) + rng.normal(0, 0.3, n)
        correct = rng.random(n) >= _sigmoid(logit)
        pred = np.where(correct, truth, (truth + rng.integers(1, n_classes, n)) % n_classes).astype(np.int32)
        # The predicted class keeps at least half the mass, so it is always the argmax.
        score = np.where(correct, 0.5 + 0.5 * rng.beta(5, 2, n), 0.5 + 0.5 * rng.beta(2, 4, n)).astype(np.float32)
        rest = rng.random((n, n_classes)).astype(np.float32)
        rest[np.arange(n), pred] = 0.0
        probs = rest * ((1.0 - score) / rest.sum(axis=1))[:, None]
        probs[np.arange(n), pred] = score
        model = pa.array(np.full(n, model_id, dtype=object), type=pa.string())
        predictions.append(pa.table({
            "model_id": model, "image_id": images["image_id"],
            "probs": list_array(probs.reshape(-1), np.arange(n + 1) * n_classes, pa.float32()),
            "pred_label": pred, "score": score}))
        outcomes.append(pa.table({"model_id": model, "image_id": images["image_id"], "correct": correct}))
    return pa.concat_tables(predictions), pa.concat_tables(outcomes)


def _boxes(rng: np.random.Generator, image: np.ndarray, width: np.ndarray, height: np.ndarray,
           side: np.ndarray) -> np.ndarray:
    """xyxy boxes of roughly ``side`` px (aspect 0.5..2) inside each row's image."""
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), len(image)))
    w = np.minimum(side * np.sqrt(aspect), width[image] - 1.0)
    h = np.minimum(side / np.sqrt(aspect), height[image] - 1.0)
    x0 = rng.random(len(image)) * (width[image] - w)
    y0 = rng.random(len(image)) * (height[image] - h)
    return np.column_stack([x0, y0, x0 + w, y0 + h])


def _gt_table(rng: np.random.Generator, images: dict[str, np.ndarray], n_classes: int) -> pd.DataFrame:
    n = len(images["image_id"])
    per_image = np.clip(rng.poisson(4.0, n), 1, 12)
    owner = np.repeat(np.arange(n, dtype=np.int32), per_image)
    # Sizes log-uniform from 8 to 400 px: COCO small, medium and large all occur.
    side = np.exp(rng.uniform(np.log(8.0), np.log(400.0), len(owner)))
    box = _boxes(rng, owner, images["width"], images["height"], side)
    frame = pd.DataFrame({"image_id": owner, "gt_id": np.arange(len(owner), dtype=np.int32),
                          "class_id": rng.integers(0, n_classes, len(owner)).astype(np.int32),
                          "xmin": box[:, 0], "ymin": box[:, 1], "xmax": box[:, 2], "ymax": box[:, 3]})
    frame["area"] = (frame["xmax"] - frame["xmin"]) * (frame["ymax"] - frame["ymin"])
    frame["iscrowd"] = rng.random(len(owner)) < 0.005
    return frame


def _detections(rng: np.random.Generator, images: dict[str, np.ndarray], gt: pd.DataFrame,
                images_range: tuple[int, int], index: int, dets_per_image: int, n_classes: int,
                first_det_id: int) -> pd.DataFrame:
    """``dets_per_image`` detections for each image in ``images_range``: jittered GTs (found,
    some mislabelled), then background boxes. ``gt`` holds that range's GT rows."""
    lo, hi = images_range
    owner = gt["image_id"].to_numpy()
    gt_box = gt[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
    side = np.sqrt(gt["area"].to_numpy())
    dark = np.clip(0.35 - images["brightness"], 0, None) / 0.35
    logit = (1.8 - 1.0 * _difficulty(images)[owner] + 0.6 * np.log(side / 32.0)
             + index * 1.2 * dark[owner])
    found = (rng.random(len(owner)) < _sigmoid(logit)) & ~gt["iscrowd"].to_numpy()
    # At most dets_per_image hits per image (GT rows are grouped by image).
    first = np.searchsorted(owner, owner)
    found &= (np.cumsum(found) - np.r_[0, np.cumsum(found)][first]) <= dets_per_image
    hit_owner, hit_box, hit_side = owner[found], gt_box[found], side[found]
    jitter = rng.normal(0, 0.08, (len(hit_owner), 4)) * hit_side[:, None]
    box = hit_box + jitter
    box[:, 2:] = np.maximum(box[:, 2:], box[:, :2] + 1.0)
    label = gt["class_id"].to_numpy()[found]
    wrong = rng.random(len(label)) < 0.08
    label = np.where(wrong, (label + rng.integers(1, n_classes, len(label))) % n_classes, label)
    hit_score = np.clip(rng.beta(6, 2, len(label)), 0.01, 0.999)

    n_background = dets_per_image - np.bincount(hit_owner - lo, minlength=hi - lo)
    bg_owner = lo + np.repeat(np.arange(hi - lo, dtype=np.int32), n_background)
    bg_box = _boxes(rng, bg_owner, images["width"], images["height"],
                    np.exp(rng.uniform(np.log(8.0), np.log(200.0), len(bg_owner))))
    frame = pd.DataFrame({
        "image_id": np.r_[hit_owner, bg_owner].astype(np.int32),
        "class_id": np.r_[label, rng.integers(0, n_classes, len(bg_owner))].astype(np.int32),
        "score": np.r_[hit_score, np.clip(rng.beta(1.5, 6, len(bg_owner)), 0.001, 0.999)],
        "xmin": np.r_[box[:, 0], bg_box[:, 0]], "ymin": np.r_[box[:, 1], bg_box[:, 1]],
        "xmax": np.r_[box[:, 2], bg_box[:, 2]], "ymax": np.r_[box[:, 3], bg_box[:, 3]],
    })
    frame = frame.sort_values("image_id", kind="stable").reset_index(drop=True)
    frame.insert(1, "det_id", np.arange(first_det_id, first_det_id + len(frame), dtype=np.int32))
    frame["area"] = (frame["xmax"] - frame["xmin"]) * (frame["ymax"] - frame["ymin"])
    return frame


def _with_model(frame: pd.DataFrame, model_id: str) -> pa.Table:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table.add_column(0, "model_id", pa.array(np.full(len(table), model_id, dtype=object), type=pa.string()))


def _present_classes(gt: pd.DataFrame, n: int) -> pa.ListArray:
    """Distinct GT classes per image, as ``images.true_label`` of a detection store."""
    pairs = np.unique(gt["image_id"].to_numpy().astype(np.int64) * 1_000_000 + gt["class_id"].to_numpy())
    owner = pairs // 1_000_000
    offsets = np.r_[0, np.cumsum(np.bincount(owner, minlength=n))]
    return list_array((pairs % 1_000_000).astype(np.int32), offsets, pa.int32())


def _detection_tables(seed: int, images: dict[str, np.ndarray], gt: pd.DataFrame, dets_per_image: int,
                      n_classes: int, staging: StagedTables, chunk_images: int, step: Progress) -> None:
    """Detections and matches of every model, chunk by chunk into ``staging``.

    Each (model, chunk) draws from its own generator seeded by ``(seed, model,
    chunk)``: the same seed and chunk size give the same detections.
    """
    n = len(images["image_id"])
    gt_images = gt["image_id"].to_numpy()
    for index, (model_id, _) in enumerate(MODELS):
        first_det_id = 0
        for chunk, lo in enumerate(range(0, n, chunk_images)):
            hi = min(n, lo + chunk_images)
            step(f"detections and matching {model_id}", lo, n)
            gt_rows = gt.iloc[slice(*np.searchsorted(gt_images, [lo, hi]))]
            dets = _detections(np.random.default_rng([seed, index, chunk]), images, gt_rows, (lo, hi),
                               index, dets_per_image, n_classes, first_det_id)
            first_det_id += len(dets)
            det_matches, gt_matches = match_detections(gt_rows, dets)
            staging.add("det_boxes", _with_model(dets, model_id))
            staging.add("det_matches", _with_model(det_matches, model_id))
            staging.add("gt_matches", _with_model(gt_matches, model_id))


def build_synthetic_store(out_path: str | Path, *, task: str = "multiclass", n_images: int,
                          dets_per_image: int = 10, seed: int = 0, chunk_images: int = MATCH_CHUNK_IMAGES,
                          progress: Progress | None = None) -> Path:
    """Write a synthetic store of ``n_images`` images; returns the base file's path.

    ``task``: ``multiclass`` (two models' predictions and outcomes) or
    ``detection`` (GT boxes, ``dets_per_image`` detections per image for each
    of two models, and their matches, computed ``chunk_images`` images at a time).
    """
    if task not in TASKS:
        raise IngestError(f"unknown synthetic task {task!r}", field="task", choices=list(TASKS))
    if isinstance(n_images, bool) or int(n_images) != n_images or n_images < 1:
        raise IngestError(f"need at least one image, got {n_images!r}", field="images")
    if isinstance(chunk_images, bool) or int(chunk_images) != chunk_images or chunk_images < 1:
        raise IngestError(f"chunk size must be a positive integer, got {chunk_images!r}", field="chunk_images")
    if isinstance(dets_per_image, bool) or int(dets_per_image) != dets_per_image or dets_per_image < 1:
        raise IngestError(f"need at least one detection per image, got {dets_per_image!r}",
                          field="dets_per_image")
    n_images, dets_per_image = int(n_images), int(dets_per_image)

    def step(stage: str, done: int = 0, total: int = 1) -> None:
        if progress:
            progress(stage, done, total)

    paths = StorePaths.of(out_path)
    picture_dir = paths.folder / f"{paths.name}.images"
    picture_dir.mkdir(parents=True, exist_ok=True)
    picture = picture_dir / "shared.jpg"
    picture.write_bytes(shared_jpeg(256))
    thumbnail = shared_jpeg(32)
    rng = np.random.default_rng(seed)
    n_classes = len(CLASSES)

    step("images")
    images = image_table(rng, n_images, str(picture.resolve()))
    tables: dict[str, pa.Table | pa.RecordBatchReader] = {}
    staging = staging_folder(paths.base, "synthetic")
    try:
        if task == "multiclass":
            truth = rng.integers(0, n_classes, n_images).astype(np.int32)
            step("predictions")
            tables["predictions"], tables["outcomes"] = _classification_models(rng, images, truth, n_classes)
            true_label: pa.Array | np.ndarray = truth
        else:
            step("ground truth")
            gt = _gt_table(rng, images, n_classes)
            tables["gt_boxes"] = pa.Table.from_pandas(gt, preserve_index=False)
            true_label = _present_classes(gt, n_images)
            _detection_tables(seed, images, gt, dets_per_image, n_classes, staging, chunk_images, step)
            # Streamed into the base file by file, never all in Python's memory.
            tables["det_boxes"] = staging.reader("det_boxes")
            tables["det_matches"] = staging.reader("det_matches", order_key_transform(staging))
            tables["gt_matches"] = staging.reader("gt_matches")
        columns = {"image_id": images["image_id"], "uri": pa.array(images["uri"], type=pa.string()),
                   "width": images["width"], "height": images["height"], "true_label": true_label}
        columns.update({k: v for k, v in images.items() if k not in columns})
        tables["images"] = pa.table(columns)
        sample = tables["images"].slice(0, min(n_images, 1000)).to_pandas()
        tables["columns"] = pa.Table.from_pandas(column_catalog(sample, set(USER_COLUMNS), task),
                                                 preserve_index=False)
        tables["thumbnails"] = pa.table({"image_id": images["image_id"],
                                         "jpeg": pa.array([thumbnail] * n_images, type=pa.binary())})
        tables["models"] = pa.table({
            "model_id": [m for m, _ in MODELS], "name": [name for _, name in MODELS],
            "task": [task] * len(MODELS),
            "params": [json.dumps({"synthetic": True, "seed": seed}) for _ in MODELS]})
        meta = {"task": task, "classes": CLASSES, "name": paths.name, "synthetic_seed": seed,
                "score_threshold": 0.5}
        step("writing")
        built = build_base(paths.base, tables, meta)
        if task == "detection":
            step("evaluating")
            store_evaluations(built.base)
    finally:
        staging.remove()
    return built.base


def synthetic_main(argv: list[str] | None = None) -> int:
    """``visionlens synthetic --images N [--task T] [--dets-per-image K] --out STORE``."""
    parser = argparse.ArgumentParser(prog="visionlens synthetic",
                                     description="build a synthetic store of any size (scale tests)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--task", choices=TASKS, default="multiclass")
    parser.add_argument("--dets-per-image", type=int, default=10, help="detections per image and model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="store path, e.g. data/synthetic-1m.duckdb")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    last = [""]

    def report(stage: str, done: int, total: int) -> None:
        if stage != last[0]:
            print(f"[{time.perf_counter() - started:6.1f}s] {stage}", flush=True)
            last[0] = stage

    path = build_synthetic_store(args.out, task=args.task, n_images=args.images,
                                 dets_per_image=args.dets_per_image, seed=args.seed, progress=report)
    size = path.stat().st_size
    print(f"built {path} ({args.images} images, {size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f}s")
    return 0
