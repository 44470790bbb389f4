"""Parity with pycocotools COCOeval (bbox): fixed fixtures and hypothesis properties, to 1e-6.

Covers the eval-coco path (json files -> arrays) and the store path (stored matches ->
``detection_metrics`` on a cohort, with a score threshold), against COCOeval run with
``imgIds`` = the cohort on only the detections above the threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from core.matching import match_detections
from core.metrics.detection import (STAT_KEYS, coco_stats, detection_metrics,
                                    evaluate_coco_arrays, load_coco_files)
from core.store import Store, build_base

TOL = 1e-6


def pycocotools_eval(gt: dict, dets: list, img_ids: list[int] | None = None) -> COCOeval:
    """COCOeval on in-memory dicts, prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def ours_from_files(gt: dict, dets: list):
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dets_path = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        gt_path.write_text(json.dumps(gt))
        dets_path.write_text(json.dumps(dets))
        return evaluate_coco_arrays(load_coco_files(gt_path, dets_path))


def assert_same_as_pycocotools(acc, ev: COCOeval) -> None:
    ours = coco_stats(acc)
    assert np.abs(np.array([ours[k] for k in STAT_KEYS]) - ev.stats).max() <= TOL
    # The full accumulate arrays too (precision and scores at maxDets 100, recall at 1/10/100).
    assert np.abs(acc.precision - ev.eval["precision"][..., -1]).max() <= TOL
    assert np.abs(acc.scores - ev.eval["scores"][..., -1]).max() <= TOL
    assert np.abs(acc.recall - ev.eval["recall"]).max() <= TOL


def store_from_coco(gt: dict, dets: list, folder: Path) -> Store:
    """A store holding the COCO pair: image ids and category ids must be 0..n-1."""
    anns = gt["annotations"]
    box = np.array([a["bbox"] for a in anns], dtype=float).reshape(-1, 4)
    gt_boxes = pd.DataFrame({
        "image_id": np.array([a["image_id"] for a in anns], dtype=np.int32),
        "gt_id": np.array([a["id"] for a in anns], dtype=np.int32),
        "class_id": np.array([a["category_id"] for a in anns], dtype=np.int32),
        "xmin": box[:, 0], "ymin": box[:, 1], "xmax": box[:, 0] + box[:, 2],
        "ymax": box[:, 1] + box[:, 3], "area": np.array([a["area"] for a in anns], dtype=float),
        "iscrowd": np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)})
    dbox = np.array([d["bbox"] for d in dets], dtype=float).reshape(-1, 4)
    det_boxes = pd.DataFrame({
        "model_id": "m", "image_id": np.array([d["image_id"] for d in dets], dtype=np.int32),
        "det_id": np.arange(1, len(dets) + 1, dtype=np.int32),
        "class_id": np.array([d["category_id"] for d in dets], dtype=np.int32),
        "score": np.array([d["score"] for d in dets], dtype=float),
        "xmin": dbox[:, 0], "ymin": dbox[:, 1], "xmax": dbox[:, 0] + dbox[:, 2],
        "ymax": dbox[:, 1] + dbox[:, 3], "area": dbox[:, 2] * dbox[:, 3]})
    dm, gm = match_detections(gt_boxes, det_boxes)
    n_images = len(gt["images"])
    path = folder / f"{uuid.uuid4().hex[:8]}.duckdb"
    build_base(path, {
        "images": pd.DataFrame({"image_id": np.arange(n_images, dtype=np.int32),
                                "uri": [f"/{i}.jpg" for i in range(n_images)], "width": 100,
                                "height": 100}),
        "gt_boxes": gt_boxes, "det_boxes": det_boxes,
        "det_matches": dm.assign(model_id="m"), "gt_matches": gm.assign(model_id="m"),
        "models": pd.DataFrame({"model_id": ["m"], "name": ["m"], "task": ["detection"],
                                "params": ["{}"]})},
        {"task": "detection", "classes": [f"c{c['id']}" for c in gt["categories"]]})
    return Store(path)


