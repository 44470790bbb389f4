"""Partitioned precompute: metadata, inference and matching over image ranges, on Ray or processes.

``plan_store(out, dataset, models)`` writes a store whose images are still
pending: the validated dataset rows (table ``pending_images``), the ground
truth, the models (each with a re-runnable ``loader`` in its params) and the
catalog of user columns; nothing heavy. ``precompute(store, steps, engine=)``
then does the heavy work in partitions of consecutive image ids:

- ``metadata``: decode every image, compute quality metadata and a
  thumbnail (``core.metadata.compute_metadata``) → ``images``,
  ``thumbnails`` and the auto columns' ``columns`` rows;
- ``inference``: run each model that has no outputs yet
  (``core.models.predict_classifier`` / ``predict_detector``) →
  ``predictions`` + ``outcomes``, or ``det_boxes``;
- ``matching``: COCO matching of each detection model without matches
  (``core.matching.match_detections``, per image, so partitions are
  independent) → ``det_matches``, ``gt_matches``;
- ``evaluation``: each detection model's COCO evaluation on every image, in the
  driver (``core.metrics.detection.store_evaluations``) → ``evaluations``;
- ``explanations`` (when methods are given): ``core.explain.precompute`` over
  the partition's images, each runnable model's predicted class (detection:
  its top detection) → ``explanations``. These rows go straight into store
  parts from the workers (``write_part`` serialises writers) and maps already
  stored are skipped, so an interrupted step resumes.

Each partition is one task: a worker (a Ray Data actor, a process of a
``concurrent.futures`` pool, or the calling process) reads its rows through
``core.store.Store``, computes, and writes its result as Parquet files into a
private staging folder beside the store. The driver then turns the staged
files into store parts (``core.store.write_part``), in image order, adding
what only the whole set knows: detection ids numbered across partitions and
``det_matches.order_key`` (the pycocotools accumulate order over all of a
model's detections). The result equals ``core.ingest.build.build_store`` on
the same inputs, table for table; the app reads it at its next rerun.

With ``engine="ray"`` the partitions go through ``ray.data`` ``map_batches``
(one GPU per inference task when CUDA is available); Ray reuses its worker
processes, and each keeps its store open and its model loaded across the
partitions of a step, so a model loads once per process, not per partition.
On a cluster the store folder must be on a file system every node sees.
``engine="process"`` is the same pipeline on one machine without Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IngestError
from .ingest import build
from .ingest.build import Dataset, ModelRun, column_catalog, validate_boxes
from .metrics.detection import EVALUATION_ARRAYS, store_evaluations
from .store import Store, StorePaths, build_base, write_part

log = logging.getLogger(__name__)

STEPS = ("metadata", "inference", "matching", "evaluation", "explanations")
ENGINES = ("ray", "process", "serial")
PENDING_TABLE = "pending_images"
DEFAULT_PARTITION_IMAGES = 20_000
Progress = Callable[[str, int, int], None]
Transform = Callable[[int, pa.Table], pa.Table]


# --------------------------------------------------------------------------- staging


class StagedTables:
    """Partial tables as Parquet files in a private folder, read back in name order.

    Files are named ``<table>/<key>.parquet``; callers choose keys that sort in
    the order the rows must keep (zero-padded partition numbers).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def add(self, table: str, rows: pa.Table | pd.DataFrame, key: str | None = None) -> Path:
        if isinstance(rows, pd.DataFrame):
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        folder = self.folder / table
        folder.mkdir(parents=True, exist_ok=True)
        key = key if key is not None else f"{len(list(folder.glob('*.parquet'))):06d}"
        final = folder / f"{key}.parquet"
        tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.writing"
        pq.write_table(rows, tmp)
        os.replace(tmp, final)
        return final

    def files(self, table: str) -> list[Path]:
        return sorted((self.folder / table).glob("*.parquet"))

    def tables(self, table: str, transform: Transform | None = None) -> Iterator[pa.Table]:
        """``table``'s staged files one by one (``transform(file_index, rows)`` applied)."""
        for index, path in enumerate(self.files(table)):
            rows = pq.read_table(path)
            yield transform(index, rows) if transform else rows

    def reader(self, table: str, transform: Transform | None = None) -> pa.RecordBatchReader:
        """All of ``table``'s rows as one stream with the first file's schema."""
        tables = self.tables(table, transform)
        first = next(tables, None)
        if first is None:
            raise IngestError(f"nothing staged for table {table!r}", field=table)

        def batches() -> Iterator[pa.RecordBatch]:
            yield from first.to_batches()
            for rows in tables:
                yield from rows.cast(first.schema).to_batches()

        return pa.RecordBatchReader.from_batches(first.schema, batches())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def staging_folder(store_path: str | os.PathLike, purpose: str) -> StagedTables:
    """A fresh staging folder beside the store (hidden; never read as parts)."""
    paths = StorePaths.of(store_path)
    return StagedTables(paths.folder / f".{paths.name}.{purpose}-{uuid.uuid4().hex[:8]}")


