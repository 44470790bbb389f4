"""Compute explanations for a store's images and add them as Parquet parts.

Work is (model, method, image, target); pairs already in ``explanations`` are skipped, so
an interrupted run resumes where it stopped. Images are loaded ``batch_size`` at a time at
the model's input size and explained together on the chosen device: one image first, then as
many as take about ``BATCH_SECONDS`` (a slow method on a slow model shows progress within
seconds). Rows are written every ``FLUSH_ROWS`` maps or ``FLUSH_SECONDS``, and when the run
ends or fails: the app shows maps while the run goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ..errors import ExplainError, IngestError, VisionLensError
from ..models import device_for, image_tensor, load_model
from ..store import Store, write_part
from .common import CLASSIFICATION_TASKS
from .methods import METHODS, method_for, resolve_params, run_method
from .storage import explanation_rows, stored_keys

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Targets = str | Sequence[int]
FLUSH_ROWS = 256
FLUSH_SECONDS = 20.0
BATCH_SECONDS = 10.0
BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax", "class_id"]


def precompute(store_path: str | os.PathLike, methods: Sequence[str], *, model_id: str | None = None,
               image_ids: Sequence[int] | None = None, targets: Targets = "pred", top_k: int = 1,
               device: str | None = None, batch_size: int = 16, params: dict | None = None,
               progress: Progress | None = None) -> int:
    """Explain images with each method for each runnable model; returns rows written.

    ``targets``: ``'pred'`` (the ``top_k`` most probable classes / labels; for detection the
    ``top_k`` highest-scored detections at or above the store's score threshold),
    ``'true'`` (the true class, or every true label; not for detection), or a list of
    class ids (detection: det ids). ``params`` maps a method name to its parameter
    overrides. ``device``: ``'cpu'``, ``'cuda'``, or None for cuda when present.
    """
    store = Store(store_path)
    task = store.task
    entries = [method_for(m, task) for m in methods]
    if not entries:
        raise ExplainError("no explanation method given", field="methods", choices=list(METHODS))
    params = params or {}
    stray = sorted(set(params) - {e.name for e in entries})
    if stray:
        raise ExplainError(f"parameters given for {stray[0]!r}, which is not being computed",
                           field="params", choices=[e.name for e in entries])
    resolved = {e.name: resolve_params(e, params.get(e.name)) for e in entries}
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ExplainError(f"top_k must be an integer >= 1, got {top_k!r}", field="top_k")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExplainError(f"batch_size must be an integer >= 1, got {batch_size!r}", field="batch_size")
    models = _runnable_models(store, model_id)
    images = _images(store, image_ids)
    dev = _device(device)

    plans = []
    for _, model_row in models.iterrows():
        wanted = _targets(store, task, model_row["model_id"], images, targets, top_k)
        for entry in entries:
            done = stored_keys(store, model_row["model_id"], entry.name)
            todo = wanted.merge(done.assign(stored=True), on=["image_id", "target"], how="left")
            todo = todo[todo["stored"].isna()].drop(columns="stored")
            skipped = len(wanted) - len(todo)
            if skipped:
                log.info("%s/%s: %d maps already stored, skipped", model_row["model_id"], entry.name,
                         skipped)
            if len(todo):
                plans.append((model_row, entry, todo))
    total = sum(len(todo) for _, _, todo in plans)
    if progress:
        progress(0, total)
    writer = _PartWriter(store.paths.base)
    done_count = 0
    loaded: dict[str, torch.nn.Module] = {}
    try:
        for model_row, entry, todo in plans:
            model_params = json.loads(model_row["params"])
            key = model_row["model_id"]
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = _load(key, model_params).to(dev)
            input_size = model_params.get("input_size")
            pace = _Pace(batch_size)
            for batch in _batches(todo.merge(images, on="image_id"), input_size, pace):
                started = time.perf_counter()
                writer.add(_explain_batch(loaded[key], key, entry.name, task, batch, input_size,
                                          resolved[entry.name], dev))
                pace.record(batch["image_id"].nunique(), time.perf_counter() - started)
                done_count += len(batch)
                if progress:
                    progress(done_count, total)
    finally:
        writer.flush()
    return writer.written


def planned_maps(store_path: str | os.PathLike, methods: Sequence[str], *, model_id: str | None = None,
                 image_ids: Sequence[int] | None = None, targets: Targets = "pred",
                 top_k: int = 1) -> pd.DataFrame:
    """The maps ``precompute`` with these arguments covers, computing nothing.

    One row per (model_id, method, image_id, target), with ``stored`` True for the maps
    already in the store: what a resumed run would skip.
    """
    store = Store(store_path)
    try:
        entries = [method_for(m, store.task) for m in methods]
        if not entries:
            raise ExplainError("no explanation method given", field="methods", choices=list(METHODS))
        images = _images(store, image_ids)
        frames = []
        for model in _runnable_models(store, model_id)["model_id"]:
            wanted = _targets(store, store.task, model, images, targets, top_k)[["image_id", "target"]]
            wanted = wanted.astype(np.int64)
            for entry in entries:
                done = stored_keys(store, model, entry.name).astype(np.int64).assign(stored=True)
                keys = wanted.merge(done, on=["image_id", "target"], how="left")
                frames.append(pd.DataFrame({
                    "model_id": model, "method": entry.name, "image_id": keys["image_id"],
                    "target": keys["target"], "stored": keys["stored"].notna().to_numpy()}))
    finally:
        store.close()
    columns = ["model_id", "method", "image_id", "target", "stored"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _explain_batch(model: torch.nn.Module, model_id: str, method: str, task: str,
                   batch: pd.DataFrame, input_size: Sequence[int] | None, params: dict,
                   device: torch.device) -> pa.Table:
    order = batch.drop_duplicates("image_id")
    x = image_tensor(list(order["uri"]), tuple(input_size) if input_size else None).to(device)
    groups = [batch[batch["image_id"] == image_id] for image_id in order["image_id"]]
    if task in CLASSIFICATION_TASKS:
        per_image = [g["target"].to_numpy(np.int64) for g in groups]
    else:
        # Stored boxes are in image pixels; the detector sees the image at input size.
        per_image = []
        for g in groups:
            boxes = g[BOX_COLUMNS].to_numpy(np.float64)
            boxes[:, [0, 2]] *= x.shape[3] / g["width"].to_numpy(np.float64)[:, None]
            boxes[:, [1, 3]] *= x.shape[2] / g["height"].to_numpy(np.float64)[:, None]
            per_image.append(boxes)
    maps = run_method(model, x, method, per_image, task, params)
    record = {**params, "input_size": [int(x.shape[2]), int(x.shape[3])]}
    return explanation_rows(model_id, np.concatenate([g["image_id"].to_numpy() for g in groups]),
                            method, np.concatenate([g["target"].to_numpy() for g in groups]),
                            np.concatenate(maps), record)


class _Pace:
    """Images per batch: one at first, then as many as take about ``BATCH_SECONDS`` at the pace measured so
    far, at most ``most`` (an image's map does not depend on its batch)."""

    def __init__(self, most: int):
        self.most, self.size = most, 1

    def record(self, images: int, seconds: float) -> None:
        per_image = max(seconds / max(images, 1), 1e-6)
        self.size = int(min(self.most, max(1, round(BATCH_SECONDS / per_image))))


class _PartWriter:
    """Collects rows and writes them as one part per ``FLUSH_ROWS`` maps or ``FLUSH_SECONDS``."""

    def __init__(self, store_path: os.PathLike):
        self.store_path, self.pending, self.written = store_path, [], 0
        self.flushed_at = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= FLUSH_ROWS or \
                time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.flushed_at = time.monotonic()
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        write_part(self.store_path, "explanations", table)
        self.written += table.num_rows
        self.pending = []


def _load(model_id: str, params: dict) -> torch.nn.Module:
    try:
        return load_model(params)
    except VisionLensError:
        raise
    except Exception as exc:  # a user's loader can fail in any way: say which model
        raise ExplainError(f"model {model_id!r} could not be loaded: {exc}", field="model") from exc


def _device(name: str | None) -> torch.device:
    try:
        return device_for(name)
    except IngestError as exc:
        raise ExplainError(exc.message, field="device") from exc


def _runnable_models(store: Store, model_id: str | None) -> pd.DataFrame:
    models = store.models()
    runnable = models[[bool(json.loads(p or "{}").get("loader")) for p in models["params"]]]
    if model_id is not None:
        if model_id not in set(models["model_id"]):
            raise ExplainError(f"no model {model_id!r} in this store", field="model",
                               choices=list(models["model_id"]))
        if model_id not in set(runnable["model_id"]):
            raise ExplainError(f"model {model_id!r} was stored from a predictions file and has no "
                               "loader, so it cannot be re-run to explain it", field="model")
        return runnable[runnable["model_id"] == model_id]
    if runnable.empty:
        raise ExplainError("no model in this store has a loader (module:function) to re-run it",
                           field="model", choices=list(models["model_id"]))
    return runnable


def _images(store: Store, image_ids: Sequence[int] | None) -> pd.DataFrame:
    images = store.query('SELECT image_id, uri, width, height FROM "images" ORDER BY image_id')
    if image_ids is None:
        return images
    wanted = pd.Index(np.asarray(image_ids, dtype=np.int64))
    unknown = wanted.difference(images["image_id"].astype(np.int64))
    if len(unknown):
        raise ExplainError(f"{len(unknown)} image ids are not in the store, e.g. {int(unknown[0])}",
                           field="image_ids")
    return images[images["image_id"].isin(wanted)]


def _targets(store: Store, task: str, model_id: str, images: pd.DataFrame, targets: Targets,
             top_k: int) -> pd.DataFrame:
    """(image_id, target) to explain, with box columns for detection."""
    ids = images["image_id"]
    if task == "detection":
        return _detection_targets(store, model_id, ids, targets, top_k)
    if isinstance(targets, str) and targets == "pred":
        table = store.arrow('SELECT image_id, probs FROM "predictions" WHERE model_id = ? '
                            "ORDER BY image_id", [model_id])
        frame = pd.DataFrame({"image_id": table["image_id"].to_numpy()})
        keep = frame["image_id"].isin(ids).to_numpy()
        if not keep.any():
            return pd.DataFrame({"image_id": pd.Series(dtype=np.int64), "target": pd.Series(dtype=np.int64)})
        probs = table["probs"].combine_chunks()
        n_classes = len(probs[0])
        matrix = probs.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_classes)[keep]
        k = min(top_k, n_classes)
        best = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
        missing = len(ids) - int(keep.sum())
        if missing:
            log.warning("%s: %d images have no predictions and are not explained", model_id, missing)
        return pd.DataFrame({"image_id": np.repeat(frame["image_id"].to_numpy()[keep], k),
                             "target": best.reshape(-1)})
    if isinstance(targets, str) and targets == "true":
        truth = store.query('SELECT image_id, true_label FROM "images" ORDER BY image_id')
        truth = truth[truth["image_id"].isin(ids)].explode("true_label").dropna()
        return pd.DataFrame({"image_id": truth["image_id"].to_numpy(np.int64),
                             "target": truth["true_label"].to_numpy(np.int64)})
    chosen = _id_list(targets)
    n_classes = len(store.classes)
    bad = [c for c in chosen if not 0 <= c < n_classes]
    if bad:
        raise ExplainError(f"class id {bad[0]} is not one of the store's {n_classes} classes",
                           field="targets")
    return pd.DataFrame({"image_id": np.repeat(ids.to_numpy(np.int64), len(chosen)),
                         "target": np.tile(chosen, len(ids))})


def _detection_targets(store: Store, model_id: str, ids: pd.Series, targets: Targets,
                       top_k: int) -> pd.DataFrame:
    columns = "image_id, det_id AS target, xmin, ymin, xmax, ymax, class_id"
    if isinstance(targets, str) and targets == "pred":
        threshold = float(store.meta().get("score_threshold", 0.5))
        boxes = store.query(
            f"SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY image_id "
            "ORDER BY score DESC, det_id) AS rank FROM \"det_boxes\" WHERE model_id = ? AND score >= ?) "
            "WHERE rank <= ? ORDER BY image_id, rank", [model_id, threshold, top_k])
    elif isinstance(targets, str):
        raise ExplainError(f"targets {targets!r} does not apply to detection: explain predicted "
                           "boxes ('pred') or give det ids", field="targets", choices=["pred"])
    else:
        chosen = _id_list(targets)
        boxes = store.query(f'SELECT {columns} FROM "det_boxes" WHERE model_id = ? '
                            "AND list_contains(?, det_id) ORDER BY image_id, det_id", [model_id, chosen])
        unknown = sorted(set(chosen) - set(boxes["target"].astype(int)))
        if unknown:
            raise ExplainError(f"model {model_id!r} has no detection with det_id {unknown[0]}",
                               field="targets")
    return boxes[boxes["image_id"].isin(ids)].reset_index(drop=True)


def _id_list(targets: Targets) -> list[int]:
    if isinstance(targets, str):
        raise ExplainError(f"unknown targets {targets!r}", field="targets", choices=["pred", "true"])
    chosen = [int(t) for t in targets]
    if not chosen:
        raise ExplainError("the list of targets is empty", field="targets")
    return chosen


def _batches(todo: pd.DataFrame, input_size: Sequence[int] | None, pace: _Pace):
    """Rows of ``pace.size`` images each (read as each batch starts); without an input size, images of one
    size together."""
    sizes = [None] if input_size else sorted(set(zip(todo["height"], todo["width"])))
    for size in sizes:
        rows = todo if size is None else todo[(todo["height"] == size[0]) & (todo["width"] == size[1])]
        image_ids = rows["image_id"].drop_duplicates().to_numpy()
        start = 0
        while start < len(image_ids):
            part = image_ids[start:start + pace.size]
            start += len(part)
            yield rows[rows["image_id"].isin(part)]


# --------------------------------------------------------------------------- CLI


def _parse_targets(text: str) -> Targets:
    if text in ("pred", "true"):
        return text
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ExplainError(f"--targets must be pred, true or comma-separated ids, got {text!r}",
                           field="targets") from exc


def precompute_main(argv: list[str] | None = None) -> int:
    """``visionlens precompute STORE --explain METHODS [--cohort QUERY] [--model M] ...``."""
    parser = argparse.ArgumentParser(prog="visionlens precompute",
                                     description="compute explanations into a store")
    parser.add_argument("store", help="path to NAME.duckdb")
    parser.add_argument("--explain", required=True,
                        help=f"comma-separated methods: {' '.join(METHODS)}")
    parser.add_argument("--cohort", help="cohort query string: explain only its images")
    parser.add_argument("--model", help="model id (default: the cohort's model, else every model "
                                        "with a loader)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--limit", type=int, help="explain at most the first N images")
    parser.add_argument("--targets", default="pred",
                        help="pred (default), true, or comma-separated class / det ids")
    parser.add_argument("--top-k", type=int, default=1, help="predicted classes or boxes per image")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--params", default="{}",
                        help='JSON per method, e.g. \'{"ig": {"n_steps": 32}}\'')
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.explain.split(",") if m.strip()]
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise ExplainError(f"--params is not valid JSON: {exc}", field="params") from exc
    if not isinstance(params, dict):
        raise ExplainError("--params must be a JSON object of method → parameters", field="params")
    store = Store(args.store)
    model_id, image_ids = args.model, None
    if args.cohort:
        image_ids, model_id = _cohort_images(store, args.cohort, args.model)
    if args.limit is not None:
        if args.limit < 0:
            raise ExplainError("--limit must be >= 0", field="limit")
        if image_ids is None:
            image_ids = store.query('SELECT image_id FROM "images" ORDER BY image_id')["image_id"]
        image_ids = sorted(int(i) for i in image_ids)[:args.limit]

    from tqdm.auto import tqdm

    with tqdm(total=0, unit="map", desc="explanations") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        written = precompute(args.store, methods, model_id=model_id, image_ids=image_ids,
                             targets=_parse_targets(args.targets), top_k=args.top_k,
                             device=args.device, batch_size=args.batch_size, params=params,
                             progress=progress)
    print(f"wrote {written} explanation rows to {store.paths.base}")
    return 0


def _cohort_images(store: Store, query: str, model_id: str | None) -> tuple[list[int], str | None]:
    """The cohort's image ids and the model it names (``--model``, else the query's ``model``).

    Membership that depends on a model (outcome, pred_label) uses that model, else the
    store's first, as ``visionlens cohort`` does.
    """
    from ..cohorts import catalog_of, compile_cohort, parse_query

    catalog = catalog_of(store)
    parsed = parse_query(query, catalog)
    named = model_id or parsed.view.model
    judged_by = named or (catalog.models[0] if catalog.models else None)
    selection = compile_cohort(parsed.cohort, store, model_id=judged_by, catalog=catalog,
                               **parsed.view.thresholds(catalog))
    return [int(i) for i in store.query(*selection)["image_id"]], named
