"""Partitioned precompute (process pool, Ray Data) equals build_store on the same inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from core.demo_models import build_demo_model
from core.distributed import (PENDING_TABLE, StagedTables, global_order_key, order_key_transform, plan_store,
                              precompute)
from core.errors import IngestError
from core.explain.precompute import precompute as explain_precompute
from core.ingest.build import Dataset, ModelRun, build_store
from core.models import load_model, predict_classifier, predict_detector
from core.store import Store

CLASSES = [str(d) for d in range(10)]
SIZE = 32


def _scenes(folder, n, rng):
    """Dark images with 1-3 bright squares; returns uris and the squares as GT rows."""
    folder.mkdir(parents=True, exist_ok=True)
    uris, boxes = [], []
    for i in range(n):
        pixels = (rng.random((SIZE, SIZE, 3)) * 40).astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(5, 12))
            x, y = (int(v) for v in rng.integers(0, SIZE - side, 2))
            pixels[y:y + side, x:x + side] = rng.integers(180, 255)
            boxes.append((100 + i, int(rng.integers(0, 10)), x, y, x + side, y + side))
        path = folder / f"im{i:03d}.png"
        Image.fromarray(pixels).save(path)
        uris.append(str(path))
    gt = pd.DataFrame(boxes, columns=["image_id", "class_id", "xmin", "ymin", "xmax", "ymax"])
    gt.insert(1, "gt_id", np.arange(len(gt)))
    return uris, gt


def _model_params(folder, kind, seed):
    torch.manual_seed(seed)
    path = folder / f"{kind}.pt"
    torch.save(build_demo_model(kind).state_dict(), path)
    return {"loader": "core.demo_models:load_demo_model", "kwargs": {"path": str(path), "kind": kind},
            "input_size": [SIZE, SIZE]}


def _inputs(tmp_path, task, n=23):
    rng = np.random.default_rng(7)
    uris, gt = _scenes(tmp_path / "images", n, rng)
    ids = np.arange(100, 100 + n)
    images = pd.DataFrame({"image_id": ids, "uri": uris, "site": rng.choice(["a", "b"], n)})
    if task == "multiclass":
        images["true_label"] = rng.integers(0, 10, n)
        kinds = {"m1": "multiclass-baseline", "m2": "multiclass-candidate"}
    else:
        images["true_label"] = [[] for _ in range(n)]
        kinds = {"m1": "detection-baseline", "m2": "detection-candidate"}
    dataset = Dataset("toy", task, CLASSES, images, gt if task == "detection" else None)
    params = {m: _model_params(tmp_path, kind, seed) for seed, (m, kind) in enumerate(kinds.items())}
    return dataset, params


def _reference(tmp_path, dataset, params, explain=()):
    """build_store with the models run in one process over every image (then ``explain``'s
    maps, computed over the whole store at once)."""
    uris, ids = dataset.images["uri"].tolist(), dataset.images["image_id"].to_numpy()
    runs = []
    for model_id, p in params.items():
        model = load_model(p)
        if dataset.task == "detection":
            runs.append(ModelRun(model_id, model_id, p, det_boxes=predict_detector(
                model, uris, ids, input_size=(SIZE, SIZE), device="cpu")))
        else:
            runs.append(ModelRun(model_id, model_id, p, predictions=predict_classifier(
                model, uris, ids, task=dataset.task, input_size=(SIZE, SIZE), device="cpu")))
    path = build_store(tmp_path / "reference", dataset, runs).path
    if explain:
        explain_precompute(path, list(explain), device="cpu")
    return Store(path)


KEYS = {"images": ["image_id"], "thumbnails": ["image_id"], "columns": ["name"], "models": ["model_id"],
        "predictions": ["model_id", "image_id"], "outcomes": ["model_id", "image_id"],
        "gt_boxes": ["gt_id"], "det_boxes": ["model_id", "det_id"],
        "det_matches": ["model_id", "det_id"], "gt_matches": ["model_id", "gt_id"],
        "explanations": ["model_id", "method", "image_id", "target"],
        "evaluations": ["model_id", "name"]}


def _plain(value):
    if isinstance(value, (list, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return "nan"
    return value


def assert_same_store(got: Store, want: Store) -> None:
    for table, keys in KEYS.items():
        assert got.has_table(table) == want.has_table(table), table
        if not want.has_table(table):
            continue
        want_rows = want.query(f'SELECT * FROM "{table}"')
        got_rows = got.query(f'SELECT * FROM "{table}"')
        assert sorted(got_rows.columns) == sorted(want_rows.columns), table
        assert len(got_rows) == len(want_rows), table
        if not len(want_rows):
            continue
        cols = sorted(want_rows.columns)
        got_rows = got_rows.sort_values(keys).reset_index(drop=True)[cols]
        want_rows = want_rows.sort_values(keys).reset_index(drop=True)[cols]
        for col in cols:
            a, b = got_rows[col].map(_plain).tolist(), want_rows[col].map(_plain).tolist()
            if table == "evaluations" and col == "data":
                for x, y, dtype in zip(a, b, want_rows["dtype"]):
                    np.testing.assert_allclose(np.frombuffer(x, dtype), np.frombuffer(y, dtype), atol=1e-6)
            elif table == "explanations" and col == "data":
                # Quantised maps: a different batch split may move a value by one code.
                for x, y in zip(a, b):
                    assert len(x) == len(y), "explanations.data"
                    np.testing.assert_allclose(np.frombuffer(x, np.uint8).astype(int),
                                               np.frombuffer(y, np.uint8).astype(int), atol=1)
            elif pd.api.types.is_float_dtype(want_rows[col]) or col in ("probs", "match_ious", "match_scores"):
                np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), rtol=1e-5,
                                           atol=1e-6, err_msg=f"{table}.{col}")
            else:
                assert a == b, f"{table}.{col}"


# The whole pipeline in this process for both tasks (explanations too for multiclass); once on
# a process pool.
@pytest.mark.parametrize("engine,task", [("serial", "multiclass"), ("serial", "detection"),
                                         ("process", "multiclass")])
def test_precompute_equals_build_store(tmp_path, engine, task):
    dataset, params = _inputs(tmp_path, task)
    explain = ("guided_backprop",) if engine == "serial" and task == "multiclass" else ()
    want = _reference(tmp_path, dataset, params, explain)
    path = plan_store(tmp_path / "planned", dataset,
                      [ModelRun(m, m, p) for m, p in params.items()])
    pending = Store(path)
    assert pending.image_count() == 0 and pending.scalar(f"SELECT count(*) FROM {PENDING_TABLE}") == 23
    # Partitions of 5 images: 5 partitions, the last one partial.
    report = precompute(path, engine=engine, partition_images=5, workers=2, device="cpu",
                        explain_methods=explain)
    assert set(report.seconds) == ({"metadata", "inference"}
                                   | ({"matching", "evaluation"} if task == "detection" else set())
                                   | ({"explanations"} if explain else set()))
    if explain:
        assert report.rows["explanations"] == 2 * 23  # each model's predicted class, every image
    got = Store(path)
    assert_same_store(got, want)
    # Nothing left to do: a second run writes nothing.
    again = precompute(path, engine="serial", partition_images=5, explain_methods=explain)
    assert again.rows == {"explanations": 0} if explain else again.rows == {}
    assert not list(tmp_path.glob(".planned.*"))  # staging removed


def test_order_key_spans_partitions():
    staged_rows = [pd.DataFrame({"model_id": "m", "class_id": [1, 0], "score": [0.9, 0.5], "image_id": [0, 0],
                                 "rank": [0, 0], "order_key": [0, 1]}),
                   pd.DataFrame({"model_id": "m", "class_id": [0, 1], "score": [0.7, 0.95], "image_id": [1, 1],
                                 "rank": [0, 0], "order_key": [0, 1]})]
    expected = global_order_key(np.array([1, 0, 0, 1]), np.array([0.9, 0.5, 0.7, 0.95]),
                                np.array([0, 0, 1, 1]), np.zeros(4))
    assert expected.tolist() == [3, 1, 0, 2]  # class 0 by score, then class 1 by score
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        staged = StagedTables(folder)
        for i, rows in enumerate(staged_rows):
            staged.add("det_matches", rows, f"m--{i:03d}")
        keys = pa.concat_tables(list(staged.tables("det_matches", order_key_transform(staged))))
    assert keys["order_key"].to_pylist() == expected.tolist()


def test_bad_requests(tmp_path):
    dataset, params = _inputs(tmp_path, "multiclass", n=3)
    with pytest.raises(IngestError, match="loader"):
        plan_store(tmp_path / "p", dataset, [ModelRun("m", "m", {})])
    path = plan_store(tmp_path / "p", dataset, [ModelRun("m1", "m1", params["m1"])])
    with pytest.raises(IngestError, match="unknown precompute step"):
        precompute(path, ["explain"])
    with pytest.raises(IngestError, match="unknown engine"):
        precompute(path, engine="spark")
    with pytest.raises(IngestError, match="partition size"):
        precompute(path, partition_images=0)
    # A model whose loader points nowhere fails with its name, and leaves no parts behind.
    broken = json.loads(json.dumps(params["m1"]))
    broken["kwargs"]["path"] = str(tmp_path / "missing.pt")
    path = plan_store(tmp_path / "q", dataset, [ModelRun("m1", "m1", broken)])
    with pytest.raises(IngestError, match="missing.pt"):
        precompute(path, engine="serial")
    assert Store(path).scalar("SELECT count(*) FROM predictions") == 0


def test_ray_engine_equals_build_store(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")

    dataset, params = _inputs(tmp_path, "detection")
    params = {"m1": params["m1"]}  # one model: one Ray Data pipeline per step
    want = _reference(tmp_path, dataset, params)
    path = plan_store(tmp_path / "planned", dataset, [ModelRun(m, m, p) for m, p in params.items()])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        report = precompute(path, engine="ray", partition_images=8, workers=1, device="cpu")
    finally:
        ray.shutdown()
    assert report.rows["det_matches"] == want.scalar("SELECT count(*) FROM det_matches")
    assert_same_store(Store(path), want)
