"""Readers that turn annotation files into a ``build.Dataset`` and model outputs into ``ModelRun``s.

- ``coco.read_coco`` / ``coco.read_coco_results``: COCO instances json and results json.
- ``voc.read_voc``: Pascal VOC xml trees.
- ``imagefolder.read_imagefolder``: one folder per class (or per label).
- ``table.read_table``: Azure RAI vision tables (CSV, JSON lines, Parquet, DataFrame).
- ``predictions.read_predictions`` / ``predictions.run_model``: a model's outputs
  from a file or from running a torch model.
- ``run.ingest_main``: the ``visionlens ingest`` command.

This module holds what they share: ``Problems`` (raise at once, or with
``skip_bad`` collect every skipped row), image path resolution that survives
annotation files written on another machine, and ``ImageIndex`` which joins
predictions to images by path or by the source's own image id.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import IngestError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})

# Columns of ``images`` that VisionLens fills itself; user columns of these names are renamed.
RESERVED_COLUMNS = frozenset({
    "image_id", "uri", "true_label", "width", "height", "file_size", "aspect_ratio", "brightness",
    "contrast", "sharpness", "noise", "colorfulness", "thumbnail", "source_id", "pred_label",
    "pred_labels", "score", "probs", "outcome", "error", "correct", "model", "cohort",
})

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class Problems:
    """Where bad rows go: raised at once, or with ``skip_bad`` kept for the final report."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.skipped: list[IngestError] = []
        # Images dropped while reading (by resolved uri and by source id), so later
        # predictions for them are dropped quietly instead of reported as unknown.
        self.dropped_uris: set[str] = set()
        self.dropped_source_ids: set[int] = set()

    def report(self, error: IngestError) -> None:
        """Raise ``error``, or record it when skipping bad rows."""
        if not self.skip_bad:
            raise error
        log.debug("skipping: %s", error)
        self.skipped.append(error)


def path_parts(name: str) -> list[str]:
    """Components of a path written on any OS (``/``, ``\\``, drive letters)."""
    text = _WINDOWS_DRIVE.sub("", name.replace("\\", "/"))
    return [p for p in text.split("/") if p not in ("", ".")]


def is_foreign(name: str) -> bool:
    """A path written on Windows (backslashes or a drive letter): only its tails can mean a file here."""
    return "\\" in name or bool(_WINDOWS_DRIVE.match(name))


def absolute(path: str | os.PathLike) -> str:
    """Absolute, normalised, symlinks kept (the layout the user chose)."""
    return os.path.abspath(os.fspath(path))


def resolve_image(name: str, root: str | os.PathLike, *, extra_roots: Iterable[str | os.PathLike] = ()
                  ) -> str | None:
    """The existing file an annotation's image path means, or None.

    Tries ``name`` as given (absolute, or relative to ``root`` and each of
    ``extra_roots``), then for paths from another machine
    (``/home/someone/coco/val2017/x.jpg``, ``C:\\data\\x.jpg``) its tails,
    longest first, under each root: ``coco/val2017/x.jpg``, ``val2017/x.jpg``, ``x.jpg``.
    """
    name = str(name).strip()
    if not name:
        return None
    roots = [Path(root), *map(Path, extra_roots)]
    if not is_foreign(name):
        if os.path.isabs(name):
            if os.path.isfile(name):
                return absolute(name)
        else:
            for r in roots:
                candidate = r / name
                if candidate.is_file():
                    return absolute(candidate)
    parts = path_parts(name)
    for start in range(len(parts)):
        tail = os.path.join(*parts[start:])
        for r in roots:
            candidate = r / tail
            if candidate.is_file():
                return absolute(candidate)
    return None


