"""Model comparison: exact changed-image sets, BTC/BEC, metrics as scikit-learn, queries that reopen the sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, hamming_loss

from core.cohorts import catalog_of, cohort_count, parse_query
from core.compare import compare_main, compare_models, image_set_query, named_cohorts
from core.errors import CohortError, EvalError
from core.ingest.build import Dataset, ModelRun, build_store
from core.state import StateDB
from core.store import Store, write_part


# true:      a a a a b b b b      (site x for the first four)
# baseline:  a a b b b b a a  → right on 0 1 4 5
# candidate: a b b a b a a b  → right on 0 3 4 7
TRUE = [0, 0, 0, 0, 1, 1, 1, 1]
BASELINE = [0, 0, 1, 1, 1, 1, 0, 0]
CANDIDATE = [0, 1, 1, 0, 1, 0, 0, 1]


def one_hot(labels, n_classes=2):
    probs = np.full((len(labels), n_classes), 0.2, np.float32)
    probs[np.arange(len(labels)), labels] = 0.8
    return pd.DataFrame({"image_id": np.arange(len(labels)), "probs": list(probs)})


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory, write_images):
    folder = tmp_path_factory.mktemp("mc")
    images = pd.DataFrame({"image_id": np.arange(8), "uri": write_images(folder / "img", 8, (32, 32)), "true_label": TRUE,
                           "site": ["x"] * 4 + ["y"] * 4})
    report = build_store(folder / "mc.duckdb", Dataset("mc", "multiclass", ["a", "b"], images),
                         [ModelRun("base", "Baseline", {}, one_hot(BASELINE)),
                          ModelRun("cand", "Candidate", {}, one_hot(CANDIDATE))])
    return Store(report.path)


def test_multiclass_sets_and_compatibility(multiclass):
    result = compare_models(multiclass, "base", "cand", cohorts=[("site x", "site__eq=x")])
    overall, site_x = result.cohorts
    assert overall.name == "All images" and overall.count == 8 and overall.evaluated == 8
    assert overall.new_errors.image_ids.tolist() == [1, 5]
    assert overall.fixed_errors.image_ids.tolist() == [3, 7]
    assert overall.disagreements.image_ids.tolist() == [1, 3, 5, 7]
    assert overall.btc == 0.5  # of 0 1 4 5 the candidate keeps 0 4
    assert overall.bec == 0.5  # of the candidate's errors 1 2 5 6 the baseline made 2 6
    assert overall.new_errors.query == "image_id__in=1,5"
    assert site_x.count == 4
    assert site_x.new_errors.image_ids.tolist() == [1] and site_x.fixed_errors.image_ids.tolist() == [3]
    assert site_x.btc == 0.5 and site_x.bec == 0.5  # baseline right on 0 1, candidate on 0 3
    for name, truth in (("baseline", BASELINE), ("candidate", CANDIDATE)):
        metrics = getattr(overall, name)
        assert metrics["accuracy"] == pytest.approx(accuracy_score(TRUE, truth))
        assert metrics["f1_macro"] == pytest.approx(f1_score(TRUE, truth, average="macro"))
    assert site_x.candidate["accuracy"] == pytest.approx(accuracy_score(TRUE[:4], CANDIDATE[:4]))
    assert site_x.delta["accuracy"] == pytest.approx(0.0)
    frame = result.metrics_frame()
    assert set(frame["cohort"]) == {"All images", "site x"} and "accuracy" in set(frame["metric"])
    assert result.compatibility_frame()["new_errors"].tolist() == [2, 1]


def test_queries_reopen_the_sets(multiclass):
    """Short sets inline; long ones saved once as a hand-picked cohort and reused."""
    catalog = catalog_of(multiclass)
    result = compare_models(multiclass, "base", "cand", max_inline=1)
    for image_set in (result.new_errors, result.fixed_errors, result.disagreements):
        assert image_set.query.startswith("cohort=")
        assert cohort_count(multiclass, parse_query(image_set.query, catalog), "base") == image_set.count
    again = compare_models(multiclass, "base", "cand", max_inline=1)
    assert again.new_errors.query == result.new_errors.query
    saved = StateDB.for_store(multiclass.paths.base).list_cohorts()
    assert len(saved) == 3
    assert image_set_query(multiclass, np.array([], dtype=np.int64), "empty") is None


def test_cohort_on_model_columns_uses_one_image_set(multiclass):
    """"outcome=incorrect" selects the baseline's errors for both models unless the query names a model."""
    result = compare_models(multiclass, "base", "cand", cohorts=[("base wrong", "outcome__eq=incorrect"),
                                                                  ("cand wrong", "outcome__eq=incorrect&model=cand")])
    base_wrong, cand_wrong = result.cohorts[1:]
    assert base_wrong.count == 4 and base_wrong.baseline["accuracy"] == 0.0
    assert base_wrong.candidate["accuracy"] == pytest.approx(0.5)  # candidate fixed 3 and 7 of 2 3 6 7
    assert cand_wrong.candidate["accuracy"] == 0.0 and cand_wrong.query.endswith("model=cand")


