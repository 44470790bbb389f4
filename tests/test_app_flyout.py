"""The image flyout under AppTest: prediction facts, detection boxes, computing an explanation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.explain import available_explanations
from core.metrics.detection import image_objects
from core.store import Store
from e2e.harness import open_app, served_navigation
from e2e.stores import build_detection, build_multiclass


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stores")
    build_multiclass(folder, n=12)
    build_detection(folder, n=10)
    return folder


@pytest.fixture
def app(folder, monkeypatch):
    monkeypatch.setenv("VISIONLENS_DATA", str(folder))
    with served_navigation():
        yield open_app


def test_detection_flyout_lists_every_box_with_its_outcome(folder, app):
    at = app("store=demo-detection&image=2&iou=0.75", page="pages/explorer.py")
    expected = image_objects(Store(folder / "demo-detection"), "baseline", 2, 0.75, 0.5)
    table = next(d.value for d in at.dataframe if "Outcome" in d.value.columns)
    assert len(table) == len(expected)
    counts = table["Outcome"].value_counts().to_dict()
    assert counts.get("TP", 0) == int(((expected["kind"] == "det") & (expected["status"] == "tp")).sum())
    assert counts.get("FN", 0) == int((expected["status"] == "fn").sum())
    assert any("at IoU 0.75" in m.value for m in at.markdown)


def test_an_explanation_is_computed_stored_and_shown(folder, app):
    store = Store(folder / "demo-multiclass")
    assert available_explanations(store, "baseline", 4).empty
    at = app("store=demo-multiclass&image=4", page="pages/explorer.py")
    assert any("No explanation stored" in c.value for c in at.caption)
    at.button(key="vl_fly_ask_4").click().run()
    at.selectbox(key="vl_fly_method_4").select("ig").run()
    at.button(key="vl_fly_compute_4").click().run()
    assert not at.exception, [e.message for e in at.exception]
    store.refresh()
    stored = available_explanations(store, "baseline", 4)
    assert list(stored["method"]) == ["ig"]
    assert at.selectbox(key="vl_fly_expl_4").value == 0  # the stored map, shown over the image
    assert at.slider(key="vl_fly_alpha").value == 0.5
    at.slider(key="vl_fly_alpha").set_value(0.2).run()  # the photo shows through more
    assert not at.exception and at.slider(key="vl_fly_alpha").value == 0.2
    # The home page counts each model's stored maps, in the order the models were added.
    models = next(d.value for d in app("store=demo-multiclass").dataframe if "Explanation maps" in d.value.columns)
    assert models.to_dict("list") == {"Model": ["baseline", "candidate"], "Name": list(models["Name"]),
                                      "Explanation maps": [1, 0], "Images explained": [1, 0]}


def probability_chart(at) -> dict[str, float]:
    for chart in at.get("vega_lite_chart"):
        for dataset in chart.proto.datasets:
            frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
            if "probability" in frame.columns:
                return dict(zip(frame["class"], frame["probability"]))
    raise AssertionError("no probability chart")


def test_the_probability_chart_follows_the_shown_image(folder, app):
    store = Store(folder / "demo-multiclass")
    at = app("store=demo-multiclass&image=3", page="pages/explorer.py")
    for image_id in (3, 5):
        at.query_params["image"] = str(image_id)
        at.run()
        probs = np.asarray(store.query('SELECT probs FROM "predictions" WHERE model_id = ? AND image_id = ?',
                                       ["baseline", image_id])["probs"].iloc[0])
        top = np.argsort(-probs, kind="stable")[:10]
        assert probability_chart(at) == pytest.approx({store.classes[k]: float(probs[k]) for k in top}, abs=1e-6)


def test_the_picture_is_shown_upright_with_its_boxes(folder, app, monkeypatch):
    """The picture turns by its EXIF orientation, as the thumbnails and photo viewers show it, and
    its boxes (stored frame) turn with it: drawn on the upright picture, their labels upright too."""
    import streamlit as st
    from PIL import Image

    from core import heatmap

    store = Store(folder / "demo-detection")
    uri = Path(store.query('SELECT uri FROM "images" WHERE image_id = 0')["uri"].iloc[0])
    original = uri.read_bytes()
    shown, drawn = [], []
    draw, draw_boxes = st.image, heatmap.draw_boxes
    monkeypatch.setattr(st, "image", lambda image, *a, **k: shown.append(image) or draw(image, *a, **k))
    monkeypatch.setattr(heatmap, "draw_boxes", lambda image, boxes, *a, **k: (
        drawn.append((image.size, boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy())),
        draw_boxes(image, boxes, *a, **k))[1])
    pictures = {}
    try:
        for orientation in (1, 6):
            with Image.open(uri) as image:
                stored_size = image.size
                exif = Image.Exif()
                exif[0x0112] = orientation
                image.convert("RGB").save(uri, format=image.format or "PNG", exif=exif)
            shown.clear()
            drawn.clear()
            at = app("store=demo-detection&image=0", page="pages/explorer.py")
            assert not at.exception
            picture = next(i for i in shown if isinstance(i, Image.Image))
            upright_size = stored_size if orientation == 1 else stored_size[::-1]  # 6: a quarter turn
            assert picture.size[0] * upright_size[1] == picture.size[1] * upright_size[0]  # same shape, scaled
            assert len(drawn) == 1 and drawn[0][0] == picture.size  # boxes drawn on the upright picture
            pictures[orientation] = drawn[0]
    finally:
        uri.write_bytes(original)
    (_, height), boxes = pictures[1]
    xmin, ymin, xmax, ymax = boxes.T
    # Orientation 6 turns the picture a quarter clockwise: (x, y) goes to (height - y, x).
    np.testing.assert_allclose(pictures[6][1], np.stack([height - ymax, xmin, height - ymin, xmax], axis=1))
    assert len(boxes)


def test_an_unreadable_file_shows_its_thumbnail_without_boxes(folder, app):
    store = Store(folder / "demo-detection")
    uri = Path(store.query('SELECT uri FROM "images" WHERE image_id = 1')["uri"].iloc[0])
    original = uri.read_bytes()
    try:
        uri.write_bytes(b"not an image")
        at = app("store=demo-detection&image=1", page="pages/explorer.py")
        assert not at.exception
        assert any("cannot be read; showing its thumbnail" in w.value for w in at.warning)
        assert not [p for p in at.get("button_group") if "Boxes" in str(p.proto.label)]
    finally:
        uri.write_bytes(original)


def test_a_store_without_a_model_shows_the_ground_truth_boxes(tmp_path, monkeypatch, write_images):
    """A freshly ingested detection set (no model yet): its boxes are there to check by eye."""
    import pandas as pd

    from core import heatmap
    from core.ingest.build import Dataset, build_store

    images = pd.DataFrame({"image_id": [0], "uri": write_images(tmp_path / "img", 1, (40, 30)), "true_label": [[]],
                           "source_id": [1225]})
    gt = pd.DataFrame({"image_id": [0, 0], "gt_id": [0, 1], "class_id": [0, 1], "xmin": [2, 20], "ymin": [3, 5],
                       "xmax": [12, 30], "ymax": [13, 25], "iscrowd": [False, True]})
    build_store(tmp_path / "truth.duckdb", Dataset("truth", "detection", ["car", "dog"], images, gt))
    drawn = []
    draw_boxes = heatmap.draw_boxes
    monkeypatch.setattr(heatmap, "draw_boxes", lambda image, boxes, *a, **k: (drawn.append(boxes.copy()),
                                                                               draw_boxes(image, boxes, *a, **k))[1])
    monkeypatch.setenv("VISIONLENS_DATA", str(tmp_path))
    with served_navigation():
        at = open_app("store=truth&image=0", page="pages/explorer.py")
    assert any("No model predictions" in c.value for c in at.caption)
    # The title names the image by the dataset's own id too (a COCO image id).
    events = [block for block in at._tree.children.values() if getattr(block, "type", "") == "event"]
    titles = [child.proto.dialog.title for block in events for child in block.children.values()
              if getattr(child, "type", "") == "dialog"]
    assert titles and titles[0].startswith("Image 0 · ") and titles[0].endswith(" · source id 1225")
    assert next(b for b in at.get("button_group") if b.key == "vl_fly_boxes_0").value == ["gt", "ignored"]
    boxes = drawn[0]
    scale = boxes["xmax"].iloc[0] / 12
    assert boxes["label"].tolist() == ["car", "dog"] and boxes["status"].tolist() == ["gt", "gt"]
    np.testing.assert_allclose(boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy() / scale,
                               [[2, 3, 12, 13], [20, 5, 30, 25]])
    assert boxes["color"].iloc[1] is not None  # the crowd region in the ignored colour
