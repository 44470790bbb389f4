"""Synthetic stores: complete, consistent with the engine, chunked matching equal to one pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.cohorts import cohort_summary
from core.errors import EvalError, IngestError
from core.matching import match_detections
from core.store import Store
from core.synthetic import CLASSES, build_synthetic_store, synthetic_main


@pytest.fixture(scope="module")
def multiclass_store(tmp_path_factory):
    path = build_synthetic_store(tmp_path_factory.mktemp("mc") / "syn-mc", n_images=3000, seed=1)
    return Store(path)


@pytest.fixture(scope="module")
def detection_store(tmp_path_factory):
    # Chunks of 70 images: several chunks, one of them partial.
    path = build_synthetic_store(tmp_path_factory.mktemp("det") / "syn-det", task="detection",
                                 n_images=300, dets_per_image=6, chunk_images=70, seed=2)
    return Store(path)


def test_multiclass_tables(multiclass_store):
    s = multiclass_store
    assert s.task == "multiclass" and s.classes == CLASSES
    assert s.image_count() == 3000
    assert s.model_ids() == ["baseline", "candidate"]
    assert s.scalar("SELECT count(*) FROM predictions") == 6000
    assert s.scalar("SELECT count(*) FROM thumbnails WHERE octet_length(jpeg) > 0") == 3000
    catalog = s.columns().set_index("name")
    assert catalog.loc["site", "source"] == "user" and catalog.loc["site", "kind"] == "categorical"
    assert catalog.loc["occluded", "kind"] == "boolean"
    assert catalog.loc["brightness", "source"] == "auto"
    assert catalog.loc["true_label", "kind"] == "categorical"
    # The one shared picture exists, so the flyout can open any image.
    uri = s.scalar("SELECT DISTINCT uri FROM images")
    assert open(uri, "rb").read(2) == b"\xff\xd8"


def test_predictions_are_consistent(multiclass_store):
    frame = multiclass_store.query(
        "SELECT p.pred_label, p.score, p.probs, o.correct, i.true_label FROM predictions p "
        "JOIN outcomes o USING (model_id, image_id) JOIN images i USING (image_id)")
    probs = np.stack(frame["probs"].to_numpy())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=1), frame["pred_label"])
    np.testing.assert_allclose(probs.max(axis=1), frame["score"], rtol=1e-6)
    np.testing.assert_array_equal(frame["correct"], frame["pred_label"] == frame["true_label"])


def test_errors_have_structure(multiclass_store):
    dark = {m: cohort_summary(multiclass_store, "brightness__lt=0.2", m)["metrics"]["accuracy"]
            for m in ("baseline", "candidate")}
    bright = cohort_summary(multiclass_store, "brightness__gt=0.5", "baseline")["metrics"]["accuracy"]
    assert dark["baseline"] < bright - 0.1
    assert dark["candidate"] > dark["baseline"] + 0.1


def test_detection_tables(detection_store):
    s = detection_store
    assert s.task == "detection" and s.image_count() == 300
    per_model = s.query("SELECT model_id, count(*) AS n, min(det_id) AS lo, max(det_id) AS hi "
                        "FROM det_boxes GROUP BY model_id ORDER BY model_id")
    assert per_model["n"].tolist() == [1800, 1800]
    assert per_model["lo"].tolist() == [0, 0] and per_model["hi"].tolist() == [1799, 1799]
    labels = s.query("SELECT image_id, true_label FROM images ORDER BY image_id")
    gt = s.query("SELECT image_id, class_id FROM gt_boxes")
    expected = gt.groupby("image_id")["class_id"].agg(lambda v: sorted(set(v)))
    assert [list(v) for v in labels["true_label"]] == [expected.get(i, []) for i in labels["image_id"]]
    assert not [p for p in s.paths.folder.iterdir() if p.name.startswith(".")]  # staging removed


@pytest.mark.parametrize("model_id", ["baseline", "candidate"])
def test_chunked_matching_equals_one_pass(detection_store, model_id):
    s = detection_store
    gt = s.query("SELECT * FROM gt_boxes ORDER BY gt_id")
    dets = s.query("SELECT * FROM det_boxes WHERE model_id = ? ORDER BY det_id", [model_id])
    det_ref, gt_ref = match_detections(gt, dets)
    for table, ref, key in (("det_matches", det_ref, "det_id"), ("gt_matches", gt_ref, "gt_id")):
        got = s.query(f"SELECT * EXCLUDE (model_id) FROM {table} WHERE model_id = ? ORDER BY {key}", [model_id])
        assert list(got.columns) == list(ref.columns)
        for col in ref.columns:
            a, b = got[col].tolist(), ref[col].tolist()
            if isinstance(a[0], (list, np.ndarray)):
                np.testing.assert_array_equal(np.stack(a), np.stack(b), err_msg=col)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=col)
    # Not a vacuous check: the key spans images, so chunks alone could not produce it.
    assert s.scalar("SELECT count(DISTINCT order_key) FROM det_matches WHERE model_id = ?", [model_id]) == 1800


def test_detection_metrics_are_plausible(detection_store):
    metrics = cohort_summary(detection_store, "", "baseline")["metrics"]
    assert 0.05 < metrics["AP"] < 0.9


def test_same_seed_same_store(tmp_path):
    a = Store(build_synthetic_store(tmp_path / "a", n_images=50, seed=3))
    b = Store(build_synthetic_store(tmp_path / "b", n_images=50, seed=3))
    sql = "SELECT * EXCLUDE (uri) FROM images ORDER BY image_id"
    pd.testing.assert_frame_equal(a.query(sql), b.query(sql))


def test_cli_and_bad_input(tmp_path, capsys):
    assert synthetic_main(["--images", "20", "--out", str(tmp_path / "cli")]) == 0
    assert Store(tmp_path / "cli.duckdb").image_count() == 20
    assert "built" in capsys.readouterr().out
    with pytest.raises(IngestError, match="task"):
        build_synthetic_store(tmp_path / "x", task="multilabel", n_images=5)
    with pytest.raises(IngestError, match="at least one image"):
        build_synthetic_store(tmp_path / "x", n_images=0)
    assert not (tmp_path / "x.duckdb").exists()


def test_one_evaluation_serves_every_threshold(detection_store):
    """``evaluate_cohort`` once, then any IoU / score threshold equals a fresh evaluation; the
    counts at the threshold equal a count over the stored masks; TIDE's base AP is the mAP."""
    from core.matching import IOU_THRESHOLDS, bit_index
    from core.metrics.detection import detection_metrics, evaluate_cohort, operating_counts, tide_errors

    s = detection_store
    cohort = ("SELECT image_id FROM images WHERE image_id % 3 = 0", [])
    matches = s.query("SELECT image_id, class_id, score, rank, tp_mask, ignored_mask FROM det_matches "
                      "WHERE model_id = 'baseline'")
    in_cohort = matches[matches["image_id"] % 3 == 0]
    for selection, dets in ((None, matches), (cohort, in_cohort)):
        evaluation = evaluate_cohort(s, "baseline", selection)
        for iou, score in ((0.5, 0.0), (0.75, 0.5), (0.95, 0.3)):
            reused = detection_metrics(s, "baseline", selection, iou=iou, score_threshold=score,
                                       evaluation=evaluation)
            fresh = detection_metrics(s, "baseline", selection, iou=iou, score_threshold=score)
            pd.testing.assert_frame_equal(reused["per_class"], fresh["per_class"])
            assert reused["aggregates"] == fresh["aggregates"]
            bit = bit_index(int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))[0]))
            kept = dets[(dets["rank"] < 100) & (dets["score"].astype(np.float64) >= score)]
            tp_mask, ignored_mask = kept["tp_mask"].to_numpy(np.int64), kept["ignored_mask"].to_numpy(np.int64)
            tp = (tp_mask >> bit) & 1 == 1
            fp = ((tp_mask | ignored_mask) >> bit) & 1 == 0
            per_class = reused["per_class"].set_index("class_id")
            assert per_class["n_tp"].sum() == tp.sum() and per_class["n_fp"].sum() == fp.sum() > 0
            assert iou > 0.5 or tp.sum() > 0
            if score == 0:  # TIDE's base ranks only the detections at or above the score threshold
                assert tide_errors(s, "baseline", selection, iou=iou)["ap"] == pytest.approx(fresh["mAP"], abs=1e-12)
        # Thresholds on the app's grid come from the evaluation; any other from one query: the same counts.
        for t, score in ((0, 0.0), (5, 0.33), (2, 1.0)):
            grid = evaluation.counts_at(t, score)
            queried = operating_counts(s, "baseline", selection, evaluation.class_ids, IOU_THRESHOLDS[t], score)
            assert np.array_equal(grid[0], queried[0]) and np.array_equal(grid[1], queried[1])
        assert evaluation.counts_at(0, 0.333) is None
        off_grid = detection_metrics(s, "baseline", selection, iou=0.5, score_threshold=0.333, evaluation=evaluation)
        assert off_grid["per_class"]["n_tp"].sum() == ((dets["rank"] < 100) & (dets["score"].astype(np.float64) >= 0.333)
                                                      & (dets["tp_mask"].to_numpy(np.int64) & 1 == 1)).sum()
    with pytest.raises(EvalError):
        detection_metrics(s, "candidate", None, evaluation=evaluation)