def global_order_key(class_id: np.ndarray, score: np.ndarray, image_id: np.ndarray,
                     rank: np.ndarray) -> np.ndarray:
    """``det_matches.order_key`` over all of one model's detections: the position in
    pycocotools' accumulate order (class, score descending, image id, rank).

    Matching is per image, so partitions can be matched apart; only this key
    spans images and is recomputed once all partitions are in.
    """
    order = np.lexsort((rank, image_id, -np.asarray(score, dtype=np.float64), class_id))
    key = np.empty(len(order), np.int64)
    key[order] = np.arange(len(order))
    return key


def order_key_transform(staged: StagedTables) -> Transform:
    """For staged ``det_matches`` (one model per file): sets ``order_key`` computed per model
    over all files (use with ``StagedTables.tables`` / ``reader``)."""
    files = staged.files("det_matches")
    needed = ["model_id", "class_id", "score", "image_id", "rank"]
    parts = [pq.read_table(f, columns=needed) for f in files]
    keys: list[np.ndarray] = [np.zeros(0, np.int64)] * len(parts)
    models = [p["model_id"][0].as_py() if len(p) else None for p in parts]
    for model in dict.fromkeys(m for m in models if m is not None):
        mine = [i for i, m in enumerate(models) if m == model]
        cols = pa.concat_tables([parts[i] for i in mine])
        key = global_order_key(cols["class_id"].to_numpy(), cols["score"].to_numpy(),
                               cols["image_id"].to_numpy(), cols["rank"].to_numpy())
        bounds = np.cumsum([0] + [len(parts[i]) for i in mine])
        for i, lo, hi in zip(mine, bounds[:-1], bounds[1:]):
            keys[i] = key[lo:hi]

    def with_key(index: int, rows: pa.Table) -> pa.Table:
        position = rows.schema.get_field_index("order_key")
        return rows.set_column(position, "order_key", pa.array(keys[index], type=pa.int64()))

    return with_key


# --------------------------------------------------------------------------- planning


