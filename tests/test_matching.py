"""COCO-exact matching: toy fixtures with exact outcomes, tie rules, stored-mask semantics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import EvalError
from core.matching import (ALL_BITS, AREA_NAMES, IOU_THRESHOLDS, bit_index, box_iou_pairs,
                           image_counts_params, match_detections,
                           threshold_index)
from core.store import memory_connection

GT_COLUMNS = ["image_id", "gt_id", "class_id", "xmin", "ymin", "xmax", "ymax", "area", "iscrowd"]
DET_COLUMNS = ["image_id", "det_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax"]


def gt_frame(rows) -> pd.DataFrame:
    """rows: (image, gt_id, class, (x0, y0, x1, y1), area or None, iscrowd)."""
    out = [(i, g, c, *box, (box[2] - box[0]) * (box[3] - box[1]) if area is None else area, crowd)
           for i, g, c, box, area, crowd in rows]
    return pd.DataFrame(out, columns=GT_COLUMNS).astype({"iscrowd": bool})


def det_frame(rows) -> pd.DataFrame:
    """rows: (image, det_id, class, score, (x0, y0, x1, y1))."""
    return pd.DataFrame([(i, d, c, s, *box) for i, d, c, s, box in rows], columns=DET_COLUMNS)


def flag(mask, iou=0.5, area="all") -> np.ndarray:
    bit = bit_index(threshold_index(iou), AREA_NAMES.index(area))
    return ((np.asarray(mask, dtype=np.int64) >> bit) & 1).astype(bool)


def outcome(dm: pd.DataFrame, iou=0.5, area="all") -> dict[int, str]:
    """det_id -> 'tp' / 'fp' / 'ignored' at one threshold and area range."""
    tp, ig = flag(dm["tp_mask"], iou, area), flag(dm["ignored_mask"], iou, area)
    return dict(zip(dm["det_id"], np.where(tp, "tp", np.where(ig, "ignored", "fp"))))


def partners(frame: pd.DataFrame, key: str, column: str, iou=0.5) -> dict[int, int]:
    t = threshold_index(iou)
    return {int(k): int(v[t]) for k, v in zip(frame[key], frame[column])}


BOX = (10.0, 10.0, 50.0, 50.0)          # 40 x 40 = 1600 px: 'medium'
SHIFTED = (14.0, 10.0, 54.0, 50.0)      # IoU with BOX = 1440 / 1760 = 0.818...


def test_empty_inputs_give_empty_tables_with_every_column():
    dm, gm = match_detections(gt_frame([]), det_frame([]))
    assert dm.empty and gm.empty
    assert {"tp_mask", "ignored_mask", "area_mask", "rank", "order_key", "match_gt_ids",
            "best_other_class_id"} <= set(dm.columns)
    assert {"area_mask", "match_det_ids", "match_scores", "match_ious"} <= set(gm.columns)


def test_gt_only_image_leaves_every_gt_unmatched():
    _, gm = match_detections(gt_frame([(0, 1, 0, BOX, None, False), (0, 2, 1, BOX, None, False)]),
                             det_frame([]))
    assert partners(gm, "gt_id", "match_det_ids") == {1: -1, 2: -1}
    assert (gm["area_mask"] & 1).all()


def test_prediction_only_image_gives_false_positives():
    dm, _ = match_detections(gt_frame([]), det_frame([(0, 1, 0, 0.9, BOX), (0, 2, 3, 0.4, BOX)]))
    for iou in IOU_THRESHOLDS:
        assert outcome(dm, iou) == {1: "fp", 2: "fp"}
    assert (dm["best_same_gt_id"] == -1).all() and (dm["best_other_iou"] == 0).all()


def test_match_depends_on_the_threshold():
    dm, gm = match_detections(gt_frame([(0, 7, 0, BOX, None, False)]),
                              det_frame([(0, 3, 0, 0.8, SHIFTED)]))
    iou = 1440 / 1760
    assert outcome(dm, 0.8) == {3: "tp"} and outcome(dm, 0.85) == {3: "fp"}
    assert partners(gm, "gt_id", "match_det_ids", 0.8) == {7: 3}
    assert partners(gm, "gt_id", "match_det_ids", 0.85) == {7: -1}
    assert dm["match_ious"].iloc[0][threshold_index(0.5)] == pytest.approx(iou)
    assert np.isnan(dm["match_ious"].iloc[0][threshold_index(0.85)])
    assert gm["match_scores"].iloc[0][0] == 0.8
    assert dm["best_same_gt_id"].iloc[0] == 7 and dm["best_same_iou"].iloc[0] == pytest.approx(iou)


def test_class_mismatch_is_a_false_positive_and_a_miss_with_best_other_overlap():
    dm, gm = match_detections(gt_frame([(0, 1, 0, BOX, None, False)]),
                              det_frame([(0, 1, 2, 0.9, BOX)]))
    assert outcome(dm) == {1: "fp"}
    assert partners(gm, "gt_id", "match_det_ids") == {1: -1}
    row = dm.iloc[0]
    best = (row["best_same_gt_id"], row["best_other_gt_id"], row["best_other_class_id"])
    assert best == (-1, 1, 0)
    assert row["best_other_iou"] == 1.0


def test_crowd_region_is_matched_many_times_and_ignored_using_det_area():
    # A crowd region 100 x 100, two small dets inside: IoU with a crowd = inter / det area = 1.
    crowd = (0.0, 0.0, 100.0, 100.0)
    dm, gm = match_detections(gt_frame([(0, 1, 0, crowd, None, True)]),
                              det_frame([(0, 1, 0, 0.9, (10, 10, 20, 20)),
                                         (0, 2, 0, 0.8, (30, 30, 40, 40))]))
    assert outcome(dm, 0.95) == {1: "ignored", 2: "ignored"}
    assert partners(dm, "det_id", "match_gt_ids", 0.95) == {1: 1, 2: 1}
    # A crowd GT never counts and records no partner.
    assert gm["area_mask"].iloc[0] == 0
    assert partners(gm, "gt_id", "match_det_ids") == {1: -1}
    # Crowd regions are not "best overlaps" (TIDE / confusion use real objects only).
    assert (dm["best_same_gt_id"] == -1).all()


def test_regular_gt_wins_over_a_better_overlapping_crowd_region():
    gt = gt_frame([(0, 1, 0, BOX, None, True), (0, 2, 0, SHIFTED, None, False)])
    dm, _ = match_detections(gt, det_frame([(0, 1, 0, 0.9, BOX)]))
    assert partners(dm, "det_id", "match_gt_ids") == {1: 2}
    assert outcome(dm) == {1: "tp"}


def test_area_ranges_ignore_out_of_range_gts_and_unmatched_dets():
    small = (0.0, 0.0, 20.0, 20.0)       # 400 px
    large = (0.0, 0.0, 200.0, 100.0)     # 20,000 px
    gt = gt_frame([(0, 1, 0, small, None, False)])
    dm, gm = match_detections(gt, det_frame([(0, 1, 0, 0.9, small), (0, 2, 0, 0.5, large)]))
    assert outcome(dm, area="small") == {1: "tp", 2: "ignored"}
    assert outcome(dm, area="large") == {1: "ignored", 2: "fp"}
    assert outcome(dm, area="medium") == {1: "ignored", 2: "ignored"}
    assert gm["area_mask"].iloc[0] == 0b0011  # counts in 'all' and 'small'
    assert dm.set_index("det_id")["area_mask"].to_dict() == {1: 0b0011, 2: 0b1001}


def test_gt_area_field_not_box_area_decides_the_range():
    gt = gt_frame([(0, 1, 0, BOX, 500.0, False)])  # box 1600 px, segment area 500 px: small
    dm, gm = match_detections(gt, det_frame([(0, 1, 0, 0.9, BOX)]))
    assert gm["area_mask"].iloc[0] == 0b0011
    assert outcome(dm, area="small") == {1: "tp"}
    assert outcome(dm, area="medium") == {1: "ignored"}  # matched an ignored GT


def test_equal_scores_keep_det_id_order():
    gt = gt_frame([(0, 1, 0, BOX, None, False)])
    dm, _ = match_detections(gt, det_frame([(0, 5, 0, 0.7, BOX), (0, 4, 0, 0.7, BOX)]))
    assert outcome(dm) == {4: "tp", 5: "fp"}
    assert dm.set_index("det_id")["rank"].to_dict() == {4: 0, 5: 1}


def test_equal_iou_goes_to_the_later_gt_as_pycocotools():
    # The det (x 4..44) overlaps GT 1 (x 0..40) and GT 2 (x 8..48) equally: IoU 1440 / 1760.
    gt = gt_frame([(0, 1, 0, (0, 0, 40, 40), None, False), (0, 2, 0, (8, 0, 48, 40), None, False)])
    dm, _ = match_detections(gt, det_frame([(0, 1, 0, 0.9, (4, 0, 44, 40))]))
    ious = box_iou_pairs(np.array([[4, 0, 40, 40]] * 2, float),
                         np.array([[0, 0, 40, 40], [8, 0, 40, 40]], float), np.zeros(2, bool))
    assert ious[0] == ious[1] > 0.5
    assert partners(dm, "det_id", "match_gt_ids") == {1: 2}


def test_only_the_100_best_dets_per_image_and_class_count():
    gt = gt_frame([(0, 1, 0, BOX, None, False)])
    rows = [(0, d, 0, 1.0 - d / 1000, (200 + d, 200, 210 + d, 210)) for d in range(101)]
    rows.append((0, 500, 1, 0.01, BOX))  # another class: its own 100
    dm, _ = match_detections(gt, det_frame(rows))
    last = dm.set_index("det_id").loc[100]
    assert last["rank"] == 100 and last["ignored_mask"] == ALL_BITS and last["tp_mask"] == 0
    assert dm.set_index("det_id").loc[500, "rank"] == 0


def test_order_key_is_class_then_score_then_image_then_rank():
    dm, _ = match_detections(gt_frame([]), det_frame([
        (1, 1, 0, 0.5, BOX), (0, 2, 0, 0.5, BOX), (0, 3, 1, 0.9, BOX), (0, 4, 0, 0.8, BOX)]))
    assert dm.sort_values("order_key")["det_id"].tolist() == [4, 2, 1, 3]


def test_store_friendly_types_round_trip_through_duckdb():
    dm, gm = match_detections(gt_frame([(0, 1, 0, BOX, None, False)]),
                              det_frame([(0, 1, 0, 0.9, BOX)]))
    con = memory_connection()
    con.register("dm", dm)
    con.register("gm", gm)
    assert con.execute("SELECT match_gt_ids[1], typeof(match_gt_ids), typeof(tp_mask) FROM dm"
                       ).fetchone() == (1, "BIGINT[]", "BIGINT")
    assert con.execute("SELECT match_scores[10] FROM gm").fetchone() == (0.9,)


@pytest.mark.parametrize("frame, field, row", [
    (det_frame([(0, 7, 0, 0.9, (0, 0, float("nan"), 10))]), "xmax", 7),
    (det_frame([(0, 7, 0, 0.9, (10, 0, 5, 10))]), "xmax", 7),
    (det_frame([(0, 7, 0, float("inf"), BOX)]), "score", 7),
    (det_frame([(0, 7, 0, 0.9, BOX), (0, 7, 0, 0.5, BOX)]), "det_id", 7),
    (det_frame([(0, 7, 0, 0.9, BOX)]).drop(columns="score"), "score", None),
])
def test_bad_detections_name_the_record_and_field(frame, field, row):
    with pytest.raises(EvalError) as info:
        match_detections(gt_frame([]), frame)
    assert (info.value.field, info.value.row, info.value.file) == (field, row, "det_boxes")


def test_threshold_index_rejects_unstored_thresholds():
    assert threshold_index(0.75) == 5
    with pytest.raises(EvalError) as info:
        threshold_index(0.6123)
    assert info.value.choices[0] == 0.5 and len(info.value.choices) == 10


# --------------------------------------------------------------------------- per-image counts

def _counts(dm, gm, iou, score):
    con = memory_connection()
    con.register("det_matches", dm.assign(model_id="m"))
    con.register("gt_matches", gm.assign(model_id="m"))
    frame = con.execute(*image_counts_params("m", iou, score)).df()
    return {int(r.image_id): (int(r.n_tp), int(r.n_fp), int(r.n_fn)) for r in frame.itertuples()}


def test_image_counts_on_the_toy_dataset():
    gt = gt_frame([
        (1, 1, 0, BOX, None, False),                              # GT only
        (3, 2, 0, BOX, None, False),                              # matched
        (4, 3, 0, BOX, None, False),                              # class mismatch
        (5, 4, 0, (0, 0, 100, 100), None, True),                  # crowd
    ])
    det = det_frame([
        (2, 1, 0, 0.9, BOX),                                      # prediction only
        (3, 2, 0, 0.8, SHIFTED), (3, 3, 0, 0.3, BOX),             # TP + duplicate
        (4, 4, 1, 0.9, BOX),
        (5, 5, 0, 0.9, (10, 10, 20, 20)),                         # in the crowd: ignored
    ])
    dm, gm = match_detections(gt, det)
    assert _counts(dm, gm, 0.5, 0.0) == {1: (0, 0, 1), 2: (0, 1, 0), 3: (1, 1, 0),
                                          4: (0, 1, 1), 5: (0, 0, 0)}
    # At 0.85 the shifted det misses; the exact duplicate (score 0.3) then matches.
    assert _counts(dm, gm, 0.85, 0.0)[3] == (1, 1, 0)
    # Score 0.5 drops the duplicate: at 0.85 image 3 has one FP and one FN.
    assert _counts(dm, gm, 0.85, 0.5)[3] == (0, 1, 1)
    assert _counts(dm, gm, 0.5, 0.95) == {1: (0, 0, 1), 3: (0, 0, 1), 4: (0, 0, 1)}


def test_image_counts_reject_unstored_iou_and_bad_score():
    with pytest.raises(EvalError) as info:
        image_counts_params("m", 0.42, 0.5)
    assert info.value.field == "iou"
    with pytest.raises(EvalError):
        image_counts_params("m", 0.5, "high")


# --------------------------------------------------------------------------- score threshold

def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for image in range(4):
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = rng.integers(0, 40, 4)
            gts.append((image, len(gts) + 1, int(rng.integers(2)), (x, y, x + w, y + h),
                        float(rng.choice([w * h, rng.integers(0, 10000)])), rng.random() < 0.15))
        for _ in range(rng.integers(0, 25)):
            if gts and rng.random() < 0.6:
                g = gts[rng.integers(len(gts))]
                box = tuple(float(v + rng.integers(-4, 5)) for v in g[3])
                box = (box[0], box[1], max(box[0], box[2]), max(box[1], box[3]))
                image_of, cls = g[0], g[2] if rng.random() < 0.8 else int(rng.integers(2))
            else:
                x, y, w, h = (float(v) for v in rng.integers(0, 40, 4))
                box, image_of, cls = (x, y, x + w, y + h), image, int(rng.integers(2))
            dets.append((image_of, len(dets) + 1, cls, float(rng.choice([0.2, 0.5, rng.random()])),
                         box))
    return gt_frame(gts), det_frame(dets)


@pytest.mark.parametrize("seed", range(20))
def test_stored_masks_above_a_score_equal_rematching_only_those_dets(seed):
    gt, det = _random_case(seed)
    dm, gm = match_detections(gt, det)
    for score in (0.2, 0.5, 0.75):
        kept = det[det["score"] >= score]
        dm2, gm2 = match_detections(gt, kept)
        stored = dm[dm["score"] >= score].set_index("det_id").sort_index()
        again = dm2.set_index("det_id").sort_index()
        for col in ("tp_mask", "ignored_mask", "rank"):
            assert stored[col].tolist() == again[col].tolist()
        # A GT's partner survives exactly when the partner's score reaches the threshold.
        for t in range(len(IOU_THRESHOLDS)):
            ids = np.array([v[t] for v in gm["match_det_ids"]])
            scores = np.array([v[t] for v in gm["match_scores"]])
            expected = np.where((ids >= 0) & (scores >= score), ids, -1)
            assert expected.tolist() == [v[t] for v in gm2["match_det_ids"]]



@pytest.mark.parametrize("seed", range(12))
def test_image_misses_equal_the_gts_whose_partner_is_missing_or_below_the_score(seed):
    """The counts read no GT partner: their misses must equal the definition that does."""
    gt, det = _random_case(seed)
    if seed % 3 == 0:  # 105 detections of one class on one image: ranks >= 100 never count
        det = pd.concat([det, det_frame([(0, 1000 + k, 0, 0.99 - k / 1000, BOX) for k in range(105)])])
    dm, gm = match_detections(gt, det)
    counted = gm[(gm["area_mask"].to_numpy() & 1) == 1]
    for iou in (0.5, 0.75, 0.95):
        t = threshold_index(iou)
        partner = np.array([v[t] for v in counted["match_det_ids"]], dtype=np.int64)
        partner_score = np.array([v[t] for v in counted["match_scores"]], dtype=float)
        for score in (0.0, 0.2, 0.5, 0.9):
            missed = (partner < 0) | ~(partner_score >= score)
            expected = pd.Series(missed, index=counted["image_id"]).groupby(level=0).sum()
            counts = _counts(dm, gm, iou, score)
            assert {i: n for i, (_, _, n) in counts.items() if n} == \
                {int(i): int(n) for i, n in expected.items() if n}

@pytest.mark.parametrize("seed", range(10))
def test_best_overlaps_equal_a_brute_force_search(seed):
    gt, det = _random_case(seed)
    dm, _ = match_detections(gt, det)
    det = det.set_index("det_id").loc[dm["det_id"]]
    solid = gt[~gt["iscrowd"]]
    g_box = solid[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    g_xywh = np.column_stack([g_box[:, :2], g_box[:, 2:] - g_box[:, :2]])
    g_image, g_class = solid["image_id"].to_numpy(), solid["class_id"].to_numpy()
    g_ids = solid["gt_id"].to_numpy()
    d_box = det[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    d_xywh = np.column_stack([d_box[:, :2], d_box[:, 2:] - d_box[:, :2]])
    class_of = dict(zip(gt["gt_id"], gt["class_id"]))
    for i, row in enumerate(dm.itertuples()):
        ious = box_iou_pairs(np.repeat(d_xywh[i:i + 1], len(g_xywh), axis=0), g_xywh,
                             np.zeros(len(g_xywh), bool))
        ious = np.where(g_image == row.image_id, ious, 0.0)
        for prefix, mask in (("best_same", g_class == row.class_id),
                             ("best_other", g_class != row.class_id)):
            candidates = np.where(mask, ious, 0.0)
            best = candidates.max() if len(candidates) else 0.0
            expected_id = int(g_ids[np.argmax(candidates)]) if best > 0 else -1
            assert (getattr(row, f"{prefix}_iou"), getattr(row, f"{prefix}_gt_id")) == \
                (best, expected_id)
        if row.best_other_gt_id >= 0:
            assert row.best_other_class_id == class_of[row.best_other_gt_id]
