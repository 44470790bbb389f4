"""Azure RAI vision tables: CSV, JSON lines, Parquet, DataFrame; every task; bad rows; end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest import Problems
from core.ingest.run import ingest_main
from core.ingest.table import read_table
from core.store import Store


@pytest.fixture
def imgs(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")
    return folder


def write(frame: pd.DataFrame, path):
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return path


def multiclass_frame():
    return pd.DataFrame({
        "image": [f"images/im{i}.jpg" for i in range(4)],
        "label": ["rose", "tulip", "rose", "daisy"],
        "camera_height": [1.5, 2.0, 1.5, 3.25],
        "indoor": [True, False, False, True],
        "site": ["north", "south", "north", "west"],
        "brightness": [1, 2, 3, 4],  # clashes with an automatic column
        "weird name!": [0, 0, 1, 1],
    })


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", "frame"])
def test_multiclass_all_formats_keep_user_column_types(tmp_path, imgs, suffix):
    frame = multiclass_frame()
    source = frame if suffix == "frame" else write(frame, tmp_path / f"t{suffix}")
    ds = read_table(source, "multiclass", images_root=tmp_path if suffix == "frame" else None)
    assert ds.classes == ["daisy", "rose", "tulip"]
    assert ds.images["true_label"].tolist() == [1, 2, 1, 0]
    assert ds.images["uri"].tolist() == [str(imgs / f"im{i}.jpg") for i in range(4)]
    images = ds.images
    assert pd.api.types.is_float_dtype(images["camera_height"])
    assert pd.api.types.is_bool_dtype(images["indoor"])
    assert images["site"].tolist() == ["north", "south", "north", "west"]
    assert images["user_brightness"].tolist() == [1, 2, 3, 4]
    assert images["weird_name"].tolist() == [0, 0, 1, 1]


def test_multiclass_indices_with_class_list_and_base(tmp_path, imgs):
    frame = pd.DataFrame({"image": [str(imgs / f"im{i}.jpg") for i in range(3)], "label": [1, 3, 2]})
    ds = read_table(frame, "multiclass", classes=["a", "b", "c"], class_index_base=1)
    assert ds.images["true_label"].tolist() == [0, 2, 1]
    ds = read_table(frame, "multiclass")
    assert ds.classes == ["0", "1", "2", "3"] and ds.images["true_label"].tolist() == [1, 3, 2]


def test_multilabel_encodings(tmp_path, imgs):
    frame = pd.DataFrame({"image": [f"im{i}.jpg" for i in range(4)],
                          "label": [json.dumps(["cat", "dog"]), "dog", "", "cat sky"]})
    path = write(frame, tmp_path / "ml.csv")
    ds = read_table(path, "multilabel", images_root=imgs)
    assert ds.classes == ["cat", "dog", "sky"]
    assert [list(v) for v in ds.images["true_label"]] == [[0, 1], [1], [], [0, 2]]
    as_lists = pd.DataFrame({"image": [f"im{i}.jpg" for i in range(2)], "label": [["dog"], ["cat", "dog"]]})
    pq = write(as_lists, tmp_path / "ml.parquet")
    ds = read_table(pq, "multilabel", images_root=imgs)
    assert [list(v) for v in ds.images["true_label"]] == [[1], [0, 1]]
    one_hot = pd.DataFrame({"image": [f"im{i}.jpg" for i in range(3)], "cat": [1, 0, 1], "dog": [True, False, True],
                            "sky": [0, 0, 1], "site": ["a", "b", "c"]})
    ds = read_table(one_hot, "multilabel", label_col=["cat", "dog", "sky"], images_root=imgs)
    assert ds.classes == ["cat", "dog", "sky"]
    assert [list(v) for v in ds.images["true_label"]] == [[0, 1], [], [0, 1, 2]]
    assert ds.images["site"].tolist() == ["a", "b", "c"]


def detection_frame(imgs):
    return pd.DataFrame({
        "image": [f"im{i}.jpg" for i in range(3)],
        "label": [json.dumps([["can", 1, 2, 11, 12], ["milk", 0, 0, 4, 4, 1]]), json.dumps([]),
                  json.dumps([["can", 2.5, 2.5, 3.5, 30.5, 0]])],
        "image_id": [7, 8, 9],
    })


def test_detection_boxes_and_source_ids(tmp_path, imgs):
    path = write(detection_frame(imgs), tmp_path / "od.csv")
    ds = read_table(path, "detection", images_root=imgs)
    assert ds.classes == ["can", "milk"]
    assert ds.images["source_id"].tolist() == [7, 8, 9]
    boxes = ds.gt_boxes
    assert boxes["image_id"].tolist() == [0, 0, 2]
    assert boxes["class_id"].tolist() == [0, 1, 0]
    assert boxes["iscrowd"].tolist() == [False, True, False]
    assert boxes[["xmin", "ymin", "xmax", "ymax"]].iloc[2].tolist() == [2.5, 2.5, 3.5, 30.5]
    assert boxes["area"].tolist() == [100, 16, 28]
    assert boxes["gt_id"].tolist() == [0, 1, 2]


def test_detection_azure_indices_count_from_one(tmp_path, imgs):
    frame = pd.DataFrame({"image": ["im0.jpg"], "label": [[[1, 0, 0, 5, 5, 0], [4, 1, 1, 2, 2, 0]]]})
    ds = read_table(frame, "detection", images_root=imgs, classes=["can", "carton", "milk_bottle", "water_bottle"],
                    class_index_base=1)
    assert ds.gt_boxes["class_id"].tolist() == [0, 3]
    with pytest.raises(IngestError, match="unknown class 4"):
        read_table(frame, "detection", images_root=imgs, classes=["can", "carton", "milk_bottle", "water_bottle"])


BAD_DETECTION_CELLS = [
    ('[["can", 1, 2, 3]]', "label[0]", "box must be"),
    ('[["can", 1, 2, 3, 4], ["can", 1, 2]]', "label[1]", "box must be"),
    ('[["can", 10, 2, 3, 4]]', "label[0].xmax", "xmax 3.0 < xmin 10.0"),
    ('[["can", 1, 20, 3, 4]]', "label[0].ymax", "ymax 4.0 < ymin 20.0"),
    ('[["can", 1, 2, NaN, 4]]', "label[0].xmax", "not a finite number"),
    ('[["can", 1, 2, Infinity, 4]]', "label[0].xmax", "not a finite number"),
    ('[["can", 1, "2", 3, 4]]', "label[0]", "must be numbers"),
    ('[["bottle", 1, 2, 3, 4]]', "label[0]", "unknown class 'bottle'"),
    ('[["can", 1, 2, 3, 4]', "label", "not a JSON list"),
    ('{"can": 1}', "label", "expected a list"),
    ('["can", 1, 2, 3, 4]', "label[0]", "box must be"),
]


@pytest.mark.parametrize("cell,field,text", BAD_DETECTION_CELLS)
def test_bad_detection_cells_name_file_row_field(tmp_path, imgs, cell, field, text):
    frame = pd.DataFrame({"image": ["im0.jpg", "im1.jpg"],
                          "label": ['[["can", 0, 0, 1, 1]]', cell]})
    path = tmp_path / "od.csv"
    frame.to_csv(path, index=False)
    classes = ["can", "milk"]
    with pytest.raises(IngestError) as info:
        read_table(path, "detection", images_root=imgs, classes=classes)
    err = info.value
    assert (err.file, err.row, err.field) == (str(path), 1, field)
    assert text in err.message
    problems = Problems(skip_bad=True)
    ds = read_table(path, "detection", images_root=imgs, classes=classes, problems=problems)
    assert ds.images["uri"].tolist() == [str(imgs / "im0.jpg")]
    assert len(ds.gt_boxes) == 1 and len(problems.skipped) == 1
    assert problems.dropped_uris == {str(imgs / "im1.jpg")}


def test_bad_rows_of_every_kind_are_all_reported_with_skip_bad(tmp_path, imgs):
    frame = pd.DataFrame({
        "image": ["im0.jpg", "missing.jpg", "im0.jpg", "https://x.org/a.jpg", "im2.jpg", "im3.jpg", None],
        "label": ["rose", "rose", "rose", "rose", 3.5, "tulip", "rose"],
        "image_id": [1, 2, 3, 4, 5, 1, 6],
    })
    path = write(frame, tmp_path / "t.jsonl")
    problems = Problems(skip_bad=True)
    ds = read_table(path, "multiclass", images_root=imgs, problems=problems)
    assert ds.images["uri"].tolist() == [str(imgs / "im0.jpg")]
    where = sorted((e.row, e.field) for e in problems.skipped)
    assert where == [(1, "image"), (2, "image"), (3, "image"), (4, "label"), (5, "image_id"), (6, "image")]
    messages = " | ".join(e.message for e in problems.skipped)
    assert "not found" in messages and "already in row 0" in messages and "remote images" in messages
    assert "duplicate id 1" in messages and "no image path" in messages
    with pytest.raises(IngestError) as info:
        read_table(path, "multiclass", images_root=imgs)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 1, "image")


def test_unknown_class_name_and_missing_columns(tmp_path, imgs):
    frame = pd.DataFrame({"image": ["im0.jpg", "im1.jpg"], "label": ["rose", "lily"]})
    with pytest.raises(IngestError) as info:
        read_table(frame, "multiclass", images_root=imgs, classes=["rose", "tulip"])
    assert (info.value.row, info.value.field) == (1, "label") and info.value.choices == ["rose", "tulip"]
    with pytest.raises(IngestError, match="no column 'path'") as info:
        read_table(frame, "multiclass", image_col="path", images_root=imgs)
    assert "image" in info.value.choices
    with pytest.raises(IngestError, match="mix class names and class indices"):
        read_table(pd.DataFrame({"image": ["im0.jpg", "im1.jpg"], "label": ["rose", 2]}), "multiclass",
                   images_root=imgs)


def test_unreadable_table_files(tmp_path):
    with pytest.raises(IngestError, match="unknown table format"):
        read_table(tmp_path / "x.xlsx", "multiclass")
    with pytest.raises(IngestError, match="file not found"):
        read_table(tmp_path / "x.csv", "multiclass")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(IngestError, match="cannot read parquet") as info:
        read_table(bad, "multiclass")
    assert info.value.file == str(bad)


def test_ingest_table_detection_end_to_end(tmp_path, imgs, capsys):
    gt = write(detection_frame(imgs), tmp_path / "od.csv")
    preds = pd.DataFrame({"image": ["im0.jpg", "im2.jpg"],
                          "detections": [json.dumps([["can", 1, 2, 11, 12, 0.9], ["milk", 0, 0, 1, 1, 0.2]]),
                                         json.dumps([["milk", 2, 2, 3, 30, 0.6]])]})
    pred_path = write(preds, tmp_path / "preds.csv")
    out = tmp_path / "od_store"
    code = ingest_main(["--task", "detection", "--out", str(out), "--table", str(gt), "--images-root", str(imgs),
                        "--predictions", str(pred_path), "--threshold", "0.4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # One box of milk: a label seen once is pointed out (it might be a misspelt class).
    assert "class(es) labelled only once: milk. A typo?" in printed.out
    assert "1 of 3 images hold no annotated object; 1 crowd region(s) are ignored in matching" in printed.out
    assert "1 of 3 images have no detection: all their objects count as missed (model 'preds')" in printed.out
    store = Store(out)
    assert store.classes == ["can", "milk"] and store.meta()["score_threshold"] == "0.4"
    assert store.image_count() == 3
    assert store.rows("SELECT image_id, class_id, xmin, ymax, iscrowd FROM gt_boxes ORDER BY gt_id") == [
        (0, 0, 1.0, 12.0, False), (0, 1, 0.0, 4.0, True), (2, 0, 2.5, 30.5, False)]
    assert store.rows("SELECT image_id, class_id, score FROM det_boxes ORDER BY det_id") == [
        (0, 0, 0.9), (0, 1, 0.2), (2, 1, 0.6)]
    assert store.model_ids() == ["preds"]
    store.close()


def test_ingest_table_multilabel_parquet_end_to_end(tmp_path, imgs, capsys):
    frame = pd.DataFrame({"image": [f"images/im{i}.jpg" for i in range(4)],
                          "label": [["cat"], ["cat", "dog"], [], ["dog"]],
                          "weather": ["rain", "sun", "sun", "fog"], "temp": [3.5, 20.0, 18.5, 1.0]})
    gt = write(frame, tmp_path / "ml.parquet")
    preds = pd.DataFrame({"image": [f"images/im{i}.jpg" for i in range(4)],
                          "probs": [[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.1, 0.9]]})
    pred_path = write(preds, tmp_path / "ml_preds.parquet")
    out = tmp_path / "ml_store"
    assert ingest_main(["--task", "multilabel", "--out", str(out), "--table", str(gt),
                        "--predictions", str(pred_path), "--model-name", "clip"]) == 0, capsys.readouterr().err
    assert "labelled only once" not in capsys.readouterr().out
    store = Store(out)
    assert store.classes == ["cat", "dog"]
    rows = store.query("SELECT image_id, true_label, weather, temp FROM images ORDER BY image_id")
    assert [list(v) for v in rows["true_label"]] == [[0], [0, 1], [], [1]]
    assert rows["weather"].tolist() == ["rain", "sun", "sun", "fog"] and rows["temp"].tolist() == [3.5, 20, 18.5, 1]
    kinds = dict(store.rows('SELECT name, kind FROM "columns"'))
    assert kinds["weather"] == "categorical" and kinds["temp"] == "numeric"
    preds_back = store.query("SELECT image_id, pred_labels FROM predictions ORDER BY image_id")
    assert [list(v) for v in preds_back["pred_labels"]] == [[0], [0, 1], [1], [1]]
    assert store.rows("SELECT image_id, correct FROM outcomes ORDER BY image_id") == [
        (0, True), (1, True), (2, False), (3, True)]
    store.close()


def test_text_image_ids_stay_metadata_and_json_array_tables(tmp_path, imgs):
    rows = [{"image": f"im{i}.jpg", "label": "a", "image_id": f"uuid-{i}"} for i in range(2)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    ds = read_table(path, "multiclass", images_root=imgs)
    assert "source_id" not in ds.images.columns
    assert ds.images["user_image_id"].tolist() == ["uuid-0", "uuid-1"]
    bad_ids = pd.DataFrame({"image": ["im0.jpg", "im1.jpg"], "label": ["a", "a"], "image_id": [3, 3.5]})
    with pytest.raises(IngestError, match="3.5 is not an integer id") as info:
        read_table(bad_ids, "multiclass", images_root=imgs)
    assert (info.value.row, info.value.field) == (1, "image_id")


def test_one_hot_label_must_be_zero_or_one(imgs):
    frame = pd.DataFrame({"image": ["im0.jpg", "im1.jpg"], "cat": [1, 2], "dog": [0, 1]})
    with pytest.raises(IngestError, match="one-hot label must be 0 or 1, got 2") as info:
        read_table(frame, "multilabel", label_col=["cat", "dog"], images_root=imgs)
    assert (info.value.row, info.value.field) == (1, "cat")
