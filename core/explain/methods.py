"""The method registry: which methods exist, for which task, with which default parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ExplainError
from .captum_methods import explain_guided_backprop, explain_guided_gradcam, explain_ig
from .common import CLASSIFICATION_TASKS, check_images, check_input_size, check_task
from .drise import explain_drise
from .shap_method import explain_shap
from .xrai import SCALES, explain_xrai


@dataclass(frozen=True)
class Method:
    name: str
    function: Callable[..., list[np.ndarray]]
    tasks: tuple[str, ...]
    defaults: dict
    signed: bool  # whether the map's sign carries meaning (drives the overlay colour map)


# ``output``: 'prob' explains softmax (multiclass) or the label's sigmoid (multilabel);
# 'logit' the raw score. Gradient-only methods default to logits, as the Grad-CAM paper
# does, because a saturated softmax has near-zero, sign-noisy gradients.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("shap", explain_shap, CLASSIFICATION_TASKS,
           {"max_evals": 500, "batch_size": 64, "mask_value": "blur", "blur_kernel": None,
            "output": "prob"}, signed=True),
    Method("ig", explain_ig, CLASSIFICATION_TASKS,
           {"n_steps": 50, "approximation": "gausslegendre", "baseline": 0.0, "batch_size": 256,
            "output": "prob"}, signed=True),
    Method("guided_backprop", explain_guided_backprop, CLASSIFICATION_TASKS,
           {"batch_size": 64, "output": "logit"}, signed=True),
    Method("guided_gradcam", explain_guided_gradcam, CLASSIFICATION_TASKS,
           {"layer": None, "interpolate_mode": "nearest", "batch_size": 64, "output": "logit"},
           signed=True),
    Method("xrai", explain_xrai, CLASSIFICATION_TASKS,
           {"n_steps": 50, "approximation": "gausslegendre", "batch_size": 256, "scales": list(SCALES),
            "sigma": 0.8, "min_segment_size": 150, "segment_size": 224, "dilation_radius": 5,
            "area_threshold": 1.0, "min_pixel_diff": 50, "output": "prob"}, signed=True),
    Method("drise", explain_drise, ("detection",),
           {"n_masks": 1000, "grid_size": 16, "keep_prob": 0.5, "seed": 0, "batch_size": 64},
           signed=False),
)}


def method_for(name: str, task: str) -> Method:
    """The registry entry, or a clear error when it does not exist or fit the task."""
    check_task(task)
    if name not in METHODS:
        raise ExplainError(f"unknown explanation method {name!r}", field="method", choices=list(METHODS))
    method = METHODS[name]
    if task not in method.tasks:
        fits = [m for m, entry in METHODS.items() if task in entry.tasks]
        raise ExplainError(f"method {name!r} does not apply to {task} models", field="method",
                           choices=fits)
    return method


def resolve_params(method: Method, params: dict | None) -> dict:
    """Defaults overridden by ``params``; unknown names are refused."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        raise ExplainError(f"unknown parameter {unknown[0]!r} for {method.name}", field=unknown[0],
                           choices=sorted(method.defaults))
    return {**method.defaults, **params}


def run_method(model: torch.nn.Module, images: torch.Tensor, method: str,
               targets: Sequence[np.ndarray], task: str, params: dict | None = None
               ) -> list[np.ndarray]:
    """One float32 (K_i, H, W) map per image, for its K_i targets (see ``common``)."""
    entry = method_for(method, task)
    images = check_images(images)
    if len(targets) != len(images):
        raise ExplainError(f"{len(targets)} target lists for {len(images)} images", field="targets")
    model = model.to(images.device).eval()
    return entry.function(model, images, targets, task, **resolve_params(entry, params))


def explain_images(model: torch.nn.Module, images: torch.Tensor, method: str, targets, task: str,
                   *, input_size: Sequence[int] | None = None, **params) -> np.ndarray:
    """Attribution maps (B, H, W) float32, one per image and its target.

    ``images``: float32 (B, 3, H, W) in [0, 1] (``core.models.image_tensor``), on the device
    to run on (the model is moved there). ``targets``: B class / label ids for classifiers;
    for detectors B rows ``[xmin, ymin, xmax, ymax, class_id]`` in the images' pixels (an
    array or a DataFrame with those columns). ``input_size`` (H, W), when given, must match
    the images. ``params`` override the method's defaults (``METHODS[method].defaults``).
    """
    images = check_images(images)
    check_input_size(images, input_size)
    if task in CLASSIFICATION_TASKS:
        ids = np.asarray(targets).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ExplainError("classification targets must be integer class ids", field="targets")
        per_image = [ids[i:i + 1] for i in range(len(ids))]
    else:
        rows = _box_rows(targets)
        per_image = [rows[i:i + 1] for i in range(len(rows))]
    maps = run_method(model, images, method, per_image, task, params)
    return np.concatenate(maps).astype(np.float32)


def _box_rows(targets) -> np.ndarray:
    columns = ["xmin", "ymin", "xmax", "ymax", "class_id"]
    if hasattr(targets, "columns"):
        missing = [c for c in columns if c not in targets.columns]
        if missing:
            raise ExplainError(f"detection targets lack column {missing[0]!r}", field="targets",
                               choices=columns)
        targets = targets[columns].to_numpy()
    rows = np.asarray(targets, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != 5:
        raise ExplainError(f"detection targets must be rows [xmin, ymin, xmax, ymax, class_id], "
                           f"got shape {rows.shape}", field="targets")
    return rows
