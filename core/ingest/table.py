"""Azure RAI vision tables → ``Dataset``: CSV, JSON lines, Parquet or a pandas DataFrame.

One row per image: an image path column (default ``image``) and a label
column (default ``label``):

- multiclass: the class name, or an integer class index;
- multilabel: a list of class names / indices (a JSON list in CSV, e.g.
  ``["cat", "dog"]``; a space-separated string such as ``cat dog`` is read
  too), or — passing ``label_col`` as a list of column names — one 0/1 column per label;
- detection: a list of ``[class, xmin, ymin, xmax, ymax]`` or
  ``[class, xmin, ymin, xmax, ymax, iscrowd]`` (pixels; a JSON list in CSV).

An empty label cell means "no labels" / "no objects" for multilabel and
detection, and is an error for multiclass. Classes are ``classes`` when given
(names must be in it; an integer ``i`` means ``classes[i - class_index_base]``:
Azure RAI detection tables made for torchvision count from 1, the background
being 0), else the sorted distinct names, or ``"0" … "K"`` for integer labels.

Image paths are absolute, relative to ``images_root`` (default: the table's
folder, or the working folder for a DataFrame), or written on another machine
(found by their tails). An integer ``image_id`` column, when present, is kept as
``source_id`` so predictions can join on it. Every other column is user
metadata, kept with its type (numeric, boolean, or text), its name made safe
for cohort URLs.

A bad row (missing image, malformed or jagged box list, ``xmax < xmin``,
non-finite number, unknown class, duplicate path or id) is an ``IngestError``
naming the file, the row (0-based data row) and the field; with ``skip_bad``
the row is skipped and kept for the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import IngestError
from . import Problems, absolute, clean_column_names, resolve_image, user_column
from .build import Dataset

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "detection")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".parquet": "parquet", ".pq": "parquet"}
DATAFRAME = "<DataFrame>"


# --------------------------------------------------------------------------- loading


def load_table(source: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The table and the name used for it in messages."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True), DATAFRAME
    path = str(source)
    kind = TABLE_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise IngestError("unknown table format", file=path, choices=sorted(TABLE_SUFFIXES))
    if not os.path.isfile(path):
        raise IngestError("file not found", file=path)
    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(path, sep="\t" if kind == "tsv" else ",")
        elif kind == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif kind == "json":
            frame = _read_json_table(path)
        else:
            frame = pd.read_parquet(path)
    except IngestError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise IngestError(f"cannot read {kind} table: {exc}", file=path) from exc
    return frame, path


def _read_json_table(path: str) -> pd.DataFrame:
    # A .json table is either JSON lines or one array of row objects.
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise IngestError("a .json table must be a list of row objects or JSON lines", file=path)
        return pd.DataFrame(rows)
    return pd.read_json(path, lines=True, dtype=False)


# --------------------------------------------------------------------------- cell parsing


def plain(value: object) -> object:
    """Nested numpy arrays (Parquet list cells) → plain Python lists."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def parse_list(value: object, *, allow_words: bool) -> list:
    """A list cell: a list, an array, a JSON string, or (``allow_words``) space-separated words.

    Missing or empty cells are the empty list. Raises ValueError on anything else.
    """
    if is_missing(value):
        return []
    value = plain(value)
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            if allow_words and not text.startswith("["):
                return text.split()
            raise ValueError(f"not a JSON list: {text[:80]!r}") from None
        if isinstance(parsed, list):
            return parsed
        if allow_words and isinstance(parsed, (str, int)):
            return [parsed]
    raise ValueError(f"expected a list, got {type(value).__name__} {str(value)[:80]!r}")


