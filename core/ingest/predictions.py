"""A model's outputs as a ``ModelRun``: from a COCO results json, a table, or a torch model.

Tables (CSV, JSON lines, Parquet, DataFrame) join to the dataset by the image
path column (default ``image``, any form ``read_table`` accepts) or, when it
is absent, by an ``image_id`` column holding the source's own ids (COCO ids).
Columns read, first present wins:

- multiclass: ``probs`` (one probability per class, in class order; a JSON list
  in CSV) or one ``prob_<class name>`` column per class, and/or ``pred_label`` /
  ``prediction`` / ``label`` (class name or index), optional ``score``;
- multilabel: ``probs`` or ``prob_<label name>`` columns (per-label sigmoid probabilities) and/or
  ``pred_labels`` / ``prediction`` / ``label`` (list of names / indices);
- detection: ``detections`` / ``prediction`` / ``label``: a list of
  ``[class, xmin, ymin, xmax, ymax, score]`` (pixels).

Rows for images skipped while reading the dataset are dropped; rows for images
the dataset never had, malformed cells, unknown classes and repeated images
are errors naming file, row and field (skipped and reported with ``skip_bad``).
Other columns are not read, and a warning names them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .. import models as models_mod
from ..errors import IngestError
from ..store import Store
from . import ImageIndex, Problems, number_rows
from .build import SKIPPED_META, ModelRun
from .coco import read_coco_results
from .table import (ClassMap, class_token, is_missing, load_table, parse_boxes, parse_list,
                    report_unknown_classes)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

PRED_COLUMNS = {
    "multiclass": ("pred_label", "prediction", "label"),
    "multilabel": ("pred_labels", "prediction", "label"),
    "detection": ("detections", "prediction", "label"),
}
# Images per inference call: bounds memory and, with skip_bad, the work redone
# image by image when a chunk holds an unreadable file.
INFERENCE_CHUNK = 1024


def store_index(store: Store) -> ImageIndex:
    """How predictions find the images of an existing store."""
    has_source = "source_id" in store.table_columns("images")
    columns = '"image_id", "uri"' + (', "source_id"' if has_source else "")
    images = store.query(f'SELECT {columns} FROM "images" ORDER BY "image_id"')
    meta = store.meta()
    root = meta.get("images_root") or (os.path.commonpath(images["uri"].tolist()) if len(images) else "")
    skipped = json.loads(meta.get(SKIPPED_META) or "{}")  # their predictions are dropped, as at the build
    return ImageIndex(uris=images["uri"].tolist(), image_ids=images["image_id"].astype(np.int64).tolist(),
                      root=root, source_ids=images["source_id"].astype(np.int64).tolist() if has_source else None,
                      dropped_uris=set(skipped.get("uris", ())), dropped_source_ids=set(skipped.get("source_ids", ())))


def _json_document(path: str | os.PathLike) -> object | None:
    """A .json file's one JSON document (list or object); None for anything else (JSON lines, which a
    table may be, included)."""
    if Path(path).suffix.lower() != ".json":
        return None
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith(b"[") and not head.startswith(b"{"):
        return None
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _holds_coco_results(data: object) -> bool:
    """A list of COCO result objects (``image_id`` + ``category_id`` or ``probs``), or an object
    whose ``annotations`` are one."""
    if isinstance(data, dict):
        data = data.get("annotations")
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "image_id" in data[0]
            and ("category_id" in data[0] or "probs" in data[0]))


def is_coco_results(path: str | os.PathLike) -> bool:
    """A .json file holding a list of COCO result objects (``image_id`` + ``category_id`` or ``probs``)."""
    return _holds_coco_results(_json_document(path))


def read_predictions(path: str | os.PathLike | pd.DataFrame, task: str, index: ImageIndex,
                     classes: Sequence[str], *, category_ids: Sequence[int] | None = None,
                     model_id: str = "model", name: str | None = None, problems: Problems | None = None,
                     image_col: str = "image", id_col: str = "image_id",
                     class_index_base: int = 0) -> ModelRun:
    """A predictions file of any supported kind (COCO results json, or a table)."""
    problems = problems or Problems()
    if not isinstance(path, pd.DataFrame):
        if not os.path.isfile(path):
            raise IngestError("predictions file not found", file=str(path))
        document = _json_document(path)  # parsed once: results, another object, or a table
        if _holds_coco_results(document):
            return read_coco_results(path, index, category_ids, task=task, model_id=model_id, name=name,
                                     problems=problems)
        if isinstance(document, dict):
            raise IngestError("a JSON object is not a predictions file: COCO results are a JSON list of "
                              "{image_id, category_id, bbox, score} objects (a COCO instances file is the "
                              "ground truth: --coco)", file=str(path))
    return read_table_predictions(path, task, index, classes, model_id=model_id, name=name, problems=problems,
                                  image_col=image_col, id_col=id_col, class_index_base=class_index_base)


def _join(frame: pd.DataFrame, index: ImageIndex, image_col: str, id_col: str, file: str,
          problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """Dataset image id per row (-1 where unusable) and a mask of rows dropped quietly."""
    n = len(frame)
    ids = np.full(n, -1, dtype=np.int64)
    dropped = np.zeros(n, dtype=bool)
    if image_col in frame.columns:
        field = image_col
        for row, value in enumerate(frame[image_col].tolist()):
            hit = None if is_missing(value) else index.by_path(str(value))
            if hit is not None:
                ids[row] = hit
            elif not is_missing(value) and index.path_was_dropped(str(value)):
                dropped[row] = True
            else:
                problems.report(IngestError(f"no image of the dataset matches {value!r}", file=file, row=row,
                                            field=image_col))
    elif id_col in frame.columns and index.has_source_ids:
        field = id_col
        for row, value in enumerate(frame[id_col].tolist()):
            token = class_token(value) if not isinstance(value, str) else None
            hit = index.by_source_id(token) if isinstance(token, int) else None
            if hit is not None:
                ids[row] = hit
            elif isinstance(token, int) and token in index.dropped_source_ids:
                dropped[row] = True
            else:
                problems.report(IngestError(f"no image of the dataset has id {value!r}", file=file, row=row,
                                            field=id_col))
    else:
        raise IngestError(f"predictions need a column {image_col!r} (image path)"
                          + (f" or {id_col!r}" if index.has_source_ids else ""), file=file,
                          choices=[str(c) for c in frame.columns])
    seen: dict[int, int] = {}
    for row in np.flatnonzero(ids >= 0):
        image_id = int(ids[row])
        if image_id in seen:
            problems.report(IngestError(f"same image as row {seen[image_id]}", file=file, row=int(row), field=field))
            ids[row] = -1
        else:
            seen[image_id] = int(row)
    if dropped.any():
        log.info("%s: %d rows for skipped images dropped", file, int(dropped.sum()))
    return ids, dropped


def _pick(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((c for c in names if c in frame.columns), None)


PROB_PREFIX = "prob_"  # one probability column per class: prob_<class name>


def _wide_probs(frame: pd.DataFrame, classes: Sequence[str], file: str) -> list[str]:
    """The ``prob_<class>`` columns, in class order ([] when there are none); every class needs one."""
    given = {str(c)[len(PROB_PREFIX):]: str(c) for c in frame.columns if str(c).startswith(PROB_PREFIX)}
    if not given:
        return []
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise IngestError(f"column {given[unknown[0]]!r} names no class", file=file, field=given[unknown[0]],
                          choices=[PROB_PREFIX + c for c in classes])
    missing = [c for c in classes if c not in given]
    if missing:
        raise IngestError(f"probabilities need a column per class: {PROB_PREFIX + missing[0]!r} is missing",
                          file=file, field=PROB_PREFIX + missing[0], choices=[PROB_PREFIX + c for c in classes])
    return [given[c] for c in classes]


def _class_list(classes: Sequence[str], shown: int = 12) -> str:
    """The classes in order, the first ``shown`` of them when there are more."""
    names = ", ".join(str(c) for c in classes[:shown])
    return names + (f", … ({len(classes)} in all)" if len(classes) > shown else "")


def read_table_predictions(source: str | os.PathLike | pd.DataFrame, task: str, index: ImageIndex,
                           classes: Sequence[str], *, model_id: str = "model", name: str | None = None,
                           problems: Problems | None = None, image_col: str = "image",
                           id_col: str = "image_id", class_index_base: int = 0) -> ModelRun:
    """Predictions from a table (see the module docstring)."""
    problems = problems or Problems()
    frame, file = load_table(source)
    ids, _ = _join(frame, index, image_col, id_col, file, problems)
    rows = np.flatnonzero(ids >= 0)
    class_map = ClassMap(list(classes), class_index_base)
    params = {"source": file}
    label = name or model_id
    pred_col = _pick(frame, PRED_COLUMNS[task])
    if task == "detection":
        if pred_col is None:
            raise IngestError("no detections column", file=file, choices=list(PRED_COLUMNS[task]))
        boxes, bad = parse_boxes(frame[pred_col].iloc[rows].tolist(), extra=("score",), optional_extra=False,
                                 file=file, field=pred_col, problems=problems, rows=rows.tolist())
        class_ids = class_map.ids(boxes.tokens)
        report_unknown_classes(class_ids, boxes.tokens, boxes.row, [f"{pred_col}[{p}]" for p in boxes.position],
                               class_map, file, problems, bad)
        ok = ~np.isin(boxes.row, np.fromiter(bad, dtype=np.int64, count=len(bad)))
        values = boxes.values[ok]
        dets = pd.DataFrame({
            "image_id": ids[boxes.row[ok]], "det_id": np.arange(int(ok.sum()), dtype=np.int32),
            "class_id": class_ids[ok].astype(np.int32), "score": values[:, 4],
            "xmin": values[:, 0], "ymin": values[:, 1], "xmax": values[:, 2], "ymax": values[:, 3],
        })
        dets["area"] = (dets["xmax"] - dets["xmin"]) * (dets["ymax"] - dets["ymin"])
        return ModelRun(model_id=model_id, name=label, params=params, det_boxes=dets)

    bad: set[int] = set()
    out = pd.DataFrame({"image_id": ids[rows]})
    n_classes = len(classes)
    wide = _wide_probs(frame, classes, file) if "probs" not in frame.columns else []
    if wide:
        frame = frame.assign(probs=list(frame[wide].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)))
    used = {image_col, id_col, pred_col, "probs", "score", *wide}
    ignored = [str(c) for c in frame.columns if c not in used]
    if ignored:
        log.warning("%s: column(s) not read: %s (see 'visionlens ingest --help' for the columns read)",
                    file, ", ".join(ignored))
    if "probs" in frame.columns:
        lists = []
        for row in rows:
            try:
                lists.append(parse_list(frame["probs"].iloc[row], allow_words=False))
            except ValueError as exc:
                problems.report(IngestError(str(exc), file=file, row=int(row), field="probs"))
                bad.add(int(row))
                lists.append([0.0] * n_classes)
        probs, bad_probs = number_rows(lists, n_classes)
        for j in np.flatnonzero(bad_probs):
            if int(rows[j]) not in bad:
                problems.report(IngestError(f"probs must be {n_classes} finite numbers, one per class of the "
                                            f"store ({_class_list(classes)})", file=file, row=int(rows[j]),
                                            field="probs"))
                bad.add(int(rows[j]))
        out["probs"] = list(np.nan_to_num(probs).astype(np.float32))
    if pred_col is not None and task == "multiclass":
        tokens = [class_token(v) if not is_missing(v) else None for v in frame[pred_col].iloc[rows]]
        class_ids = class_map.ids(tokens)
        report_unknown_classes(class_ids, tokens, rows, [pred_col] * len(rows), class_map, file, problems, bad)
        out["pred_label"] = class_ids.astype(np.int32)
        if "score" in frame.columns:
            scores = pd.to_numeric(frame["score"].iloc[rows], errors="coerce").to_numpy(np.float64)
            for j in np.flatnonzero(~np.isfinite(scores)):
                if int(rows[j]) not in bad:
                    problems.report(IngestError("score must be a finite number", file=file, row=int(rows[j]),
                                                field="score"))
                    bad.add(int(rows[j]))
            out["score"] = scores.astype(np.float32)
    elif pred_col is not None and task == "multilabel":
        lists = []
        for row in rows:
            try:
                lists.append([class_token(v) for v in parse_list(frame[pred_col].iloc[row], allow_words=True)])
            except ValueError as exc:
                problems.report(IngestError(str(exc), file=file, row=int(row), field=pred_col))
                bad.add(int(row))
                lists.append([])
        flat = [t for values in lists for t in values]
        class_ids = class_map.ids(flat)
        owner = np.repeat(rows, [len(v) for v in lists])
        report_unknown_classes(class_ids, flat, owner, [pred_col] * len(flat), class_map, file, problems, bad)
        starts = np.concatenate([[0], np.cumsum([len(v) for v in lists])])
        out["pred_labels"] = [np.unique(class_ids[starts[j]:starts[j + 1]]).astype(np.int32)
                              for j in range(len(rows))]
    elif "probs" not in frame.columns:
        raise IngestError("no prediction column", file=file, choices=["probs", *PRED_COLUMNS[task]])
    keep = ~np.isin(rows, np.fromiter(bad, dtype=np.int64, count=len(bad)))
    return ModelRun(model_id=model_id, name=label, params=params,
                    predictions=out[keep].reset_index(drop=True))


def run_model(spec: str, task: str, uris: Sequence[str], image_ids: Sequence[int], *,
              input_size: tuple[int, int] | None = None, device: str | None = None, threshold: float = 0.5,
              model_id: str = "model", name: str | None = None, problems: Problems | None = None,
              progress: Progress | None = None) -> ModelRun:
    """Run ``module:function`` (returning a torch module) over the images.

    With ``skip_bad``, a chunk holding an unreadable image is re-run image by
    image and the unreadable ones are reported and left without predictions.
    """
    problems = problems or Problems()
    params = {"loader": spec, "kwargs": {}}
    if input_size is not None:
        params["input_size"] = [int(input_size[0]), int(input_size[1])]
    model = models_mod.load_model(params)
    uris = list(uris)
    ids = np.asarray(image_ids, dtype=np.int64)
    total = len(uris)

    def infer(part: slice, offset: int) -> pd.DataFrame:
        def chunk_progress(done: int, _total: int) -> None:
            if progress:
                progress(offset + done, total)
        if task == "detection":
            return models_mod.predict_detector(model, uris[part], ids[part], input_size=input_size,
                                               device=device, progress=chunk_progress)
        return models_mod.predict_classifier(model, uris[part], ids[part], task=task, input_size=input_size,
                                             threshold=threshold, device=device, progress=chunk_progress)

    frames = []
    for start in range(0, total, INFERENCE_CHUNK):
        part = slice(start, min(total, start + INFERENCE_CHUNK))
        try:
            frames.append(infer(part, start))
        except IngestError as exc:
            if not problems.skip_bad or exc.file is None:
                raise
            for k in range(part.start, part.stop):
                try:
                    frames.append(infer(slice(k, k + 1), k))
                except IngestError as single:
                    if single.file is None:
                        raise
                    problems.report(single)
    if progress:
        progress(total, total)
    frame = pd.concat(frames, ignore_index=True) if frames else None
    if task == "detection":
        if frame is None:
            frame = models_mod.predict_detector(model, [], ids[:0], input_size=input_size, device=device)
        frame["det_id"] = np.arange(len(frame), dtype=np.int32)  # unique across chunks
        return ModelRun(model_id=model_id, name=name or model_id, params=params, det_boxes=frame)
    if frame is None:
        frame = pd.DataFrame({"image_id": np.zeros(0, np.int32)})
    return ModelRun(model_id=model_id, name=name or model_id, params=params, predictions=frame)
