"""VisionLens at scale: engine queries and app memory on synthetic stores of 100k and 1M images.

For each chosen task and size, builds (or reuses) a synthetic store
(``core.synthetic``) and prints:

- store size on disk and build time (when built in this run);
- median milliseconds (of ``--repeat`` warm runs; the first, cold run too) of
  what the pages run: cohort count (also of the cohort's errors: for
  detection the first run computes the per-image counts, ``Store.derived``),
  confusion matrix, the metrics-per-cohort table (all images and one cohort
  per site), the error-analysis tree (the frame of the cohort and of all
  images, and the fit on all images; the fit uses a uniform sample of at most
  ``TreeSettings.max_fit_rows`` images, as the page states), one image-grid
  page deep in a large cohort (``cohort_rows`` with LIMIT/OFFSET), the data
  analysis chart's counts (``core.distribution``), and for
  detection the metrics at an IoU and a score threshold not asked for before
  (the cohorts' evaluations cached, as the model overview keeps them), TIDE
  errors, and how long merely counting the cohort's detections takes: the
  least any detection query on the cohort costs;
- with ``--app``: the Streamlit server's resident memory (VmRSS, and VmHWM,
  its peak) after visiting every page in headless Chromium.

Ratios printed: each figure against its target (1M: query ≤ 100 ms, tree fit
≤ 2 s, app RSS ≤ 600 MiB) and, when both sizes ran, 1M / 100k (10 means the
cost grows with the data, 1 means it does not).

    .venv/bin/python benchmarks/scale.py [--tasks multiclass,detection] [--sizes 100k,1m]
        [--data /tmp/visionlens-scale] [--repeat 5] [--app]

Timings depend on the machine's load: run it on an idle machine, or read the
figures as ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cohorts import catalog_of, cohort_count, cohort_rows, compile_cohort, parse_query  # noqa: E402
from core.distribution import distribution  # noqa: E402
from core.error_analysis import TreeSettings, fit_error_tree, load_error_frame  # noqa: E402
from core.store import Store, StorePaths  # noqa: E402
from core.synthetic import SITES, build_synthetic_store  # noqa: E402
from serving import serve  # noqa: E402

SIZES = {"100k": 100_000, "1m": 1_000_000}
MODEL = "baseline"
COHORT = "brightness__lt=0.4&camera__in=phone,webcam"
# The same images where the model is wrong: for detection, the per-image counts at the thresholds.
ERROR_COHORT = COHORT + "&outcome__eq=incorrect"
TREE_FEATURES = ["brightness", "contrast", "sharpness", "noise", "colorfulness", "site", "camera", "clutter",
                 "occluded"]
TARGET_QUERY_MS = 100.0
TARGET_TREE_S = 2.0
TARGET_RSS_MIB = 600.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu"]


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(first run, median of ``repeat`` further runs), in milliseconds."""
    started = time.perf_counter()
    fn()
    first = (time.perf_counter() - started) * 1000
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(runs)


def store_bytes(path: Path) -> int:
    paths = StorePaths.of(path)
    total = paths.base.stat().st_size
    if paths.parts.is_dir():
        total += sum(f.stat().st_size for f in paths.parts.rglob("*.parquet"))
    return total


