"""COCO instances / results readers and `visionlens ingest --coco` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import IngestError
from core.ingest import Problems
from core.ingest.coco import dataset_index, read_coco, read_coco_results
from core.ingest.run import ingest_main
from core.store import Store


def make_images(folder, names, size=(40, 30)):
    rng = np.random.default_rng(1)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def coco_gt(tmp_path, *, file_names=None, annotations=None, categories=None, extra_images=()):
    """Four images in val2017/, categories with non-contiguous ids 90 (zebra), 3 (car), 17 (cat)."""
    names = [f"{i:03d}.jpg" for i in range(4)]
    make_images(tmp_path / "val2017", names)
    file_names = file_names or [f"val2017/{n}" for n in names]
    images = [{"id": 100 + i, "file_name": f, "width": 40, "height": 30, "site": ["a", "b"][i % 2],
               "night": bool(i % 2), "license": 1} for i, f in enumerate(file_names)]
    images += list(extra_images)
    categories = categories or [{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 100, "category_id": 3, "bbox": [1, 2, 10, 5], "area": 33.5, "iscrowd": 0},
            {"id": 2, "image_id": 100, "category_id": 90, "bbox": [0, 0, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 101, "category_id": 17, "bbox": [5, 5, 20, 10]},
            {"id": 4, "image_id": 102, "category_id": 17, "bbox": [2.5, 3.5, 1, 1]},
            {"id": 5, "image_id": 103, "category_id": 90, "bbox": [0, 0, 40, 30]},
        ]
    path = tmp_path / "annotations" / "instances.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_detection_dataset(tmp_path):
    gt = coco_gt(tmp_path)
    ds = read_coco(gt, tmp_path)
    assert ds.classes == ["car", "cat", "zebra"]  # sorted by COCO id 3, 17, 90
    assert ds.extra_meta["coco_category_ids"] == [3, 17, 90]
    assert ds.images["uri"].tolist() == [str(tmp_path / "val2017" / f"{i:03d}.jpg") for i in range(4)]
    assert ds.images["source_id"].tolist() == [100, 101, 102, 103]
    assert ds.images["site"].tolist() == ["a", "b", "a", "b"]
    assert ds.images["night"].dtype == bool
    assert "license" not in ds.images.columns
    boxes = ds.gt_boxes
    assert boxes[["xmin", "ymin", "xmax", "ymax"]].iloc[0].tolist() == [1, 2, 11, 7]
    assert boxes["area"].tolist() == [33.5, 16, 200, 1, 1200]  # given area kept, else w*h
    assert boxes["iscrowd"].tolist() == [False, True, False, False, False]
    assert boxes["class_id"].tolist() == [0, 2, 1, 1, 2]
    assert boxes["image_id"].tolist() == [100, 100, 101, 102, 103]


def test_images_root_defaults_to_json_folder(tmp_path):
    gt = coco_gt(tmp_path)
    (tmp_path / "annotations" / "val2017").symlink_to(tmp_path / "val2017")
    ds = read_coco(gt)
    assert ds.images["uri"].iloc[0] == str(tmp_path / "annotations" / "val2017" / "000.jpg")


@pytest.mark.parametrize("written", ["/home/someone/coco/val2017/{n}", "C:\\data\\coco\\val2017\\{n}",
                                     "{n}", "D:/x/{n}"])
def test_foreign_paths_resolve_by_tail(tmp_path, written):
    names = [f"{i:03d}.jpg" for i in range(4)]
    gt = coco_gt(tmp_path, file_names=[written.format(n=n) for n in names])
    ds = read_coco(gt, tmp_path / "val2017")
    assert ds.images["uri"].tolist() == [str(tmp_path / "val2017" / n) for n in names]


def test_multilabel_and_multiclass_from_coco(tmp_path):
    gt = coco_gt(tmp_path)
    ml = read_coco(gt, tmp_path, task="multilabel")
    assert [list(v) for v in ml.images["true_label"]] == [[0, 2], [1], [1], [2]]
    assert ml.gt_boxes is None
    with pytest.raises(IngestError) as info:
        read_coco(gt, tmp_path, task="multiclass")
    assert "image 100 has 2 (car, zebra)" in str(info.value)
    assert info.value.file == str(gt)
    problems = Problems(skip_bad=True)
    mc = read_coco(gt, tmp_path, task="multiclass", problems=problems)
    assert mc.images["true_label"].tolist() == [1, 1, 2]
    assert mc.images["source_id"].tolist() == [101, 102, 103]
    assert len(problems.skipped) == 1 and problems.dropped_source_ids == {100}


def test_image_without_annotations_fails_multiclass(tmp_path):
    gt = coco_gt(tmp_path, annotations=[{"image_id": 100, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(IngestError, match=r"image 101 has 0 \(none\)"):
        read_coco(gt, tmp_path, task="multiclass")


BAD_ANNOTATIONS = [
    ({"image_id": 100, "category_id": 5, "bbox": [0, 0, 1, 1]}, "category_id", "not one of the categories"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, 1]}, "bbox", "4 finite numbers"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, "a", 1]}, "bbox", "4 finite numbers"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, -2, 1]}, "bbox", "w, h >= 0"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, float("inf"), 1]}, "bbox", "finite"),
    ({"image_id": 100, "category_id": 3, "bbox": None}, "bbox", "4 finite numbers"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, 1, 1], "area": -1}, "area", "area"),
    ({"image_id": 100, "category_id": 3, "bbox": [0, 0, 1, 1], "iscrowd": 2}, "iscrowd", "iscrowd"),
    ({"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1]}, "image_id", "not in 'images'"),
    ({"image_id": "100", "category_id": 3, "bbox": [0, 0, 1, 1]}, "image_id", "not in 'images'"),
]


@pytest.mark.parametrize("bad,field,text", BAD_ANNOTATIONS)
def test_bad_annotation_names_file_row_field(tmp_path, bad, field, text):
    good = {"image_id": 101, "category_id": 17, "bbox": [0, 0, 2, 2]}
    gt = coco_gt(tmp_path, annotations=[good, bad])
    with pytest.raises(IngestError) as info:
        read_coco(gt, tmp_path)
    err = info.value
    assert (err.file, err.row, err.field) == (str(gt), "annotations[1]", field)
    assert text in err.message
    if field == "category_id":  # ids, with the names they stand for
        assert err.choices == ["3 (car)", "17 (cat)", "90 (zebra)"]
    problems = Problems(skip_bad=True)
    ds = read_coco(gt, tmp_path, problems=problems)
    assert len(problems.skipped) == 1
    # The image owning the bad annotation is skipped whole; an annotation of an unknown image only itself.
    expected = [101, 102, 103] + ([100] if field == "image_id" else [])
    assert sorted(ds.images["source_id"]) == sorted(expected)
    assert ds.gt_boxes["image_id"].tolist() == [101]


def test_missing_duplicate_and_broken_image_entries(tmp_path):
    extra = [{"id": 104, "file_name": "val2017/nope.jpg"}, {"id": 101, "file_name": "val2017/001.jpg"},
             {"id": 105, "file_name": "val2017/000.jpg"}, {"file_name": "val2017/002.jpg"}]
    gt = coco_gt(tmp_path, extra_images=extra)
    with pytest.raises(IngestError) as info:
        read_coco(gt, tmp_path)
    assert (info.value.row, info.value.field) == ("images[4]", "file_name")
    assert "nope.jpg" in info.value.message and "--images-root" in info.value.message
    problems = Problems(skip_bad=True)
    ds = read_coco(gt, tmp_path, problems=problems)
    assert ds.images["source_id"].tolist() == [100, 101, 102, 103]
    assert [(e.row, e.field) for e in problems.skipped] == [
        ("images[4]", "file_name"), ("images[5]", "id"), ("images[6]", "file_name"), ("images[7]", "id")]
    assert "already used by image id 100" in problems.skipped[2].message


@pytest.mark.parametrize("content,text", [
    ("{not json", "not valid json"),
    ('{"annotations": []}', "no 'images' list"),
    ('{"images": [], "categories": []}', "no 'categories'"),
    ('{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "duplicate category id 1"),
    ('{"images": [], "categories": [{"id": "x", "name": "a"}]}', "integer 'id'"),
])
def test_malformed_files(tmp_path, content, text):
    path = tmp_path / "gt.json"
    path.write_text(content)
    with pytest.raises(IngestError, match=text) as info:
        read_coco(path)
    assert info.value.file == str(path)


def test_duplicate_category_names_are_told_apart(tmp_path):
    gt = coco_gt(tmp_path, categories=[{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"},
                                       {"id": 17, "name": "car"}])
    assert read_coco(gt, tmp_path).classes == ["car (3)", "car (17)", "zebra"]


def write_results(tmp_path, results, name="dets.json"):
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return path


def test_detection_results(tmp_path):
    ds = read_coco(coco_gt(tmp_path), tmp_path)
    res = write_results(tmp_path, [
        {"image_id": 101, "category_id": 17, "bbox": [5, 5, 20, 10], "score": 0.9},
        {"image_id": 100, "category_id": 90, "bbox": [1, 1, 2, 3], "score": 0.25},
    ])
    run = read_coco_results(res, ds, model_id="m1")
    dets = run.det_boxes
    assert dets["image_id"].tolist() == [101, 100]
    assert dets["class_id"].tolist() == [1, 2]
    assert dets[["xmin", "ymin", "xmax", "ymax"]].iloc[1].tolist() == [1, 1, 3, 4]
    assert dets["area"].tolist() == [200, 6]
    assert dets["score"].tolist() == [0.9, 0.25]
    assert dets["det_id"].tolist() == [0, 1]


@pytest.mark.parametrize("bad,field", [
    ({"image_id": 555, "category_id": 17, "bbox": [0, 0, 1, 1], "score": 0.5}, "image_id"),
    ({"image_id": 100, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}, "category_id"),
    ({"image_id": 100, "category_id": 17, "bbox": [0, 0, 1], "score": 0.5}, "bbox"),
    ({"image_id": 100, "category_id": 17, "bbox": [0, 0, 1, 1], "score": None}, "score"),
    ({"image_id": 100, "category_id": 17, "bbox": [0, 0, 1, 1], "score": float("nan")}, "score"),
])
def test_bad_results(tmp_path, bad, field):
    ds = read_coco(coco_gt(tmp_path), tmp_path)
    good = {"image_id": 101, "category_id": 17, "bbox": [0, 0, 1, 1], "score": 0.5}
    res = write_results(tmp_path, [good, bad])
    with pytest.raises(IngestError) as info:
        read_coco_results(res, ds)
    assert (info.value.file, info.value.row, info.value.field) == (str(res), "[1]", field)
    if field == "category_id":  # the ids the file may use
        assert info.value.choices == ["3", "17", "90"]
    problems = Problems(skip_bad=True)
    run = read_coco_results(res, ds, problems=problems)
    assert len(run.det_boxes) == 1 and len(problems.skipped) == 1


def test_results_for_skipped_images_are_dropped_quietly(tmp_path):
    extra = [{"id": 104, "file_name": "val2017/gone.jpg"}]
    gt = coco_gt(tmp_path, extra_images=extra)
    problems = Problems(skip_bad=True)
    ds = read_coco(gt, tmp_path, problems=problems)
    res = write_results(tmp_path, [{"image_id": 104, "category_id": 17, "bbox": [0, 0, 1, 1], "score": 0.5},
                                   {"image_id": 100, "category_id": 17, "bbox": [0, 0, 1, 1], "score": 0.5}])
    run = read_coco_results(res, dataset_index(ds, problems), [3, 17, 90], problems=Problems())
    assert run.det_boxes["image_id"].tolist() == [100]


def test_classification_results(tmp_path):
    ds = read_coco(coco_gt(tmp_path), tmp_path, task="multilabel")
    per_class = write_results(tmp_path, [
        {"image_id": 100, "category_id": 3, "score": 0.8}, {"image_id": 100, "category_id": 90, "score": 0.6},
        {"image_id": 101, "category_id": 17, "score": 0.3}, {"image_id": 102, "probs": [0.1, 0.2, 0.7]},
    ])
    preds = read_coco_results(per_class, ds, task="multilabel").predictions
    assert preds["image_id"].tolist() == [100, 101, 102]
    np.testing.assert_allclose(np.stack(preds["probs"]), [[0.8, 0, 0.6], [0, 0.3, 0], [0.1, 0.2, 0.7]], rtol=1e-6)
    one_each = write_results(tmp_path, [{"image_id": 101, "category_id": 17, "score": 0.9},
                                        {"image_id": 100, "category_id": 3, "score": 0.4}], "mc.json")
    mc = read_coco_results(one_each, ds, task="multiclass").predictions
    assert mc["pred_label"].tolist() == [1, 0] and mc["score"].tolist() == pytest.approx([0.9, 0.4])
    repeated = write_results(tmp_path, [{"image_id": 100, "category_id": 3, "score": 0.8},
                                        {"image_id": 100, "category_id": 3, "score": 0.6}], "rep.json")
    with pytest.raises(IngestError) as info:
        read_coco_results(repeated, ds, task="multilabel")
    assert info.value.row == "[1]" and info.value.field == "category_id"
    bad_probs = write_results(tmp_path, [{"image_id": 100, "probs": [0.5, 0.5]}], "bp.json")
    with pytest.raises(IngestError, match="probs must be 3 finite numbers"):
        read_coco_results(bad_probs, ds, task="multilabel")


def test_ingest_coco_end_to_end(tmp_path, capsys):
    gt = coco_gt(tmp_path)
    res = write_results(tmp_path, [
        {"image_id": 100, "category_id": 3, "bbox": [1, 2, 10, 5], "score": 0.9},
        {"image_id": 103, "category_id": 90, "bbox": [0, 0, 40, 30], "score": 0.8},
        {"image_id": 102, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.3},
    ])
    out = tmp_path / "stores" / "cocods"
    code = ingest_main(["--task", "detection", "--out", str(out), "--coco", str(gt), "--images-root",
                        str(tmp_path), "--predictions", str(res), "--model-name", "Faster RCNN"])
    assert code == 0, capsys.readouterr().err
    store = Store(out)
    assert store.task == "detection" and store.classes == ["car", "cat", "zebra"]
    assert store.meta()["coco_category_ids"] == "[3, 17, 90]"
    assert store.image_count() == 4
    images = store.query('SELECT * FROM images ORDER BY image_id')
    assert images["source_id"].tolist() == [100, 101, 102, 103]
    assert images["width"].tolist() == [40] * 4 and images["height"].tolist() == [30] * 4
    assert [list(v) for v in images["true_label"]] == [[0, 2], [1], [1], [2]]
    for column in ("brightness", "contrast", "sharpness", "noise", "colorfulness", "site", "night"):
        assert column in images.columns
    kinds = dict(store.rows('SELECT name, kind FROM "columns"'))
    assert kinds["site"] == "categorical" and kinds["night"] == "boolean" and kinds["brightness"] == "numeric"
    gt_boxes = store.query("SELECT * FROM gt_boxes ORDER BY gt_id")
    assert len(gt_boxes) == 5 and gt_boxes["iscrowd"].sum() == 1
    assert gt_boxes["area"].iloc[0] == 33.5
    assert store.model_ids() == ["Faster-RCNN"]
    assert store.models()["name"].tolist() == ["Faster RCNN"]
    dets = store.query("SELECT * FROM det_boxes ORDER BY det_id")
    assert dets["image_id"].tolist() == [0, 3, 2] and dets["class_id"].tolist() == [0, 2, 0]
    assert store.scalar("SELECT count(*) FROM thumbnails") == 4
    # The COCO id filters a cohort, but is no feature to analyse, chart, slice or balance.
    from core.cohorts import catalog_of, cohort_count, parse_query
    from core.error_analysis import available_features
    from core.slices import sliceable_columns

    catalog = catalog_of(store)
    assert cohort_count(store, parse_query("source_id__gte=102", catalog).cohort, None) == 2
    assert catalog.columns["source_id"].is_identifier
    assert "source_id" not in {f.name for f in available_features(catalog)} | set(sliceable_columns(catalog))
    assert {"site", "brightness"} <= {f.name for f in available_features(catalog)}
    store.close()

    # A second results file later: added to the same store as parts, joined by COCO image id.
    res2 = write_results(tmp_path, [{"image_id": 101, "category_id": 17, "bbox": [5, 5, 20, 10], "score": 0.7}],
                         "second.json")
    assert ingest_main(["--task", "detection", "--out", str(out), "--predictions", str(res2)]) == 0
    store = Store(out)
    assert store.model_ids() == ["Faster-RCNN", "second"]
    assert store.rows("SELECT image_id, class_id FROM det_boxes WHERE model_id = 'second'") == [(1, 1)]
    store.close()

    # A dataset source again would rebuild the store and drop both models: only when asked.
    again = ["--task", "detection", "--out", str(out), "--coco", str(gt), "--images-root", str(tmp_path),
             "--predictions", str(res2)]
    assert ingest_main(again) == 2
    assert "a store is already here" in capsys.readouterr().err
    store = Store(out)
    assert store.model_ids() == ["Faster-RCNN", "second"]
    store.close()
    assert ingest_main([*again, "--replace"]) == 0
    store = Store(out)
    assert store.model_ids() == ["second"]
    store.close()


def test_boxes_drawn_on_upright_photos_are_stored_in_the_stored_frame(tmp_path, capsys):
    """The json gives a quarter-turned photo (EXIF 6, stored 40 x 30) as 30 x 40: its boxes, and
    the predictions read from files with them, were drawn upright; they are moved to the stored
    pixels, where models and maps work. --exif-boxes stored keeps them as given."""
    turned = [{"id": 100, "file_name": "val2017/000.jpg", "width": 30, "height": 40},
              {"id": 101, "file_name": "val2017/001.jpg", "width": 40, "height": 30},
              {"id": 102, "file_name": "val2017/002.jpg", "width": 40, "height": 30}]
    annotations = [{"id": 1, "image_id": 100, "category_id": 3, "bbox": [2, 5, 10, 20]},
                   {"id": 2, "image_id": 101, "category_id": 3, "bbox": [2, 5, 10, 20]},
                   {"id": 3, "image_id": 102, "category_id": 3, "bbox": [2, 5, 10, 20]}]
    gt = coco_gt(tmp_path, annotations=annotations)
    data = json.loads(gt.read_text())
    gt.write_text(json.dumps({**data, "images": turned}))
    for name, orientation in (("000.jpg", 6), ("001.jpg", 3)):
        path = tmp_path / "val2017" / name
        with Image.open(path) as image:
            exif = Image.Exif()
            exif[0x0112] = orientation
            image.convert("RGB").save(path, exif=exif)
    res = write_results(tmp_path, [{"image_id": i, "category_id": 3, "bbox": [2, 5, 10, 20], "score": 0.9}
                                   for i in (100, 101, 102)])
    # Stored 40 x 30: EXIF 6 turns (x, y) to (30 - y, x), so upright [2, 5, 12, 25] was [5, 18, 25, 28];
    # EXIF 3 turns (x, y) to (40 - x, 30 - y), so it was [28, 5, 38, 25]; image 102 is not turned.
    expected = [[5, 18, 25, 28], [28, 5, 38, 25], [2, 5, 12, 25]]
    corners = "xmin, ymin, xmax, ymax"
    for mode, boxes in (("auto", expected), ("stored", [[2, 5, 12, 25]] * 3)):
        out = tmp_path / "stores" / mode
        assert ingest_main(["--task", "detection", "--out", str(out), "--coco", str(gt), "--images-root",
                            str(tmp_path), "--predictions", str(res), "--exif-boxes", mode]) == 0
        assert ("were given upright" in capsys.readouterr().out) == (mode == "auto")
        store = Store(out)
        assert store.rows(f"SELECT {corners} FROM gt_boxes ORDER BY image_id") == [tuple(b) for b in boxes]
        assert store.rows(f"SELECT {corners} FROM det_boxes ORDER BY image_id") == [tuple(b) for b in boxes]
        assert store.rows("SELECT count(*) FROM det_matches WHERE tp_mask & 1 = 1")[0][0] == 3
        store.close()
    # Predictions added later come from a file like the dataset's boxes: moved the same way.
    out = tmp_path / "stores" / "auto"
    later = write_results(tmp_path, [{"image_id": 100, "category_id": 3, "bbox": [2, 5, 10, 20], "score": 0.8}],
                          "later.json")
    assert ingest_main(["--task", "detection", "--out", str(out), "--predictions", str(later)]) == 0
    store = Store(out)
    assert store.rows(f"SELECT {corners} FROM det_boxes WHERE model_id = 'later'") == [(5, 18, 25, 28)]
    store.close()


def test_predictions_added_later_skip_the_images_the_build_skipped(tmp_path, capsys):
    """Image 101's file is corrupt and image 104's is missing: the build skips both (--skip-bad), and a
    results file added later drops their rows as the build did, instead of calling them unknown."""
    gt = coco_gt(tmp_path, extra_images=[{"id": 104, "file_name": "val2017/gone.jpg", "width": 40, "height": 30}])
    (tmp_path / "val2017" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "stores" / "skips"
    assert ingest_main(["--task", "detection", "--out", str(out), "--coco", str(gt), "--images-root",
                        str(tmp_path), "--skip-bad"]) == 0
    later = write_results(tmp_path, [{"image_id": i, "category_id": 3, "bbox": [1, 2, 10, 5], "score": 0.9}
                                     for i in (100, 101, 104)], "later.json")
    assert ingest_main(["--task", "detection", "--out", str(out), "--predictions", str(later)]) == 0
    store = Store(out)
    assert store.rows("SELECT i.source_id FROM det_boxes AS d JOIN images AS i USING (image_id)") == [(100,)]
    store.close()
    unknown = write_results(tmp_path, [{"image_id": 999, "category_id": 3, "bbox": [1, 2, 10, 5], "score": 0.9}],
                            "unknown.json")
    assert ingest_main(["--task", "detection", "--out", str(out), "--predictions", str(unknown)]) == 2
    assert "not in the dataset: 999" in capsys.readouterr().err
