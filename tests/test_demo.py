"""Demo stores: built offline, nuisance factors that matter, models that re-run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core import demo, demo_jobs
from core.errors import IngestError
from core.explain.precompute import planned_maps
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


@pytest.mark.parametrize("task", demo.TASKS)
def test_label_review_data_ships_with_the_store(stores, task):
    store = stores[task]
    models = sorted(store.model_ids())
    scored = store.query('SELECT model_id, count(DISTINCT image_id) AS n FROM "label_quality" GROUP BY 1 ORDER BY 1')
    assert scored["model_id"].tolist() == models and (scored["n"] == N_IMAGES).all()
    if task == "detection":
        assert not store.has_table("embeddings")
    else:
        mapped = store.query('SELECT model_id, count(*) AS n FROM "embeddings" GROUP BY 1 ORDER BY 1')
        assert mapped["model_id"].tolist() == models and (mapped["n"] == N_IMAGES).all()


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

    def fake_build(out, tasks, n_images, seed, progress=None, n_train=None, workers=None):
        calls.append((Path(out), tuple(tasks), n_images, seed, n_train, workers))
        progress("multiclass: rendering scenes", 0, 1)
        return {t: Path(out) / f"demo-{t}.duckdb" for t in tasks}

    monkeypatch.setattr(demo, "build_demos", fake_build)
    assert demo.demo_main(["--task", "multiclass", "--images", "50", "--out", str(tmp_path)]) == 0
    assert calls == [(tmp_path, ("multiclass",), 50, 0, None, None)]
    printed = capsys.readouterr().out
    assert "rendering scenes" in printed and "built 1 demo store(s) of 50 images in" in printed
    status = demo_jobs.read_status(tmp_path / demo_jobs.BUILD_STATUS)
    assert status.state == "done" and status.tasks == ("multiclass",)
    assert status.stages == {"multiclass": ("rendering scenes", 0, 1)}
    assert demo.demo_main(["--out", str(tmp_path), "--train-scenes", "40", "--workers", "1"]) == 0
    assert calls[-1][1:] == (demo.TASKS, 2000, 0, 40, 1)
    with pytest.raises(SystemExit):
        demo.demo_main(["--task", "segmentation"])


def test_failed_build_leaves_its_reason_in_the_status(monkeypatch, tmp_path):
    def failing_build(out, tasks, n_images, seed, progress=None, n_train=None, workers=None):
        progress("detection: training baseline", 0, 2)
        raise IngestError("disk full", file=str(out))

    monkeypatch.setattr(demo, "build_demos", failing_build)
    with pytest.raises(IngestError):
        demo.demo_main(["--out", str(tmp_path)])
    status = demo_jobs.read_status(tmp_path / demo_jobs.BUILD_STATUS)
    assert status.state == "failed" and "disk full" in status.error
    assert status.stages["detection"] == ("training baseline", 0, 2)


def test_a_second_build_in_the_same_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "build_demos", lambda out, tasks, *a, **k: {t: Path(out) for t in tasks})
    lock = demo_jobs.DemoLock(tmp_path / demo_jobs.BUILD_LOCK)
    assert lock.acquire()
    try:
        with pytest.raises(IngestError, match=f"another demo build is running .*process {os.getpid()}"):
            demo.demo_main(["--out", str(tmp_path)])
        # The process that took the lock hands it to the build it starts.
        assert demo.demo_main(["--out", str(tmp_path), "--lock-fd", str(os.dup(lock.fileno()))]) == 0
    finally:
        lock.release()
    assert demo_jobs.read_status(tmp_path / demo_jobs.BUILD_STATUS).state == "done"


def test_then_explain_starts_the_background_step(monkeypatch, tmp_path, capsys):
    started = []
    monkeypatch.setattr(demo, "build_demos", lambda out, tasks, *a, **k: {t: Path(out) for t in tasks})

    def start(out, n, workers, lock):
        # The step counts as running from the start: the lock is taken and handed over.
        assert demo_jobs.lock_held(Path(out) / demo_jobs.EXPLAIN_LOCK)
        started.append((Path(out), n, workers))
        return _Pid(7)

    monkeypatch.setattr(demo_jobs, "start_explain_process", start)
    demo.demo_main(["--out", str(tmp_path), "--then-explain", "--explain-images", "5"])
    assert started == [(tmp_path, 5, None)]
    assert "process 7" in capsys.readouterr().out
    assert not demo_jobs.lock_held(tmp_path / demo_jobs.EXPLAIN_LOCK)
    demo.demo_main(["--out", str(tmp_path)])
    assert len(started) == 1


@dataclasses.dataclass
class _Pid:
    pid: int


# --------------------------------------------------------------------------- status files and locks


def test_status_file_reports_stages_and_the_build_fraction(tmp_path):
    path = tmp_path / "status"
    assert demo_jobs.read_status(path).state == "none"
    status = demo_jobs.StatusFile(path, ["multiclass", "detection"])
    assert demo_jobs.read_status(path).state == "running" and demo_jobs.read_status(path).build_fraction() == 0
    status.progress("multiclass: done", 1, 1)
    status.progress("detection: metadata", 0, 10)
    status.progress("detection: metadata", 5, 10)  # within the interval: not written
    status.progress("detection: metadata", 10, 10)  # a stage's end is always written
    read = demo_jobs.read_status(path)
    stages = len(demo_jobs.BUILD_STAGES)
    assert read.stages == {"multiclass": ("done", 1, 1), "detection": ("metadata", 10, 10)}
    metadata = demo_jobs.BUILD_STAGES.index("metadata")
    assert read.build_fraction() == pytest.approx((1 + (metadata + 1) / stages) / 2)
    being_written = tmp_path / "being-written"
    being_written.write_text(path.read_text() + '{"stage": "multicl')  # read mid-line
    assert demo_jobs.read_status(being_written).stages == read.stages
    status.finish()
    assert demo_jobs.read_status(path).state == "done" and demo_jobs.read_status(path).build_fraction() == 1.0


def test_lock_is_exclusive_and_follows_a_child_process(tmp_path):
    path = tmp_path / "data" / demo_jobs.BUILD_LOCK
    assert not demo_jobs.lock_held(path)
    first = demo_jobs.DemoLock(path)
    assert first.acquire()
    assert demo_jobs.lock_held(path) and demo_jobs.lock_holder(path) == os.getpid()
    assert not demo_jobs.DemoLock(path).acquire(wait_s=0.1)
    # The child inherits the lock and keeps it after this process lets go.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(first.fileno(),))
    first.record(child.pid)
    first.release()
    assert demo_jobs.lock_held(path) and demo_jobs.lock_holder(path) == child.pid
    child.communicate(b"")
    assert not demo_jobs.lock_held(path)
    again = demo_jobs.DemoLock(path)
    assert again.acquire(wait_s=0.1)
    again.release()


def test_explain_ends_at_once_while_another_run_holds_the_lock(tmp_path, capsys):
    lock = demo_jobs.DemoLock(tmp_path / demo_jobs.EXPLAIN_LOCK)
    assert lock.acquire()
    try:
        assert demo.demo_main(["--explain", "--out", str(tmp_path)]) == 0
    finally:
        lock.release()
    assert f"computed by process {os.getpid()}" in capsys.readouterr().out
    assert not (tmp_path / demo_jobs.PLAN_FILE).exists()


# --------------------------------------------------------------------------- explanation sample

# Cheap method parameters: these tests check the plan and the bookkeeping, not the maps.
QUICK_PARAMS = {"shap": {"max_evals": 40}, "ig": {"n_steps": 4}, "xrai": {"n_steps": 4},
                "drise": {"n_masks": 16, "batch_size": 16}}
N_EXPLAINED = 3


@pytest.fixture
def explain_folder(demos, tmp_path, monkeypatch):
    """Copies of the demo bases (images and models are absolute paths), quick method parameters."""
    for path in demos.values():
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(demo, "EXPLAIN_PARAMS", QUICK_PARAMS)
    monkeypatch.setattr(demo, "EXPLAIN_CHUNK", 2)
    return tmp_path


def test_plan_covers_every_method_model_and_target(explain_folder, stores):
    plan = demo.plan_explanations(explain_folder, N_EXPLAINED)
    assert demo_jobs.read_plan(explain_folder) == json.loads(json.dumps(plan))
    assert set(plan["stores"]) == {f"demo-{t}" for t in demo.TASKS}
    classification = {"shap", "ig", "guided_backprop", "guided_gradcam", "xrai"}
    for task in demo.TASKS:
        spec = plan["stores"][f"demo-{task}"]
        maps = pd.DataFrame(spec["maps"], columns=demo_jobs.PLAN_KEYS)
        assert spec["image_ids"] == list(range(N_EXPLAINED))
        assert set(spec["methods"]) == ({"drise"} if task == "detection" else classification)
        assert set(maps["model_id"]) == {"baseline", "candidate"}
        per_image = maps.groupby(["model_id", "method", "image_id"]).size()
        if task == "detection":
            shown = stores[task].query(
                'SELECT model_id, image_id, least(count(*), 3) AS n FROM "det_boxes" WHERE score >= 0.5 '
                "AND image_id < ? GROUP BY ALL", [N_EXPLAINED]).set_index(["model_id", "image_id"])["n"]
            assert per_image.droplevel("method").sort_index().to_dict() == shown.sort_index().to_dict()
        else:
            assert (per_image == demo.EXPLAIN_TOP_K[task]).all()
            assert len(per_image) == 2 * len(classification) * N_EXPLAINED
    xrai = plan["stores"]["demo-multilabel"]["methods"]["xrai"]
    assert xrai["segment_size"] == demo.SIZES["multilabel"]


def test_explanations_resume_and_progress_counts_stored_maps(explain_folder, monkeypatch):
    # The bookkeeping is the same for every method: the quickest ones keep the test short
    # (SHAP compiles numba code on first use, tens of seconds).
    every = demo.explanation_methods
    monkeypatch.setattr(demo, "explanation_methods", lambda task: {
        name: params for name, params in every(task).items() if name in ("guided_backprop", "drise")})
    plan = demo.plan_explanations(explain_folder, N_EXPLAINED)
    planned = {name: len(spec["maps"]) for name, spec in plan["stores"].items()}
    before = demo_jobs.explanation_progress(explain_folder)
    assert before.stores == {name: (0, n) for name, n in planned.items()}
    assert not before.running and before.error is None
    # One chunk of one store, as a run stopped after its first part would leave it.
    chunks = demo.explain_chunks(plan)
    # Chunks of EXPLAIN_CHUNK images, the stores in turn.
    assert [(name, spec["image_ids"]) for name, spec in chunks[:4]] == [
        ("demo-multiclass", [0, 1]), ("demo-multilabel", [0, 1]), ("demo-detection", [0, 1]), ("demo-multiclass", [2])]
    first = demo.explain_chunk(explain_folder, *chunks[0])
    partial = demo_jobs.explanation_progress(explain_folder)
    assert partial.stores["demo-multiclass"] == (first, planned["demo-multiclass"])
    name, spec = chunks[0]
    maps = planned_maps(explain_folder / f"{name}.duckdb", list(spec["methods"]),
                        image_ids=plan["stores"][name]["image_ids"], top_k=spec["top_k"])
    assert len(maps) == planned[name] and maps["stored"].sum() == first
    assert set(maps.loc[maps["stored"], "image_id"]) == set(spec["image_ids"])
    assert first == planned["demo-multiclass"] * 2 // N_EXPLAINED
    written = demo.explain_demos(explain_folder, N_EXPLAINED, workers=1)
    assert written == sum(planned.values()) - first
    done = demo_jobs.explanation_progress(explain_folder)
    assert done.stores == {name: (n, n) for name, n in planned.items()} and done.done == done.planned
    assert demo.explain_demos(explain_folder, N_EXPLAINED, workers=1) == 0
    parts = sorted((explain_folder / "demo-multilabel.parts" / "explanations").glob("*.parquet"))
    assert len(parts) == -(-N_EXPLAINED // demo.EXPLAIN_CHUNK)  # a part per chunk: maps land as they go


def test_a_new_build_drops_the_old_plan(explain_folder):
    demo.plan_explanations(explain_folder, 1)
    with pytest.raises(IngestError):
        demo.build_demos(explain_folder, tasks=("segmentation",))
    assert demo_jobs.read_plan(explain_folder) is not None
    demo.build_demos(explain_folder, tasks=("multiclass",), n_images=10, n_train={"multiclass": 30})
    assert demo_jobs.read_plan(explain_folder) is None
    assert demo_jobs.explanation_progress(explain_folder) is None


def test_background_explain_adopts_the_lock_and_reports_its_failure(tmp_path):
    lock = demo_jobs.DemoLock(tmp_path / demo_jobs.EXPLAIN_LOCK)
    assert lock.acquire()
    try:
        child = demo_jobs.start_explain_process(tmp_path, 2, 1, lock)
    finally:
        lock.release()
    assert demo_jobs.lock_holder(tmp_path / demo_jobs.EXPLAIN_LOCK) == child.pid
    assert child.wait(timeout=120) == 2  # no demo store in the folder
    assert not demo_jobs.lock_held(tmp_path / demo_jobs.EXPLAIN_LOCK)
    status = demo_jobs.read_status(tmp_path / demo_jobs.EXPLAIN_STATUS)
    assert status.state == "failed" and "no demo store" in status.error
    assert "no demo store" in (tmp_path / demo_jobs.EXPLAIN_LOG).read_text()
