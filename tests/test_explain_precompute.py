"""Quantised storage of maps and `precompute` over a small store (resumable, per task)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import ExplainError
from core.explain import available_explanations, load_explanation
from core.explain.methods import explain_images
from core.explain.precompute import precompute, precompute_main
from core.explain.storage import MAX_SIDE, dequantise, quantise, reduce_maps
from core.models import image_tensor
from core.store import Store, build_base

SIZE = 32


def small_classifier(n_classes: int = 3) -> torch.nn.Module:
    """Loader for the test store: a seeded CNN."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, n_classes))


class LeftHalfDetector(torch.nn.Module):
    def forward(self, x):
        b, _, h, w = x.shape
        p0 = torch.sigmoid(12 * (x[:, :, :, : w // 2].mean(dim=(1, 2, 3)) - 0.35))
        probs = torch.stack([p0, 1 - p0], dim=1)
        boxes = torch.tensor([[0, 0, w / 2, h], [w / 2, 0, w, h]], dtype=torch.float32)
        return [{"boxes": boxes, "scores": probs[i].max().repeat(2), "labels": probs[i].argmax().repeat(2),
                 "class_probs": probs[i].repeat(2, 1)} for i in range(b)]


def left_half_detector() -> torch.nn.Module:
    return LeftHalfDetector()


def broken_loader() -> torch.nn.Module:
    raise RuntimeError("size mismatch for head.weight")


def write_images(folder, sizes) -> list[str]:
    rng = np.random.default_rng(0)
    uris = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"im{i}.png"
        Image.fromarray((128 + rng.random((h, w, 3)) * 127).astype(np.uint8)).save(path)
        uris.append(str(path))
    return uris


def model_row(model_id: str, loader: str | None, task: str) -> dict:
    params = {"input_size": [SIZE, SIZE]}
    if loader:
        params["loader"] = f"{__name__}:{loader}"
    return {"model_id": model_id, "name": model_id, "task": task, "params": json.dumps(params)}


@pytest.fixture()
def classification_store(tmp_path):
    sizes = [(SIZE, SIZE), (40, 24), (SIZE, SIZE), (SIZE, SIZE)]
    uris = write_images(tmp_path, sizes)
    images = pd.DataFrame({"image_id": np.arange(4, dtype=np.int32), "uri": uris,
                           "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
                           "true_label": np.array([0, 1, 2, 1], dtype=np.int32)})
    model = small_classifier().eval()
    with torch.no_grad():
        probs = torch.softmax(model(image_tensor(uris, (SIZE, SIZE))), dim=1).numpy()
    rows = []
    for model_id in ("cnn", "file", "zz_broken"):
        rows.append(pd.DataFrame({"model_id": model_id, "image_id": np.arange(4, dtype=np.int32),
                                  "pred_label": probs.argmax(1).astype(np.int32),
                                  "score": probs.max(1), "probs": list(probs)}))
    models = pd.DataFrame([model_row("cnn", "small_classifier", "multiclass"),
                           model_row("file", None, "multiclass"),
                           model_row("zz_broken", "broken_loader", "multiclass")])
    path = tmp_path / "cls.duckdb"
    build_base(path, {"images": images, "models": models, "predictions": pd.concat(rows)},
               {"task": "multiclass", "classes": ["a", "b", "c"], "name": "cls"})
    return path, probs


@pytest.fixture()
def detection_store(tmp_path):
    sizes = [(64, 64), (SIZE, SIZE)]
    uris = write_images(tmp_path, sizes)
    images = pd.DataFrame({"image_id": np.arange(2, dtype=np.int32), "uri": uris,
                           "width": [64, SIZE], "height": [64, SIZE]})
    dets = pd.DataFrame({"model_id": "det", "image_id": np.array([0, 0, 0, 1], np.int32),
                         "det_id": np.array([0, 1, 2, 3], np.int32),
                         "class_id": np.array([0, 1, 0, 0], np.int32),
                         "score": [0.9, 0.8, 0.3, 0.7],
                         "xmin": [32.0, 0.0, 0.0, 16.0], "ymin": [0.0, 0.0, 0.0, 0.0],
                         "xmax": [64.0, 32.0, 10.0, 32.0], "ymax": [64.0, 64.0, 10.0, 32.0]})
    dets["area"] = (dets.xmax - dets.xmin) * (dets.ymax - dets.ymin)
    path = tmp_path / "det.duckdb"
    build_base(path, {"images": images, "det_boxes": dets,
                      "models": pd.DataFrame([model_row("det", "left_half_detector", "detection")])},
               {"task": "detection", "classes": ["a", "b"], "name": "det", "score_threshold": 0.5})
    return path


# --------------------------------------------------------------------------- storage


def test_quantise_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    maps = np.stack([rng.normal(size=(20, 30)), rng.random((20, 30)) * 1e-6,
                     np.full((20, 30), -2.5)]).astype(np.float32)
    codes, scale, offset = quantise(maps)
    assert codes.dtype == np.uint8 and scale.dtype == np.float32
    for m, c, s, o in zip(maps, codes, scale, offset):
        back = dequantise(c, s, o)
        bound = float(s / 2 + 1e-6 * np.abs(m).max())
        assert np.abs(back - m).max() <= bound
        assert back.min() == pytest.approx(m.min(), abs=bound)
        assert back.max() == pytest.approx(m.max(), abs=bound)
    assert scale[2] == 0 and (dequantise(codes[2], scale[2], offset[2]) == -2.5).all()
    assert (np.sign(dequantise(codes[0], scale[0], offset[0]))[np.abs(maps[0]) > scale[0]]
            == np.sign(maps[0])[np.abs(maps[0]) > scale[0]]).all()  # the sign survives


def test_reduced_maps_keep_aspect_and_mean():
    maps = np.random.default_rng(1).random((2, 256, 128)).astype(np.float32)
    reduced = reduce_maps(maps)
    assert reduced.shape == (2, MAX_SIDE, MAX_SIDE // 2)
    np.testing.assert_allclose(reduced.mean(axis=(1, 2)), maps.mean(axis=(1, 2)), rtol=1e-5)
    assert reduce_maps(maps[:, :224, :100]).shape == (2, MAX_SIDE, 29)
    small = maps[:, :40, :20]
    np.testing.assert_array_equal(reduce_maps(small), small)


# --------------------------------------------------------------------------- precompute


def test_precompute_writes_resumes_and_loads(classification_store):
    path, probs = classification_store
    params = {"ig": {"n_steps": 8}, "guided_backprop": {}}
    seen = []
    written = precompute(path, ["ig", "guided_backprop"], model_id="cnn", targets="pred", top_k=2,
                         device="cpu", batch_size=3, params=params,
                         progress=lambda d, t: seen.append((d, t)))
    assert written == 4 * 2 * 2  # images x top classes x methods
    assert seen[0] == (0, 16) and seen[-1] == (16, 16)
    assert seen[1] == (2, 16)  # the first batch is one image (two targets): progress shows at once
    assert precompute(path, ["ig", "guided_backprop"], model_id="cnn", targets="pred", top_k=2,
                      params=params) == 0
    store = Store(path)
    frame = store.query('SELECT model_id, image_id, method, target FROM "explanations"')
    assert set(frame["model_id"]) == {"cnn"}
    top2 = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    for image_id in range(4):
        stored = set(frame.loc[(frame.image_id == image_id) & (frame.method == "ig"), "target"])
        assert stored == set(top2[image_id].tolist())
    # The stored map is the model's IG map at input size, within quantisation error.
    target = int(top2[1, 0])
    x = image_tensor([store.rows('SELECT uri FROM "images" WHERE image_id = 1')[0][0]], (SIZE, SIZE))
    direct = explain_images(small_classifier().eval(), x, "ig", np.array([target]), "multiclass",
                            n_steps=8)[0]
    loaded = load_explanation(store, "cnn", 1, "ig", target)
    assert loaded.shape == (SIZE, SIZE) and loaded.dtype == np.float32
    step = (direct.max() - direct.min()) / 255
    assert np.abs(loaded - direct).max() <= step / 2 + 1e-6
    assert load_explanation(store, "cnn", 1, "ig", 99) is None
    listed = available_explanations(path, "cnn", 1)
    assert list(listed["method"]) == ["guided_backprop"] * 2 + ["ig"] * 2
    assert json.loads(listed["params"][2])["n_steps"] == 8
    assert json.loads(listed["params"][2])["input_size"] == [SIZE, SIZE]


def test_batches_are_paced_and_slow_runs_store_maps_as_they_go(classification_store, monkeypatch):
    from core.explain import precompute as module

    pace = module._Pace(16)
    assert pace.size == 1
    pace.record(2, 0.001)
    assert pace.size == 16
    pace.record(4, 4 * module.BATCH_SECONDS / 3)  # each image takes a third of the budget
    assert pace.size == 3
    pace.record(1, 60.0)
    assert pace.size == 1
    path, _ = classification_store
    monkeypatch.setattr(module, "FLUSH_SECONDS", 0.0)  # a slow run: every batch is written at once
    assert precompute(path, ["guided_backprop"], model_id="cnn", targets="true", batch_size=2) == 4
    parts = list((Store(path).paths.parts / "explanations").glob("*.parquet"))
    assert len(parts) == 3  # batches of 1, 2 and 1 images


def test_precompute_true_labels_explicit_classes_and_image_subset(classification_store):
    path, _ = classification_store
    assert precompute(path, ["guided_gradcam"], model_id="cnn", targets="true", image_ids=[1, 3]) == 2
    rows = Store(path).query('SELECT image_id, target FROM "explanations" ORDER BY image_id')
    assert rows.values.tolist() == [[1, 1], [3, 1]]
    assert precompute(path, ["guided_gradcam"], model_id="cnn", targets=[0, 1], image_ids=[1]) == 1


def test_a_failing_loader_is_named_and_earlier_maps_are_kept(classification_store):
    path, _ = classification_store
    # Models run in id order: 'cnn' (fine), then 'zz_broken'; 'file' has no loader.
    with pytest.raises(ExplainError, match="model 'zz_broken' could not be loaded: size mismatch"):
        precompute(path, ["guided_backprop"])
    assert precompute(path, ["guided_backprop"], model_id="cnn") == 0  # its 4 maps were written


def test_precompute_refuses_what_cannot_be_explained(classification_store):
    path, _ = classification_store
    cases = [
        (dict(methods=["drise"]), "does not apply to multiclass"),
        (dict(methods=["ig"], model_id="file"), "cannot be re-run"),
        (dict(methods=["ig"], model_id="nope"), "no model 'nope'"),
        (dict(methods=["ig"], image_ids=[0, 17]), "not in the store"),
        (dict(methods=["ig"], targets=[5]), "class id 5"),
        (dict(methods=["ig"], targets="best"), "unknown targets"),
        (dict(methods=["ig"], params={"xrai": {}}), "not being computed"),
        (dict(methods=["ig"], params={"ig": {"steps": 3}}), "unknown parameter"),
        (dict(methods=["ig"], top_k=0), "top_k"),
        (dict(methods=[]), "no explanation method"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExplainError, match=message):
            precompute(path, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ExplainError, match="no CUDA device"):
            precompute(path, ["ig"], device="cuda")
    assert Store(path).scalar('SELECT count(*) FROM "explanations"') == 0


def test_precompute_detection_explains_chosen_boxes(detection_store):
    params = {"drise": {"n_masks": 60, "grid_size": 4}}
    # 'pred': the best box at or above the store's threshold, per image.
    assert precompute(detection_store, ["drise"], targets="pred", params=params) == 2
    store = Store(detection_store)
    assert sorted(store.query('SELECT target FROM "explanations"')["target"]) == [0, 3]
    assert precompute(detection_store, ["drise"], targets="pred", top_k=5, params=params) == 1  # det 1
    # det 2 is below the threshold, but asked for by id
    assert precompute(detection_store, ["drise"], targets=[2], params=params) == 1
    saliency = load_explanation(store, "det", 0, "drise", 0)
    assert saliency.shape == (SIZE, SIZE)  # the model's input size (images are resized to it)
    above = saliency - saliency.min()
    assert above[:, : SIZE // 2].sum() / above.sum() > 0.6
    with pytest.raises(ExplainError, match="det_id 42"):
        precompute(detection_store, ["drise"], targets=[42], params=params)
    with pytest.raises(ExplainError, match="does not apply to detection"):
        precompute(detection_store, ["drise"], targets="true")
    with pytest.raises(ExplainError, match="does not apply to detection"):
        precompute(detection_store, ["shap"])


def test_detection_boxes_are_scaled_to_the_model_input(detection_store, monkeypatch):
    from core.explain import precompute as module

    seen = []
    real = module.run_method

    def spy(model, images, method, targets, task, params):
        seen.extend(t.tolist() for t in targets)
        return real(model, images, method, targets, task, params)

    monkeypatch.setattr(module, "run_method", spy)
    precompute(detection_store, ["drise"], targets=[0, 3], params={"drise": {"n_masks": 8, "grid_size": 2}})
    # image 0 is 64x64, shown to the model at 32x32: its box halves; image 1 is already 32x32.
    assert seen == [[[16.0, 0.0, 32.0, 32.0, 0.0]], [[16.0, 0.0, 32.0, 32.0, 0.0]]]


def test_cli_limits_images_and_reports(classification_store, capsys):
    path, _ = classification_store
    code = precompute_main([str(path), "--explain", "ig,guided_backprop", "--limit", "2", "--model", "cnn",
                            "--params", '{"ig": {"n_steps": 4}}'])
    assert code == 0
    assert "wrote 4 explanation rows" in capsys.readouterr().out
    ids = Store(path).query('SELECT DISTINCT image_id FROM "explanations" ORDER BY 1')["image_id"]
    assert list(ids) == [0, 1]
    with pytest.raises(ExplainError, match="--params"):
        precompute_main([str(path), "--explain", "ig", "--params", "{nope"])
    with pytest.raises(ExplainError, match="unknown explanation method"):
        precompute_main([str(path), "--explain", "ig,lime"])


def test_cli_cohort_limits_the_work_to_its_images_and_model(classification_store, capsys):
    path, _ = classification_store
    code = precompute_main([str(path), "--explain", "guided_backprop",
                            "--cohort", "image_id__in=1,3&model=cnn"])
    assert code == 0
    rows = Store(path).query('SELECT DISTINCT model_id, image_id FROM "explanations" ORDER BY 2')
    assert rows.values.tolist() == [["cnn", 1], ["cnn", 3]]
    from core.errors import CohortError

    with pytest.raises(CohortError):
        precompute_main([str(path), "--explain", "guided_backprop", "--cohort", "colour__eq=red"])