def engine_cases(store: Store, task: str) -> dict[str, Callable[[], object]]:
    """What the pages run, as closures over one open store."""
    catalog = catalog_of(store)
    cohort = parse_query(COHORT, catalog).cohort
    selection = compile_cohort(cohort, store, model_id=MODEL, catalog=catalog)
    site_selections = [compile_cohort(parse_query(f"site__eq={site}", catalog).cohort, store, model_id=MODEL,
                                      catalog=catalog) for site in SITES]
    half = cohort_count(store, cohort, MODEL, catalog=catalog) // 2
    if task == "detection":
        from core.metrics.detection import (confusion_matrix_detection, detection_metrics, evaluate_cohort,
                                            tide_errors)

        def metrics(sel, iou=0.5):
            return detection_metrics(store, MODEL, sel, iou=iou)

        def metrics_table(selections):
            return [metrics(s) for s in selections]

        # The model overview keeps each cohort's evaluation (every IoU threshold) in its cache, so a new
        # IoU or score threshold re-reads only the counts at the threshold.
        evaluations = [evaluate_cohort(store, MODEL, s) for s in [None, *site_selections]]

        confusion = lambda: confusion_matrix_detection(store, MODEL, selection, iou=0.5, score_threshold=0.5)  # noqa: E731
    else:
        from core.metrics.classification import (classification_metrics, classification_metrics_of_cohorts,
                                                 confusion_matrix)

        def metrics(sel, iou=None):
            return classification_metrics(store, MODEL, sel)

        def metrics_table(selections):  # the model overview counts every cohort in one scan
            return classification_metrics_of_cohorts(store, MODEL, selections)

        confusion = lambda: confusion_matrix(store, MODEL, selection)  # noqa: E731
    errors = parse_query(ERROR_COHORT, catalog).cohort
    cases = {
        "cohort count": lambda: cohort_count(store, cohort, MODEL, catalog=catalog),
        "cohort count, images with an error": lambda: cohort_count(store, errors, MODEL, catalog=catalog),
        "confusion matrix (cohort)": confusion,
        "metrics per cohort table (5 rows)": lambda: metrics_table([None, *site_selections]),
        "metrics, one cohort": lambda: metrics(selection),
        "error tree: load frame": lambda: load_error_frame(store, cohort, MODEL, TREE_FEATURES, catalog=catalog),
        "image grid page (offset half the cohort)": lambda: cohort_rows(
            store, cohort, MODEL, columns=["image_id", "uri", "brightness", "site"], order_by="-brightness",
            limit=48, offset=half, catalog=catalog),
        "data analysis chart (cohort, brightness by outcome)": lambda: distribution(
            store, cohort, MODEL, "brightness", "count", "outcome", catalog=catalog),
    }
    loaded = {}

    def load_all_images():
        loaded["frame"] = load_error_frame(store, cohort.__class__(), MODEL, TREE_FEATURES, catalog=catalog)
        return loaded["frame"]

    # Timed in this order: the fit reads the frame the case before it loaded.
    cases["error tree: load frame (all images)"] = load_all_images
    cases["error tree: fit (all images)"] = lambda: fit_error_tree(loaded["frame"], TreeSettings(), catalog=catalog)
    if task == "detection":
        from core.metrics.detection import _cohort_det_counts

        # The least any detection query on the cohort does: read its detections (a floor for the
        # confusion matrix, the metrics and TIDE), here only to count them per class.
        every_class = np.arange(len(store.classes))
        cases["cohort's detections counted (floor)"] = lambda: _cohort_det_counts(
            store, MODEL, selection, every_class)
        cases["metrics at a new IoU (0.75), all images"] = lambda: detection_metrics(
            store, MODEL, None, iou=0.75, evaluation=evaluations[0])
        cases["metrics table at a new score threshold (5 rows)"] = lambda: [
            detection_metrics(store, MODEL, s, iou=0.75, score_threshold=0.3, evaluation=e)
            for s, e in zip([None, *site_selections], evaluations)]
        cases["TIDE errors (cohort)"] = lambda: tide_errors(store, MODEL, selection, iou=0.5, score_threshold=0.5)
    return cases


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def app_memory(folder: Path, stores: list[str], timeout_s: float = 300.0) -> dict:
    """Serve ``folder``, visit every page of each store once; the server's memory and page times."""
    from playwright.sync_api import sync_playwright

    from app.nav import PAGES

    result: dict = {"pages": {}}
    with serve(folder, startup_s=timeout_s) as (base, server):
        result["idle"] = _memory_kb(server.pid)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            visits = [(name, url_path) for name in stores
                      for url_path in ["overview", *[spec.url_path for spec in PAGES]]]
            for name, url_path in visits:
                started = time.perf_counter()
                page.goto(f"{base}/{url_path}?store={name}&model={MODEL}")
                page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_s * 1000)
                page.wait_for_timeout(300)
                page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                                       timeout=timeout_s * 1000)
                errors = page.locator('[data-testid="stException"]').count()
                result["pages"][f"{name}/{url_path}"] = {"seconds": time.perf_counter() - started, "exceptions": errors,
                                                         **_memory_kb(server.pid)}
            browser.close()
        result["after"] = _memory_kb(server.pid)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="multiclass", help="comma-separated: multiclass, detection")
    parser.add_argument("--sizes", default="100k,1m", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--data", default="/tmp/visionlens-scale", help="folder of the synthetic stores")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--app", action="store_true", help="also measure the app's memory (needs chromium)")
    args = parser.parse_args(argv)
    results: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    for task in args.tasks.split(","):
        for size in args.sizes.split(","):
            # One folder per store: the app serves the whole folder.
            path = Path(args.data) / f"{task}-{size}" / f"synthetic-{task}-{size}.duckdb"
            if not path.exists():
                started = time.perf_counter()
                build_synthetic_store(path, task=task, n_images=SIZES[size])
                print(f"\nbuilt {path} in {time.perf_counter() - started:.1f}s")
            store = Store(path)
            print(f"\n== {task}, {SIZES[size]:,} images: {store_bytes(path) / 2**20:.1f} MiB on disk "
                  f"({path}) ==")
            figures = {}
            for name, fn in engine_cases(store, task).items():
                first, median = timed(fn, args.repeat)
                figures[name] = (first, median)
                target = TARGET_TREE_S * 1000 if "fit" in name else TARGET_QUERY_MS
                print(f"  {name:44s} first {first:9.1f} ms   median {median:9.1f} ms   "
                      f"/ target {median / target:5.2f}")
            results[(task, size)] = figures
            store.close()
            if args.app:
                memory = app_memory(path.parent, [StorePaths.of(path).name])
                print(f"  app: idle {memory['idle']['VmRSS'] / 1024:.0f} MiB RSS")
                for url_path, row in memory["pages"].items():
                    print(f"    {url_path:48s} {row['seconds']:6.1f} s   RSS {row['VmRSS'] / 1024:6.0f} MiB   "
                          f"exceptions {row['exceptions']}")
                after = memory["after"]
                print(f"  app after every page: RSS {after['VmRSS'] / 1024:.0f} MiB, peak (VmHWM) "
                      f"{after['VmHWM'] / 1024:.0f} MiB / target {after['VmRSS'] / 1024 / TARGET_RSS_MIB:.2f}")
        if (task, "100k") in results and (task, "1m") in results:
            print(f"\n  {task}: 1M / 100k median time")
            for name, (_, big) in results[(task, "1m")].items():
                small = results[(task, "100k")][name][1]
                print(f"    {name:44s} {big / small:6.1f}x")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
