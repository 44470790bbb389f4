"""Load a torch model from a store's ``models.params`` and run it in batches.

Classifiers (multiclass and multilabel) map float32 ``(B, 3, H, W)`` in [0, 1] to
logits ``(B, C)``. Detectors map the same input to a list of dicts with
``boxes`` (xyxy pixels), ``scores``, ``labels`` and ``class_probs``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .errors import IngestError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def device_for(name: str | None = None) -> torch.device:
    """``cuda`` when asked for or available, else ``cpu``."""
    if name:
        if name == "cuda" and not torch.cuda.is_available():
            raise IngestError("--device cuda asked for, but no CUDA device is available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve(spec: str) -> Callable:
    """``package.module:function`` → the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise IngestError(f"model loader {spec!r} is not of the form module:function", field="loader")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise IngestError(f"cannot import {module_name!r}: {exc} (it must be importable wherever VisionLens runs "
                          "it, the app included: install its package, or add its folder to PYTHONPATH)",
                          field="loader") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise IngestError(f"module {module_name!r} has no {attr!r}", field="loader") from exc


def load_model(params: dict) -> torch.nn.Module:
    """Build the model described by a ``models.params`` dict, in eval mode."""
    loader = params.get("loader")
    if not loader:
        raise IngestError("this model was stored from a predictions file; it cannot be re-run",
                          field="loader")
    model = resolve(loader)(**params.get("kwargs", {}))
    if not isinstance(model, torch.nn.Module):
        raise IngestError(f"{loader} returned {type(model).__name__}, not a torch.nn.Module",
                          field="loader")
    return model.eval()


def to_rgb_array(image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``; resized to ``size`` = (H, W) when given."""
    from .metadata import as_rgb

    image = as_rgb(image)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def image_tensor(images: Sequence[str | Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Load paths or PIL images into float32 ``(B, 3, H, W)`` in [0, 1]."""
    arrays = []
    for item in images:
        if isinstance(item, Image.Image):
            arrays.append(to_rgb_array(item, size))
            continue
        try:
            with Image.open(item) as im:
                arrays.append(to_rgb_array(im, size))
        except (OSError, ValueError) as exc:
            raise IngestError(f"cannot read image: {exc}", file=str(item)) from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise IngestError(f"images of different sizes {sorted(shapes)} in one batch; give input_size")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return batch


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.inference_mode()
def predict_classifier(model: torch.nn.Module, uris: Sequence[str], image_ids: Sequence[int], *,
                       task: str, input_size: tuple[int, int] | None, threshold: float = 0.5,
                       batch_size: int = 256, device: str | None = None,
                       progress: Progress | None = None) -> pd.DataFrame:
    """Predictions table rows (image_id, pred_label, score, probs | probs, pred_labels)."""
    dev = device_for(device)
    model = model.to(dev)
    probs_all = []
    for i, part in enumerate(_batches(len(uris), batch_size)):
        x = image_tensor(uris[part], input_size).to(dev)
        logits = model(x).float()
        probs = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
        probs_all.append(probs.cpu().numpy())
        if progress:
            progress(part.stop, len(uris))
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, 0), np.float32)
    return classifier_frame(np.asarray(image_ids), probs, task=task, threshold=threshold)


def classifier_frame(image_ids: np.ndarray, probs: np.ndarray, *, task: str,
                     threshold: float = 0.5) -> pd.DataFrame:
    """Predictions rows from a probability matrix (rows aligned with ``image_ids``)."""
    probs = probs.astype(np.float32)
    frame = pd.DataFrame({"image_id": image_ids.astype(np.int32)})
    frame["probs"] = list(probs)
    if task == "multilabel":
        frame["pred_labels"] = [np.flatnonzero(row >= threshold).astype(np.int32) for row in probs]
    else:
        frame["pred_label"] = probs.argmax(axis=1).astype(np.int32)
        frame["score"] = probs.max(axis=1)
    return frame


@torch.inference_mode()
def predict_detector(model: torch.nn.Module, uris: Sequence[str], image_ids: Sequence[int], *,
                     input_size: tuple[int, int] | None = None, batch_size: int = 64,
                     device: str | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """det_boxes rows (image_id, det_id, class_id, score, xmin, ymin, xmax, ymax, area)."""
    dev = device_for(device)
    model = model.to(dev)
    frames = []
    for part in _batches(len(uris), batch_size):
        x = image_tensor(uris[part], input_size).to(dev)
        outputs = model(x)
        for uri, image_id, out in zip(uris[part], image_ids[part], outputs):
            boxes = out["boxes"].float().cpu().numpy().reshape(-1, 4)
            if input_size is not None:
                # The model saw a resized image: boxes go back to the file's pixels.
                with Image.open(uri) as im:
                    width, height = im.size
                boxes = boxes * np.array([width / input_size[1], height / input_size[0]] * 2)
            frames.append(pd.DataFrame({
                "image_id": np.full(len(boxes), image_id, np.int32),
                "class_id": out["labels"].cpu().numpy().astype(np.int32),
                "score": out["scores"].float().cpu().numpy().astype(np.float64),
                "xmin": boxes[:, 0].astype(np.float64), "ymin": boxes[:, 1].astype(np.float64),
                "xmax": boxes[:, 2].astype(np.float64), "ymax": boxes[:, 3].astype(np.float64),
            }))
        if progress:
            progress(part.stop, len(uris))
    dets = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image_id", "class_id", "score", "xmin", "ymin", "xmax", "ymax"])
    dets.insert(1, "det_id", np.arange(len(dets), dtype=np.int32))
    dets["area"] = (dets["xmax"] - dets["xmin"]) * (dets["ymax"] - dets["ymin"])
    return dets
