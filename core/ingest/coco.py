"""COCO instances json → ``Dataset``; COCO results json → ``ModelRun``.

Categories keep a stable order: sorted by COCO category id, so class id ``k``
is the k-th smallest category id (the order pycocotools' ``getCatIds`` uses).
The COCO ids, in class order, go to the store meta as ``coco_category_ids``;
each image's COCO id is kept in the ``source_id`` column so a later results
file can be joined to an existing store.

Boxes: COCO ``[x, y, w, h]`` → pixel ``xmin, ymin, xmax, ymax``; ``area`` is
the annotation's ``area`` (segment area) when given, else ``w * h``.

An annotation that cannot be used (unknown category, malformed bbox, bad
area/iscrowd) makes its whole image unusable (its ground truth would be
incomplete): with ``skip_bad`` the image and its annotations are skipped and
the reason kept for the report; otherwise ``IngestError`` names the file, the
entry (``annotations[17]``) and the field.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import IngestError
from . import ImageIndex, Problems, absolute, clean_column_names, number_rows, resolve_image, user_column
from .build import Dataset, ModelRun

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "detection")
# Fields of a COCO image entry that are not user metadata.
_COCO_IMAGE_FIELDS = frozenset({"id", "file_name", "width", "height", "license", "flickr_url",
                                "coco_url", "date_captured"})


def load_json(path: str | os.PathLike) -> object:
    """Parse a json file; IngestError naming the file and line when it is not json."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise IngestError("file not found", file=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise IngestError(f"not valid json: {exc.msg} (column {exc.colno})", file=str(path),
                          row=f"line {exc.lineno}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read file: {exc}", file=str(path)) from exc


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _categories(data: dict, path: str) -> tuple[list[str], list[int]]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise IngestError("no 'categories' list", file=path, field="categories")
    ids: list[int] = []
    names: list[str] = []
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise IngestError("category needs an integer 'id'", file=path, row=f"categories[{i}]", field="id")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise IngestError("category needs a 'name'", file=path, row=f"categories[{i}]", field="name")
        ids.append(int(cat["id"]))
        names.append(name.strip())
    if len(set(ids)) != len(ids):
        dup = next(i for i, v in enumerate(ids) if ids.index(v) != i)
        raise IngestError(f"duplicate category id {ids[dup]}", file=path, row=f"categories[{dup}]", field="id")
    order = np.argsort(ids, kind="stable")
    ids = [ids[k] for k in order]
    names = [names[k] for k in order]
    counts = pd.Series(names).value_counts()
    # Two categories may share a name; keep both, told apart by their COCO id.
    names = [f"{n} ({i})" if counts[n] > 1 else n for n, i in zip(names, ids)]
    return names, ids