def assert_store_cohort_matches(store: Store, gt: dict, dets: list, cohort: list[int],
                                score: float) -> None:
    selection = ("SELECT image_id FROM images WHERE list_contains(?, image_id)", [cohort])
    # The score threshold sets the operating point (counts), never the ranking AP is made of.
    ours = detection_metrics(store, "m", selection, score_threshold=score)
    if not dets:  # pycocotools cannot load an empty result list: every AP is 0 or -1
        assert all(ours[k] in (0.0, -1.0) for k in STAT_KEYS)
        return
    ev = pycocotools_eval(gt, dets, cohort)
    assert np.abs(np.array([ours[k] for k in STAT_KEYS]) - ev.stats).max() <= TOL
    for k, curve in ours["curves"].items():
        assert np.abs(curve["precision"] - ev.eval["precision"][0, :, k, 0, -1]).max() <= TOL
        assert np.abs(curve["scores"] - ev.eval["scores"][0, :, k, 0, -1]).max() <= TOL
    # Counts at the operating point: pycocotools' own matches (IoU 0.5, area all) scored >= score.
    n_tp, n_fp = np.zeros(len(gt["categories"]), int), np.zeros(len(gt["categories"]), int)
    for entry in ev.evalImgs:
        if entry is None or entry["aRng"] != ev.params.areaRng[0]:
            continue
        kept = (np.asarray(entry["dtScores"]) >= score) & ~np.asarray(entry["dtIgnore"][0], bool)
        matched = np.asarray(entry["dtMatches"][0]) > 0
        n_tp[entry["category_id"]] += int((kept & matched).sum())
        n_fp[entry["category_id"]] += int((kept & ~matched).sum())
    assert ours["per_class"]["n_tp"].tolist() == n_tp.tolist()
    assert ours["per_class"]["n_fp"].tolist() == n_fp.tolist()


# --------------------------------------------------------------------------- fixed fixtures

def seeded_pair(seed: int, n_images=40, n_cats=6, n_gt=150, n_dets=600) -> tuple[dict, list]:
    """A reproducible COCO pair with crowds, empty images, a category without GT, ties."""
    rng = np.random.default_rng(seed)
    gt_img = rng.integers(0, n_images - 5, n_gt)         # the last 5 images have no GT
    gt_cat = rng.integers(0, n_cats - 1, n_gt)            # the last category has no GT
    xy = rng.integers(0, 300, (n_gt, 2)).astype(float)
    wh = np.exp(rng.uniform(np.log(4), np.log(200), (n_gt, 2))).round(1)
    area = np.where(rng.random(n_gt) < 0.5, wh[:, 0] * wh[:, 1], rng.uniform(0, 12000, n_gt))
    crowd = rng.random(n_gt) < 0.08
    anns = [{"id": int(k + 1), "image_id": int(gt_img[k]), "category_id": int(gt_cat[k]),
             "bbox": [*xy[k].tolist(), *wh[k].tolist()], "area": float(area[k]),
             "iscrowd": int(crowd[k])} for k in range(n_gt)]
    src = rng.integers(0, n_gt, n_dets)
    near = rng.random(n_dets) < 0.7
    jitter = rng.normal(0, 0.15, (n_dets, 4))
    d_xy = np.where(near[:, None], xy[src] + jitter[:, :2] * wh[src],
                    rng.integers(0, 300, (n_dets, 2)))
    d_wh = np.where(near[:, None], np.abs(wh[src] * (1 + jitter[:, 2:])),
                    rng.uniform(2, 150, (n_dets, 2))).round(1)
    d_img = np.where(near, gt_img[src], rng.integers(0, n_images, n_dets))
    same_class = near & (rng.random(n_dets) < 0.85)
    d_cat = np.where(same_class, gt_cat[src], rng.integers(0, n_cats, n_dets))
    score = np.where(rng.random(n_dets) < 0.3, rng.choice([0.25, 0.5, 0.75], n_dets),
                     rng.random(n_dets)).round(4)
    dets = [{"image_id": int(d_img[k]), "category_id": int(d_cat[k]),
             "bbox": [*d_xy[k].round(1).tolist(), *d_wh[k].tolist()], "score": float(score[k])}
            for k in range(n_dets)]
    gt = {"images": [{"id": i} for i in range(n_images)],
          "categories": [{"id": c} for c in range(n_cats)], "annotations": anns}
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eval_coco_equals_pycocotools_on_fixed_pairs(seed):
    gt, dets = seeded_pair(seed)
    assert_same_as_pycocotools(ours_from_files(gt, dets), pycocotools_eval(gt, dets))


