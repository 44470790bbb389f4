"""Cost of the store layout: the refresh check per rerun, and base + parts vs base alone.

    .venv/bin/python benchmarks/store_parts.py [--images 100000] [--parts 100]

Builds a synthetic multiclass store of N images with one model, times
``Store.refresh()`` when nothing changed (what every app rerun pays), then the
same aggregate query (count + confusion matrix) on the base alone and after the
second model's predictions were added as P Parquet parts, and prints the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.store import Store, build_base, write_part

QUERY = """
SELECT o.model_id, i.true_label, p.pred_label, count(*) AS n
FROM images i JOIN predictions p USING (image_id) JOIN outcomes o USING (model_id, image_id)
WHERE i.brightness < ? GROUP BY ALL
"""


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def predictions(rng, ids: np.ndarray, model_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    pred = rng.integers(0, 10, len(ids)).astype(np.int32)
    preds = pd.DataFrame({"model_id": model_id, "image_id": ids.astype(np.int32), "pred_label": pred,
                          "score": rng.random(len(ids)).astype(np.float32)})
    outcomes = pd.DataFrame({"model_id": model_id, "image_id": ids.astype(np.int32),
                             "correct": rng.random(len(ids)) < 0.8})
    return preds, outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--parts", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.images
    ids = np.arange(n, dtype=np.int32)
    images = pd.DataFrame({"image_id": ids, "uri": [f"/img/{i}.png" for i in ids], "width": 64, "height": 64,
                           "true_label": rng.integers(0, 10, n).astype(np.int32),
                           "brightness": rng.random(n)})
    preds, outcomes = predictions(rng, ids, "a")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        build_base(path, {"images": images, "predictions": preds, "outcomes": outcomes},
                   {"task": "multiclass", "classes": [str(c) for c in range(10)]})
        print(f"build base ({n} images): {time.perf_counter() - start:.2f} s")
        store = Store(path)
        check = timed(store.refresh, 2000)
        print(f"refresh check, nothing changed: {check * 1e6:.1f} us per rerun")
        base_alone = timed(lambda: store.query(QUERY, [0.5]), 15)
        for chunk in np.array_split(ids, args.parts):
            p, o = predictions(rng, chunk, "b")
            write_part(path, "predictions", p)
            write_part(path, "outcomes", o)
        start = time.perf_counter()
        store.refresh()
        print(f"refresh that picks up {2 * args.parts} new parts (loads them once): "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms")
        check_parts = timed(store.refresh, 500)
        print(f"refresh check with {2 * args.parts} parts on disk: {check_parts * 1e6:.1f} us per rerun")
        with_parts = timed(lambda: store.query(QUERY, [0.5]), 15)
        rows_base = store.scalar("SELECT count(*) FROM predictions")
        print(f"query, base alone (1 model, {n} rows):            {base_alone * 1e3:.1f} ms")
        print(f"query, base + {args.parts} parts (2 models, {rows_base} rows): {with_parts * 1e3:.1f} ms")
        print(f"ratio base+parts / base alone: {with_parts / base_alone:.2f}x "
              f"(per row: {(with_parts / rows_base) / (base_alone / n):.2f}x)")


if __name__ == "__main__":
    main()
