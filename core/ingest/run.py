"""``visionlens ingest``: read a dataset (and a model's outputs) and build a store.

With a dataset source (``--coco``, ``--voc``, ``--imagefolder``, ``--table``)
the store at ``--out`` is built (or rebuilt, atomically). Without one, an
existing store gets one more model (``--predictions`` or ``--model``) as parts.
Progress goes to stderr; errors print one message and exit with code 2;
rows skipped with ``--skip-bad`` are listed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from ..errors import IngestError, VisionLensError
from ..store import Store, StorePaths
from . import Problems
from .build import EXIF_BOXES, SKIPPED_META, TASKS, Dataset, ModelRun, add_model, build_store
from .coco import dataset_index, read_coco
from .imagefolder import read_imagefolder
from .predictions import read_predictions, run_model, store_index
from .table import read_table
from .voc import read_voc


class ProgressBar:
    """``stage [#####-----] done/total`` on stderr; redrawn in place on a terminal, one line per stage otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.stage: str | None = None
        self.open_line = False
        self.told_done = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.finish()
            self.stage = stage
            self.told_done = False
            if not self.tty:
                self.stream.write(f"{stage} ...\n")
        filled = self.width if total <= 0 else int(self.width * min(done, total) / total)
        # A one-step stage (reading a folder, writing the store) has nothing to count.
        count = f"{done}/{total}" if total > 1 else ""
        if self.tty:
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{stage:<10} [{bar}] {count}")
            self.open_line = True
        elif total > 0 and done >= total and not self.told_done:  # a stage may report its end twice
            self.stream.write(f"{stage} done: {total}\n" if total > 1 else f"{stage} done\n")
            self.told_done = True
        self.stream.flush()

    def finish(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionlens ingest",
                                description="Build a VisionLens store from annotations and model outputs.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="store path: DIR/NAME or DIR/NAME.duckdb")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--coco", metavar="GT.json", help="COCO instances json")
    source.add_argument("--voc", metavar="DIR", help="folder of Pascal VOC xml files (any nesting)")
    source.add_argument("--imagefolder", metavar="DIR", help="one sub-folder per class (or per label)")
    source.add_argument("--table", metavar="FILE", help="Azure RAI vision table: CSV, JSON lines or Parquet")
    p.add_argument("--images-root", metavar="DIR", help="folder image paths are relative to")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--predictions", metavar="FILE",
                       help="COCO results json, or a table (CSV, JSON lines, Parquet) with columns: image (path) or "
                            "image_id (the source's id); pred_label, prediction or label (a class name or index); "
                            "score; probs (a list, in class order) or prob_<class> (one per class); for detection "
                            "a detections list of [class, xmin, ymin, xmax, ymax, score]")
    model.add_argument("--model", metavar="MODULE:FUNCTION", help="function returning a torch model to run")
    p.add_argument("--model-name", help="display name of the model (its id is derived from it)")
    p.add_argument("--threshold", type=float,
                   help="multilabel label threshold / detection score threshold (default 0.5)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows and images, list them at the end")
    p.add_argument("--replace", action="store_true",
                   help="with a dataset source, rebuild an existing store (its models and results go)")
    p.add_argument("--exif-boxes", choices=EXIF_BOXES, default="auto",
                   help="frame of the boxes of EXIF-rotated photos: 'upright' (as a viewer shows them), 'stored' "
                        "(raw pixels, as COCO and torchvision read them) or 'auto' (default: the one the COCO "
                        "width/height of quarter-turned photos match; else stored)")
    p.add_argument("--input-size", metavar="H,W", type=_size, help="resize images to H,W for --model")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device for --model (default: cuda if present)")
    p.add_argument("--image-col", default="image", help="table column with the image path (default: image)")
    p.add_argument("--label-col", default="label", help="table column with the label (default: label)")
    p.add_argument("--classes", help="class names in id order: comma-separated, or a file with one per line")
    p.add_argument("--class-index-base", type=int, choices=(0, 1), default=0,
                   help="integer class labels in tables count from this (Azure RAI detection: 1)")
    return p


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _classes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    return [c.strip() for c in value.split(",") if c.strip()]


