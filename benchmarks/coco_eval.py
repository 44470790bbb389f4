"""COCO bbox evaluation: VisionLens vs pycocotools vs faster-coco-eval on one synthetic pair.

    .venv/bin/python benchmarks/coco_eval.py [--images 5000] [--classes 80]
        [--gt-per-image 7] [--dets-per-image 100] [--seed 0] [--skip-pycocotools]

Writes a synthetic COCO ground truth and results file into a temporary folder, then times,
from the json files to the 12 stats (load + match + accumulate + summarize), each tool in
this one run, and prints times, ratios and the largest difference between our stats and
pycocotools' (the reference; faster-coco-eval's difference is printed too).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.metrics.detection import STAT_KEYS, evaluate_coco_files  # noqa: E402


def synthetic_coco(n_images: int, n_classes: int, gt_per_image: float, dets_per_image: int,
                   seed: int) -> tuple[dict, list]:
    """A COCO ground truth dict and a results list that look like a real detector's output.

    GT boxes span small/medium/large areas, segment areas are below box areas, about 1 % are
    crowd regions; each GT draws a few jittered detections (mostly of its class), the rest are
    random boxes; scores are rounded to 3 decimals so ties occur as in real outputs.
    """
    rng = np.random.default_rng(seed)
    width, height = 640.0, 480.0
    n_gt_img = rng.poisson(gt_per_image, n_images)
    n_gt = int(n_gt_img.sum())
    gt_img = np.repeat(np.arange(1, n_images + 1), n_gt_img)
    side = np.exp(rng.uniform(np.log(8), np.log(400), (n_gt, 2)))
    gw, gh = np.minimum(side[:, 0], width - 1), np.minimum(side[:, 1], height - 1)
    gx, gy = rng.uniform(0, width - gw), rng.uniform(0, height - gh)
    gx, gy, gw, gh = (np.round(v, 2) for v in (gx, gy, gw, gh))
    g_cls = rng.integers(1, n_classes + 1, n_gt)
    crowd = rng.random(n_gt) < 0.01
    area = np.round(gw * gh * rng.uniform(0.5, 1.0, n_gt), 2)
    gt = {
        "images": [{"id": int(i), "width": width, "height": height, "file_name": f"{i}.jpg"}
                   for i in range(1, n_images + 1)],
        "categories": [{"id": int(c), "name": f"class{c}"} for c in range(1, n_classes + 1)],
        "annotations": [
            {"id": int(k + 1), "image_id": int(gt_img[k]), "category_id": int(g_cls[k]),
             "bbox": [float(gx[k]), float(gy[k]), float(gw[k]), float(gh[k])],
             "area": float(area[k]), "iscrowd": int(crowd[k])}
            for k in range(n_gt)],
    }
    # Detections: ~3 jittered copies per GT, the rest random, up to dets_per_image per image.
    per_gt = rng.poisson(3.0, n_gt)
    src = np.repeat(np.arange(n_gt), per_gt)
    jitter = rng.normal(0, 0.12, (len(src), 4))
    dx = gx[src] + jitter[:, 0] * gw[src]
    dy = gy[src] + jitter[:, 1] * gh[src]
    dw = np.abs(gw[src] * (1 + jitter[:, 2]))
    dh = np.abs(gh[src] * (1 + jitter[:, 3]))
    d_cls = np.where(rng.random(len(src)) < 0.85, g_cls[src],
                     rng.integers(1, n_classes + 1, len(src)))
    d_img = gt_img[src]
    d_score = np.clip(rng.beta(5, 2, len(src)), 0, 1)
    n_near = np.bincount(d_img, minlength=n_images + 1)[1:]
    n_rand = np.maximum(dets_per_image - n_near, 0)
    r_img = np.repeat(np.arange(1, n_images + 1), n_rand)
    r_side = np.exp(rng.uniform(np.log(6), np.log(300), (len(r_img), 2)))
    rx, ry = rng.uniform(0, width - r_side[:, 0]), rng.uniform(0, height - r_side[:, 1])
    img = np.r_[d_img, r_img]
    box = np.column_stack([np.r_[dx, rx], np.r_[dy, ry],
                           np.r_[dw, r_side[:, 0]], np.r_[dh, r_side[:, 1]]])
    cls = np.r_[d_cls, rng.integers(1, n_classes + 1, len(r_img))]
    score = np.round(np.r_[d_score, rng.beta(1.2, 6, len(r_img))], 3)
    order = rng.permutation(len(img))
    box = np.round(box[order], 2)
    img, cls, score = img[order], cls[order], score[order]
    dets = [{"image_id": int(img[k]), "category_id": int(cls[k]),
             "bbox": [float(v) for v in box[k]], "score": float(score[k])}
            for k in range(len(img))]
    return gt, dets


def _pycocotools_stats(gt_path: Path, dets_path: Path, module: str) -> np.ndarray:
    if module == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Eval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(dets_path))
        ev = Eval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=float)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--gt-per-image", type=float, default=7.0)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-pycocotools", action="store_true",
                        help="time only VisionLens and faster-coco-eval (pycocotools is slow)")
    args = parser.parse_args(argv)

    gt, dets = synthetic_coco(args.images, args.classes, args.gt_per_image,
                              args.dets_per_image, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dets_path = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        gt_path.write_text(json.dumps(gt))
        dets_path.write_text(json.dumps(dets))
        print(f"synthetic COCO: {len(gt['images'])} images, {len(gt['annotations'])} GT, "
              f"{len(dets)} detections, {len(gt['categories'])} classes")
        del gt, dets

        ours, t_ours = _timed(lambda: evaluate_coco_files(gt_path, dets_path))
        ours = np.array([ours[k] for k in STAT_KEYS])
        fast, t_fast = _timed(lambda: _pycocotools_stats(gt_path, dets_path, "faster_coco_eval"))
        print(f"VisionLens        {t_ours:8.2f} s")
        print(f"faster-coco-eval  {t_fast:8.2f} s   ours / faster-coco-eval = {t_ours / t_fast:.3f}"
              f"  (target <= 0.5)")
        if not args.skip_pycocotools:
            ref, t_ref = _timed(lambda: _pycocotools_stats(gt_path, dets_path, "pycocotools"))
            print(f"pycocotools       {t_ref:8.2f} s   ours / pycocotools = {t_ours / t_ref:.3f}")
            print(f"max |ours - pycocotools|            = {np.abs(ours - ref).max():.3g}")
            print(f"max |faster-coco-eval - pycocotools| = {np.abs(fast - ref).max():.3g}")
        else:
            print(f"max |ours - faster-coco-eval| = {np.abs(ours - fast).max():.3g}")
        for key, value in zip(STAT_KEYS, ours):
            print(f"  {key:6s} {value:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
