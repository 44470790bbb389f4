"""The explorer's image-grid page query at scale: ``cohort_rows`` against the whole-frame query.

    .venv/bin/python benchmarks/grid_page.py [--images 100000] [--dets-per-image 10]
        [--folder DIR] [--repeats 5] [--page-size 24]

Builds (or reuses, from ``--folder``) a synthetic detection store and a synthetic
multiclass store (``core.synthetic``, as ``visionlens synthetic`` does), then times the
queries the grid view runs for one page of a section (``app/explorer.py``: the cohort AND
``outcome = incorrect`` / ``correct``, the card columns, ordered by image id, LIMIT a page,
OFFSET page x size), for the whole dataset and for a metadata cohort, on the first page and
a deep one:

- after: ``core.cohorts.cohort_rows`` (the page's ids first, then the card columns
  aggregated for those images only; image-column filters narrow the aggregation);
- before, measured in the same run: the whole frame (``frame_sql``: every image's
  detections and matches aggregated) filtered, sorted and cut with LIMIT/OFFSET.

Both must return identical rows; prints median milliseconds, the ratio, and the section's
count query (``cohort_count``, cached per cohort by the app) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import cohorts as C  # noqa: E402
from core.store import Store  # noqa: E402
from core.synthetic import build_synthetic_store  # noqa: E402

MODEL = "baseline"
# The columns the grid's image cards read (app/image_card.py CARD_COLUMNS).
CARD_COLUMNS = {"multiclass": ["image_id", "true_label", "pred_label", "score", "outcome"],
                "detection": ["image_id", "outcome", "n_tp", "n_fp", "n_fn"]}
COHORTS = {"all images": "", "brightness < 0.4": "brightness__lt=0.4"}


def _store(folder: Path, task: str, images: int, dets_per_image: int) -> Store:
    path = folder / f"grid-{task}-{images}.duckdb"
    if not path.exists():
        started = time.perf_counter()
        build_synthetic_store(path, task=task, n_images=images, dets_per_image=dets_per_image)
        print(f"built {path} in {time.perf_counter() - started:.1f}s", flush=True)
    return Store(path)


def _whole_frame_page(store: Store, catalog: C.Catalog, cohort: C.Cohort, columns: list[str], limit: int,
                      offset: int) -> tuple[str, list]:
    frame, params = C.frame_sql(store, MODEL, columns=list(dict.fromkeys([*columns, *cohort.columns()])),
                                catalog=catalog)
    where, where_params = C.where_sql(cohort, catalog)
    q = C.quote_identifier
    return (f"SELECT {', '.join(q(c) for c in columns)} FROM ({frame}) AS f WHERE {where} "
            f"ORDER BY {q('image_id')} ASC NULLS LAST LIMIT ? OFFSET ?", params + where_params + [limit, offset])


def _median_ms(run, repeats: int) -> tuple[float, object]:
    result, times = None, []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def _rows(frame) -> list:
    return [[v.tolist() if isinstance(v, np.ndarray) else v for v in row] for row in frame.itertuples(index=False)]


def bench(store: Store, task: str, repeats: int, page_size: int) -> list[float]:
    catalog = C.catalog_of(store)
    columns = CARD_COLUMNS[task]
    ratios = []
    print(f"\n{task}: {store.image_count():,} images, page of {page_size}")
    print(f"  {'cohort':<18} {'section':<10} {'page':>5} {'before ms':>10} {'after ms':>9} {'ratio':>7} "
          f"{'count ms':>9}")
    for name, query in COHORTS.items():
        base = C.parse_query(query, catalog).cohort
        for section in ("incorrect", "correct"):
            cohort = base.with_filters(C.Filter("outcome", "eq", section))
            count_ms, count = _median_ms(lambda: C.cohort_count(store, cohort, MODEL, catalog=catalog), repeats)
            last_page = max(1, -(-count // page_size))
            for page in sorted({1, min(100, last_page)}):
                offset = (page - 1) * page_size
                sql, params = _whole_frame_page(store, catalog, cohort, columns, page_size, offset)
                before_ms, before = _median_ms(lambda: store.query(sql, params), repeats)
                after_ms, after = _median_ms(
                    lambda: C.cohort_rows(store, cohort, MODEL, columns=columns, order_by="image_id",
                                          limit=page_size, offset=offset, catalog=catalog), repeats)
                if _rows(before) != _rows(after) or len(after) == 0:
                    raise SystemExit(f"{task} {name} {section} page {page}: the two queries disagree")
                ratios.append(before_ms / after_ms)
                print(f"  {name:<18} {section:<10} {page:>5} {before_ms:>10.1f} {after_ms:>9.1f} "
                      f"{before_ms / after_ms:>6.1f}x {count_ms:>9.1f}", flush=True)
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dets-per-image", type=int, default=10)
    parser.add_argument("--folder", help="where the stores are built or found again (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--page-size", type=int, default=24)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vl-grid-") as scratch:
        folder = Path(args.folder) if args.folder else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for task in ("detection", "multiclass"):
            store = _store(folder, task, args.images, args.dets_per_image)
            try:
                ratios = bench(store, task, args.repeats, args.page_size)
            finally:
                store.close()
            print(f"  {task}: identical rows on every page; speed-up median {statistics.median(ratios):.1f}x "
                  f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