def _reference_confusion(store, model_id, image_filter, iou, score):
    """The detection confusion matrix from the stored matches, row by row in pandas (the rules of
    ``confusion_matrix_detection``'s docstring, written out independently of its SQL)."""
    from core.matching import IOU_THRESHOLDS, bit_index

    t = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))[0])
    bit = bit_index(t)
    dets = store.query("SELECT * FROM det_matches WHERE model_id = ?", [model_id])
    gts = store.query("SELECT * FROM gt_matches WHERE model_id = ?", [model_id])
    dets, gts = dets[image_filter(dets["image_id"])], gts[image_filter(gts["image_id"])]
    tp_mask, ignored = dets["tp_mask"].to_numpy(np.int64), dets["ignored_mask"].to_numpy(np.int64)
    dets = dets.assign(tp=(tp_mask >> bit) & 1 == 1, ignored=(ignored >> bit) & 1 == 1)
    dets = dets[(dets["score"].astype(float) >= score) & (dets["tp"] | ~dets["ignored"])]
    gts = gts[gts["area_mask"].to_numpy(np.int64) & 1 == 1]
    partner = [ids[t] for ids in gts["match_det_ids"]]
    partner_score = [scores[t] for scores in gts["match_scores"]]
    matched = {g for g, d, sc in zip(gts["gt_id"], partner, partner_score) if d >= 0 and sc >= score}
    n = len(store.classes)
    matrix = np.zeros((n + 1, n + 1), np.int64)
    confused = {}
    fps = dets[~dets["tp"]].sort_values(["score", "det_id"], ascending=[False, True])
    gt_ids = set(gts["gt_id"])
    for row in fps.itertuples():
        target = row.best_other_gt_id
        if (row.best_other_iou >= IOU_THRESHOLDS[t] and target >= 0 and target in gt_ids
                and target not in matched and target not in confused):
            confused[target] = (row.best_other_class_id, row.class_id)
        else:
            matrix[n, row.class_id] += 1
    for cls in dets[dets["tp"]]["class_id"]:
        matrix[cls, cls] += 1
    for truth, predicted in confused.values():
        matrix[truth, predicted] += 1
    for g, cls in zip(gts["gt_id"], gts["class_id"]):
        if g not in matched and g not in confused:
            matrix[cls, n] += 1
    return matrix


