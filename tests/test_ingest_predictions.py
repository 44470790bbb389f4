"""Predictions from tables (every task), joins by path / source id, bad rows; path helpers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest import ImageIndex, Problems, clean_column_names, resolve_image
from core.ingest.coco import dataset_index
from core.ingest.predictions import is_coco_results, read_predictions, read_table_predictions
from core.ingest.table import read_table


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "images" / "day"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"p{i}.png")
    frame = pd.DataFrame({"image": [f"images/day/p{i}.png" for i in range(3)], "label": ["b", "a", "c"],
                          "image_id": [70, 71, 72]})
    problems = Problems()
    return read_table(frame, "multiclass", images_root=tmp_path, problems=problems), problems


def index_of(dataset):
    ds, problems = dataset
    return dataset_index(ds, problems)


def test_multiclass_by_path_names_indices_probs(dataset, tmp_path):
    index = index_of(dataset)
    frame = pd.DataFrame({
        "image": ["images/day/p2.png", "/mnt/other/machine/images/day/p0.png", "C:\\x\\day\\p1.png"],
        "pred_label": ["c", 1, "a"], "score": [0.7, 0.6, 0.9],
        "probs": [json.dumps([0.1, 0.2, 0.7]), json.dumps([0.3, 0.6, 0.1]), json.dumps([0.9, 0.05, 0.05])],
    })
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    run = read_predictions(path, "multiclass", index, ["a", "b", "c"], model_id="m")
    preds = run.predictions
    assert preds["image_id"].tolist() == [2, 0, 1]
    assert preds["pred_label"].tolist() == [2, 1, 0]
    assert preds["score"].tolist() == pytest.approx([0.7, 0.6, 0.9])
    np.testing.assert_allclose(np.stack(preds["probs"])[0], [0.1, 0.2, 0.7], rtol=1e-6)
    assert run.params == {"source": str(path)}


def test_one_probability_column_per_class(dataset, tmp_path, caplog):
    """prob_<class> columns, in any order, become probs in class order; other columns are named in a warning."""
    index = index_of(dataset)
    frame = pd.DataFrame({"image": [f"images/day/p{i}.png" for i in range(3)], "label": ["c", "a", "b"],
                          "prob_c": [0.7, 0.1, 0.2], "prob_a": [0.2, 0.8, 0.1], "prob_b": [0.1, 0.1, 0.7],
                          "notes": ["x", "y", "z"]})
    with caplog.at_level("WARNING"):
        preds = read_table_predictions(frame, "multiclass", index, ["a", "b", "c"]).predictions
    np.testing.assert_allclose(np.stack(preds["probs"]), [[0.2, 0.1, 0.7], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]],
                               rtol=1e-6)
    assert preds["pred_label"].tolist() == [2, 0, 1]
    assert "column(s) not read: notes" in caplog.text and "prob_" not in caplog.text
    with pytest.raises(IngestError, match="'prob_b' is missing"):
        read_table_predictions(frame.drop(columns="prob_b"), "multiclass", index, ["a", "b", "c"])
    with pytest.raises(IngestError, match="'prob_zebra' names no class"):
        read_table_predictions(frame.assign(prob_zebra=0.0), "multiclass", index, ["a", "b", "c"])


def test_a_json_object_is_no_predictions_file(dataset, tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(IngestError, match="COCO results are a JSON list") as info:
        read_predictions(path, "multiclass", index_of(dataset), ["a", "b", "c"])
    assert info.value.file == str(path)


def test_join_by_source_id(dataset):
    frame = pd.DataFrame({"image_id": [72, 70], "prediction": ["a", "b"]})
    preds = read_table_predictions(frame, "multiclass", index_of(dataset), ["a", "b", "c"]).predictions
    assert preds["image_id"].tolist() == [2, 0] and preds["pred_label"].tolist() == [0, 1]


@pytest.mark.parametrize("row,field,text", [
    ({"image": "images/day/nope.png", "pred_label": "a"}, "image", "no image of the dataset matches"),
    ({"image": "images/day/p0.png", "pred_label": "a"}, "image", "same image as row 0"),
    ({"image": "images/day/p1.png", "pred_label": "zebra"}, "pred_label", "unknown class 'zebra'"),
    ({"image": "images/day/p1.png", "pred_label": 3}, "pred_label", "unknown class 3"),
    ({"image": "images/day/p1.png", "pred_label": "a", "score": float("nan")}, "score", "finite"),
    ({"image": "images/day/p1.png", "pred_label": "a", "probs": [0.5, 0.5]}, "probs",
     "3 finite numbers, one per class of the store (a, b, c)"),
    ({"image": "images/day/p1.png", "pred_label": "a", "probs": "[0.5, 0.5"}, "probs", "not a JSON list"),
])
def test_bad_prediction_rows(dataset, row, field, text):
    first = {"image": "images/day/p0.png", "pred_label": "b", "score": 0.5, "probs": [0.2, 0.5, 0.3]}
    second = {"score": 0.5, "probs": [0.2, 0.5, 0.3], **row}
    frame = pd.DataFrame([first, second])
    with pytest.raises(IngestError) as info:
        read_table_predictions(frame, "multiclass", index_of(dataset), ["a", "b", "c"])
    assert (info.value.row, info.value.field) == (1, field)
    assert text in info.value.message
    problems = Problems(skip_bad=True)
    run = read_table_predictions(frame, "multiclass", index_of(dataset), ["a", "b", "c"], problems=problems)
    assert run.predictions["image_id"].tolist() == [0] and len(problems.skipped) == 1


def test_rows_for_skipped_images_are_dropped_quietly(tmp_path):
    folder = tmp_path / "im"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    frame = pd.DataFrame({"image": ["a.png", "gone.png"], "label": ["x", "y"]})
    problems = Problems(skip_bad=True)
    ds = read_table(frame, "multiclass", images_root=folder, problems=problems)
    assert len(problems.skipped) == 1
    preds = pd.DataFrame({"image": ["gone.png", "a.png"], "label": ["x", "x"]})
    run = read_table_predictions(preds, "multiclass", dataset_index(ds, problems), ds.classes, problems=Problems())
    assert run.predictions["image_id"].tolist() == [0]


def test_multilabel_predictions(dataset):
    index = index_of(dataset)
    frame = pd.DataFrame({"image": ["images/day/p0.png", "images/day/p1.png"],
                          "pred_labels": ['["a", "c"]', "b"], "probs": [[0.9, 0.1, 0.8], [0.1, 0.7, 0.2]]})
    preds = read_table_predictions(frame, "multilabel", index, ["a", "b", "c"]).predictions
    assert [list(v) for v in preds["pred_labels"]] == [[0, 2], [1]]
    assert len(preds["probs"].iloc[0]) == 3
    only_probs = frame.drop(columns="pred_labels")
    assert "pred_labels" not in read_table_predictions(only_probs, "multilabel", index, ["a", "b", "c"]).predictions
    with pytest.raises(IngestError, match="no prediction column"):
        read_table_predictions(frame[["image"]], "multilabel", index, ["a", "b", "c"])


def test_detection_predictions(dataset):
    index = index_of(dataset)
    frame = pd.DataFrame({"image": ["images/day/p0.png", "images/day/p2.png"],
                          "detections": [[["a", 0, 0, 2, 2, 0.9], [2, 1, 1, 3, 4, 0.1]], []]})
    dets = read_table_predictions(frame, "detection", index, ["a", "b", "c"]).det_boxes
    assert dets["image_id"].tolist() == [0, 0]
    assert dets["class_id"].tolist() == [0, 2]
    assert dets["score"].tolist() == [0.9, 0.1]
    assert dets["area"].tolist() == [4, 6]
    missing_score = pd.DataFrame({"image": ["images/day/p0.png"], "detections": [[["a", 0, 0, 2, 2]]]})
    with pytest.raises(IngestError, match="box must be") as info:
        read_table_predictions(missing_score, "detection", index, ["a", "b", "c"])
    assert (info.value.row, info.value.field) == (0, "detections[0]")


def test_predictions_file_kinds(tmp_path, dataset):
    coco = tmp_path / "res.json"
    coco.write_text(json.dumps([{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"image": "images/day/p0.png", "pred_label": "a"}]))
    assert is_coco_results(coco) and not is_coco_results(rows)
    run = read_predictions(rows, "multiclass", index_of(dataset), ["a", "b", "c"])
    assert run.predictions["pred_label"].tolist() == [0]
    with pytest.raises(IngestError, match="COCO results join on COCO image ids"):
        read_predictions(coco, "detection", ImageIndex(["/x/a.png"], [0], "/x"), ["a"], category_ids=[2])
    with pytest.raises(IngestError, match="not found"):
        read_predictions(tmp_path / "none.csv", "multiclass", index_of(dataset), ["a"])


def test_resolve_image_and_index(tmp_path):
    target = tmp_path / "data" / "val" / "x.jpg"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    root = tmp_path / "data"
    for written in ("val/x.jpg", str(target), "/home/u/coco/val/x.jpg", "E:\\coco\\val\\x.jpg", "x.jpg"):
        expected = str(target) if written != "x.jpg" else None
        assert resolve_image(written, root) == expected or (written == "x.jpg" and
                                                              resolve_image(written, root / "val") == str(target))
    assert resolve_image("val/y.jpg", root) is None and resolve_image("", root) is None
    other = tmp_path / "data" / "test" / "x.jpg"
    other.parent.mkdir()
    index = ImageIndex([str(target), str(other)], [5, 6], str(root))
    assert index.by_path("val/x.jpg") == 5 and index.by_path("/elsewhere/test/x.jpg") == 6
    assert index.by_path("x.jpg") is None  # ambiguous basename
    assert index.by_path("C:\\d\\data\\val\\x.jpg") == 5


def test_clean_column_names():
    names = clean_column_names(["site", "Camera Model", "a__b", "1st", "brightness", "exif_make", "site!", "g1.x"])
    assert names == {"site": "site", "Camera Model": "Camera_Model", "a__b": "a_b", "1st": "c_1st",
                     "brightness": "user_brightness", "exif_make": "user_exif_make", "site!": "site_2",
                     "g1.x": "g1_x"}
