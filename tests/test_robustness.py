"""core.rerun and core.robustness: bisection flips where a brightness-reading model flips, sweeps at strength 0
reproduce the stored metrics, resumability, what-if, snapshots, the CLI, and the Robustness page and flyout
showing stored results without importing torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from core import perturb as P
from core import rerun
from core import robustness as R
from core.cohorts import catalog_of, compile_cohort, parse_query
from core.demo import CLASS_NAMES
from core.demo_models import build_demo_model
from core.errors import EvalError
from core.ingest.build import Dataset, ModelRun, build_store
from core.matching import image_counts_params
from core.metrics.classification import classification_metrics, multilabel_metrics
from core.metrics.detection import detection_metrics
from core.models import predict_classifier, predict_detector
from core.store import Store, write_part

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a model that reads brightness only


class MeanBrightness(torch.nn.Module):
    """Class 1 exactly when the mean intensity is above 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-margin, margin], dim=1) * 100.0


def brightness_model() -> torch.nn.Module:
    return MeanBrightness()


GREYS = np.array([77, 115, 179, 26, 250])  # mean intensity grey / 255


def _grey_store(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, grey in enumerate(GREYS):
        path = folder / f"grey_{i}.png"
        Image.new("RGB", (16, 12), (int(grey),) * 3).save(path)
        uris.append(str(path))
    images = pd.DataFrame({"image_id": np.arange(len(GREYS)), "uri": uris,
                           "true_label": (GREYS / 255 > 0.5).astype(np.int32)})
    params = {"loader": f"{__name__}:brightness_model", "kwargs": {}}
    model = brightness_model()
    preds = predict_classifier(model, uris, images["image_id"].to_numpy(), task="multiclass", input_size=None,
                               device="cpu")
    dataset = Dataset("greys", "multiclass", ["dark", "bright"], images)
    return build_store(folder / "greys", dataset, [ModelRun("bright", "Brightness", params, preds)]).path


@pytest.fixture(scope="module")
def greys(tmp_path_factory) -> Path:
    return _grey_store(tmp_path_factory.mktemp("greys"))


def test_bisection_flips_exactly_where_it_says(greys):
    store = Store(greys)
    runner = rerun.Runner.load(store, "bright", "cpu")
    images = runner.images(store.query('SELECT uri FROM "images" ORDER BY image_id')["uri"].tolist())
    keys = np.arange(len(GREYS))
    for bound in (1.0, -1.0):
        strength, resolution = rerun.flip_strengths(runner, images, keys, "brightness", bound, grid=8, steps=10)
        assert resolution == pytest.approx(1 / 8 / 2 ** 10)
        means = GREYS / 255
        crossing = 0.5 - means  # the offset that brings the mean to 0.5
        flips = (crossing > 0) if bound > 0 else (crossing < 0)
        expected = np.where(flips & (np.abs(crossing) <= 1), crossing, np.nan)
        np.testing.assert_array_equal(np.isnan(strength), np.isnan(expected))
        found = ~np.isnan(strength)
        # The returned strength flips; one resolution step less does not.
        assert np.all(np.abs(strength[found] - expected[found]) <= resolution + 1e-6)
        reference = runner.decisions(runner.predict(images))
        at = runner.decisions(runner.run(images, np.flatnonzero(found), {"brightness": strength[found]},
                                         keys[found]))
        before = runner.decisions(runner.run(images, np.flatnonzero(found),
                                             {"brightness": strength[found] - np.sign(bound) * resolution},
                                             keys[found]))
        assert (at != reference[found]).any(axis=1).all()
        assert not (before != reference[found]).any(axis=1).any()


def test_counterfactuals_are_stored_resumable_and_pivoted(greys):
    written = rerun.run_counterfactuals(greys, "brightness", device="cpu", steps=6)
    assert written == 2 * len(GREYS)  # both directions
    assert rerun.run_counterfactuals(greys, "brightness", device="cpu", steps=6) == 0
    table = R.counterfactuals(Store(greys), "bright").set_index("image_id")
    assert list(table.columns) == ["flip_brightness_down", "flip_brightness_up"]
    crossing = 0.5 - GREYS / 255
    up = table["flip_brightness_up"].to_numpy(float)
    assert np.all(np.abs(up[crossing > 0] - crossing[crossing > 0]) <= 1 / 8 / 2 ** 6 + 1e-6)
    assert np.isnan(up[crossing < 0]).all()
    assert R.counterfactual_column("blur", 1) == "flip_blur"
    assert R.counterfactual_columns(Store(greys)) == [
        ("flip_brightness_down", "Flips under brightness (down) at (added to [0, 1] intensities)"),
        ("flip_brightness_up", "Flips under brightness (up) at (added to [0, 1] intensities)")]


def test_what_if_with_the_brightness_model(greys):
    store = Store(greys)
    runner = rerun.Runner.load(store, "bright", "cpu")
    unchanged = rerun.what_if(runner, store, 0, P.Settings())
    assert not unchanged.flipped and np.array_equal(unchanged.original_image, unchanged.perturbed_image)
    crossing = 0.5 - GREYS[0] / 255
    assert not rerun.what_if(runner, store, 0, P.Settings(brightness=round(crossing - 0.02, 2))).flipped
    flipped = rerun.what_if(runner, store, 0, P.Settings(brightness=round(crossing + 0.02, 2)))
    assert flipped.flipped and flipped.original.labels == (0,) and flipped.perturbed.labels == (1,)
    assert R.describe_outcome(flipped.perturbed, ["dark", "bright"], "multiclass").startswith("bright (")


def test_tied_top_names_the_classes_sharing_the_highest_probability():
    third = np.float32(1) / np.float32(3)
    assert R.Outcome((0,), np.array([third] * 3, np.float32), float(third)).tied_top("multiclass") == [0, 1, 2]
    assert R.Outcome((1,), np.array([0.2, 0.4, 0.4 + 1e-9])).tied_top("multiclass") == [1, 2]
    assert R.Outcome((1,), np.array([0.2, 0.5, 0.3])).tied_top("multiclass") == []
    assert R.Outcome((0, 1), np.array([0.9, 0.9])).tied_top("multilabel") == []


def test_snapshot_stores_the_perturbed_image(greys):
    store = Store(greys)
    runner = rerun.Runner.load(store, "bright", "cpu")
    result = rerun.what_if(runner, store, 1, P.Settings(noise=0.1, occlusion=0.5))
    line = rerun.save_snapshot(greys, result, model_id="bright", classes=["dark", "bright"], task="multiclass")
    assert "noise 0.1" in line
    saved = Store(greys).query(f'SELECT * FROM "{R.SNAPSHOTS}" WHERE image_id = 1')
    assert len(saved) == 1 and saved["note"].iloc[0] == line
    png = np.asarray(Image.open(io.BytesIO(saved["png"].iloc[0])))
    np.testing.assert_array_equal(png, result.perturbed_image)


def test_a_store_without_a_loader_says_so(tmp_path, greys):
    store = Store(greys)
    images = store.query('SELECT image_id, uri, true_label FROM "images"')
    preds = store.query('SELECT image_id, probs FROM "predictions"')
    path = build_store(tmp_path / "plain", Dataset("plain", "multiclass", ["dark", "bright"], images),
                       [ModelRun("file", "From a file", {}, preds)]).path
    with pytest.raises(EvalError, match="cannot be re-run"):
        rerun.Runner.load(Store(path), "file")


# --------------------------------------------------------------------------- stores of every task


def _scenes(folder: Path, task: str, n: int, size: int, rng: np.random.Generator):
    folder.mkdir(parents=True, exist_ok=True)
    uris, labels, boxes = [], [], []
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(120, 240, 3)))
        draw = ImageDraw.Draw(image)
        mine = []
        for _ in range(1 if task == "multiclass" else int(rng.integers(1, 3))):
            cls = int(rng.integers(0, len(CLASS_NAMES)))
            x0, y0 = rng.uniform(2, size * 0.55, 2)
            w, h = rng.uniform(size * 0.2, size * 0.4, 2)
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
            mine.append(cls)
            boxes.append((i, cls, x0, y0, x0 + w + 1, y0 + h + 1))
        path = folder / f"{i:03d}.png"
        image.save(path)
        uris.append(str(path))
        labels.append(mine)
    return uris, labels, boxes