@pytest.mark.parametrize("iou, score", [(0.5, 0.0), (0.5, 0.5), (0.75, 0.3)])
def test_detection_confusion_matrix_equals_a_row_by_row_reference(detection_store, iou, score):
    from core.metrics.detection import confusion_matrix_detection

    s = detection_store
    for selection, image_filter in ((None, lambda ids: ids >= 0),
                                    (("SELECT image_id FROM images WHERE image_id % 4 = 1", []),
                                     lambda ids: ids % 4 == 1)):
        ours = confusion_matrix_detection(s, "baseline", selection, iou, score).to_numpy()
        expected = _reference_confusion(s, "baseline", image_filter, iou, score)
        assert np.array_equal(ours, expected)
        assert ours[:-1, :-1].trace() > 0 and ours[-1].sum() > 0 and ours[:-1, -1].sum() > 0
        off_diagonal = ours[:-1, :-1] - np.diag(np.diag(ours[:-1, :-1]))
        assert off_diagonal.sum() > 0  # class confusions occur in this set


@pytest.mark.parametrize("classes", [None, [0, 2, 3]])
def test_evaluation_read_a_few_classes_at_a_time_equals_one_read(detection_store, monkeypatch, classes):
    import core.metrics.detection as detection

    selection = ("SELECT image_id FROM images WHERE image_id % 5 <> 2", [])
    whole = detection.evaluate_cohort(detection_store, "baseline", selection, classes=classes)
    reads = []
    original = detection._cohort_dets
    monkeypatch.setattr(detection, "_cohort_dets", lambda *a, **k: reads.append(k.get("class_range")) or original(*a, **k))
    monkeypatch.setattr(detection, "CHUNK_DETECTIONS", 150)
    chunked = detection.evaluate_cohort(detection_store, "baseline", selection, classes=classes)
    assert len([r for r in reads if r is not None]) >= 2  # several class groups, then the micro ranking
    for name in ("precision", "scores", "recall"):
        assert np.array_equal(getattr(whole.per_class, name), getattr(chunked.per_class, name))
        assert np.array_equal(getattr(whole.micro, name), getattr(chunked.micro, name))
    assert np.array_equal(whole.grid_tp, chunked.grid_tp) and np.array_equal(whole.grid_fp, chunked.grid_fp)
    assert (whole.per_class.precision[0, 0, :, 0] > 0).all()