def test_bad_input(multiclass):
    with pytest.raises(EvalError, match="unknown candidate model 'nope'") as info:
        compare_models(multiclass, "base", "nope")
    assert info.value.choices == ["base", "cand"]
    with pytest.raises(EvalError, match="unknown baseline model 'x'"):
        compare_models(multiclass, "x", "cand")
    with pytest.raises(EvalError, match="same model"):
        compare_models(multiclass, "base", "base")
    with pytest.raises(CohortError, match="cohort 'bad': unknown column 'nope'"):
        compare_models(multiclass, "base", "cand", cohorts=[("bad", "nope__eq=1")])


def test_model_of_another_task(tmp_path, write_images):
    folder = tmp_path
    images = pd.DataFrame({"image_id": np.arange(8), "uri": write_images(folder / "img", 8, (32, 32)), "true_label": TRUE})
    report = build_store(folder / "t.duckdb", Dataset("t", "multiclass", ["a", "b"], images),
                         [ModelRun("base", "Baseline", {}, one_hot(BASELINE))])
    write_part(report.path, "models", pd.DataFrame({"model_id": ["det"], "name": ["detector"],
                                                    "task": ["detection"], "params": ["{}"]}))
    with pytest.raises(EvalError, match="candidate model 'det' is a detection model") as info:
        compare_models(report.path, "base", "det")
    assert info.value.choices == ["base"]