def plan_store(out_path: str | os.PathLike, dataset: Dataset, models: Sequence[ModelRun], *,
               threshold: float | None = None) -> Path:
    """A store whose heavy work is still to do: run ``precompute`` on it next.

    ``models`` carry ``params`` with a ``loader`` (see ``core.models.load_model``)
    and no outputs. Inputs are checked as ``build_store`` checks them.
    """
    build._validate_images(dataset)
    task, n_classes = dataset.task, len(dataset.classes)
    seen: set[str] = set()
    for run in models:
        if run.model_id in seen:
            raise IngestError(f"model id {run.model_id!r} given twice", field="model_id")
        seen.add(run.model_id)
        if not run.params.get("loader"):
            raise IngestError(f"model {run.model_id!r} has no loader to run it with", field="loader")
        if run.predictions is not None or run.det_boxes is not None:
            raise IngestError(f"model {run.model_id!r} already has outputs; use build_store",
                              field="model_id")
    images = dataset.images.reset_index(drop=True).copy()
    id_map = {int(old): new for new, old in enumerate(images["image_id"].tolist())}
    images["image_id"] = np.arange(len(images), dtype=np.int32)
    tables: dict[str, pd.DataFrame | pa.Table] = {}
    if task == "detection":
        gt = dataset.gt_boxes if dataset.gt_boxes is not None else pd.DataFrame(
            columns=["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax"])
        gt = validate_boxes(gt.copy(), n_classes, what="ground-truth boxes", id_col="gt_id", scored=False)
        gt["iscrowd"] = gt["iscrowd"].fillna(False).astype(bool) if "iscrowd" in gt.columns else False
        build._check_prediction_ids(gt, set(id_map), "ground truth", "box")
        gt = build._remap(gt, id_map)
        present = gt.groupby("image_id")["class_id"].agg(lambda s: np.unique(s.to_numpy()).astype(np.int32))
        images["true_label"] = [present.get(i, np.zeros(0, np.int32)) for i in images["image_id"]]
        tables["gt_boxes"] = gt[["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax", "area",
                                 "iscrowd"]]
    elif task == "multiclass":
        images["true_label"] = images["true_label"].astype(np.int32)
    else:
        images["true_label"] = [np.asarray(v if v is not None else [], dtype=np.int32)
                                for v in images["true_label"]]
    user_columns = set(images.columns) - {"image_id", "uri", "true_label"}
    tables[PENDING_TABLE] = images
    if task != "detection":
        # Empty, with exactly the columns inference will add for this task.
        label = ("pred_label", pa.int32()) if task == "multiclass" else ("pred_labels", pa.list_(pa.int32()))
        fields = [("model_id", pa.string()), ("image_id", pa.int32()), ("probs", pa.list_(pa.float32())), label]
        tables["predictions"] = pa.schema(fields + ([("score", pa.float32())] if task == "multiclass" else [])
                                          ).empty_table()
    tables["columns"] = column_catalog(images, user_columns, task)
    tables["models"] = build._models_rows(task, list(models))
    meta = {"task": task, "classes": list(dataset.classes), "name": dataset.name,
            "label_threshold" if task == "multilabel" else "score_threshold":
                0.5 if threshold is None else threshold,
            "user_columns": sorted(user_columns)}
    meta.update(dataset.extra_meta)
    return build_base(out_path, tables, meta).base


# --------------------------------------------------------------------------- partition workers


def _source_table(store: Store) -> str:
    """Where a store's image rows are: ``images`` once metadata is in, else the pending rows."""
    if store.has_table(PENDING_TABLE) and not store.scalar('SELECT count(*) FROM "images"'):
        return PENDING_TABLE
    return "images"


def _image_rows(store: Store, lo: int, hi: int, columns: str = "*") -> pd.DataFrame:
    table = _source_table(store)
    return store.query(f'SELECT {columns} FROM "{table}" WHERE image_id >= ? AND image_id < ? '
                       "ORDER BY image_id", [lo, hi])


def _key(task: dict) -> str:
    return f"{task.get('model_id') or '-'}--{int(task['lo']):010d}"


class _Worker:
    """Holds the store open for the tasks of one worker (actor, process or caller)."""

    def __init__(self, store_path: str, staging: str):
        self.store = Store(store_path)
        self.staged = StagedTables(staging)
        self.meta = self.store.meta()
        self.task = self.store.task
        self.n_classes = len(self.store.classes)