@dataclass
class ImageIndex:
    """Finds a dataset's image id from a path (written anywhere) or a source image id."""

    uris: list[str]
    image_ids: list[int]
    root: str
    source_ids: list[int] | None = None
    dropped_uris: set[str] = field(default_factory=set)
    dropped_source_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._by_uri = dict(zip(self.uris, self.image_ids))
        self._by_source = dict(zip(self.source_ids, self.image_ids)) if self.source_ids is not None else None
        self._by_tail: dict[str, int] | None = None
        self._dropped_tails: set[str] | None = None

    @property
    def has_source_ids(self) -> bool:
        return self._by_source is not None

    def _tail_key(self, uri: str) -> str:
        try:
            rel = os.path.relpath(uri, self.root)
        except ValueError:
            rel = uri
        return "/".join(path_parts(rel)) if not rel.startswith("..") else "/".join(path_parts(uri))

    def _tails(self) -> dict[str, int]:
        # Every suffix of each image's path below the root, kept only where unambiguous.
        if self._by_tail is None:
            counts: dict[str, int] = {}
            tails: dict[str, int] = {}
            for uri, image_id in self._by_uri.items():
                parts = self._tail_key(uri).split("/")
                for start in range(len(parts)):
                    key = "/".join(parts[start:])
                    counts[key] = counts.get(key, 0) + 1
                    tails[key] = image_id
            self._by_tail = {k: v for k, v in tails.items() if counts[k] == 1}
            self._dropped_tails = set()
            for uri in self.dropped_uris:
                parts = self._tail_key(uri).split("/")
                self._dropped_tails.update("/".join(parts[s:]) for s in range(len(parts)))
        return self._by_tail

    def by_path(self, name: str) -> int | None:
        """Image id for a path as written in a predictions file; None if unknown."""
        name = str(name).strip()
        if not is_foreign(name):
            full = absolute(name if os.path.isabs(name) else os.path.join(self.root, name))
            if full in self._by_uri:
                return self._by_uri[full]
        parts = path_parts(name)
        tails = self._tails()
        for start in range(len(parts)):
            hit = tails.get("/".join(parts[start:]))
            if hit is not None:
                return hit
        return None

    def path_was_dropped(self, name: str) -> bool:
        """Whether a path names an image that was skipped while reading the dataset."""
        if not self.dropped_uris:
            return False
        name = str(name).strip()
        if not is_foreign(name):
            full = absolute(name if os.path.isabs(name) else os.path.join(self.root, name))
            if full in self.dropped_uris:
                return True
        self._tails()
        parts = path_parts(name)
        return any("/".join(parts[s:]) in self._dropped_tails for s in range(len(parts)))

    def by_source_id(self, source_id: int) -> int | None:
        if self._by_source is None:
            return None
        return self._by_source.get(source_id)


def clean_column_names(names: Iterable[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """Map user column names to safe, unique identifiers.

    Cohort URLs read ``column__op=value`` with ``g1.`` group prefixes, so names
    keep only letters, digits and single underscores; names VisionLens fills
    itself get a ``user_`` prefix.
    """
    used = set(taken)
    out: dict[str, str] = {}
    for original in names:
        safe = re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]+", "_", str(original))).strip("_") or "column"
        if safe[0].isdigit():
            safe = f"c_{safe}"
        if safe in RESERVED_COLUMNS or safe.startswith("exif_"):
            safe = f"user_{safe}"
        candidate, n = safe, 2
        while candidate in used:
            candidate, n = f"{safe}_{n}", n + 1
        used.add(candidate)
        out[original] = candidate
    return out


def user_column(values: pd.Series) -> pd.Series:
    """A user metadata column with a type the cohort filters understand.

    Booleans stay boolean, numbers numeric (bools mixed with numbers count as
    numbers), everything else becomes text; lists and dicts become their JSON text.
    """
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return values
    if pd.api.types.is_datetime64_any_dtype(values):
        return values
    present = values.dropna()
    if len(present) and present.map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return values.astype("boolean")
    if len(present) and present.map(lambda v: isinstance(v, (int, float, np.number))
                                    and not isinstance(v, (bool, np.bool_))).all():
        return pd.to_numeric(values, errors="coerce")

    def as_text(v: object) -> object:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, (list, tuple, dict, np.ndarray)):
            return json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
        return str(v)

    return pd.Series([as_text(v) for v in values], index=values.index, dtype="string")


def number_rows(values: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as an ``(N, width)`` float array and a mask of malformed rows.

    One numpy conversion when every row is well formed; the per-row check runs
    only when that fails.
    """
    n = len(values)
    try:
        arr = np.asarray(values)
        if arr.shape == (n, width) and arr.dtype.kind in "iuf":
            arr = arr.astype(np.float64)
            return arr, ~np.isfinite(arr).all(axis=1)
    except (TypeError, ValueError):
        pass
    arr = np.full((n, width), np.nan)
    bad = np.zeros(n, dtype=bool)
    for i, row in enumerate(values):
        ok = (isinstance(row, (list, tuple)) and len(row) == width
              and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in row))
        if ok:
            arr[i] = row
            ok = bool(np.isfinite(arr[i]).all())
        bad[i] = not ok
    return arr, bad
