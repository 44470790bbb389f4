"""Cohort detection metrics from stored matches: time to recompute mAP for a 10 % cohort.

    .venv/bin/python benchmarks/detection_cohort.py [--images 10000] [--dets-per-image 100]
        [--cohort 0.1] [--iou 0.75] [--repeats 5] [--seed 0]

Builds a synthetic detection store (default 10,000 images x 100 detections = 1M detections,
80 classes) with ``core.matching.match_detections``, then times ``detection_metrics`` (all 12
COCO stats, per-class AP/AR and curves, macro/micro/weighted) for a 10 % image cohort (a filter
on a random ``brightness`` column, as the cohort compiler writes) at IoU 0.75, and, in the
same run, faster-coco-eval's COCOeval_faster on the same cohort
(``params.imgIds`` = cohort, from COCO objects already in memory: evaluate + accumulate +
summarize only). Prints median times, the ratio, and the largest stat difference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coco_eval import synthetic_coco  # noqa: E402
from core.matching import match_detections  # noqa: E402
from core.metrics.detection import STAT_KEYS, detection_metrics  # noqa: E402
from core.store import Store, build_base  # noqa: E402


def _frames(gt: dict, dets: list, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    anns = pd.DataFrame(gt["annotations"])
    box = np.array(anns["bbox"].tolist(), dtype=float).reshape(-1, 4)
    gt_boxes = pd.DataFrame({
        "image_id": anns["image_id"].to_numpy(np.int32) - 1, "gt_id": anns["id"].to_numpy(np.int32),
        "class_id": anns["category_id"].to_numpy(np.int32) - 1,
        "xmin": box[:, 0], "ymin": box[:, 1], "xmax": box[:, 0] + box[:, 2],
        "ymax": box[:, 1] + box[:, 3], "area": anns["area"].to_numpy(float),
        "iscrowd": anns["iscrowd"].to_numpy(bool)})
    res = pd.DataFrame(dets)
    dbox = np.array(res["bbox"].tolist(), dtype=float).reshape(-1, 4)
    det_boxes = pd.DataFrame({
        "model_id": "bench", "image_id": res["image_id"].to_numpy(np.int32) - 1,
        "det_id": np.arange(1, len(res) + 1, dtype=np.int32),
        "class_id": res["category_id"].to_numpy(np.int32) - 1,
        "score": res["score"].to_numpy(float),
        "xmin": dbox[:, 0], "ymin": dbox[:, 1], "xmax": dbox[:, 0] + dbox[:, 2],
        "ymax": dbox[:, 1] + dbox[:, 3], "area": dbox[:, 2] * dbox[:, 3]})
    images = pd.DataFrame({"image_id": np.arange(len(gt["images"]), dtype=np.int32),
                           "uri": [f"/synthetic/{im['file_name']}" for im in gt["images"]],
                           "width": 640, "height": 480,
                           "brightness": np.random.default_rng(seed).random(len(gt["images"]))})
    return images, gt_boxes, det_boxes


def _reference_coco(gt_boxes: pd.DataFrame, det_boxes: pd.DataFrame, n_images: int,
                    n_classes: int):
    """faster-coco-eval COCO objects built from the same (xyxy -> xywh) boxes the store holds."""
    from faster_coco_eval import COCO

    coco_gt = COCO()
    coco_gt.dataset = {
        "images": [{"id": i} for i in range(n_images)],
        "categories": [{"id": c} for c in range(n_classes)],
        "annotations": [
            {"id": int(g), "image_id": int(i), "category_id": int(c),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(a), "iscrowd": int(cr)}
            for g, i, c, x0, y0, x1, y1, a, cr in gt_boxes[
                ["gt_id", "image_id", "class_id", "xmin", "ymin", "xmax", "ymax", "area",
                 "iscrowd"]].itertuples(index=False)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([
            {"image_id": int(i), "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0],
             "score": float(s)}
            for i, c, s, x0, y0, x1, y1 in det_boxes[
                ["image_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax"]
            ].itertuples(index=False)])
    return coco_gt, coco_dt


def _faster_stats(coco_gt, coco_dt, cohort: list[int]) -> np.ndarray:
    from faster_coco_eval import COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = cohort
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=float)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--cohort", type=float, default=0.1, help="cohort fraction of images")
    parser.add_argument("--iou", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gt, dets = synthetic_coco(args.images, args.classes, 7.0, args.dets_per_image, args.seed)
    images, gt_boxes, det_boxes = _frames(gt, dets, args.seed)
    del gt, dets
    start = time.perf_counter()
    det_matches, gt_matches = match_detections(gt_boxes, det_boxes)
    t_match = time.perf_counter() - start
    det_matches.insert(0, "model_id", "bench")
    gt_matches.insert(0, "model_id", "bench")
    models = pd.DataFrame({"model_id": ["bench"], "name": ["bench"], "task": ["detection"],
                           "params": ["{}"]})
    # A cohort as the cohort compiler writes one: a filter on an image metadata column.
    selection = ('SELECT image_id FROM images WHERE "brightness" < ?', [args.cohort])
    cohort = images.loc[images["brightness"] < args.cohort, "image_id"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        build_base(Path(tmp) / "bench.duckdb",
                   {"images": images, "gt_boxes": gt_boxes, "det_boxes": det_boxes,
                    "det_matches": det_matches, "gt_matches": gt_matches, "models": models},
                   {"task": "detection", "classes": [f"class{c}" for c in range(args.classes)]})
        store = Store(Path(tmp) / "bench.duckdb")
        print(f"store: {len(images)} images, {len(gt_boxes)} GT, {len(det_boxes)} detections; "
              f"matching took {t_match:.2f} s; cohort {len(cohort)} images, IoU {args.iou}")
        times, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            ours = detection_metrics(store, "bench", selection, iou=args.iou)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        store.close()
    coco_gt, coco_dt = _reference_coco(gt_boxes, det_boxes, args.images, args.classes)
    ref_times = []
    for _ in range(max(1, min(args.repeats, 3))):
        start = time.perf_counter()
        ref = _faster_stats(coco_gt, coco_dt, cohort)
        ref_times.append(time.perf_counter() - start)
    ours_t, ref_t = statistics.median(times), statistics.median(ref_times)
    ours_stats = np.array([ours[k] for k in STAT_KEYS])
    print(f"VisionLens detection_metrics ({len(cohort)}-image cohort, stored matches): median "
          f"{ours_t * 1000:.1f} ms wall (best {min(times) * 1000:.1f} ms), "
          f"{statistics.median(cpu) * 1000:.1f} ms CPU (all threads)  (target <= 100 ms); "
          f"mAP@{args.iou} = {ours['mAP']:.6f}")
    print(f"faster-coco-eval on the cohort (evaluate+accumulate+summarize): median "
          f"{ref_t * 1000:.1f} ms   ours / faster-coco-eval = {ours_t / ref_t:.3f}")
    print(f"max |ours - faster-coco-eval| over the 12 stats = {np.abs(ours_stats - ref).max():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