class MetadataWorker(_Worker):
    def __call__(self, task: dict) -> dict:
        from .metadata import compute_metadata

        rows = _image_rows(self.store, task["lo"], task["hi"])
        metadata, _ = compute_metadata(rows["uri"].tolist())
        metadata = metadata.reset_index(drop=True)
        thumbnails = pd.DataFrame({"image_id": rows["image_id"].to_numpy(np.int32),
                                   "jpeg": metadata["thumbnail"].to_numpy()})
        extra = metadata.drop(columns=["thumbnail"])
        images = pd.concat([rows.drop(columns=list(set(extra.columns) & set(rows.columns))), extra], axis=1)
        # As build_store: identifiers first; EXIF timestamps as ISO text.
        ordered = ["image_id", "uri", "width", "height", "true_label"]
        images = images[ordered + [c for c in images.columns if c not in ordered]]
        for name in images.columns:
            if pd.api.types.is_datetime64_any_dtype(images[name]):
                images[name] = images[name].dt.strftime("%Y-%m-%dT%H:%M:%S").astype(object)
        if self.task == "multilabel" or self.task == "detection":
            images["true_label"] = [np.asarray(v, dtype=np.int32) for v in images["true_label"]]
        key = _key(task)
        self.staged.add("images", images, key)
        self.staged.add("thumbnails", thumbnails, key)
        return {"key": key, "rows": len(images)}


class InferenceWorker(_Worker):
    def __init__(self, store_path: str, staging: str, model_id: str, device: str | None):
        super().__init__(store_path, staging)
        from .models import load_model

        models = self.store.models().set_index("model_id")
        self.model_id = model_id
        self.params = json.loads(models.loc[model_id, "params"])
        self.model = load_model(self.params)
        self.device = device
        self.threshold = float(self.meta.get("label_threshold", 0.5))

    def __call__(self, task: dict) -> dict:
        from .models import predict_classifier, predict_detector

        rows = _image_rows(self.store, task["lo"], task["hi"], "image_id, uri, true_label")
        ids = rows["image_id"].to_numpy(np.int32)
        size = tuple(self.params["input_size"]) if self.params.get("input_size") else None
        key = _key(task)
        if self.task == "detection":
            dets = predict_detector(self.model, rows["uri"].tolist(), ids, input_size=size, device=self.device)
            dets = validate_boxes(dets, self.n_classes, what=f"detections of {self.model_id!r}",
                                  id_col="det_id", scored=True)
            dets.insert(0, "model_id", self.model_id)
            self.staged.add("det_boxes", dets, key)
            return {"key": key, "rows": len(dets)}
        preds = predict_classifier(self.model, rows["uri"].tolist(), ids, task=self.task, input_size=size,
                                   threshold=self.threshold, device=self.device)
        if self.task == "multilabel":
            rows["true_label"] = [np.asarray(v, dtype=np.int32) for v in rows["true_label"]]
        run = ModelRun(self.model_id, self.model_id, self.params, predictions=preds)
        preds, outcomes = build._classification_rows(self.task, rows[["image_id", "true_label"]], run,
                                                      self.n_classes, self.threshold)
        self.staged.add("predictions", preds, key)
        self.staged.add("outcomes", outcomes, key)
        return {"key": key, "rows": len(preds)}


class MatchingWorker(_Worker):
    def __init__(self, store_path: str, staging: str, model_id: str):
        super().__init__(store_path, staging)
        self.model_id = model_id

    def __call__(self, task: dict) -> dict:
        from .matching import match_detections

        params = [task["lo"], task["hi"]]
        gt = self.store.query('SELECT * FROM "gt_boxes" WHERE image_id >= ? AND image_id < ? '
                              "ORDER BY gt_id", params)
        dets = self.store.query('SELECT * FROM "det_boxes" WHERE model_id = ? AND image_id >= ? '
                                "AND image_id < ? ORDER BY det_id", [self.model_id, *params])
        det_matches, gt_matches = match_detections(gt, dets)
        key = _key(task)
        for table, frame in (("det_matches", det_matches), ("gt_matches", gt_matches)):
            frame = frame.drop(columns=[c for c in ("model_id",) if c in frame.columns])
            frame.insert(0, "model_id", self.model_id)
            self.staged.add(table, frame, key)
        return {"key": key, "rows": len(det_matches)}


