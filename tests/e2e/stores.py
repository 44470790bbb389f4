"""Small stores of every task for the app tests, built through the real ingest path.

Images are tiny synthetic PNGs drawn with PIL; predictions are seeded random
probabilities and boxes, so each store has correct and incorrect images,
true and false positives and missed objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from core.ingest.build import Dataset, ModelRun, build_store

CLASSES = ["cat", "dog", "bird"]
LABELS = ["sky", "tree", "car", "person"]
SITES = ["north", "south", "east"]
MODELS = ("baseline", "candidate")
# The multiclass baseline can be re-run (explanations from the flyout): a seeded toy CNN.
TINY_LOADER = {"loader": "tests.e2e.stores:tiny_classifier", "kwargs": {"n_classes": len(CLASSES)},
               "input_size": [48, 64]}


def tiny_classifier(n_classes: int, seed: int = 0) -> torch.nn.Module:
    """A few-parameter CNN, the same for the same seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, n_classes))


def _draw_images(folder: Path, n: int, rng: np.random.Generator, boxes: pd.DataFrame | None = None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(n):
        level = int(rng.integers(20, 236))
        image = Image.new("RGB", (64, 48), (level, int(rng.integers(0, 256)), 255 - level))
        draw = ImageDraw.Draw(image)
        if boxes is not None:
            for box in boxes[boxes["image_id"] == i].itertuples():
                draw.rectangle([box.xmin, box.ymin, box.xmax, box.ymax], outline=(255, 255, 255), width=2)
        else:
            draw.ellipse([8, 8, 8 + int(rng.integers(10, 40)), 40], fill=(255 - level, level, 90))
        path = folder / f"img_{i:04d}.png"
        image.save(path)
        uris.append(str(path))
    return uris


def _user_columns(n: int, rng: np.random.Generator) -> dict[str, object]:
    return {"site": [SITES[i % len(SITES)] for i in range(n)],
            "altitude": np.round(rng.uniform(0, 100, n), 1)}


def build_multiclass(folder: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    uris = _draw_images(folder / "demo-multiclass.images", n, rng)
    truth = rng.integers(0, len(CLASSES), n)
    images = pd.DataFrame({"image_id": np.arange(n), "uri": uris, "true_label": truth, **_user_columns(n, rng)})
    runs = []
    for k, model_id in enumerate(MODELS):
        logits = rng.normal(0, 1, (n, len(CLASSES)))
        logits[np.arange(n), truth] += 1.5 + k  # the candidate is right more often
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        params = TINY_LOADER if model_id == "baseline" else {}
        runs.append(ModelRun(model_id, model_id.capitalize(), params, pd.DataFrame(
            {"image_id": np.arange(n), "probs": list(probs.astype(np.float32))})))
    dataset = Dataset("demo-multiclass", "multiclass", CLASSES, images)
    return build_store(folder / "demo-multiclass", dataset, runs).path


def build_multilabel(folder: Path, n: int = 40, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    uris = _draw_images(folder / "demo-multilabel.images", n, rng)
    present = rng.random((n, len(LABELS))) < 0.4
    truth = [np.flatnonzero(row).astype(np.int32) for row in present]
    images = pd.DataFrame({"image_id": np.arange(n), "uri": uris, "true_label": truth, **_user_columns(n, rng)})
    runs = []
    for k, model_id in enumerate(MODELS):
        logits = rng.normal(0, 1, (n, len(LABELS))) + np.where(present, 1.2 + k, -1.2 - k)
        probs = 1 / (1 + np.exp(-logits))
        runs.append(ModelRun(model_id, model_id.capitalize(), {}, pd.DataFrame(
            {"image_id": np.arange(n), "probs": list(probs.astype(np.float32))})))
    dataset = Dataset("demo-multilabel", "multilabel", LABELS, images)
    return build_store(folder / "demo-multilabel", dataset, runs, threshold=0.5).path


def build_detection(folder: Path, n: int = 30, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    gt_rows = []
    for image_id in range(n):
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 36), rng.uniform(0, 24)
            w, h = rng.uniform(10, 26), rng.uniform(8, 22)
            gt_rows.append((image_id, int(rng.integers(0, len(CLASSES))), x, y, min(x + w, 63), min(y + h, 47)))
    gt = pd.DataFrame(gt_rows, columns=["image_id", "class_id", "xmin", "ymin", "xmax", "ymax"])
    gt.insert(1, "gt_id", np.arange(len(gt)))
    uris = _draw_images(folder / "demo-detection.images", n, rng, gt)
    images = pd.DataFrame({"image_id": np.arange(n), "uri": uris, "true_label": [[] for _ in range(n)],
                           **_user_columns(n, rng)})
    runs = []
    for k, model_id in enumerate(MODELS):
        keep = rng.random(len(gt)) < 0.7 + 0.15 * k
        found = gt[keep].copy()
        jitter = rng.normal(0, 2.0 - k, (len(found), 4))
        found[["xmin", "ymin", "xmax", "ymax"]] += jitter
        found["xmax"] = np.maximum(found["xmax"], found["xmin"] + 1)
        found["ymax"] = np.maximum(found["ymax"], found["ymin"] + 1)
        wrong = rng.random(len(found)) < 0.15
        found.loc[wrong, "class_id"] = (found.loc[wrong, "class_id"] + 1) % len(CLASSES)
        found["score"] = rng.uniform(0.3, 1.0, len(found))
        spurious = pd.DataFrame({"image_id": rng.integers(0, n, n // 3), "class_id": rng.integers(0, len(CLASSES), n // 3),
                                 "xmin": 2.0, "ymin": 2.0, "xmax": 14.0, "ymax": 12.0,
                                 "score": rng.uniform(0.1, 0.8, n // 3)})
        dets = pd.concat([found.drop(columns="gt_id"), spurious], ignore_index=True)
        runs.append(ModelRun(model_id, model_id.capitalize(), {}, det_boxes=dets))
    dataset = Dataset("demo-detection", "detection", CLASSES, images, gt_boxes=gt)
    return build_store(folder / "demo-detection", dataset, runs).path


def build_all(folder: Path) -> dict[str, Path]:
    """The three stores, named like the demo stores, in ``folder``."""
    return {"multiclass": build_multiclass(folder), "multilabel": build_multilabel(folder),
            "detection": build_detection(folder)}
