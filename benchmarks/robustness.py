"""Robustness sweep throughput: batched over images and strengths vs one image at a time.

    .venv/bin/python benchmarks/robustness.py [--task multiclass|detection] [--images 48]
        [--perturb blur] [--levels 0,0.5,1,2,3,4] [--batch-size 64] [--repeat 3] [--device cpu]

Builds a store of synthetic scenes whose model (a demo architecture, untrained:
the cost is the same) can be re-run, then times, in turn within each round:

1. ``core.rerun.run_sweep``: every image at every level, batched
   (``--batch-size`` image-levels per forward), results matched (detection) and
   written as parts: the whole CLI path.
2. The same images and levels one at a time: load the image, perturb it with
   ``core.perturb.perturb`` at one level, run the model on that single image; no
   matching and nothing stored, so the reference is if anything flattered.

Prints image-levels per second for both and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from core import perturb as P
from core import rerun
from core import robustness as R
from core.demo import CLASS_NAMES
from core.demo_models import build_demo_model
from core.ingest.build import Dataset, ModelRun, build_store
from core.models import predict_classifier, predict_detector
from core.store import Store, StorePaths

SIZES = {"multiclass": 48, "detection": 128}


def interleaved(candidates: dict[str, Callable[[], object]], repeat: int,
                setup: Callable[[], None]) -> dict[str, float]:
    """Median seconds per candidate, timed in turn within each round (fair under load)."""
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            setup()
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in runs.items()}


def build(folder: Path, task: str, n: int) -> Path:
    rng = np.random.default_rng(0)
    size = SIZES[task]
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    uris, boxes = [], []
    for i in range(n):
        pixels = np.full((size, size, 3), rng.integers(140, 230, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(2, size // 2, 2)
            w, h = rng.integers(size // 8, size // 3, 2)
            pixels[y0:y0 + h, x0:x0 + w] = rng.integers(0, 80, 3)
            boxes.append((i, int(rng.integers(0, 10)), x0, y0, x0 + w, y0 + h))
        uris.append(str(images_dir / f"{i}.png"))
        Image.fromarray(pixels).save(uris[-1])
    kind = f"{task}-baseline"
    torch.manual_seed(0)
    model = build_demo_model(kind).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    params = {"loader": "core.demo:load_demo_model", "kwargs": {"path": str(folder / "model.pt"), "kind": kind},
              "input_size": [size, size]}
    ids = np.arange(n)
    if task == "detection":
        gt = pd.DataFrame(boxes, columns=["image_id", "class_id", "xmin", "ymin", "xmax", "ymax"])
        gt.insert(1, "gt_id", np.arange(len(gt)))
        images = pd.DataFrame({"image_id": ids, "uri": uris, "true_label": [[] for _ in ids]})
        run = ModelRun("m", "M", params, det_boxes=predict_detector(model, uris, ids, input_size=(size, size),
                                                                     device="cpu"))
        dataset = Dataset("bench", task, CLASS_NAMES, images, gt)
    else:
        images = pd.DataFrame({"image_id": ids, "uri": uris, "true_label": rng.integers(0, 10, n).astype(np.int32)})
        run = ModelRun("m", "M", params, predictions=predict_classifier(model, uris, ids, task=task,
                                                                        input_size=(size, size), device="cpu"))
        dataset = Dataset("bench", task, CLASS_NAMES, images)
    return build_store(folder / "bench", dataset, [run]).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(SIZES), default="multiclass")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--perturb", default="blur", choices=list(P.KINDS))
    parser.add_argument("--levels", help="default: the kind's six levels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    levels = R.parse_levels(args.levels) if args.levels else list(P.KINDS[args.perturb].levels)
    folder = Path(tempfile.mkdtemp(prefix="vl-robustness-bench-"))
    try:
        path = build(folder, args.task, args.images)
        store = Store(path)
        runner = rerun.Runner.load(store, "m", args.device)
        frame = store.query('SELECT image_id, uri FROM "images" ORDER BY image_id')
        ids, uris = frame["image_id"].to_numpy(np.int64), frame["uri"].tolist()
        parts = StorePaths.of(path).parts

        def clear() -> None:
            shutil.rmtree(parts, ignore_errors=True)

        def batched() -> None:
            rerun.run_sweep(path, args.perturb, levels, model_id="m", batch_size=args.batch_size, runner=runner)

        def one_at_a_time() -> None:
            for image_id, uri in zip(ids, uris):
                x = runner.images([uri])
                for level in levels:
                    runner.predict(P.perturb(x, {args.perturb: level}, keys=[image_id]))

        clear()
        batched()  # warm up: imports, first-call allocations
        one_at_a_time()
        times = interleaved({"batched sweep": batched, "one at a time": one_at_a_time}, args.repeat, clear)
        work = len(ids) * len(levels)
        print(f"{args.task}, {len(ids)} images x {len(levels)} levels of {args.perturb} "
              f"({SIZES[args.task]} px, batch {args.batch_size}, {runner.device}, "
              f"{torch.get_num_threads()} threads), median of {args.repeat}:")
        for name, seconds in times.items():
            print(f"  {name:14s} {seconds:7.2f} s  {work / seconds:8.1f} image-levels/s")
        print(f"  ratio (batched / one at a time): {times['one at a time'] / times['batched sweep']:.1f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