class ExplanationWorker(_Worker):
    def __init__(self, store_path: str, staging: str, methods: list[str], device: str | None):
        super().__init__(store_path, staging)
        self.store_path, self.methods, self.device = store_path, list(methods), device

    def __call__(self, task: dict) -> dict:
        from .explain.precompute import precompute as explain

        written = explain(self.store_path, self.methods, image_ids=range(task["lo"], task["hi"]),
                          device=self.device)
        return {"key": _key(task), "rows": written}




# --------------------------------------------------------------------------- engines


# The worker built in this process, by (class, arguments): a pool process (or a Ray
# worker process) keeps its store open and its model loaded across the tasks of a step,
# and holds one worker at a time (steps and models run one after another).
_WORKERS: dict[tuple, _Worker] = {}


def _call_worker(worker_cls: type, kwargs: dict, task: dict) -> dict:
    key = (worker_cls.__name__, json.dumps(kwargs, sort_keys=True))
    if key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[key] = worker_cls(**kwargs)
    worker = _WORKERS[key]
    worker.store.refresh()
    return worker(task)


def _ray_batch(batch: dict, worker_cls: type, kwargs: dict) -> dict:
    """A Ray Data ``map_batches`` function: one partition task per row. Ray reuses its worker
    processes across tasks and steps, so each imports torch and DuckDB once and keeps its
    worker (store, model) for the rest of the step."""
    tasks = pd.DataFrame(batch).to_dict("records")
    results = [_call_worker(worker_cls, kwargs, task) for task in tasks]
    return {"key": np.array([r["key"] for r in results]), "rows": np.array([r["rows"] for r in results])}


class _Engine:
    """Runs a step's partition tasks: in this process, on a process pool, or on Ray Data.

    One process pool serves every step of a ``precompute`` call, so each
    process imports torch and DuckDB once.
    """

    def __init__(self, name: str, workers: int):
        self.name, self.workers = name, workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Engine":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        _WORKERS.clear()

    def run(self, worker_cls: type, kwargs: dict, tasks: list[dict], *, gpu: bool = False) -> list[dict]:
        if not tasks:
            return []
        if self.name == "serial":
            return [_call_worker(worker_cls, kwargs, task) for task in tasks]
        if self.name == "process":
            if self._pool is None:
                # forkserver: torch and DuckDB threads of this process are never forked, and the
                # server imports the heavy modules once for every pool process.
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["core.distributed", "core.metadata", "core.models",
                                                "core.matching"])
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
            futures = [self._pool.submit(_call_worker, worker_cls, kwargs, task) for task in tasks]
            return [f.result() for f in futures]
        import ray.data

        results = ray.data.from_items(tasks).map_batches(
            _ray_batch, fn_kwargs={"worker_cls": worker_cls, "kwargs": kwargs},
            batch_size=1, concurrency=min(self.workers, len(tasks)), num_gpus=1 if gpu else 0,
            batch_format="numpy")
        return [{"key": str(r["key"]), "rows": int(r["rows"])} for r in results.take_all()]


# --------------------------------------------------------------------------- driver


@dataclass
class PrecomputeReport:
    """What ``precompute`` did: rows written per table, seconds per step."""

    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _partitions(n: int, size: int, model_id: str | None = None) -> list[dict]:
    return [{"model_id": model_id or "", "lo": lo, "hi": min(n, lo + size)} for lo in range(0, n, size)]


def _write_parts(store_path: str, table: str, staged: StagedTables, report: PrecomputeReport,
                 transform: Transform | None = None) -> None:
    """One store part per staged file (memory bounded by a partition), in staged order."""
    for rows in staged.tables(table, transform):
        write_part(store_path, table, rows)
        report.rows[table] = report.rows.get(table, 0) + len(rows)