def test_cli(multiclass, capsys):
    path = str(multiclass.paths.base)
    assert compare_main([path, "--baseline", "base", "--candidate", "cand", "--cohort", "site x::site__eq=x",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["btc"] == 0.5 and out["new_errors"]["count"] == 2
    assert [c["name"] for c in out["cohorts"]] == ["All images", "site x"]
    assert compare_main([path, "--baseline", "base", "--candidate", "cand"]) == 0
    text = capsys.readouterr().out
    assert "BTC 0.5000  BEC 0.5000" in text and "new errors: 2  ?image_id__in=1,5" in text
    assert named_cohorts(["a::b__eq=1", "c__eq=2"]) == [("a", "b__eq=1"), ("c__eq=2", "c__eq=2")]


# --------------------------------------------------------------------------- multilabel

ML_TRUE = [[0], [0, 1], [2], []]
ML_BASE = [[0.9, 0.1, 0.1], [0.9, 0.4, 0.1], [0.1, 0.1, 0.7], [0.2, 0.2, 0.2]]
ML_CAND = [[0.9, 0.6, 0.1], [0.8, 0.7, 0.1], [0.1, 0.1, 0.6], [0.1, 0.1, 0.1]]


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, write_images):
    folder = tmp_path_factory.mktemp("ml")
    images = pd.DataFrame({"image_id": np.arange(4), "uri": write_images(folder / "img", 4, (32, 32)),
                           "true_label": ML_TRUE})

    def run(model_id, probs):
        return ModelRun(model_id, model_id, {}, pd.DataFrame({"image_id": np.arange(4),
                                                              "probs": list(np.array(probs, np.float32))}))

    report = build_store(folder / "ml.duckdb", Dataset("ml", "multilabel", ["x", "y", "z"], images),
                         [run("base", ML_BASE), run("cand", ML_CAND)])
    return Store(report.path)


def _indicator(lists):
    out = np.zeros((len(lists), 3), int)
    for i, labels in enumerate(lists):
        out[i, labels] = 1
    return out


@pytest.mark.parametrize("threshold, new, fixed, btc", [(0.5, [0], [1], 2 / 3), (0.3, [0], [], 3 / 4)])
def test_multilabel_at_live_threshold(multilabel, threshold, new, fixed, btc):
    result = compare_models(multilabel, "base", "cand", label_threshold=threshold)
    assert result.new_errors.image_ids.tolist() == new
    assert result.fixed_errors.image_ids.tolist() == fixed
    assert result.btc == pytest.approx(btc)
    predicted = (np.array(ML_BASE) >= threshold).astype(int)
    assert result.overall.baseline["exact_match"] == pytest.approx(accuracy_score(_indicator(ML_TRUE), predicted))
    assert result.overall.baseline["hamming_loss"] == pytest.approx(hamming_loss(_indicator(ML_TRUE), predicted))
    if threshold == 0.5:
        assert result.disagreements.image_ids.tolist() == [0, 1]
        assert result.bec == 0.0
        assert "(label threshold 0.5)" in result.new_errors.name


# --------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def detection(tmp_path_factory, write_images):
    folder = tmp_path_factory.mktemp("det")
    images = pd.DataFrame({"image_id": np.arange(4), "uri": write_images(folder / "img", 4, (32, 32)),
                           "true_label": [[]] * 4})
    gt = pd.DataFrame({"image_id": [0, 1, 1, 3], "gt_id": [0, 1, 2, 3], "class_id": [0, 0, 1, 1],
                       "xmin": [0, 0, 15, 5], "ymin": [0, 0, 15, 5], "xmax": [10, 10, 30, 20],
                       "ymax": [10, 10, 30, 20]})

    def dets(rows):
        return pd.DataFrame(rows, columns=["image_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax"])

    # baseline: finds everything but the person in image 1.
    base = dets([(0, 0, 0.9, 0, 0, 10, 10), (1, 0, 0.9, 0, 0, 10, 10), (3, 1, 0.8, 5, 5, 20, 20)])
    # candidate: finds everything, plus a false car in image 0 (0.7) and in image 2 (0.6).
    cand = dets([(0, 0, 0.9, 0, 0, 10, 10), (0, 0, 0.7, 20, 20, 30, 30), (1, 0, 0.9, 0, 0, 10, 10),
                 (1, 1, 0.9, 15, 15, 30, 30), (2, 0, 0.6, 0, 0, 5, 5), (3, 1, 0.8, 5, 5, 20, 20)])
    report = build_store(folder / "det.duckdb", Dataset("det", "detection", ["car", "person"], images, gt),
                         [ModelRun("base", "Baseline", {}, det_boxes=base),
                          ModelRun("cand", "Candidate", {}, det_boxes=cand)])
    return Store(report.path)


def test_detection_objects_and_images(detection):
    result = compare_models(detection, "base", "cand", score_threshold=0.5)
    assert result.new_errors.image_ids.tolist() == [0, 2]  # false positives appear
    assert result.fixed_errors.image_ids.tolist() == [1]  # the person is found
    assert result.disagreements.image_ids.tolist() == [0, 1, 2]
    assert result.btc == pytest.approx(1 / 3) and result.bec == 0.0
    o = result.objects
    assert (o.ground_truths, o.baseline_tp, o.candidate_tp, o.newly_missed, o.newly_found) == (4, 3, 4, 0, 1)
    assert (o.baseline_fp, o.candidate_fp) == (0, 2)
    assert result.overall.candidate["recall"] == 1.0 and result.overall.baseline["recall"] == 0.75
    # Averaged over the classes, as the model overview does: cars 2 of 4, persons 2 of 2 (pooled: 4 of 6).
    assert result.overall.candidate["precision"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    # Above the 0.6 detection's score, image 2 is right again for the candidate.
    stricter = compare_models(detection, "base", "cand", score_threshold=0.65)
    assert stricter.new_errors.image_ids.tolist() == [0]
    assert stricter.objects.candidate_fp == 1
    # A cohort whose query sets its own score threshold is compared at it, and its link keeps it.
    own = compare_models(detection, "base", "cand", score_threshold=0.5, cohorts=[("strict", "conf=0.65")]).cohorts[1]
    assert own.query == "conf=0.65" and own.new_errors.image_ids.tolist() == [0]
    assert own.candidate == stricter.overall.candidate and own.candidate != result.overall.candidate
