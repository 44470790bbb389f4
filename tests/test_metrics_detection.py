"""Detection metrics from a store: exact toy values, cohorts, objects, confusion, TIDE, files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import EvalError
from core.matching import RECALL_THRESHOLDS, image_counts_params, match_detections
from core.metrics.detection import (BACKGROUND, STAT_KEYS, _in_key_order, _is_in, _regroup_by_class,
                                    _score_order, confusion_matrix_detection,
                                    detection_metrics, eval_coco_main, evaluate_coco_files,
                                    image_objects, summary_lines, tide_errors)
from core.store import Store, build_base

GT_COLUMNS = ["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax", "area", "iscrowd"]
DET_COLUMNS = ["image_id", "det_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax"]


def make_store(tmp_path, gts, dets, n_images, classes) -> Store:
    """gts: (image, gt_id, class, box, iscrowd); dets: (image, det_id, class, score, box)."""
    gt = pd.DataFrame([(i, g, c, *b, (b[2] - b[0]) * (b[3] - b[1]), crowd)
                       for i, g, c, b, crowd in gts], columns=GT_COLUMNS)
    det = pd.DataFrame([(i, d, c, s, *b) for i, d, c, s, b in dets], columns=DET_COLUMNS)
    gt = gt.astype({"image_id": "int32", "gt_id": "int32", "class_id": "int32", "iscrowd": bool})
    det = det.astype({"image_id": "int32", "det_id": "int32", "class_id": "int32"})
    dm, gm = match_detections(gt, det)
    det = det.assign(model_id="m", area=(det.xmax - det.xmin) * (det.ymax - det.ymin))
    images = pd.DataFrame({"image_id": np.arange(n_images, dtype=np.int32),
                           "uri": [f"/img/{i}.jpg" for i in range(n_images)],
                           "width": 200, "height": 200})
    models = pd.DataFrame({"model_id": ["m"], "name": ["m"], "task": ["detection"],
                           "params": ["{}"]})
    path = tmp_path / "toy.duckdb"
    build_base(path, {"images": images, "gt_boxes": gt, "det_boxes": det, "models": models,
                      "det_matches": dm.assign(model_id="m"),
                      "gt_matches": gm.assign(model_id="m")},
               {"task": "detection", "classes": classes})
    return Store(path)


def plain_ap(labels: list[bool], n_gt: int) -> float:
    """COCO 101-point AP of one class from TP flags in score order, written out plainly."""
    if n_gt == 0:
        return 0.0
    tp = np.cumsum(labels)
    fp = np.cumsum(np.logical_not(labels))
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    total = 0.0
    for r in RECALL_THRESHOLDS:
        # The envelope at the first point reaching recall r: the best precision from there on.
        later = precision[recall >= r]
        total += later.max() if later.size else 0.0
    return total / len(RECALL_THRESHOLDS)


def images_in(ids):
    return ("SELECT image_id FROM images WHERE list_contains(?, image_id)", [list(ids)])


A = (10.0, 10.0, 60.0, 60.0)      # 2500 px: medium
B = (100.0, 100.0, 150.0, 150.0)
C = (10.0, 120.0, 60.0, 170.0)


@pytest.fixture
def two_class_store(tmp_path):
    # Class 0: GT A in image 0 (TP 0.9), GT B in image 1 (FP 0.8 elsewhere, TP 0.7).
    # Class 1: GT C in image 0 (TP 0.6).
    gts = [(0, 1, 0, A, False), (1, 2, 0, B, False), (0, 3, 1, C, False)]
    dets = [(0, 1, 0, 0.9, A), (1, 2, 0, 0.8, C), (1, 3, 0, 0.7, B), (0, 4, 1, 0.6, C)]
    store = make_store(tmp_path, gts, dets, 3, ["cat", "dog"])
    yield store
    store.close()


def test_coco_stats_per_class_and_averages_on_a_toy_store(two_class_store):
    res = detection_metrics(two_class_store, "m", None)
    ap0, ap1 = plain_ap([True, False, True], 2), plain_ap([True], 1)
    assert res["AP"] == pytest.approx((ap0 + ap1) / 2, abs=1e-12)
    assert res["AP50"] == res["AP75"] == res["APm"] == pytest.approx(res["AP"], abs=1e-12)
    assert res["APs"] == res["APl"] == res["ARs"] == res["ARl"] == -1
    # maxDets 1: image 1's best class-0 det is the FP.
    assert res["AR1"] == pytest.approx((0.5 + 1.0) / 2)
    assert res["AR10"] == res["AR100"] == 1.0
    per_class = res["per_class"].set_index("class_id")
    assert per_class.loc[0, ["n_gt", "n_tp", "n_fp", "n_fn"]].tolist() == [2, 2, 1, 0]
    assert per_class.loc[0, "name"] == "cat"
    assert per_class.loc[0, "precision"] == pytest.approx(2 / 3)
    assert per_class["AP_iou"].tolist() == pytest.approx([ap0, ap1])
    agg = res["aggregates"]
    assert res["mAP"] == agg["macro"]["AP_iou"] == pytest.approx((ap0 + ap1) / 2)
    assert agg["weighted"]["AP_iou"] == pytest.approx((2 * ap0 + ap1) / 3)
    assert agg["micro"]["AP_iou"] == pytest.approx(plain_ap([True, False, True, True], 3))
    assert agg["micro"]["precision"] == pytest.approx(3 / 4)
    curve = res["curves"][0]
    assert curve["precision"][:51] == pytest.approx(np.ones(51))
    assert curve["precision"][51:] == pytest.approx(np.full(50, 2 / 3))
    assert curve["scores"][0] == 0.9 and curve["scores"][-1] == 0.7


def test_cohort_score_threshold_classes_and_average(two_class_store):
    only_1 = detection_metrics(two_class_store, "m", images_in([1]))
    assert only_1["AP"] == pytest.approx(plain_ap([False, True], 1))  # class 1 has no GT there
    assert only_1["per_class"]["AP"].tolist()[1] == -1
    empty = detection_metrics(two_class_store, "m", images_in([2]))
    assert all(empty[k] == -1 for k in STAT_KEYS) and empty["curves"] == {}
    high = detection_metrics(two_class_store, "m", None, score_threshold=0.75)
    every = detection_metrics(two_class_store, "m", None)
    assert all(high[k] == every[k] for k in STAT_KEYS)  # AP ranks every detection, as COCO does
    assert every["AP50"] == pytest.approx((plain_ap([True, False, True], 2) + 1.0) / 2)
    # The threshold is the operating point: only the 0.9 (TP) and 0.8 (FP) detections count.
    at_threshold = high["per_class"]
    assert at_threshold["n_tp"].tolist() == [1, 0] and at_threshold["n_fp"].tolist() == [1, 0]
    assert at_threshold["n_fn"].tolist() == [1, 1]
    assert at_threshold["precision"].tolist() == [0.5, 0.0] and at_threshold["recall"].tolist() == [0.5, 0.0]
    assert every["per_class"]["n_tp"].tolist() == [2, 1] and every["per_class"]["n_fp"].tolist() == [1, 0]
    assert high["aggregates"]["micro"]["precision"] == pytest.approx(0.5)
    assert high["aggregates"]["micro"]["recall"] == pytest.approx(1 / 3)
    dogs = detection_metrics(two_class_store, "m", None, classes=[1], average="micro")
    assert dogs["AP"] == pytest.approx(plain_ap([True], 1))
    assert dogs["mAP"] == pytest.approx(dogs["AP"])
    assert dogs["per_class"]["class_id"].tolist() == [1]


def test_image_counts_from_the_store(two_class_store):
    counts = two_class_store.query(*image_counts_params("m", 0.5, 0.0)).set_index("image_id")
    assert counts.sort_index().to_numpy().tolist() == [[2, 0, 0], [1, 1, 0]]
    high = two_class_store.query(*image_counts_params("m", 0.5, 0.75)).set_index("image_id")
    assert high.sort_index().to_numpy().tolist() == [[1, 0, 1], [0, 1, 1]]


@pytest.mark.parametrize("kwargs, field", [
    ({"iou": 0.42}, "iou"), ({"average": "median"}, "average"), ({"classes": [9]}, "classes"),
    ({"score_threshold": "x"}, "score_threshold"),
])
def test_bad_metric_arguments_are_eval_errors(two_class_store, kwargs, field):
    with pytest.raises(EvalError) as info:
        detection_metrics(two_class_store, "m", None, **kwargs)
    assert info.value.field == field


def test_unknown_model_lists_the_models(two_class_store):
    with pytest.raises(EvalError) as info:
        detection_metrics(two_class_store, "nope", None)
    assert info.value.choices == ["m"]


def test_a_store_without_detection_matches_is_an_eval_error(tmp_path):
    build_base(tmp_path / "cls.duckdb", {"models": pd.DataFrame(
        {"model_id": ["m"], "name": ["m"], "task": ["multiclass"], "params": ["{}"]})},
               {"task": "multiclass", "classes": ["a", "b"]})
    store = Store(tmp_path / "cls.duckdb")
    for call in (lambda: detection_metrics(store, "m", None),
                 lambda: tide_errors(store, "m", None),
                 lambda: image_objects(store, "m", 0, 0.5, 0.5)):
        with pytest.raises(EvalError) as info:
            call()
        assert info.value.field == "task"
    store.close()


def test_image_objects_label_every_box(tmp_path):
    crowd = (0.0, 150.0, 100.0, 200.0)
    gts = [(0, 1, 0, A, False), (0, 2, 0, B, False), (0, 3, 0, crowd, True)]
    dets = [(0, 1, 0, 0.9, A), (0, 2, 0, 0.8, (100, 100, 150, 120)),
            (0, 3, 0, 0.7, (10, 160, 20, 170)), (0, 4, 0, 0.1, B)]
    store = make_store(tmp_path, gts, dets, 1, ["cat"])
    objs = image_objects(store, "m", 0, 0.5, 0.5).set_index(["kind", "id"])
    assert objs["status"].to_dict() == {("det", 1): "tp", ("det", 2): "fp", ("det", 3): "ignored",
                                        ("gt", 1): "tp", ("gt", 2): "fn", ("gt", 3): "ignored"}
    assert objs.loc[("det", 1), "partner_id"] == 1 and objs.loc[("gt", 1), "partner_id"] == 1
    assert objs.loc[("det", 2), "iou"] == pytest.approx(0.4)  # best same-class IoU of an FP
    assert pd.isna(objs.loc[("gt", 2), "partner_id"])
    assert objs.loc[("det", 1), ["xmin", "ymax"]].tolist() == [10.0, 60.0]
    # With the low-scored det kept, GT 2 is found.
    low = image_objects(store, "m", 0, 0.5, 0.0).set_index(["kind", "id"])
    assert low.loc[("gt", 2), "status"] == "tp" and low.loc[("det", 4), "status"] == "tp"
    store.close()


def test_confusion_matrix_places_each_box_once(tmp_path):
    # Image 0: cat GT A detected as dog twice (0.9 and 0.5) -> one confusion, one background FP;
    # dog GT B found; cat GT C missed with nothing on it; a cat FP on empty ground.
    gts = [(0, 1, 0, A, False), (0, 2, 1, B, False), (0, 3, 0, C, False)]
    dets = [(0, 1, 1, 0.9, A), (0, 2, 1, 0.5, A), (0, 3, 1, 0.8, B),
            (0, 4, 0, 0.7, (150, 10, 190, 50))]
    store = make_store(tmp_path, gts, dets, 1, ["cat", "dog"])
    cm = confusion_matrix_detection(store, "m", None, 0.5, 0.0)
    assert cm.index.tolist() == cm.columns.tolist() == ["cat", "dog", BACKGROUND]
    assert cm.to_numpy().tolist() == [[0, 1, 1],
                                      [0, 1, 0],
                                      [1, 1, 0]]
    assert cm.sum(axis=0).tolist()[:2] == [1, 3]   # detections per predicted class
    assert cm.sum(axis=1).tolist()[:2] == [2, 1]   # GTs per class
    # Above 0.85 only the 0.9 dog det remains: the confusion stays, B becomes a miss.
    high = confusion_matrix_detection(store, "m", None, 0.5, 0.85)
    assert high.to_numpy().tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    store.close()


def test_tide_classifies_each_error_and_fixes_it(tmp_path):
    g1, g2, g3, g4, g5 = A, B, C, (10, 10, 40, 40), (100, 100, 140, 140)
    gts = [(0, 1, 0, g1, False), (0, 2, 0, g2, False), (0, 3, 1, g3, False),
           (1, 4, 0, g4, False), (1, 5, 0, g5, False)]
    loc_box = (110, 110, 170, 170)        # IoU with B: 1600 / 4500 = 0.36
    both_box = (40, 140, 90, 190)         # IoU with C (other class): 600 / 4400 = 0.14
    dets = [(0, 1, 0, 0.9, g1),           # TP
            (0, 2, 0, 0.85, loc_box),     # Loc on unmatched B: fixable
            (0, 3, 0, 0.8, g1),           # Dupe of g1
            (0, 4, 0, 0.75, (150, 10, 190, 40)),  # Bkg
            (0, 5, 0, 0.7, g3),           # Cls: a cat box on the dog GT C
            (0, 6, 0, 0.65, both_box),    # Both
            (1, 7, 0, 0.5, g5)]           # TP; g4 is missed
    store = make_store(tmp_path, gts, dets, 2, ["cat", "dog"])
    res = tide_errors(store, "m", None)
    errors = res["errors"].set_index("type")
    assert errors["count"].to_dict() == {"Cls": 1, "Loc": 1, "Both": 1, "Dupe": 1, "Bkg": 1,
                                         "Miss": 1}
    assert res["det_errors"].set_index("det_id")["error"].to_dict() == {
        2: "Loc", 3: "Dupe", 4: "Bkg", 5: "Cls", 6: "Both"}
    assert res["missed_gt_ids"].tolist() == [4]
    T, F = True, False
    base = (plain_ap([T, F, F, F, F, F, T], 4) + 0.0) / 2
    assert res["ap"] == pytest.approx(base)
    assert res["ap"] == pytest.approx(detection_metrics(store, "m", None)["mAP"])
    expected = {
        "Loc": (plain_ap([T, T, F, F, F, F, T], 4) + 0.0) / 2,
        "Dupe": (plain_ap([T, F, F, F, F, T], 4) + 0.0) / 2,
        "Bkg": (plain_ap([T, F, F, F, F, T], 4) + 0.0) / 2,
        "Both": (plain_ap([T, F, F, F, F, T], 4) + 0.0) / 2,
        "Cls": (plain_ap([T, F, F, F, F, T], 4) + plain_ap([T], 1)) / 2,
        "Miss": (plain_ap([T, F, F, F, F, F, T], 3) + 0.0) / 2,
    }
    for kind, fixed in expected.items():
        assert errors.loc[kind, "dAP"] == pytest.approx(max(fixed - base, 0.0), abs=1e-12), kind
    assert res["special"]["FalsePos"] == pytest.approx(plain_ap([T, T], 4) / 2 - base)
    false_neg = plain_ap([T, F, F, F, F, F, T], 2) / 2
    assert res["special"]["FalseNeg"] == pytest.approx(false_neg - base)
    with pytest.raises(EvalError):
        tide_errors(store, "m", None, background_iou=0.6)
    store.close()


def test_fast_orders_and_lookups_equal_lexsort_argsort_and_isin():
    rng = np.random.default_rng(3)
    n = 400
    cls, score = np.sort(rng.integers(0, 4, n)), rng.choice([0.2, 0.5, 0.9], n)  # ties across classes
    image, rank = rng.integers(0, 30, n), rng.integers(0, 100, n)
    coco = np.lexsort((rank, image, -score, cls))
    score, image, rank = score[coco], image[coco], rank[coco]
    by_score = _score_order(score, image, rank)
    assert np.array_equal(by_score, np.lexsort((rank, image, -score)))
    relabelled = rng.integers(0, 4, n)
    assert np.array_equal(_regroup_by_class(by_score, relabelled), np.lexsort((rank, image, -score, relabelled)))
    for span in (n, 100 * n):  # dense keys are scattered, sparse ones argsorted
        keys = rng.choice(span, n, replace=False)
        ordered = _in_key_order({"order_key": keys, "value": np.arange(n)})
        assert list(ordered) == ["value"] and np.array_equal(ordered["value"], np.argsort(keys))
    assert np.array_equal(_is_in(image, rank), np.isin(image, rank)) and not _is_in(image, rank[:0]).any()


# --------------------------------------------------------------------------- COCO files

def coco_gt(annotations, images=(1, 2), categories=(1, 2)):
    return {"images": [{"id": i} for i in images], "categories": [{"id": c} for c in categories],
            "annotations": annotations}


GOOD_ANNS = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
              "iscrowd": 0},
             {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "area": 400,
              "iscrowd": 0}]
GOOD_DETS = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},
             {"image_id": 2, "category_id": 2, "bbox": [30, 30, 20, 20], "score": 0.8}]


def write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_eval_coco_cli_prints_summary_or_json(tmp_path, capsys):
    gt = write(tmp_path, "gt.json", coco_gt(GOOD_ANNS))
    dets = write(tmp_path, "dets.json", GOOD_DETS)
    stats = evaluate_coco_files(gt, dets)
    assert stats["AP50"] == pytest.approx(plain_ap([True], 1) / 2)
    assert stats["APs"] == 0.0 and stats["APm"] == pytest.approx(plain_ap([True], 1))
    assert eval_coco_main([str(gt), str(dets)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == summary_lines(stats) and len(lines) == 12
    assert lines[0].startswith(
        " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    assert eval_coco_main([str(gt), str(dets), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(stats)


def test_eval_coco_counts_images_without_gt_and_skips_categories_without_gt(tmp_path):
    gt = write(tmp_path, "gt.json", coco_gt(GOOD_ANNS[:1], images=(1, 2, 3), categories=(1, 2, 7)))
    dets = write(tmp_path, "dets.json", GOOD_DETS[:1] + [
        {"image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5], "score": 0.99}])
    stats = evaluate_coco_files(gt, dets)
    assert stats["AP"] == pytest.approx(plain_ap([True], 1))  # categories 2 and 7: no GT, -1


def test_eval_coco_empty_results_give_zero_ap(tmp_path):
    stats = evaluate_coco_files(write(tmp_path, "gt.json", coco_gt(GOOD_ANNS)),
                                write(tmp_path, "dets.json", "[]"))
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0


@pytest.mark.parametrize("which, payload, row, field, words", [
    ("dets", '[{"image_id": 1, "category_id": 1, "bbox": [1, 2, NaN, 4], "score": 0.5}]',
     0, "bbox", "finite"),
    ("dets", [GOOD_DETS[0], {"image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4], "score": 1}],
     1, "bbox", "negative"),
    ("dets", [GOOD_DETS[0], {"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 1}],
     1, "category_id", "unknown category 5"),
    ("dets", [{"image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}],
     0, "image_id", "unknown image 9"),
    ("dets", [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}], 0, "score", "no 'score'"),
    ("dets", [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 1}], 0, "bbox", "4"),
    ("dets", [{"image_id": 1.5, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}],
     0, "image_id", "integer"),
    ("dets", {"image_id": 1}, None, None, "results list"),
    ("dets", "[{", None, None, "results list"),
    ("gt", coco_gt(GOOD_ANNS + [dict(GOOD_ANNS[0])]), 2, "id", "duplicate annotation id 1"),
    ("gt", coco_gt(GOOD_ANNS, images=(1, 2, 1)), 2, "id", "duplicate image id 1"),
    ("gt", coco_gt(GOOD_ANNS, categories=(1, 2, 2)), 2, "id", "duplicate category id 2"),
    ("gt", coco_gt([dict(GOOD_ANNS[0], bbox=[1, 1, float("inf"), 3])]), 0, "bbox", "finite"),
    ("gt", coco_gt([dict(GOOD_ANNS[0], bbox=[1, 1, 3])]), 0, "bbox", "list of 4"),
    ("gt", coco_gt([dict(GOOD_ANNS[0], category_id=3)]), 0, "category_id", "unknown category"),
    ("gt", coco_gt([{k: v for k, v in GOOD_ANNS[0].items() if k != "image_id"}]), 0, "image_id",
     "no 'image_id'"),
    ("gt", "[]", None, None, "one object"),
    ("gt", "{not json", None, None, "not valid JSON"),
])
def test_bad_coco_input_names_the_record(tmp_path, capsys, which, payload, row, field, words):
    gt = write(tmp_path, "gt.json", payload if which == "gt" else coco_gt(GOOD_ANNS))
    dets = write(tmp_path, "dets.json", payload if which == "dets" else GOOD_DETS)
    with pytest.raises(EvalError) as info:
        evaluate_coco_files(gt, dets)
    err = info.value
    assert (err.row, err.field) == (row, field)
    assert err.file == str(gt if which == "gt" else dets)
    assert words in str(err)
    assert eval_coco_main([str(gt), str(dets)]) == 1
    assert words in capsys.readouterr().err


def test_missing_area_and_iscrowd_default_to_box_area_and_zero(tmp_path):
    anns = [{k: v for k, v in a.items() if k not in ("area", "iscrowd")} for a in GOOD_ANNS]
    plain = evaluate_coco_files(write(tmp_path, "a.json", coco_gt(anns)),
                                write(tmp_path, "d.json", GOOD_DETS))
    full = evaluate_coco_files(write(tmp_path, "b.json", coco_gt(GOOD_ANNS)),
                               write(tmp_path, "e.json", GOOD_DETS))
    assert plain == full