def build_task_store(folder: Path, task: str, n: int = 16, seed: int = 0) -> Path:
    """A small store whose model (an untrained demo architecture, seeded) can be re-run."""
    rng = np.random.default_rng(seed)
    size = 64 if task == "detection" else 32
    uris, labels, boxes = _scenes(folder / f"{task}.images", task, n, size, rng)
    images = pd.DataFrame({"image_id": np.arange(n), "uri": uris, "site": ["north", "south"] * (n // 2)})
    if task == "multiclass":
        images["true_label"] = np.array([m[0] for m in labels], dtype=np.int32)
    elif task == "multilabel":
        images["true_label"] = [np.unique(m).astype(np.int32) for m in labels]
    else:
        images["true_label"] = [[] for _ in range(n)]
    kind = f"{task}-candidate" if task != "detection" else "detection-baseline"
    torch.manual_seed(seed)
    model = build_demo_model(kind).eval()
    weights = folder / f"{task}.pt"
    torch.save(model.state_dict(), weights)
    params = {"loader": "core.demo:load_demo_model", "kwargs": {"path": str(weights), "kind": kind},
              "input_size": [size, size]}
    ids = images["image_id"].to_numpy()
    if task == "detection":
        gt = pd.DataFrame(boxes, columns=["image_id", "class_id", "xmin", "ymin", "xmax", "ymax"])
        gt.insert(1, "gt_id", np.arange(len(gt)))
        run = ModelRun("m", "Model", params, det_boxes=predict_detector(model, uris, ids, input_size=(size, size),
                                                                         device="cpu"))
        dataset = Dataset(task, task, CLASS_NAMES, images, gt)
    else:
        run = ModelRun("m", "Model", params, predictions=predict_classifier(
            model, uris, ids, task=task, input_size=(size, size), device="cpu"))
        dataset = Dataset(task, task, CLASS_NAMES, images)
    return build_store(folder / task, dataset, [run]).path


@pytest.fixture(scope="module", params=["multiclass", "multilabel", "detection"])
def task_store(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_task_store(tmp_path_factory.mktemp(request.param), request.param)


def _selection(store: Store, query: str):
    catalog = catalog_of(store)
    return compile_cohort(parse_query(query, catalog).cohort, store, model_id="m", catalog=catalog)


def _stored_metrics(store: Store, task: str, selection, score_threshold: float) -> dict:
    if task == "multiclass":
        m = classification_metrics(store, "m", selection)
        return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
    if task == "multilabel":
        m = multilabel_metrics(store, "m", selection, label_threshold=0.5)
        return {"exact_match": m["exact_match"], "f1_macro": m["f1_macro"]}
    m = detection_metrics(store, "m", selection, iou=0.5, score_threshold=score_threshold)
    return {"mAP": m["mAP"], "AP": m["AP"]}


def test_sweep_at_strength_zero_equals_the_stored_metrics(task_store):
    task, path = task_store
    summary = rerun.run_sweep(path, "blur", [0, 1.5, 3], device="cpu", batch_size=7)
    assert summary.rows_written == 16 * 3 and summary.rows_skipped == 0
    store = Store(path)
    cohorts = {"all": None, "north": _selection(store, "site__eq=north")}
    curves = R.robustness_curves(store, "m", "blur", cohorts, score_threshold=0.1)
    assert set(curves["level"]) == {0.0, 1.5, 3.0}
    for name, selection in cohorts.items():
        zero = curves[(curves["cohort"] == name) & (curves["level"] == 0)].iloc[0]
        assert zero["images"] == (16 if name == "all" else 8)
        assert zero["flip_rate"] == 0.0
        for metric, value in _stored_metrics(store, task, selection, 0.1).items():
            assert zero[metric] == pytest.approx(value, abs=1e-12), metric
    correct = store.query(f'SELECT r.image_id, r.correct, o.correct AS stored FROM "{R.TABLE}" r '
                          'JOIN "outcomes" o USING (model_id, image_id) WHERE r.level = 0')
    if task != "detection":  # detection outcomes are live (from the matches), not a table
        assert len(correct) == 16 and (correct["correct"] == correct["stored"]).all()
    if task == "detection":
        stored = store.query(*image_counts_params("m", 0.5, 0.5)).set_index("image_id")
        swept = store.query(f'SELECT image_id, n_tp, n_fp, n_fn FROM "{R.TABLE}" WHERE level = 0').set_index("image_id")
        joined = swept.join(stored.add_suffix("_stored")).fillna(0)
        for column in ("n_tp", "n_fp", "n_fn"):
            np.testing.assert_array_equal(joined[column], joined[f"{column}_stored"])


def test_sweeps_resume_and_count_each_key_once(task_store):
    task, path = task_store
    again = rerun.run_sweep(path, "blur", [0, 1.5, 3, 4.5], device="cpu")
    assert again.rows_written == 16 and again.rows_skipped == 16 * 3
    store = Store(path)
    listing = R.swept(store, "m")
    assert listing["level"].tolist() == [0.0, 1.5, 3.0, 4.5] and (listing["images"] == 16).all()
    before = R.robustness_curves(store, "m", "blur", {"all": None}, score_threshold=0.1)
    # The same keys stored a second time (another run) replace, never add to, the first.
    runner = rerun.Runner.load(store, "m", "cpu")
    ids = np.arange(4)
    images = runner.images(store.query('SELECT uri FROM "images" WHERE image_id < 4 ORDER BY image_id')["uri"])
    frames = rerun.sweep_frames(runner, store, ids, images, np.arange(4), np.full(4, 1.5), "blur")
    for table, frame in frames.items():
        write_part(path, table, frame)
    after = R.robustness_curves(Store(path), "m", "blur", {"all": None}, score_threshold=0.1)
    pd.testing.assert_frame_equal(before, after)


@pytest.fixture(scope="module")
def small_detection(tmp_path_factory) -> Path:
    return build_task_store(tmp_path_factory.mktemp("small"), "detection", n=6, seed=3)


def test_geometric_sweep_moves_the_ground_truth(small_detection):
    path = small_detection
    rerun.run_sweep(path, "scale", [0.0, -0.5], device="cpu")
    store = Store(path)
    gts = store.query(f'SELECT image_id, gt_id, level, area_mask FROM "{R.GTS_TABLE}" ORDER BY ALL')
    original = store.query('SELECT image_id, gt_id, area FROM "gt_boxes"')
    assert len(gts[gts["level"] == 0]) == len(original)
    assert len(gts[gts["level"] == -0.5]) == len(original)  # halved boxes stay inside the image
    runner = rerun.Runner.load(store, "m", "cpu")
    result = rerun.what_if(runner, store, 0, P.Settings(scale=-0.5))
    before = result.original.boxes[result.original.boxes["kind"] == "gt"].sort_values("id")
    after = result.perturbed.boxes[result.perturbed.boxes["kind"] == "gt"].sort_values("id")
    width_before = (before["xmax"] - before["xmin"]).to_numpy()
    width_after = (after["xmax"] - after["xmin"]).to_numpy()
    np.testing.assert_allclose(width_after, width_before / 2)


def test_what_if_detection_counts_match_matching(small_detection):
    store = Store(small_detection)
    runner = rerun.Runner.load(store, "m", "cpu")
    result = rerun.what_if(runner, store, 2, P.Settings(), iou=0.5, score_threshold=0.0)
    stored = store.query(*image_counts_params("m", 0.5, 0.0)).set_index("image_id")
    expected = tuple(int(stored.loc[2, c]) if 2 in stored.index else 0 for c in ("n_tp", "n_fp", "n_fn"))
    assert result.original.counts == expected == result.perturbed.counts
    boxes = result.original.boxes
    assert ((boxes["kind"] == "det") & (boxes["status"] == "tp")).sum() == expected[0]


def test_breaking_points_interpolate():
    curves = pd.DataFrame({"cohort": ["a"] * 3 + ["b"] * 3 + ["c"] * 2, "level": [0, 1, 2, 0, -1, -2, 0, 1],
                           "accuracy": [0.9, 0.8, 0.4, 0.95, 0.9, 0.85, 0.5, 0.4]})
    points = R.breaking_points(curves, "accuracy", 0.6).set_index("cohort")["strength"]
    assert points["a"] == pytest.approx(1.5)
    assert np.isnan(points["b"])
    assert points["c"] == 0


def test_cli_sweeps_and_prints_curves(greys, capsys):
    args = [str(greys), "--perturb", "brightness", "--levels", "0,0.1,0.3", "--device", "cpu"]
    assert R.robustness_main([*args, "--cohort", "true_label__eq=dark"]) == 0
    out = capsys.readouterr().out
    assert "brightness: 9 image-levels computed, 0 already stored" in out  # the three dark images
    assert "true_label__eq=dark: accuracy 0: 1.000" in out
    assert R.robustness_main(args) == 0
    assert "brightness: 6 image-levels computed, 9 already stored" in capsys.readouterr().out
    curves = R.robustness_curves(Store(greys), "bright", "brightness", {"all": None})
    # Dark images at +0.3 cross 0.5 when their mean is above 0.2: two of three (77 and 115 of 255).
    at = curves.set_index("level")
    assert at.loc[0.0, "accuracy"] == 1.0 and at.loc[0.3, "flip_rate"] == pytest.approx(2 / 5)
    with pytest.raises(EvalError, match="unknown perturbation"):
        R.robustness_main([str(greys), "--perturb", "sharpen"])


# --------------------------------------------------------------------------- reading without torch


# Run in a fresh interpreter: this test process has torch loaded already (conftest, the model above).
_VISIT_WITHOUT_TORCH = """
import json, sys
from e2e.harness import open_app, served_navigation

with served_navigation():
    at = open_app("store=greys&model=bright&image=0", page="pages/robustness.py")
    seen = {"torch_on_the_page": "torch" in sys.modules, "subheaders": [s.value for s in at.subheader],
            "toggles": [t.key for t in at.toggle]}
    at.toggle(key="vl_wi_open").set_value(True).run()
    seen["errors"] = [e.value for e in at.error] + [e.message for e in at.exception]
    seen["torch_after_what_if"] = "torch" in sys.modules
print(json.dumps(seen))
"""


def test_robustness_page_and_flyout_show_stored_results_without_torch(tmp_path):
    """The curves, the flip strengths and the image flyout come without the ~500 MiB torch import;
    opening the what-if panel re-runs the model and loads it (so the check sees an import)."""
    path = _grey_store(tmp_path)
    rerun.run_sweep(path, "brightness", [0, 0.3], device="cpu")
    rerun.run_counterfactuals(path, "brightness", device="cpu", steps=2)
    env = {**os.environ, "VISIONLENS_DATA": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", _VISIT_WITHOUT_TORCH], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Most fragile images" in seen["subheaders"]  # the stored flip strengths were read
    assert "vl_wi_open" in seen["toggles"]  # the flyout of image 0 is open
    assert not seen["torch_on_the_page"]
    assert seen["errors"] == [] and seen["torch_after_what_if"]