def test_the_all_images_evaluation_is_persisted_and_kept_current(detection_store, tmp_path, monkeypatch):
    import shutil

    import core.metrics.detection as detection
    from core.cohorts import ALL_IMAGES_SQL

    assert detection.store_evaluations(detection_store.paths.base) == []  # written with the store, current
    reads = []
    original = detection._cohort_dets
    monkeypatch.setattr(detection, "_cohort_dets", lambda *a, **k: reads.append(1) or original(*a, **k))
    unrecognised = ("SELECT image_id FROM images", [])  # every image too, but evaluated from the matches
    for model in ("baseline", "candidate"):
        stored = detection.evaluate_cohort(detection_store, model, (ALL_IMAGES_SQL, []))
        assert not reads
        fresh = detection.evaluate_cohort(detection_store, model, unrecognised)
        assert reads
        for name in ("class_ids", "n_gt", "grid_tp", "grid_fp"):
            assert getattr(stored, name).dtype == getattr(fresh, name).dtype
            assert np.array_equal(getattr(stored, name), getattr(fresh, name))
        for ranking in ("per_class", "micro"):
            for name in ("precision", "scores", "recall"):
                assert np.array_equal(getattr(getattr(stored, ranking), name), getattr(getattr(fresh, ranking), name))
        reads.clear()
    # A change to the evaluation's code makes the persisted ones stale: computed afresh, then rewritten.
    copy = tmp_path / detection_store.paths.base.name
    shutil.copy(detection_store.paths.base, copy)
    shutil.copytree(detection_store.paths.parts, tmp_path / detection_store.paths.parts.name)
    monkeypatch.setattr(detection, "EVALUATION_VERSION", detection.EVALUATION_VERSION + 1)
    detection.evaluate_cohort(Store(copy), "baseline", None)
    assert reads
    assert detection.store_evaluations(copy) == ["baseline", "candidate"]
    reads.clear()
    detection.evaluate_cohort(Store(copy), "baseline", None)
    assert not reads
