"""Demo stores: built offline, nuisance factors that matter, models that re-run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import demo
from core.errors import IngestError
from core.models import load_model, predict_classifier, predict_detector
from core.store import Store

N_IMAGES = 120
# Training scenes per model: small for speed, but the multiclass models as in the real demo
# (the nuisance checks below need a model that reads clear digits well).
N_TRAIN = {"multiclass": demo.TRAIN_SCENES["multiclass"], "multilabel": 800, "detection": 800}
SEED = 0


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo")
    return demo.build_demos(out, n_images=N_IMAGES, seed=SEED, n_train=N_TRAIN)


@pytest.fixture(scope="module")
def stores(demos):
    opened = {task: Store(path) for task, path in demos.items()}
    yield opened
    for store in opened.values():
        store.close()


@pytest.mark.parametrize("task", demo.TASKS)
def test_store_shape(stores, task):
    store = stores[task]
    assert store.task == task
    assert store.classes == demo.CLASS_NAMES
    assert sorted(store.model_ids()) == ["baseline", "candidate"]
    assert store.scalar('SELECT count(*) FROM "images"') == N_IMAGES
    if task == "detection":
        per_model = store.rows('SELECT model_id, count(*) FROM "det_boxes" GROUP BY model_id')
        assert {m for m, _ in per_model} == {"baseline", "candidate"}
        lo, hi = store.rows('SELECT min(n), max(n) FROM (SELECT count(*) AS n FROM "gt_boxes" '
                            'WHERE NOT iscrowd GROUP BY image_id)')[0]
        assert store.scalar('SELECT count(DISTINCT image_id) FROM "gt_boxes"') == N_IMAGES
        assert (lo, hi) == (1, 5)
    else:
        assert store.scalar('SELECT count(*) FROM "predictions"') == 2 * N_IMAGES
    if task == "multilabel":
        lengths = store.query('SELECT len(true_label) AS n FROM "images"')["n"]
        assert lengths.min() == 1 and lengths.max() == 3
    columns = store.columns().set_index("name")
    assert columns.loc["site", ["kind", "source"]].tolist() == ["categorical", "user"]
    assert columns.loc["camera", ["kind", "source"]].tolist() == ["categorical", "user"]
    assert columns.loc["occluded", ["kind", "source"]].tolist() == ["boolean", "user"]
    assert set(store.query('SELECT DISTINCT site FROM "images"')["site"]) <= set(demo.SITES)
    assert set(store.query('SELECT DISTINCT camera FROM "images"')["camera"]) == set(demo.CAMERAS)


@pytest.mark.parametrize("task", demo.TASKS)
def test_images_are_pngs_of_the_model_input_size(stores, task):
    store = stores[task]
    size = demo.SIZES[task]
    uris = store.query('SELECT uri FROM "images" ORDER BY image_id')["uri"].tolist()
    assert all(Path(u).is_absolute() for u in uris)
    with Image.open(uris[0]) as first, Image.open(uris[-1]) as last:
        assert first.format == "PNG" and first.size == (size, size) and first.mode == "RGB"
        assert last.size == (size, size)
    for params in store.models()["params"].map(json.loads):
        assert params["input_size"] == [size, size]
        assert params["task"] == task
        assert Path(params["kwargs"]["path"]).is_file()
        assert Path(params["kwargs"]["path"]).parent.name == f"demo-{task}.models"


def test_injected_label_errors_are_recorded(stores):
    ids = json.loads(stores["multiclass"].meta()["injected_label_errors"])
    assert len(ids) == round(demo.LABEL_ERROR_RATE * N_IMAGES)
    assert len(set(ids)) == len(ids) and all(0 <= i < N_IMAGES for i in ids)


def _accuracy(store: Store, model_id: str, where: str) -> tuple[float, int]:
    row = store.rows(f'SELECT avg(o.correct::INTEGER), count(*) FROM "outcomes" o '
                     f'JOIN "images" i USING (image_id) WHERE o.model_id = ? AND ({where})', [model_id])[0]
    return float(row[0]), int(row[1])


def _candidate(store: Store):
    params = store.query("""SELECT params FROM "models" WHERE model_id = 'candidate'""")["params"][0]
    return load_model(json.loads(params))


# The same digits, drawn under one condition at a time (paired, so few scenes suffice).
# Values from the demo's own ranges: the warehouse's light (where the camera's gain
# triples its noise), the phone's blur, the webcam's noise.
CONDITIONS = {
    "clear": {"gain": 0.95, "blur": 0.3, "noise": 0.01},
    "dark": {"gain": 0.2, "blur": 0.3, "noise": 0.06},
    "blurred": {"gain": 0.95, "blur": 2.5, "noise": 0.01},
    "noisy": {"gain": 0.95, "blur": 0.3, "noise": 0.2},
}


def test_nuisance_factors_lower_candidate_accuracy(stores):
    model = _candidate(stores["multiclass"])
    _, glyphs = demo.digit_glyphs(SEED)
    n, size = 400, demo.SIZES["multiclass"]
    rng = np.random.default_rng(11)
    base = demo.sample_conditions(rng, n)
    layout = demo.single_digit_layout(rng, glyphs, n, size)
    targets = demo.occlusion_targets(rng, layout, n)
    truth = glyphs.labels[layout.glyph]
    accuracy = {}
    for name, values in CONDITIONS.items():
        cond = dataclasses.replace(base, occluded=np.zeros(n, bool),
                                   **{k: np.full(n, v) for k, v in values.items()})
        images = demo.render(glyphs, layout, cond, size, np.random.default_rng(12), targets).images
        with torch.inference_mode():
            logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        accuracy[name] = float((logits.argmax(1).numpy() == truth).mean())
    assert accuracy["clear"] >= 0.85, accuracy
    # Noise alone costs least: the candidate trained on noisy webcams.
    for name, margin in (("dark", 0.05), ("blurred", 0.05), ("noisy", 0.02)):
        assert accuracy[name] <= accuracy["clear"] - margin, accuracy


def test_baseline_fails_in_the_dark_where_the_candidate_copes(stores):
    store = stores["multiclass"]
    baseline, n = _accuracy(store, "baseline", "i.site = 'warehouse'")
    candidate, _ = _accuracy(store, "candidate", "i.site = 'warehouse'")
    assert n >= 5
    assert candidate >= baseline + 0.2, (candidate, baseline)


@pytest.mark.parametrize("model_id", ["baseline", "candidate"])
def test_detector_has_hits_false_alarms_and_misses(stores, model_id):
    store = stores["detection"]
    # Bit 0 of the masks: IoU 0.5, all areas (see core.matching).
    tp, fp = store.rows(
        'SELECT count(*) FILTER (WHERE tp_mask & 1 = 1), '
        'count(*) FILTER (WHERE tp_mask & 1 = 0 AND ignored_mask & 1 = 0) '
        'FROM "det_matches" WHERE model_id = ?', [model_id])[0]
    fn = store.scalar('SELECT count(*) FROM "gt_matches" WHERE model_id = ? AND NOT iscrowd '
                      'AND match_det_ids[1] = -1', [model_id])
    assert tp > 0 and fp > 0 and fn > 0, (tp, fp, fn)


def test_candidate_detector_finds_more(stores):
    store = stores["detection"]
    tp = dict(store.rows('SELECT model_id, count(*) FILTER (WHERE tp_mask & 1 = 1) '
                         'FROM "det_matches" GROUP BY model_id'))
    assert tp["candidate"] > tp["baseline"]


@pytest.mark.parametrize("task", demo.TASKS)
def test_models_reload_and_reproduce_stored_predictions(stores, task):
    store = stores[task]
    images = store.query('SELECT image_id, uri FROM "images" ORDER BY image_id LIMIT 24')
    ids, uris = images["image_id"].to_numpy(), images["uri"].tolist()
    for model_id, params in store.models()[["model_id", "params"]].itertuples(index=False):
        params = json.loads(params)
        model = load_model(params)
        size = tuple(params["input_size"])
        if task == "detection":
            again = predict_detector(model, uris, ids, input_size=size, device="cpu")
            stored = store.query('SELECT image_id, class_id, score, xmin, ymin, xmax, ymax FROM "det_boxes" '
                                 'WHERE model_id = ? AND image_id < ?', [model_id, len(ids)])
            key = ["image_id", "xmin", "ymin", "xmax", "ymax"]
            again = again.sort_values(key).reset_index(drop=True)
            stored = stored.sort_values(key).reset_index(drop=True)
            assert len(again) == len(stored) > 0
            np.testing.assert_array_equal(again[key].to_numpy(), stored[key].to_numpy())
            np.testing.assert_array_equal(again["class_id"], stored["class_id"])
            np.testing.assert_allclose(again["score"], stored["score"], atol=1e-5)
        else:
            again = predict_classifier(model, uris, ids, task=task, input_size=size, device="cpu")
            stored = store.query('SELECT probs FROM "predictions" WHERE model_id = ? AND image_id < ? '
                                 'ORDER BY image_id', [model_id, len(ids)])
            np.testing.assert_allclose(np.stack(again["probs"]), np.stack(stored["probs"]), atol=1e-5)


def test_held_out_digits_never_reach_training():
    train, test = demo.digit_glyphs(SEED)
    seen = {b.tobytes() for b in train.bitmaps}
    assert not any(b.tobytes() in seen for b in test.bitmaps)
    assert set(np.unique(test.labels)) == set(range(10))


def test_scenes_are_deterministic():
    _, glyphs = demo.digit_glyphs(SEED)

    def scenes(seed: int) -> demo.Scenes:
        rng = np.random.default_rng(seed)
        cond = demo.sample_conditions(rng, 8)
        layout = demo.detection_layout(rng, glyphs, 8, 128)
        return demo.render(glyphs, layout, cond, 128, rng, demo.occlusion_targets(rng, layout, 8))

    a, b, c = scenes(1), scenes(1), scenes(2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
    assert not np.array_equal(a.images, c.images)


def test_training_is_seeded_whatever_ran_before():
    train, _ = demo.digit_glyphs(SEED)

    def weights() -> dict:
        torch.rand(5)  # moves the global generator, as any earlier work would
        model = demo.train_model("multiclass", "baseline", train, np.random.default_rng(1), 64, seed=7)
        return model.state_dict()

    first, second = weights(), weights()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_dim_scenes_are_darker_and_noisier():
    _, glyphs = demo.digit_glyphs(SEED)
    rng = np.random.default_rng(3)
    cond = demo.sample_conditions(rng, 400)
    layout = demo.single_digit_layout(rng, glyphs, 400, 48)
    images = demo.render(glyphs, layout, cond, 48, rng, demo.occlusion_targets(rng, layout, 400)).images
    dim = np.array(demo.SITES)[cond.site] == "warehouse"
    assert images[dim].mean() < 0.6 * images[~dim].mean()
    assert cond.noise[dim].mean() > cond.noise[~dim].mean()


def test_ground_truth_boxes_hug_the_ink():
    _, glyphs = demo.digit_glyphs(SEED)
    rng = np.random.default_rng(4)
    layout = demo.detection_layout(rng, glyphs, 16, 128)
    cond = demo.sample_conditions(rng, 16)
    scenes = demo.render(glyphs, layout, cond, 128, rng, demo.occlusion_targets(rng, layout, 16))
    x0, y0, w, h = layout.box.T
    gt = scenes.gt_boxes
    # Inside the placed box (within a pixel) and not a sliver of it.
    assert (gt[:, 0] >= np.floor(x0) - 1).all() and (gt[:, 2] <= np.ceil(x0 + w) + 1).all()
    assert (gt[:, 1] >= np.floor(y0) - 1).all() and (gt[:, 3] <= np.ceil(y0 + h) + 1).all()
    assert ((gt[:, 3] - gt[:, 1]) >= 0.5 * h).all()


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(IngestError, match="unknown demo task"):
        demo.build_demos(tmp_path, tasks=("segmentation",))
    with pytest.raises(IngestError, match="at least"):
        demo.build_demos(tmp_path, n_images=3)


def test_demo_main_parses_and_reports(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_build(out, tasks, n_images, seed, progress=None):
        calls.append((out, tuple(tasks), n_images, seed))
        progress("multiclass: rendering scenes", 0, 1)
        return {t: Path(out) / f"demo-{t}.duckdb" for t in tasks}

    monkeypatch.setattr(demo, "build_demos", fake_build)
    assert demo.demo_main(["--task", "multiclass", "--images", "50", "--out", str(tmp_path)]) == 0
    assert calls == [(str(tmp_path), ("multiclass",), 50, 0)]
    printed = capsys.readouterr().out
    assert "rendering scenes" in printed and "built 1 demo store(s) of 50 images in" in printed
    assert demo.demo_main(["--out", str(tmp_path)]) == 0
    assert calls[-1][1] == demo.TASKS and calls[-1][2] == 2000
    with pytest.raises(SystemExit):
        demo.demo_main(["--task", "segmentation"])