def read_coco(gt_json: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
              task: str = "detection", name: str | None = None,
              problems: Problems | None = None) -> Dataset:
    """Read a COCO instances file.

    Images are found from ``file_name`` under ``images_root`` (default: the
    json's folder); a path written on another machine is tried by its tails.
    ``task``: ``detection`` keeps boxes; ``multilabel`` takes the set of
    categories in each image; ``multiclass`` needs exactly one category per
    image (an image with none or several is an error).
    """
    if task not in TASKS:
        raise IngestError(f"unknown task {task!r}", field="task", choices=list(TASKS))
    problems = problems or Problems()
    path = str(gt_json)
    root = absolute(images_root if images_root is not None else Path(path).parent)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestError("not a COCO instances file: no 'images' list", file=path, field="images")
    classes, cat_ids = _categories(data, path)
    cat_index = {cid: k for k, cid in enumerate(cat_ids)}
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise IngestError("'annotations' is not a list", file=path, field="annotations")

    # -- images
    known_ids: set[int] = set()
    bad_ids: set[int] = set()
    rows: list[dict] = []
    declared: list[tuple[int, int, int]] = []  # (id, width, height): the frame the boxes were drawn in
    seen_uris: dict[str, int] = {}
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            problems.report(IngestError("image entry needs an integer 'id'", file=path, row=where, field="id"))
            continue
        image_id = int(entry["id"])
        if image_id in known_ids:
            problems.report(IngestError(f"duplicate image id {image_id}", file=path, row=where, field="id"))
            continue
        known_ids.add(image_id)
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            bad_ids.add(image_id)
            problems.report(IngestError(f"image {image_id} has no 'file_name'", file=path, row=where,
                                        field="file_name"))
            continue
        uri = resolve_image(file_name, root)
        if uri is None:
            bad_ids.add(image_id)
            problems.report(IngestError(f"image file {file_name!r} not found under {root} (--images-root: the "
                                        "folder the file names are relative to)", file=path, row=where,
                                        field="file_name"))
            continue
        if uri in seen_uris:
            bad_ids.add(image_id)
            problems.report(IngestError(f"image file {uri} is already used by image id {seen_uris[uri]}",
                                        file=path, row=where, field="file_name"))
            continue
        seen_uris[uri] = image_id
        if all(_is_int(entry.get(k)) and int(entry[k]) > 0 for k in ("width", "height")):
            declared.append((image_id, int(entry["width"]), int(entry["height"])))
        extra = {k: v for k, v in entry.items() if k not in _COCO_IMAGE_FIELDS
                 and (v is None or isinstance(v, (str, int, float, bool)))}
        rows.append({"image_id": image_id, "uri": uri, **extra})

    # -- annotations (ids, categories and boxes checked as arrays)
    n = len(annotations)
    is_dict = np.array([isinstance(a, dict) for a in annotations], dtype=bool)
    ann = [a if isinstance(a, dict) else {} for a in annotations]
    raw_image = [a.get("image_id") for a in ann]
    raw_cat = [a.get("category_id") for a in ann]
    int_image = np.array([_is_int(v) for v in raw_image], dtype=bool)
    ann_image = np.array([int(v) if ok else -1 for v, ok in zip(raw_image, int_image)], dtype=np.int64)
    ann_class = np.array([cat_index.get(int(v), -1) if _is_int(v) else -1 for v in raw_cat], dtype=np.int64)
    boxes, bad_box = number_rows([a.get("bbox") for a in ann], 4)
    bad_box |= (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    has_area = np.array(["area" in a for a in ann], dtype=bool)
    areas, bad_area = number_rows([[a["area"]] if "area" in a else [0.0] for a in ann], 1)
    areas = np.where(has_area, areas[:, 0], boxes[:, 2] * boxes[:, 3])
    bad_area |= has_area & (areas < 0)
    crowd_raw = [a.get("iscrowd", 0) for a in ann]
    bad_crowd = np.array([v not in (0, 1) for v in crowd_raw], dtype=bool)
    crowd = np.array([bool(v) if v in (0, 1) else False for v in crowd_raw], dtype=bool)

    known = np.isin(ann_image, np.fromiter(known_ids, dtype=np.int64, count=len(known_ids)))
    checks = [
        (~is_dict, "annotation is not an object", None),
        (is_dict & ~known, "annotation for an image id that is not in 'images'", "image_id"),
        (ann_class < 0, "category_id is not one of the categories", "category_id"),
        (bad_box, "bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0", "bbox"),
        (bad_area, "area must be a finite number >= 0", "area"),
        (bad_crowd, "iscrowd must be 0 or 1", "iscrowd"),
    ]
    usable = np.ones(n, dtype=bool)
    for mask, message, field in checks:
        for j in np.flatnonzero(mask & usable):
            value = ann[j].get(field) if field else annotations[j]
            owner = int(ann_image[j]) if known[j] else None
            suffix = f" (image {owner} skipped)" if owner is not None and problems.skip_bad else ""
            problems.report(IngestError(f"{message}: {value!r}{suffix}", file=path,
                                        row=f"annotations[{j}]", field=field,
                                        choices=[f"{cid} ({name})" for cid, name in zip(cat_ids, classes)]
                                        if field == "category_id" else None))
            if owner is not None:
                bad_ids.add(owner)
        usable &= ~mask

    # -- per-task ground truth, dropping images that had a bad entry
    extra_columns = sorted({k for r in rows for k in r} - {"image_id", "uri"})
    images = pd.DataFrame(rows, columns=["image_id", "uri", *extra_columns])
    images = images[~images["image_id"].isin(bad_ids)]
    keep = usable & np.isin(ann_image, images["image_id"].to_numpy())
    gt = pd.DataFrame({
        "image_id": ann_image[keep], "class_id": ann_class[keep].astype(np.int32),
        "xmin": boxes[keep, 0], "ymin": boxes[keep, 1],
        "xmax": boxes[keep, 0] + boxes[keep, 2], "ymax": boxes[keep, 1] + boxes[keep, 3],
        "area": areas[keep], "iscrowd": crowd[keep],
    })
    gt_boxes = None
    if task == "detection":
        gt.insert(1, "gt_id", np.arange(len(gt), dtype=np.int32))
        gt_boxes = gt
        images["true_label"] = [np.zeros(0, np.int32)] * len(images)
    else:
        present = gt.groupby("image_id")["class_id"].agg(lambda s: np.unique(s.to_numpy()).astype(np.int32))
        labels = [present.get(i, np.zeros(0, np.int32)) for i in images["image_id"]]
        if task == "multilabel":
            images["true_label"] = labels
        else:
            counts = np.array([len(v) for v in labels])
            for pos in np.flatnonzero(counts != 1):
                image_id = int(images["image_id"].iloc[pos])
                names = [classes[c] for c in labels[pos]]
                problems.report(IngestError(
                    f"multiclass needs exactly one category per image; image {image_id} has "
                    f"{len(names)} ({', '.join(names) or 'none'})", file=path,
                    row=f"image id {image_id}", field="category_id"))
                bad_ids.add(image_id)
            ok = counts == 1
            images = images[ok].copy()
            images["true_label"] = [int(v[0]) for v, good in zip(labels, ok) if good]

    dropped = known_ids & bad_ids
    problems.dropped_source_ids.update(dropped)
    problems.dropped_uris.update(u for u, i in seen_uris.items() if i in dropped)
    images = images.reset_index(drop=True)
    images["source_id"] = images["image_id"].astype(np.int64)
    user = [c for c in images.columns if c not in ("image_id", "uri", "true_label", "source_id")]
    renamed = clean_column_names(user)
    for column in user:
        images[column] = user_column(images[column])
    images = images.rename(columns=renamed)
    images = images[["image_id", "uri", "true_label", "source_id"] + [renamed[c] for c in user]]
    log.info("COCO %s: %d images, %d annotations, %d classes", path, len(images), int(keep.sum()), len(classes))
    return Dataset(name=name or Path(path).stem, task=task, classes=classes, images=images,
                   gt_boxes=gt_boxes, extra_meta={"coco_category_ids": cat_ids, "images_root": root},
                   declared_sizes=pd.DataFrame(declared, columns=["image_id", "width", "height"]))


def dataset_index(dataset: Dataset, problems: Problems | None = None) -> ImageIndex:
    """Join key for a dataset's predictions: its paths, and its source ids when it has them."""
    images = dataset.images
    source = images["source_id"].astype(np.int64).tolist() if "source_id" in images.columns else None
    problems = problems or Problems()
    return ImageIndex(uris=images["uri"].tolist(), image_ids=images["image_id"].astype(np.int64).tolist(),
                      root=str(dataset.extra_meta.get("images_root", os.getcwd())), source_ids=source,
                      dropped_uris=set(problems.dropped_uris),
                      dropped_source_ids=set(problems.dropped_source_ids))


def read_coco_results(path: str | os.PathLike, images: Dataset | ImageIndex,
                      category_ids: Sequence[int] | None = None, *, task: str = "detection",
                      model_id: str = "model", name: str | None = None,
                      problems: Problems | None = None) -> ModelRun:
    """A model's outputs from a COCO results json (a list of result objects).

    - detection: ``{image_id, category_id, bbox: [x, y, w, h], score}``.
    - multiclass / multilabel: ``{image_id, category_id, score}`` (one object
      per image and class; classes not listed score 0) or ``{image_id, probs}``
      with one probability per class in class order. For multiclass, exactly
      one object per image gives ``pred_label`` and ``score`` without ``probs``.

    ``image_id`` is the COCO image id; results for images that were skipped
    while reading the dataset are dropped; for images never in it they are an
    error (or skipped rows with ``skip_bad``). ``category_ids`` defaults to the
    dataset's ``coco_category_ids``.
    """
    problems = problems or Problems()
    file = str(path)
    if isinstance(images, Dataset):
        if category_ids is None:
            category_ids = images.extra_meta.get("coco_category_ids")
        index = dataset_index(images, problems)
    else:
        index = images
    if category_ids is None:
        raise IngestError("the dataset has no COCO category ids to map results to", file=file,
                          field="category_id")
    if not index.has_source_ids:
        raise IngestError("COCO results join on COCO image ids, but this dataset has none "
                          "(it was not read from COCO json); give predictions as a table instead",
                          file=file, field="image_id")
    cat_index = {int(c): k for k, c in enumerate(category_ids)}
    category_choices = [str(int(c)) for c in category_ids]
    data = load_json(file)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise IngestError("COCO results must be a json list of objects", file=file)
    results = [r if isinstance(r, dict) else {} for r in data]
    is_dict = np.array([isinstance(r, dict) for r in data], dtype=bool)
    raw_image = [r.get("image_id") for r in results]
    ids = [index.by_source_id(int(v)) if _is_int(v) else None for v in raw_image]
    dropped = np.array([ids[j] is None and _is_int(v) and int(v) in index.dropped_source_ids
                        for j, v in enumerate(raw_image)], dtype=bool)
    image_ids = np.array([-1 if v is None else v for v in ids], dtype=np.int64)
    has_probs = np.array(["probs" in r for r in results], dtype=bool)
    cats = np.array([cat_index.get(int(r["category_id"]), -1) if _is_int(r.get("category_id")) else -1
                     for r in results], dtype=np.int64)
    scores, bad_score = number_rows([[r.get("score")] if "score" in r else [1.0] for r in results], 1)
    checks = [
        (~is_dict, "result is not an object", None),
        (is_dict & (image_ids < 0) & ~dropped, "result for an image id that is not in the dataset", "image_id"),
        (~has_probs & (cats < 0), "category_id is not one of the dataset's categories", "category_id"),
        (~has_probs & bad_score, "score must be a finite number", "score"),
    ]
    if task == "detection":
        boxes, bad_box = number_rows([r.get("bbox") for r in results], 4)
        bad_box |= (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
        checks.append((bad_box, "bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0", "bbox"))
    else:
        n_classes = len(category_ids)
        probs, bad_probs = number_rows([r.get("probs") if "probs" in r else [0.0] * n_classes
                                         for r in results], n_classes)
        checks.append((has_probs & bad_probs, f"probs must be {n_classes} finite numbers", "probs"))
    usable = ~dropped
    for mask, message, field in checks:
        for j in np.flatnonzero(mask & usable):
            value = results[j].get(field) if field else data[j]
            problems.report(IngestError(f"{message}: {value!r}", file=file, row=f"[{j}]", field=field,
                                        choices=category_choices if field == "category_id" else None))
        usable &= ~mask
    if dropped.any():
        log.info("%s: %d results for skipped images dropped", file, int(dropped.sum()))

    if task == "detection":
        keep = usable
        dets = pd.DataFrame({
            "image_id": image_ids[keep], "det_id": np.arange(int(keep.sum()), dtype=np.int32),
            "class_id": cats[keep].astype(np.int32), "score": scores[keep, 0],
            "xmin": boxes[keep, 0], "ymin": boxes[keep, 1],
            "xmax": boxes[keep, 0] + boxes[keep, 2], "ymax": boxes[keep, 1] + boxes[keep, 3],
        })
        dets["area"] = boxes[keep, 2] * boxes[keep, 3]
        return ModelRun(model_id=model_id, name=name or model_id, params={"source": file}, det_boxes=dets)
    return ModelRun(model_id=model_id, name=name or model_id, params={"source": file},
                    predictions=_classification_predictions(
                        task, image_ids[usable], cats[usable], scores[usable, 0], probs[usable],
                        has_probs[usable], np.flatnonzero(usable), len(category_ids), file, problems))


def _classification_predictions(task: str, image_ids: np.ndarray, cats: np.ndarray, scores: np.ndarray,
                                probs: np.ndarray, has_probs: np.ndarray, positions: np.ndarray,
                                n_classes: int, file: str, problems: Problems) -> pd.DataFrame:
    """Classification rows from result objects; ``positions`` are their indices in the file."""
    counts = pd.Series(image_ids).value_counts()
    if task == "multiclass" and not has_probs.any() and (counts == 1).all():
        return pd.DataFrame({"image_id": image_ids.astype(np.int32), "pred_label": cats.astype(np.int32),
                             "score": scores.astype(np.float32)})
    # Several results per image (or explicit probs): one probability row per image.
    keys = pd.DataFrame({"image_id": image_ids, "class_id": np.where(has_probs, -1, cats)})
    per_image = counts.reindex(image_ids).to_numpy()
    clash = keys.duplicated(keep="first").to_numpy() | (has_probs & (per_image > 1))
    for j in np.flatnonzero(clash):
        problems.report(IngestError("a result for the same image and class came earlier; the image's "
                                    "results are skipped", file=file, row=f"[{positions[j]}]", field="category_id"))
    unique_ids, inverse = np.unique(image_ids, return_inverse=True)
    matrix = np.zeros((len(unique_ids), n_classes), dtype=np.float64)
    per_class = ~has_probs & ~clash
    matrix[inverse[per_class], cats[per_class]] = scores[per_class]
    with_probs = has_probs & ~clash
    matrix[inverse[with_probs]] = probs[with_probs]
    good = ~np.isin(unique_ids, image_ids[clash])
    return pd.DataFrame({"image_id": unique_ids[good].astype(np.int32),
                         "probs": list(matrix[good].astype(np.float32))})