def test_over_100_detections_per_image_and_class_follow_maxdets():
    gt, dets = seeded_pair(3, n_images=6, n_cats=2, n_gt=30, n_dets=900)
    assert_same_as_pycocotools(ours_from_files(gt, dets), pycocotools_eval(gt, dets))


@pytest.mark.parametrize("seed", [0, 1])
def test_store_cohorts_equal_pycocotools_on_image_subsets(tmp_path, seed):
    gt, dets = seeded_pair(seed)
    store = store_from_coco(gt, dets, tmp_path)
    rng = np.random.default_rng(seed)
    for fraction in (1.0, 0.5, 0.1):
        cohort = sorted(rng.choice(40, max(1, int(40 * fraction)), replace=False).tolist())
        for score in (0.0, 0.5):
            assert_store_cohort_matches(store, gt, dets, cohort, score)
    store.close()


# --------------------------------------------------------------------------- hypothesis

@st.composite
def coco_pairs(draw, min_dets=1):
    """Small COCO pairs with integer boxes (exact IoU ties), crowds, area-range edges,
    images without GT or detections, categories without GT, and equal scores."""
    n_images = draw(st.integers(1, 5))
    n_cats = draw(st.integers(1, 4))
    coord, size = st.integers(0, 60), st.integers(0, 110)
    areas = st.one_of(st.none(), st.sampled_from([0.0, 500.0, 1024.0, 3000.0, 9216.0, 20000.0]))
    gt_rows = draw(st.lists(st.tuples(st.integers(0, n_images - 1), st.integers(0, n_cats - 1),
                                      coord, coord, size, size, areas,
                                      st.sampled_from([False] * 6 + [True])), max_size=14))
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
             "area": float(w * h) if a is None else a, "iscrowd": int(crowd)}
            for k, (i, c, x, y, w, h, a, crowd) in enumerate(gt_rows)]
    scores = st.one_of(st.sampled_from([0.1, 0.5, 0.9]), st.floats(0, 1, width=32))
    copy_of = st.tuples(st.just("copy"), st.integers(0, max(len(anns) - 1, 0)),
                        st.integers(-6, 6), st.integers(-6, 6), st.integers(-6, 6),
                        st.integers(-6, 6), st.booleans(), st.integers(0, n_cats - 1), scores)
    fresh = st.tuples(st.just("new"), st.integers(0, n_images - 1), coord, coord, size, size,
                      st.integers(0, n_cats - 1), scores)
    det_rows = draw(st.lists(st.one_of(copy_of, fresh) if anns else fresh,
                             min_size=min_dets, max_size=30))
    dets = []
    for row in det_rows:
        if row[0] == "copy":
            _, g, dx, dy, dw, dh, same_class, other, score = row
            x, y, w, h = anns[g]["bbox"]
            image, cat = anns[g]["image_id"], anns[g]["category_id"] if same_class else other
            box = [x + dx, y + dy, max(w + dw, 0), max(h + dh, 0)]
        else:
            _, image, x, y, w, h, cat, score = row
            box = [x, y, w, h]
        dets.append({"image_id": image, "category_id": cat, "bbox": box, "score": float(score)})
    gt = {"images": [{"id": i} for i in range(n_images)],
          "categories": [{"id": c} for c in range(n_cats)], "annotations": anns}
    return gt, dets


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(coco_pairs())
def test_property_eval_coco_equals_pycocotools(pair):
    gt, dets = pair
    assert_same_as_pycocotools(ours_from_files(gt, dets), pycocotools_eval(gt, dets))


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("parity-stores")


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(pair=coco_pairs(min_dets=0), data=st.data())
def test_property_store_cohort_equals_pycocotools(store_folder, pair, data):
    gt, dets = pair
    n_images = len(gt["images"])
    cohort = sorted(data.draw(st.sets(st.integers(0, n_images - 1), min_size=1)))
    score = data.draw(st.sampled_from([0.0, 0.5, 0.9]))
    store = store_from_coco(gt, dets, store_folder)
    try:
        assert_store_cohort_matches(store, gt, dets, cohort, score)
    finally:
        store.close()
        store.paths.base.unlink()
