"""Pascal VOC xml trees → ``Dataset``.

Every ``*.xml`` below ``root`` whose top element is ``<annotation>`` is one
image (other xml files are ignored). The image is looked for, first hit wins:

1. ``<filename>``, then ``<folder>/<filename>``, then ``<path>`` (by its tails
   when written on another machine), under ``images_root`` (if given), the xml's
   own folder, the VOC sibling folder (``…/Annotations/…`` → ``…/JPEGImages/…``)
   and ``root``;
2. the xml's stem with an image extension, in the same folders;
3. a file of that name anywhere below ``images_root`` (or ``root``), if exactly one.

Boxes are kept as written (VOC pixel coordinates, ``xmin ymin xmax ymax``);
area is the box area. VOC ``difficult`` objects are conventionally left out
of scoring, so they become ``iscrowd = True``: the COCO matcher then ignores
them and any detection matched to them, as VOC evaluation does. Class names
are collected from all objects and sorted.

An xml that cannot be used (malformed, an object without name or numeric
box, ``xmax < xmin``) names the file, the object (``object[2]``) and the field;
with ``skip_bad`` the image is skipped and the reason kept for the report.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IngestError
from . import IMAGE_EXTENSIONS, Problems, absolute, path_parts, resolve_image
from .build import Dataset

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "detection")
_TRUE = {"1", "true", "yes"}


def _xml_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in files if f.lower().endswith(".xml") and not f.startswith("."))
    return sorted(found)


def _sibling_images_dir(xml_path: Path) -> Path | None:
    parts = list(xml_path.parent.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k].lower() == "annotations":
            return Path(*parts[:k], "JPEGImages", *parts[k + 1:])
    return None


class _ImageFinder:
    """Looks for an annotation's image; the by-name index of last resort is built once, lazily."""

    def __init__(self, search_root: Path):
        self.search_root = search_root
        self._by_name: dict[str, list[str]] | None = None

    def by_name(self, basename: str) -> list[str]:
        if self._by_name is None:
            self._by_name = {}
            for folder, dirs, files in os.walk(self.search_root):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in files:
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        self._by_name.setdefault(f, []).append(absolute(os.path.join(folder, f)))
        return self._by_name.get(basename, [])

    def find(self, xml_path: Path, tree: ET.Element, roots: list[Path]) -> str:
        filename = (tree.findtext("filename") or "").strip()
        folder = (tree.findtext("folder") or "").strip()
        path = (tree.findtext("path") or "").strip()
        names = [n for n in (filename, f"{folder}/{filename}" if folder and filename else "", path) if n]
        names += [xml_path.stem + ext for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")]
        for name in names:
            hit = resolve_image(name, roots[0], extra_roots=roots[1:])
            if hit:
                return hit
        basename = (path_parts(filename or path) or [""])[-1]
        matches = self.by_name(basename) if basename else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise IngestError(f"{len(matches)} files are named {basename!r} below {self.search_root}; "
                              "give --images-root so the image is found by its folder",
                              file=str(xml_path), field="filename")
        raise IngestError(f"image {filename or path or xml_path.stem!r} not found "
                          f"(looked in {', '.join(map(str, roots))})", file=str(xml_path), field="filename")


def _number(text: str | None) -> float:
    value = float(text) if text is not None else math.nan
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _objects(xml_path: Path, tree: ET.Element) -> list[tuple[str, float, float, float, float, bool]]:
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        where = f"object[{k}]"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise IngestError("object has no <name>", file=str(xml_path), row=where, field="name")
        box = obj.find("bndbox")
        if box is None:
            raise IngestError(f"object {name!r} has no <bndbox>", file=str(xml_path), row=where, field="bndbox")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(tag)
            try:
                coords.append(_number(text.strip() if text else None))
            except ValueError:
                raise IngestError(f"<{tag}> is {text!r}, not a finite number", file=str(xml_path),
                                  row=where, field=f"bndbox/{tag}") from None
        xmin, ymin, xmax, ymax = coords
        if xmax < xmin or ymax < ymin:
            field = "bndbox/xmax" if xmax < xmin else "bndbox/ymax"
            raise IngestError(f"box {coords} has max < min", file=str(xml_path), row=where, field=field)
        difficult = (obj.findtext("difficult") or "0").strip().lower() in _TRUE
        objects.append((name, xmin, ymin, xmax, ymax, difficult))
    return objects


def _declared_size(tree: ET.Element) -> tuple[int, int] | None:
    """``<size>``'s width and height (the frame the boxes were drawn in), when both are positive integers."""
    try:
        width, height = (int((tree.findtext(f"size/{tag}") or "").strip()) for tag in ("width", "height"))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def read_voc(root: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
             task: str = "detection", name: str | None = None,
             problems: Problems | None = None) -> Dataset:
    """Read every VOC annotation below ``root`` (see the module docstring)."""
    if task not in TASKS:
        raise IngestError(f"unknown task {task!r}", field="task", choices=list(TASKS))
    problems = problems or Problems()
    root_path = Path(absolute(root))
    if not root_path.is_dir():
        raise IngestError("VOC folder not found", file=str(root_path))
    image_root = Path(absolute(images_root)) if images_root is not None else None
    finder = _ImageFinder(image_root or root_path)
    uris: list[str] = []
    declared: list[tuple[int, int] | None] = []
    objects: list[list[tuple]] = []
    seen: dict[str, str] = {}
    ignored = 0
    for xml_path in _xml_files(root_path):
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            problems.report(IngestError(f"not valid xml: {exc}", file=str(xml_path),
                                        row=f"line {exc.position[0]}"))
            continue
        except OSError as exc:
            problems.report(IngestError(f"cannot read: {exc}", file=str(xml_path)))
            continue
        if tree.tag != "annotation":
            ignored += 1
            continue
        roots = [r for r in (image_root, xml_path.parent, _sibling_images_dir(xml_path), root_path) if r]
        try:
            uri = finder.find(xml_path, tree, roots)
            boxes = _objects(xml_path, tree)
        except IngestError as exc:
            problems.report(exc)
            continue
        if uri in seen:
            problems.report(IngestError(f"image {uri} is already annotated by {seen[uri]}",
                                        file=str(xml_path), field="filename"))
            continue
        seen[uri] = str(xml_path)
        uris.append(uri)
        declared.append(_declared_size(tree))
        objects.append(boxes)
    if ignored:
        log.info("%d xml file(s) below %s are not VOC annotations; ignored", ignored, root_path)
    if not uris and not problems.skipped:
        raise IngestError("no VOC annotation xml files found", file=str(root_path))

    classes = sorted({obj[0] for boxes in objects for obj in boxes})
    class_index = {c: k for k, c in enumerate(classes)}
    counts = np.array([len(b) for b in objects], dtype=np.int64)
    flat = [obj for boxes in objects for obj in boxes]
    gt = pd.DataFrame({
        "image_id": np.repeat(np.arange(len(uris), dtype=np.int64), counts),
        "gt_id": np.arange(len(flat), dtype=np.int32),
        "class_id": np.array([class_index[o[0]] for o in flat], dtype=np.int32),
        "xmin": np.array([o[1] for o in flat], dtype=np.float64),
        "ymin": np.array([o[2] for o in flat], dtype=np.float64),
        "xmax": np.array([o[3] for o in flat], dtype=np.float64),
        "ymax": np.array([o[4] for o in flat], dtype=np.float64),
        "iscrowd": np.array([o[5] for o in flat], dtype=bool),
    })
    gt["area"] = (gt["xmax"] - gt["xmin"]) * (gt["ymax"] - gt["ymin"])
    images = pd.DataFrame({"image_id": np.arange(len(uris), dtype=np.int64), "uri": uris})
    sizes = pd.DataFrame([(i, *size) for i, size in enumerate(declared) if size is not None],
                         columns=["image_id", "width", "height"])
    labels = [np.unique(np.array([class_index[o[0]] for o in boxes], dtype=np.int32)) for boxes in objects]
    gt_boxes = None
    if task == "detection":
        gt_boxes = gt
        images["true_label"] = labels
    elif task == "multilabel":
        images["true_label"] = labels
    else:
        single = np.array([len(v) == 1 for v in labels], dtype=bool)
        for pos in np.flatnonzero(~single):
            names = [classes[c] for c in labels[pos]]
            problems.report(IngestError(
                f"multiclass needs exactly one class per image; this one has {len(names)} "
                f"({', '.join(names) or 'none'})", file=seen[uris[pos]], field="name"))
            problems.dropped_uris.add(uris[pos])
        images["true_label"] = [int(v[0]) if len(v) == 1 else -1 for v in labels]
        images = images[single].reset_index(drop=True)
    return Dataset(name=name or root_path.name, task=task, classes=classes, images=images,
                   gt_boxes=gt_boxes, extra_meta={"images_root": str(image_root or root_path)}, declared_sizes=sizes)
