"""ImageFolder trees → ``Dataset`` (classification only).

``root/<class>/…/<image>``: each sub-folder of ``root`` is a class (sorted by
name, as torchvision's ``ImageFolder``); images may sit at any depth inside it.
Hidden files and folders are ignored, and so are images directly in ``root``
(they have no class; a warning counts them).

Multilabel: one folder per label, and an image carrying several labels is
stored in each of its label folders under the same relative path
(``root/cat/0001.jpg`` and ``root/dog/0001.jpg`` are one image labelled
cat + dog). Copies of one relative path must have the same size in bytes; the
first copy (in class order) is the file VisionLens reads. An image with no
label at all cannot be expressed this way: use a table for such datasets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IngestError
from . import IMAGE_EXTENSIONS, Problems, absolute
from .build import Dataset

log = logging.getLogger(__name__)


def _images_below(folder: Path) -> list[str]:
    """Paths of image files below ``folder``, relative to it, sorted."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(current, folder)
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def read_imagefolder(root: str | os.PathLike, *, task: str = "multiclass", name: str | None = None,
                     problems: Problems | None = None) -> Dataset:
    """Read an ImageFolder tree (see the module docstring)."""
    if task == "detection":
        raise IngestError("an ImageFolder tree has no boxes; use --coco, --voc or --table for detection",
                          field="task", choices=["multiclass", "multilabel"])
    if task not in ("multiclass", "multilabel"):
        raise IngestError(f"unknown task {task!r}", field="task", choices=["multiclass", "multilabel"])
    problems = problems or Problems()
    root_path = Path(absolute(root))
    if not root_path.is_dir():
        raise IngestError("ImageFolder root not found", file=str(root_path))
    classes = sorted(e.name for e in os.scandir(root_path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise IngestError("no class sub-folders", file=str(root_path))
    loose = [e.name for e in os.scandir(root_path)
             if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("%d image(s) directly in %s have no class folder; ignored", len(loose), root_path)

    rel_paths: list[str] = []
    class_ids: list[int] = []
    for k, cls in enumerate(classes):
        found = _images_below(root_path / cls)
        rel_paths.extend(found)
        class_ids.extend([k] * len(found))
    if not rel_paths:
        raise IngestError("no images in the class folders", file=str(root_path))
    files = pd.DataFrame({"rel": rel_paths, "class_id": np.asarray(class_ids, dtype=np.int32)})
    files["uri"] = [os.path.join(root_path, classes[c], r) for c, r in zip(files["class_id"], files["rel"])]

    if task == "multiclass":
        images = pd.DataFrame({"image_id": np.arange(len(files), dtype=np.int64), "uri": files["uri"],
                               "true_label": files["class_id"]})
    else:
        files["size"] = [os.path.getsize(u) for u in files["uri"]]
        groups = files.groupby("rel", sort=True)
        sizes = groups["size"].nunique()
        for rel in sizes.index[sizes > 1]:
            copies = files[files["rel"] == rel]
            listing = ", ".join(f"{classes[c]} ({s} bytes)" for c, s in zip(copies["class_id"], copies["size"]))
            problems.report(IngestError(f"copies of {rel!r} in label folders differ: {listing}",
                                        file=str(root_path / classes[copies['class_id'].iloc[0]] / rel),
                                        field="label folders"))
            problems.dropped_uris.update(copies["uri"])
        keep = sizes.index[sizes == 1]
        first = groups["uri"].first().loc[keep]
        labels = groups["class_id"].agg(lambda s: np.unique(s.to_numpy()).astype(np.int32)).loc[keep]
        images = pd.DataFrame({"image_id": np.arange(len(keep), dtype=np.int64),
                               "uri": first.to_numpy(), "true_label": list(labels.to_numpy())})
    return Dataset(name=name or root_path.name, task=task, classes=classes, images=images,
                   extra_meta={"images_root": str(root_path)})
