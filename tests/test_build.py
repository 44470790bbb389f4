"""build_store / add_model: the base, the catalog, outcomes, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest.build import Dataset, ModelRun, add_model, build_store
from core.store import Store


def write_images(folder, n, size=(16, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return uris


def multiclass_dataset(tmp_path, n=6):
    uris = write_images(tmp_path / "imgs", n)
    images = pd.DataFrame({"image_id": np.arange(10, 10 + n), "uri": uris,
                           "true_label": [i % 3 for i in range(n)],
                           "site": [f"s{i % 2}" for i in range(n)]})
    return Dataset("mc", "multiclass", ["a", "b", "c"], images)


def probs_for(ids, labels, n_classes=3):
    probs = np.full((len(ids), n_classes), 0.1, np.float32)
    probs[np.arange(len(ids)), labels] = 0.8
    return pd.DataFrame({"image_id": ids, "probs": list(probs)})


def test_multiclass_store(tmp_path):
    ds = multiclass_dataset(tmp_path)
    preds = probs_for(np.arange(10, 16), [0, 1, 2, 1, 1, 2])  # image 13 (label 0) is wrong
    report = build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "Model 1", {}, preds)])
    store = Store(report.path)
    assert store.image_count() == 6
    assert store.query("SELECT image_id FROM images ORDER BY image_id")["image_id"].tolist() == list(range(6))
    out = store.query("SELECT image_id, correct FROM outcomes ORDER BY image_id")
    assert out["correct"].tolist() == [True, True, True, False, True, True]
    cat = store.columns().set_index("name")
    assert cat.loc["site", "kind"] == "categorical" and cat.loc["site", "source"] == "user"
    assert cat.loc["brightness", "kind"] == "numeric" and cat.loc["brightness", "source"] == "auto"
    assert "uri" not in cat.index
    assert store.scalar("SELECT count(*) FROM thumbnails WHERE jpeg IS NOT NULL") == 6
    pred = store.query("SELECT pred_label, score FROM predictions WHERE image_id = 3")
    assert pred["pred_label"].iloc[0] == 1 and pred["score"].iloc[0] == pytest.approx(0.8)


def test_prediction_for_unknown_image(tmp_path):
    ds = multiclass_dataset(tmp_path)
    preds = probs_for(np.array([10, 99]), [0, 1])
    with pytest.raises(IngestError, match="image id 99") as err:
        build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "m1", {}, preds)])
    assert err.value.row == 1 and err.value.field == "image_id"
    assert not (tmp_path / "mc.duckdb").exists()


def test_bad_probs_length(tmp_path):
    ds = multiclass_dataset(tmp_path)
    preds = pd.DataFrame({"image_id": [10], "probs": [np.array([0.5, 0.5], np.float32)]})
    with pytest.raises(IngestError, match="expected 3") as err:
        build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "m1", {}, preds)])
    assert err.value.field == "probs"


def test_skip_bad_drops_corrupt_image_and_its_predictions(tmp_path):
    ds = multiclass_dataset(tmp_path)
    broken = ds.images["uri"].iloc[2]
    with open(broken, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really")
    preds = probs_for(np.arange(10, 16), [0, 1, 2, 0, 1, 2])
    with pytest.raises(IngestError) as err:
        build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "m1", {}, preds)])
    assert broken in str(err.value)
    report = build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "m1", {}, preds)], skip_bad=True)
    assert [p.file for p in report.skipped] == [broken]
    store = Store(report.path)
    assert store.image_count() == 5
    assert store.scalar("SELECT count(*) FROM predictions") == 5
    assert broken not in store.query("SELECT uri FROM images")["uri"].tolist()


def test_add_model_writes_parts_only(tmp_path):
    ds = multiclass_dataset(tmp_path)
    path = build_store(tmp_path / "mc.duckdb", ds, [ModelRun("m1", "m1", {}, probs_for(np.arange(10, 16), [0] * 6))]).path
    store = Store(path)
    before = path.stat().st_ino
    add_model(path, ModelRun("m2", "m2", {}, probs_for(np.arange(6), [0, 1, 2, 0, 1, 2])))
    assert path.stat().st_ino == before
    store.refresh()
    assert store.model_ids() == ["m1", "m2"]
    assert store.scalar("SELECT count(*) FROM outcomes WHERE model_id = 'm2' AND correct") == 6
    with pytest.raises(IngestError, match="already in the store"):
        add_model(path, ModelRun("m2", "m2", {}, probs_for(np.arange(6), [0] * 6)))


def test_multilabel_store(tmp_path):
    uris = write_images(tmp_path / "imgs", 3)
    images = pd.DataFrame({"image_id": [0, 1, 2], "uri": uris, "true_label": [[0], [0, 2], []]})
    ds = Dataset("ml", "multilabel", ["a", "b", "c"], images)
    probs = np.array([[0.9, 0.1, 0.2], [0.8, 0.6, 0.7], [0.1, 0.2, 0.3]], np.float32)
    preds = pd.DataFrame({"image_id": [0, 1, 2], "probs": list(probs)})
    store = Store(build_store(tmp_path / "ml.duckdb", ds, [ModelRun("m", "m", {}, preds)]).path)
    assert store.query("SELECT correct FROM outcomes ORDER BY image_id")["correct"].tolist() == [True, False, True]
    labels = store.query("SELECT pred_labels FROM predictions ORDER BY image_id")["pred_labels"]
    assert [list(v) for v in labels] == [[0], [0, 1, 2], []]
    assert store.columns().set_index("name").loc["true_label", "kind"] == "list"


def test_detection_store_and_bad_boxes(tmp_path):
    uris = write_images(tmp_path / "imgs", 2, size=(40, 40))
    images = pd.DataFrame({"image_id": [0, 1], "uri": uris, "true_label": [None, None]})
    gt = pd.DataFrame({"image_id": [0, 0, 1], "gt_id": [0, 1, 2], "class_id": [0, 1, 1],
                       "xmin": [0, 20, 5], "ymin": [0, 20, 5], "xmax": [10, 30, 15], "ymax": [10, 30, 15]})
    dets = pd.DataFrame({"image_id": [0, 1, 1], "det_id": [0, 1, 2], "class_id": [0, 1, 0], "score": [0.9, 0.8, 0.3],
                         "xmin": [0, 5, 30], "ymin": [0, 5, 30], "xmax": [10, 15, 39], "ymax": [10, 15, 39]})
    ds = Dataset("det", "detection", ["a", "b"], images, gt)
    store = Store(build_store(tmp_path / "det.duckdb", ds, [ModelRun("d", "d", {}, det_boxes=dets)]).path)
    assert store.scalar("SELECT count(*) FROM gt_boxes") == 3
    assert store.scalar("SELECT count(*) FROM det_matches WHERE model_id = 'd'") == 3
    assert [list(v) for v in store.query("SELECT true_label FROM images ORDER BY image_id")["true_label"]] == [[0, 1], [1]]
    bad = gt.copy()
    bad.loc[1, "xmax"] = 5  # xmax < xmin
    with pytest.raises(IngestError, match="xmax < xmin") as err:
        build_store(tmp_path / "det2.duckdb", Dataset("det", "detection", ["a", "b"], images, bad))
    assert err.value.row == 1 and err.value.field == "xmax"
    bad = dets.copy()
    bad.loc[2, "class_id"] = 7
    with pytest.raises(IngestError, match="class id 7") as err:
        build_store(tmp_path / "det3.duckdb", ds, [ModelRun("d", "d", {}, det_boxes=bad)])
    assert err.value.field == "class_id"
    bad = dets.copy()
    bad.loc[0, "ymin"] = float("nan")
    with pytest.raises(IngestError, match="non-finite") as err:
        build_store(tmp_path / "det4.duckdb", ds, [ModelRun("d", "d", {}, det_boxes=bad)])
    assert err.value.row == 0 and err.value.field == "ymin"


def test_duplicate_images_and_unknown_task(tmp_path):
    ds = multiclass_dataset(tmp_path)
    ds.images.loc[3, "uri"] = ds.images.loc[2, "uri"]
    with pytest.raises(IngestError, match="duplicate image") as err:
        build_store(tmp_path / "x.duckdb", ds)
    assert err.value.row == 3
    with pytest.raises(IngestError, match="unknown task"):
        build_store(tmp_path / "x.duckdb", Dataset("x", "segmentation", [], ds.images))


def test_a_loader_that_cannot_be_imported_says_how_to_make_it_importable():
    from core.models import resolve

    with pytest.raises(IngestError, match="PYTHONPATH") as info:
        resolve("no_such_package_here.models:load")
    assert info.value.field == "loader" and "no_such_package_here" in info.value.message
    with pytest.raises(IngestError, match="module:function"):
        resolve("no_colon")
