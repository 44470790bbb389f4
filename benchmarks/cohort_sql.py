"""Cohort compiler vs hand-written DuckDB SQL on a synthetic 1M-image multiclass store.

For each cohort: parse the query string, compile it, count the cohort and
compute its confusion matrix through ``core.cohorts`` and
``core.metrics.classification`` (what a page does), and time the same count and
confusion matrix written by hand as one DuckDB query each, on the same store
connection. Prints median milliseconds and the ratio compiler / hand.
Targets: ratio ≤ 2 and compiler ≤ 100 ms.

    .venv/bin/python benchmarks/cohort_sql.py [--images 1000000] [--repeat 15] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import cohorts  # noqa: E402
from core.metrics import classification  # noqa: E402
from core.store import Store, build_base  # noqa: E402

CLASSES = [f"class_{i}" for i in range(10)]
MODEL = "baseline"

# (name, query string, hand-written WHERE, its params, whether it reads the prediction p).
# Hand-written queries join predictions only when they must, as a person would.
CASES = [
    ("metadata", "brightness__lt=0.3&sharpness__gte=50",
     "i.brightness < ? AND i.sharpness >= ?", [0.3, 50], False),
    ("labels+metadata", "true_label__in=class_3,class_8&brightness__between=0.2,0.6",
     "i.true_label IN (?, ?) AND i.brightness BETWEEN ? AND ?", [3, 8, 0.2, 0.6], False),
    ("outcome", "outcome__eq=incorrect&camera__in=canon,sony",
     "p.pred_label <> i.true_label AND i.camera IN (?, ?)", ["canon", "sony"], True),
    ("or-groups", "g1.brightness__lt=0.2&g2.sharpness__lt=20&g2.camera__eq=nikon",
     "(i.brightness < ? OR (i.sharpness < ? AND i.camera = ?))", [0.2, 20, "nikon"], False),
    ("score", "score__lt=0.5&true_label__eq=class_1",
     "p.score < ? AND i.true_label = ?", [0.5, 1], True),
]


def build(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(CLASSES), n).astype(np.int32)
    correct = rng.random(n) < 0.8
    pred = np.where(correct, true, rng.integers(0, len(CLASSES), n)).astype(np.int32)
    images = pd.DataFrame({
        "image_id": np.arange(n, dtype=np.int32),
        "uri": [f"/data/img_{i:07d}.jpg" for i in range(n)],
        "width": rng.integers(64, 1024, n).astype(np.int32),
        "height": rng.integers(64, 1024, n).astype(np.int32),
        "true_label": true,
        "brightness": rng.random(n),
        "sharpness": rng.gamma(2.0, 50.0, n),
        "camera": rng.choice(np.array(["canon", "nikon", "sony", "fuji"], dtype=object), n),
    })
    columns = pd.DataFrame({
        "name": ["image_id", "true_label", "width", "height", "brightness", "sharpness", "camera"],
        "kind": ["numeric", "categorical", "numeric", "numeric", "numeric", "numeric", "categorical"],
        "source": ["derived", "derived", "auto", "auto", "auto", "auto", "user"],
        "label": ["Image id", "True label", "Width", "Height", "Brightness", "Sharpness", "Camera"],
    })
    predictions = pd.DataFrame({
        "model_id": MODEL, "image_id": images["image_id"], "pred_label": pred,
        "score": rng.random(n).astype(np.float32),
    })
    models = pd.DataFrame({"model_id": [MODEL], "name": ["Baseline"], "task": ["multiclass"], "params": ["{}"]})
    build_base(path, {"images": images, "columns": columns, "predictions": predictions, "models": models},
               {"task": "multiclass", "classes": CLASSES, "name": path.stem})


def interleaved_ms(functions: dict, repeat: int) -> tuple[dict, dict]:
    """Median milliseconds of each function, run in turn so all meet the same machine load."""
    results = {name: fn() for name, fn in functions.items()}  # warm: plans, caches
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--keep", help="folder to build the store in (kept); default a temporary folder")
    args = parser.parse_args(argv)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vl-bench-"))
    path = folder / "bench.duckdb"
    if not path.exists():
        start = time.perf_counter()
        build(path, args.images)
        print(f"built {args.images:,} images in {time.perf_counter() - start:.1f} s at {path}")
    store = Store(path)
    n_classes = len(CLASSES)
    print(f"{'cohort':<18} {'count':>9} {'compiler ms':>12} {'hand ms':>9} {'ratio':>6}")
    ratios, worst = [], 0.0
    for name, query, where, params, reads_prediction in CASES:
        def through_compiler():
            catalog = cohorts.catalog_of(store)
            parsed = cohorts.parse_query(query, catalog)
            selection = cohorts.compile_cohort(parsed, store, model_id=MODEL, catalog=catalog)
            count = store.scalar(f"SELECT count(*) FROM ({selection[0]}) AS s", selection[1])
            matrix = classification.confusion_matrix(store, MODEL, selection)
            return count, matrix.to_numpy()

        def by_hand():
            join = "JOIN predictions p ON p.image_id = i.image_id AND p.model_id = ?"
            count = store.scalar(f"SELECT count(*) FROM images i {join if reads_prediction else ''} WHERE {where}",
                                 [MODEL, *params] if reads_prediction else params)
            rows = store.rows(f"SELECT i.true_label, p.pred_label, count(*) FROM images i {join} "
                              f"WHERE {where} GROUP BY ALL", [MODEL, *params])
            matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
            for t, y, c in rows:
                matrix[t, y] = c
            return count, matrix

        times, results = interleaved_ms({"compiler": through_compiler, "hand": by_hand}, args.repeat)
        (count, matrix), (hand_count, hand_matrix) = results["compiler"], results["hand"]
        if count != hand_count or not np.array_equal(matrix, hand_matrix):
            print(f"MISMATCH in {name}: {count} vs {hand_count}")
            return 1
        ratio = times["compiler"] / times["hand"]
        ratios.append(ratio)
        worst = max(worst, times["compiler"])
        print(f"{name:<18} {count:>9,} {times['compiler']:>12.1f} {times['hand']:>9.1f} {ratio:>6.2f}")
    # One grid page deep into a big cohort, sorted by a metadata column.
    page_query, page_where, page_params = "sharpness__gte=20", "i.sharpness >= ?", [20]

    def page_through_compiler():
        catalog = cohorts.catalog_of(store)
        parsed = cohorts.parse_query(page_query, catalog)
        rows = cohorts.cohort_rows(store, parsed, MODEL, columns=["image_id", "uri", "brightness", "outcome"],
                                   order_by="-brightness", limit=100, offset=400_000 * args.images // 1_000_000,
                                   catalog=catalog)
        return rows["image_id"].tolist()

    def page_by_hand():
        rows = store.query(
            "SELECT i.image_id, i.uri, i.brightness, CASE WHEN p.pred_label = i.true_label THEN 'correct' "
            "ELSE 'incorrect' END AS outcome FROM images i LEFT JOIN predictions p ON p.image_id = i.image_id "
            f"AND p.model_id = ? WHERE {page_where} ORDER BY i.brightness DESC, i.image_id LIMIT 100 OFFSET ?",
            [MODEL, *page_params, 400_000 * args.images // 1_000_000])
        return rows["image_id"].tolist()

    times, results = interleaved_ms({"compiler": page_through_compiler, "hand": page_by_hand}, args.repeat)
    if results["compiler"] != results["hand"]:
        print("MISMATCH in the grid page")
        return 1
    page_ratio = times["compiler"] / times["hand"]
    print(f"{'grid page (offset)':<18} {'100 rows':>9} {times['compiler']:>12.1f} {times['hand']:>9.1f} "
          f"{page_ratio:>6.2f}")
    print(f"geometric mean ratio {float(np.exp(np.mean(np.log(ratios)))):.2f}, worst ratio {max(ratios):.2f}, "
          f"slowest compiler run {worst:.1f} ms (targets: ratio ≤ 2, ≤ 100 ms)")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