def class_token(value: object) -> str | int | None:
    """A class given as a name (str) or an index (int); None if neither."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class ClassMap:
    """Class names in id order, and how integer labels map onto them."""

    classes: list[str]
    index_base: int = 0

    @classmethod
    def infer(cls, tokens: Sequence[str | int], classes: Sequence[str] | None, index_base: int) -> "ClassMap":
        if classes is not None:
            return cls([str(c) for c in classes], index_base)
        names = {t for t in tokens if isinstance(t, str)}
        numbers = {t for t in tokens if isinstance(t, int)}
        if names and numbers:
            raise IngestError("labels mix class names and class indices; give the class list (--classes)",
                              field="label")
        if numbers:
            top = max(numbers) - index_base
            return cls([str(i + index_base) for i in range(top + 1)], index_base)
        return cls(sorted(names), index_base)

    def ids(self, tokens: Sequence[object]) -> np.ndarray:
        """Class id per token; -1 where the token is no known class."""
        by_name = {c: k for k, c in enumerate(self.classes)}
        n = len(self.classes)
        out = np.full(len(tokens), -1, dtype=np.int64)
        for i, token in enumerate(tokens):
            if isinstance(token, str) and token not in by_name and token.isdigit():
                token = int(token)  # an index that came through a text column (CSV)
            if isinstance(token, str):
                out[i] = by_name.get(token, -1)
            elif isinstance(token, int) and 0 <= token - self.index_base < n:
                out[i] = token - self.index_base
        return out


@dataclass
class BoxRows:
    """Box lists of many rows flattened: ``row`` is the table row of each box."""

    row: np.ndarray
    position: np.ndarray  # index of the box within its row's list
    tokens: list
    values: np.ndarray  # (N, 4 + extra) float


def parse_boxes(cells: Sequence[object], *, extra: tuple[str, ...], optional_extra: bool,
                file: str, field: str, problems: Problems, rows: Sequence[int]) -> tuple[BoxRows, set[int]]:
    """Flatten box-list cells ``[class, xmin, ymin, xmax, ymax, *extra]``.

    ``optional_extra``: the extra values may be left out (ground truth's iscrowd).
    Returns the boxes of good rows and the set of bad rows (reported through ``problems``).
    """
    widths = {5 + len(extra)} | ({5} if optional_extra else set())
    names = ["xmin", "ymin", "xmax", "ymax", *extra]
    row_ids: list[int] = []
    positions: list[int] = []
    tokens: list = []
    values: list[list[float]] = []
    bad: set[int] = set()
    for row, cell in zip(rows, cells):
        try:
            boxes = parse_list(cell, allow_words=False)
        except ValueError as exc:
            problems.report(IngestError(str(exc), file=file, row=row, field=field))
            bad.add(row)
            continue
        for k, box in enumerate(boxes):
            box = plain(box)
            if not isinstance(box, list) or len(box) not in widths:
                problems.report(IngestError(
                    f"box must be [class, xmin, ymin, xmax, ymax{''.join(', ' + e for e in extra)}], "
                    f"got {str(box)[:80]}", file=file, row=row, field=f"{field}[{k}]"))
                bad.add(row)
                break
            numbers = box[1:] + ([0.0] * (5 + len(extra) - len(box)))
            if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
                       for v in box[1:]):
                problems.report(IngestError(f"box values must be numbers, got {str(box)[:80]}",
                                            file=file, row=row, field=f"{field}[{k}]"))
                bad.add(row)
                break
            row_ids.append(row)
            positions.append(k)
            tokens.append(class_token(box[0]))
            values.append([float(v) for v in numbers])
    arr = np.asarray(values, dtype=np.float64).reshape(-1, len(names))
    row_arr = np.asarray(row_ids, dtype=np.int64)
    pos_arr = np.asarray(positions, dtype=np.int64)
    finite = np.isfinite(arr).all(axis=1)
    for j in np.flatnonzero(~finite):
        col = int(np.flatnonzero(~np.isfinite(arr[j]))[0])
        _box_problem(problems, bad, file, row_arr[j], f"{field}[{pos_arr[j]}].{names[col]}",
                     f"{names[col]} {arr[j, col]} is not a finite number")
    for lo, hi in ((0, 2), (1, 3)):
        for j in np.flatnonzero(finite & (arr[:, hi] < arr[:, lo])):
            _box_problem(problems, bad, file, row_arr[j], f"{field}[{pos_arr[j]}].{names[hi]}",
                         f"{names[hi]} {arr[j, hi]} < {names[lo]} {arr[j, lo]}")
    keep = ~np.isin(row_arr, np.fromiter(bad, dtype=np.int64, count=len(bad)))
    return BoxRows(row_arr[keep], pos_arr[keep], [t for t, k in zip(tokens, keep) if k], arr[keep]), bad


def _box_problem(problems: Problems, bad: set[int], file: str, row: int, field: str, message: str) -> None:
    if row in bad:
        return
    problems.report(IngestError(message, file=file, row=int(row), field=field))
    bad.add(int(row))


def report_unknown_classes(ids: np.ndarray, tokens: Sequence[object], rows: np.ndarray, fields: Sequence[str],
                           class_map: ClassMap, file: str, problems: Problems, bad: set[int]) -> None:
    """Report (once per row) tokens that name no class."""
    for j in np.flatnonzero(ids < 0):
        row = int(rows[j])
        if row in bad:
            continue
        problems.report(IngestError(f"unknown class {tokens[j]!r}", file=file, row=row, field=fields[j],
                                    choices=class_map.classes))
        bad.add(row)


# --------------------------------------------------------------------------- images


def resolve_rows(paths: Sequence[object], root: str, *, file: str, field: str,
                 problems: Problems) -> tuple[list[str | None], set[int]]:
    """Image file for each row's path; bad rows (missing, remote, duplicate) reported."""
    uris: list[str | None] = []
    bad: set[int] = set()
    first_row: dict[str, int] = {}
    for row, value in enumerate(paths):
        uri = None
        if is_missing(value) or not str(value).strip():
            problems.report(IngestError("no image path", file=file, row=row, field=field))
        elif str(value).startswith(("http://", "https://")):
            problems.report(IngestError("remote images are not supported; download them and give local paths",
                                        file=file, row=row, field=field))
        else:
            uri = resolve_image(str(value), root)
            if uri is None:
                problems.report(IngestError(f"image file {str(value)!r} not found under {root}", file=file,
                                            row=row, field=field))
                # Skipped: predictions naming this path are dropped quietly later.
                problems.dropped_uris.add(absolute(os.path.join(root, str(value))))
            elif uri in first_row:
                problems.report(IngestError(f"image {uri} is already in row {first_row[uri]}", file=file,
                                            row=row, field=field))
                uri = None
            else:
                first_row[uri] = row
        uris.append(uri)
        if uri is None:
            bad.add(row)
    return uris, bad


def _numeric_ids(values: pd.Series) -> bool:
    """Whether an id column holds numbers (else it is text metadata, and predictions join by path)."""
    if pd.api.types.is_bool_dtype(values):
        return False
    present = values.dropna()
    return bool(len(present)) and bool(pd.to_numeric(present, errors="coerce").notna().all())


def integer_ids(values: pd.Series, *, file: str, field: str, problems: Problems) -> tuple[np.ndarray, set[int]]:
    """An integer id column; -1 and a reported problem where a cell is no integer or repeats."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    integral = np.isfinite(numbers) & (numbers == np.round(numbers))
    ids = np.where(integral, numbers, -1).astype(np.int64)
    bad: set[int] = set()
    cells = values.tolist()  # plain Python values, for readable messages
    for row in np.flatnonzero(~integral):
        problems.report(IngestError(f"{cells[row]!r} is not an integer id", file=file, row=int(row),
                                    field=field))
        bad.add(int(row))
    first = pd.Series(ids).duplicated(keep="first").to_numpy() & integral
    for row in np.flatnonzero(first):
        earlier = int(np.flatnonzero(ids == ids[row])[0])
        problems.report(IngestError(f"duplicate id {ids[row]} (first in row {earlier})", file=file,
                                    row=int(row), field=field))
        bad.add(int(row))
    return ids, bad


# --------------------------------------------------------------------------- reader


def read_table(source: str | os.PathLike | pd.DataFrame, task: str, image_col: str = "image",
               label_col: str | Sequence[str] = "label", images_root: str | os.PathLike | None = None, *,
               classes: Sequence[str] | None = None, class_index_base: int = 0, id_col: str = "image_id",
               name: str | None = None, problems: Problems | None = None) -> Dataset:
    """Read an Azure RAI vision style table (see the module docstring)."""
    if task not in TASKS:
        raise IngestError(f"unknown task {task!r}", field="task", choices=list(TASKS))
    problems = problems or Problems()
    frame, file = load_table(source)
    label_cols = list(label_col) if isinstance(label_col, (list, tuple)) else [label_col]
    for col in [image_col, *label_cols]:
        if col not in frame.columns:
            raise IngestError(f"no column {col!r}", file=file, field=col, choices=[str(c) for c in frame.columns])
    if len(label_cols) > 1 and task != "multilabel":
        raise IngestError("one label column per label is only for multilabel", file=file, field="label")
    root = absolute(images_root if images_root is not None else
                    (Path(file).parent if file != DATAFRAME else os.getcwd()))
    uris, bad = resolve_rows(frame[image_col].tolist(), root, file=file, field=image_col, problems=problems)
    source_ids = None
    if id_col in frame.columns and _numeric_ids(frame[id_col]):
        source_ids, bad_ids = integer_ids(frame[id_col], file=file, field=id_col, problems=problems)
        bad |= bad_ids
    elif id_col in frame.columns:
        log.warning("%s: column %r holds text, not integer ids; kept as metadata (predictions join by path)",
                    file, id_col)

    class_map, labels, gt_boxes, bad_labels = _labels(frame, task, label_cols, classes, class_index_base,
                                                      file, problems)
    bad |= bad_labels
    keep = np.array([row not in bad for row in range(len(frame))], dtype=bool)
    problems.dropped_uris.update(u for u, k in zip(uris, keep) if u is not None and not k)
    if source_ids is not None:
        problems.dropped_source_ids.update(int(s) for s, k in zip(source_ids, keep) if s >= 0 and not k)

    rows = np.flatnonzero(keep)
    images = pd.DataFrame({"image_id": rows.astype(np.int64), "uri": [uris[r] for r in rows]})
    images["true_label"] = [labels[r] for r in rows]
    if source_ids is not None:
        images["source_id"] = source_ids[rows]
    consumed = {image_col, *label_cols} | ({id_col} if source_ids is not None else set())
    user = [c for c in frame.columns if c not in consumed]
    renamed = clean_column_names(map(str, user))
    for column in user:
        images[renamed[str(column)]] = user_column(frame[column].iloc[rows].reset_index(drop=True))
    if gt_boxes is not None:
        gt_boxes = gt_boxes[np.isin(gt_boxes["image_id"].to_numpy(), rows)].reset_index(drop=True)
        gt_boxes["gt_id"] = np.arange(len(gt_boxes), dtype=np.int32)
    stem = Path(file).stem if file != DATAFRAME else "table"
    return Dataset(name=name or stem, task=task, classes=class_map.classes, images=images,
                   gt_boxes=gt_boxes, extra_meta={"images_root": root})


def _labels(frame: pd.DataFrame, task: str, label_cols: list[str], classes: Sequence[str] | None,
            index_base: int, file: str, problems: Problems
            ) -> tuple[ClassMap, list, pd.DataFrame | None, set[int]]:
    """Per-row true labels (and detection boxes) with the class map they use."""
    n = len(frame)
    bad: set[int] = set()
    if len(label_cols) > 1:
        return _one_hot_labels(frame, label_cols, file, problems)
    field = label_cols[0]
    cells = frame[field].tolist()
    if task == "multiclass":
        tokens = [None if is_missing(v) else class_token(v) for v in cells]
        for row in np.flatnonzero([t is None for t in tokens]):
            problems.report(IngestError(f"label {cells[row]!r} is no class name or index", file=file,
                                        row=int(row), field=field))
            bad.add(int(row))
        class_map = ClassMap.infer([t for t in tokens if t is not None], classes, index_base)
        ids = class_map.ids(tokens)
        report_unknown_classes(ids, tokens, np.arange(n), [field] * n, class_map, file, problems, bad)
        return class_map, [int(v) for v in ids], None, bad
    if task == "multilabel":
        lists: list[list] = []
        for row, cell in enumerate(cells):
            try:
                lists.append([class_token(v) for v in parse_list(cell, allow_words=True)])
            except ValueError as exc:
                problems.report(IngestError(str(exc), file=file, row=row, field=field))
                bad.add(row)
                lists.append([])
        flat = [t for values in lists for t in values]
        rows = np.repeat(np.arange(n), [len(v) for v in lists])
        class_map = ClassMap.infer([t for t in flat if t is not None], classes, index_base)
        ids = class_map.ids(flat)
        report_unknown_classes(ids, flat, rows, [field] * len(flat), class_map, file, problems, bad)
        starts = np.concatenate([[0], np.cumsum([len(v) for v in lists])])
        labels = [np.unique(ids[starts[r]:starts[r + 1]]).astype(np.int32) for r in range(n)]
        return class_map, labels, None, bad
    boxes, bad = parse_boxes(cells, extra=("iscrowd",), optional_extra=True, file=file, field=field,
                             problems=problems, rows=range(n))
    class_map = ClassMap.infer([t for t in boxes.tokens if t is not None], classes, index_base)
    ids = class_map.ids(boxes.tokens)
    report_unknown_classes(ids, boxes.tokens, boxes.row,
                           [f"{field}[{p}]" for p in boxes.position], class_map, file, problems, bad)
    ok = ~np.isin(boxes.row, np.fromiter(bad, dtype=np.int64, count=len(bad)))
    values = boxes.values[ok]
    gt = pd.DataFrame({
        "image_id": boxes.row[ok], "class_id": ids[ok].astype(np.int32),
        "xmin": values[:, 0], "ymin": values[:, 1], "xmax": values[:, 2], "ymax": values[:, 3],
        "iscrowd": values[:, 4] != 0,
    })
    gt["area"] = (gt["xmax"] - gt["xmin"]) * (gt["ymax"] - gt["ymin"])
    labels = [np.zeros(0, np.int32)] * n
    return class_map, labels, gt, bad


def _one_hot_labels(frame: pd.DataFrame, label_cols: list[str], file: str, problems: Problems
                    ) -> tuple[ClassMap, list, None, set[int]]:
    values = frame[label_cols]
    bad: set[int] = set()
    matrix = np.zeros(values.shape, dtype=bool)
    for k, col in enumerate(label_cols):
        column = values[col]
        cells = column.tolist()
        ok = column.isin([0, 1, True, False]).to_numpy()
        for row in np.flatnonzero(~ok):
            problems.report(IngestError(f"one-hot label must be 0 or 1, got {cells[row]!r}", file=file,
                                        row=int(row), field=col))
            bad.add(int(row))
        matrix[ok, k] = column[ok].astype(bool).to_numpy()
    labels = [np.flatnonzero(r).astype(np.int32) for r in matrix]
    return ClassMap([str(c) for c in label_cols]), labels, None, bad