def model_id_from(text: str) -> str:
    """A model id (letters, digits, ``-``, ``_``) from a name, file or loader."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return slug[:64] or "model"


def _model_identity(args: argparse.Namespace) -> tuple[str, str]:
    if args.model_name:
        return model_id_from(args.model_name), args.model_name
    if args.predictions:
        stem = Path(args.predictions).stem
        return model_id_from(stem), stem
    function = args.model.partition(":")[2] or args.model
    return model_id_from(function), function


def _read_dataset(args: argparse.Namespace, name: str, problems: Problems) -> Dataset:
    if args.coco:
        return read_coco(args.coco, args.images_root, task=args.task, name=name, problems=problems)
    if args.voc:
        return read_voc(args.voc, args.images_root, task=args.task, name=name, problems=problems)
    if args.imagefolder:
        return read_imagefolder(args.imagefolder, task=args.task, name=name, problems=problems)
    return read_table(args.table, args.task, image_col=args.image_col, label_col=args.label_col,
                      images_root=args.images_root, classes=_classes(args.classes),
                      class_index_base=args.class_index_base, name=name, problems=problems)


def _model_run(args: argparse.Namespace, index, classes: list[str], category_ids, uris: list[str],
               image_ids: list[int], threshold: float, problems: Problems, bar: ProgressBar) -> ModelRun | None:
    if not (args.predictions or args.model):
        return None
    model_id, name = _model_identity(args)
    if args.predictions:
        bar("predictions", 0, 1)
        run = read_predictions(args.predictions, args.task, index, classes, category_ids=category_ids,
                               model_id=model_id, name=name, problems=problems, image_col=args.image_col,
                               class_index_base=args.class_index_base)
        bar("predictions", 1, 1)
        return run
    return run_model(args.model, args.task, uris, image_ids, input_size=args.input_size, device=args.device,
                     threshold=threshold, model_id=model_id, name=name, problems=problems,
                     progress=lambda done, total: bar("inference", done, total))


def _ingest(args: argparse.Namespace, problems: Problems, bar: ProgressBar) -> list[IngestError]:
    paths = StorePaths.of(args.out)
    has_source = any((args.coco, args.voc, args.imagefolder, args.table))
    if not has_source:
        if not (args.predictions or args.model):
            raise IngestError("give a dataset (--coco, --voc, --imagefolder or --table), or --predictions / "
                              "--model to add a model to an existing store")
        if not paths.base.exists():
            raise IngestError("no store to add the model to; give a dataset source to build it",
                              file=str(paths.base))
        store = Store(paths.base)
        try:
            if store.task != args.task:
                raise IngestError(f"the store's task is {store.task!r}, not {args.task!r}", field="task",
                                  file=str(paths.base))
            index = store_index(store)
            classes = store.classes
            meta = store.meta()
        finally:
            store.close()
        category_ids = json.loads(meta["coco_category_ids"]) if "coco_category_ids" in meta else None
        threshold = args.threshold if args.threshold is not None else float(
            meta.get("label_threshold" if args.task == "multilabel" else "score_threshold", 0.5))
        run = _model_run(args, index, classes, category_ids, index.uris, index.image_ids, threshold,
                         problems, bar)
        bar("writing", 0, 1)
        add_model(paths.base, run, threshold=threshold)
        bar("writing", 1, 1)
        bar.finish()
        print(f"added model {run.model_id!r} to {paths.base}")
        _print_coverage(paths.base, run.model_id, ground_truth=False)
        return list(problems.skipped)

    if paths.base.exists() and not args.replace:
        raise IngestError("a store is already here: to add a model to it, give --predictions or --model without "
                          "a dataset source; to build it anew from the dataset (dropping its models and "
                          "results), add --replace", file=str(paths.base))
    bar("reading", 0, 1)
    dataset = _read_dataset(args, paths.name, problems)
    bar("reading", 1, 1)
    if dataset.images.empty:
        raise IngestError("no usable images", file=args.coco or args.voc or args.imagefolder or args.table)
    threshold = args.threshold if args.threshold is not None else 0.5
    run = _model_run(args, dataset_index(dataset, problems), dataset.classes,
                     dataset.extra_meta.get("coco_category_ids"), dataset.images["uri"].tolist(),
                     dataset.images["image_id"].tolist(), threshold, problems, bar)
    dataset.extra_meta[SKIPPED_META] = {"uris": sorted(problems.dropped_uris),
                                        "source_ids": sorted(problems.dropped_source_ids)}
    report = build_store(paths.base, dataset, [run] if run else [], skip_bad=args.skip_bad,
                         threshold=threshold, progress=bar, exif_boxes=args.exif_boxes)
    bar.finish()
    print(f"built {report.path}: {report.images} images, {len(dataset.classes)} classes"
          + (f", model {run.model_id!r}" if run else ""))
    # COCO declares its categories and a folder is a class: only labels typed into a table or XML can be misspelt.
    rare = rare_classes(dataset) if (args.table or args.voc) and not args.classes else []
    if rare:
        print(f"class(es) labelled only once: {', '.join(rare)}. A typo? Give --classes to list the valid "
              "classes: a label outside them is then an error naming its row.")
    _print_coverage(report.path, run.model_id if run else None, ground_truth=True)
    if report.upright_images:
        print(f"the boxes of {report.upright_images} EXIF-rotated image(s) were given upright (as a viewer shows "
              "them) and are stored in the images' stored frame, like their pixels (--exif-boxes to choose)")
    # An unreadable image fails both inference and metadata: list it once, with the metadata reason.
    seen = {_where(e) for e in report.skipped}
    return [e for e in problems.skipped if _where(e) not in seen] + list(report.skipped)


def _print_coverage(path: Path, model_id: str | None, *, ground_truth: bool) -> None:
    """What the store holds less than every image: images without objects (detection), crowd regions, and
    images the model gave nothing for (and what that means for its metrics)."""
    store = Store(path)
    try:
        n = store.image_count()
        detection = store.task == "detection"
        if ground_truth and detection:
            crowd, with_objects = store.rows('SELECT count(*) FILTER (WHERE iscrowd), count(DISTINCT image_id) '
                                             'FROM "gt_boxes"')[0]
            if n - with_objects or crowd:
                print(f"{n - with_objects:,} of {n:,} images hold no annotated object; {crowd:,} crowd region(s) "
                      "are ignored in matching, as COCO does")
        if model_id is not None:
            table = "det_boxes" if detection else "predictions"
            given = int(store.scalar(f'SELECT count(DISTINCT image_id) FROM "{table}" WHERE model_id = ?',
                                     [model_id]))
            if given < n:
                what = ("no detection: all their objects count as missed" if detection else
                        "no prediction: they are left out of its metrics")
                print(f"{n - given:,} of {n:,} images have {what} (model {model_id!r})")
    finally:
        store.close()


def rare_classes(dataset: Dataset) -> list[str]:
    """Classes that the ground truth names once (one image or box): read from the labels, a misspelt
    label becomes a class of its own."""
    if dataset.gt_boxes is not None:
        labels = dataset.gt_boxes["class_id"].to_numpy(np.int64)
    elif dataset.task == "multilabel":
        labels = np.concatenate([np.asarray(v, np.int64) for v in dataset.images["true_label"]] or [np.zeros(0)])
    else:
        labels = dataset.images["true_label"].dropna().to_numpy(np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=len(dataset.classes))
    return [dataset.classes[k] for k in np.flatnonzero(counts == 1)]


def _where(error: IngestError) -> tuple:
    return (error.file, str(error.row), error.field)


def _print_skipped(skipped: list[IngestError], stream: TextIO) -> None:
    unique = list(dict.fromkeys(str(e) for e in skipped))
    if unique:
        stream.write(f"skipped {len(unique)} bad row(s)/image(s):\n")
        for text in unique:
            stream.write(f"  {text}\n")


def ingest_main(argv: list[str] | None = None) -> int:
    """Entry point of ``visionlens ingest``; returns the exit code."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    problems = Problems(args.skip_bad)
    bar = ProgressBar()
    try:
        skipped = _ingest(args, problems, bar)
    except VisionLensError as exc:
        bar.finish()
        sys.stderr.write(f"visionlens ingest: error: {exc}\n")
        return 2
    _print_skipped(skipped, sys.stderr)
    return 0