def _models_needing(store: Store, step: str) -> list[str]:
    models = store.models()
    if step == "inference":
        table = "det_boxes" if store.task == "detection" else "predictions"
        done = set(store.query(f'SELECT DISTINCT model_id FROM "{table}"')["model_id"])
        runnable = [m for m, p in zip(models["model_id"], models["params"]) if json.loads(p).get("loader")]
        return [m for m in runnable if m not in done]
    if step == "matching" and store.task == "detection":
        boxed = set(store.query('SELECT DISTINCT model_id FROM "det_boxes"')["model_id"])
        matched = set(store.query('SELECT DISTINCT model_id FROM "det_matches"')["model_id"])
        return sorted(boxed - matched)
    return []


def _metadata_catalog(store: Store, staged: StagedTables) -> pd.DataFrame:
    """``columns`` rows for the metadata columns the staged images brought."""
    known = set(store.columns()["name"])
    sample = pd.concat([pq.read_table(f).slice(0, 100).to_pandas() for f in staged.files("images")],
                       ignore_index=True)
    user = set(json.loads(store.meta().get("user_columns", "[]")))
    catalog = column_catalog(sample, user, store.task)
    return catalog[~catalog["name"].isin(known)].reset_index(drop=True)


def precompute(store_path: str | os.PathLike, steps: Sequence[str] = STEPS, *, engine: str = "process",
               partition_images: int = DEFAULT_PARTITION_IMAGES, workers: int | None = None,
               device: str | None = None, explain_methods: Sequence[str] = (),
               progress: Progress | None = None) -> PrecomputeReport:
    """Run the pending ``steps`` of a store in image partitions on ``engine``; write parts.

    Steps run in the order metadata, inference, matching, evaluation, explanations, each only
    where its output is missing (evaluation: a detection model's metrics on every image, see
    ``store_evaluations``; explanations: with ``explain_methods``, e.g. ``["ig"]``, and for the
    maps not stored yet); ``report.seconds`` names the steps that did work.
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise IngestError(f"unknown precompute step {unknown[0]!r}", field="steps", choices=list(STEPS))
    if engine not in ENGINES:
        raise IngestError(f"unknown engine {engine!r}", field="engine", choices=list(ENGINES))
    if isinstance(partition_images, bool) or int(partition_images) != partition_images or partition_images < 1:
        raise IngestError(f"partition size must be a positive integer, got {partition_images!r}",
                          field="partition_images")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise IngestError("engine 'ray' needs Ray: pip install 'ray[data]'", field="engine") from exc
    path = str(StorePaths.of(store_path).base)
    workers = workers or max(1, os.cpu_count() or 1)
    import torch

    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    report = PrecomputeReport()
    with _Engine(engine, workers) as runner:
        for step in (s for s in STEPS if s in steps):
            started = time.perf_counter()
            store = Store(path)
            n = int(store.scalar(f'SELECT count(*) FROM "{_source_table(store)}"'))
            staged = staging_folder(path, step)
            try:
                if step == "evaluation":
                    detection = store.task == "detection"
                    store.close()
                    if not detection:
                        continue
                    if progress:
                        progress(step, 0, n)
                    evaluated = store_evaluations(path)
                    if not evaluated:
                        continue
                    report.rows["evaluations"] = len(evaluated) * len(EVALUATION_ARRAYS)
                elif step == "explanations":
                    store.close()
                    if not explain_methods:
                        continue
                    if progress:
                        progress(step, 0, n)
                    results = runner.run(ExplanationWorker, {"store_path": path, "staging": str(staged.folder),
                                                             "methods": list(explain_methods), "device": device},
                                         _partitions(n, partition_images), gpu=gpu)
                    report.rows["explanations"] = sum(r["rows"] for r in results)
                elif step == "metadata":
                    if not store.has_table(PENDING_TABLE) or store.scalar('SELECT count(*) FROM "images"'):
                        store.close()
                        continue
                    if progress:
                        progress(step, 0, n)
                    runner.run(MetadataWorker, {"store_path": path, "staging": str(staged.folder)},
                               _partitions(n, partition_images))
                    catalog = _metadata_catalog(store, staged)
                    store.close()
                    # images before the catalog rows that name their columns.
                    _write_parts(path, "images", staged, report)
                    _write_parts(path, "thumbnails", staged, report)
                    write_part(path, "columns", catalog)
                else:
                    models = _models_needing(store, step)
                    store.close()
                    if not models:
                        continue
                    for model_id in models:
                        if progress:
                            progress(f"{step} {model_id}", 0, n)
                        worker_cls = InferenceWorker if step == "inference" else MatchingWorker
                        kwargs = {"store_path": path, "staging": str(staged.folder), "model_id": model_id}
                        if step == "inference":
                            kwargs["device"] = device
                        runner.run(worker_cls, kwargs, _partitions(n, partition_images, model_id),
                                   gpu=gpu and step == "inference")
                    if step == "inference":
                        _finish_inference(path, staged, report)
                    else:
                        _write_parts(path, "det_matches", staged, report, order_key_transform(staged))
                        _write_parts(path, "gt_matches", staged, report)
            finally:
                staged.remove()
            report.seconds[step] = time.perf_counter() - started
    return report


def _finish_inference(path: str, staged: StagedTables, report: PrecomputeReport) -> None:
    if staged.files("det_boxes"):
        # Detection ids count from 0 per model across partitions, in image order (as build_store).
        counts = {}

        def renumber(index: int, rows: pa.Table) -> pa.Table:
            model = rows["model_id"][0].as_py() if len(rows) else ""
            first = counts.get(model, 0)
            counts[model] = first + len(rows)
            position = rows.schema.get_field_index("det_id")
            return rows.set_column(position, "det_id",
                                   pa.array(np.arange(first, first + len(rows), dtype=np.int32)))

        _write_parts(path, "det_boxes", staged, report, renumber)
        return
    _write_parts(path, "predictions", staged, report)
    _write_parts(path, "outcomes", staged, report)


def ray_precompute(store_path: str | os.PathLike, what: Sequence[str] = STEPS, **options) -> PrecomputeReport:
    """``precompute`` on Ray Data (``ray.init()`` first to join a cluster; else a local one starts)."""
    return precompute(store_path, what, engine="ray", **options)


def distributed_main(argv: list[str] | None = None) -> int:
    """``visionlens precompute STORE --engine ray|process|serial [--steps ...]``."""
    parser = argparse.ArgumentParser(prog="visionlens precompute",
                                     description="metadata, inference, matching, evaluation and explanations in image partitions")
    parser.add_argument("store", help="path to NAME.duckdb (made by plan_store)")
    parser.add_argument("--engine", choices=ENGINES, default="process")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated from " + ", ".join(STEPS))
    parser.add_argument("--partition-images", type=int, default=DEFAULT_PARTITION_IMAGES)
    parser.add_argument("--workers", type=int, help="parallel workers (default: CPU count)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--explain", default="", help="comma-separated explanation methods, e.g. ig,guided_backprop")
    args = parser.parse_args(argv)
    report = precompute(args.store, [s for s in args.steps.split(",") if s], engine=args.engine,
                        partition_images=args.partition_images, workers=args.workers, device=args.device,
                        explain_methods=[m for m in args.explain.split(",") if m],
                        progress=lambda stage, done, total: print(f"{stage}: {total} images", flush=True))
    for step, seconds in report.seconds.items():
        print(f"{step}: {seconds:.1f}s")
    for table, rows in report.rows.items():
        print(f"  {table}: {rows} rows")
    return 0
