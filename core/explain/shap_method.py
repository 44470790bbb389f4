"""SHAP (Owen values) for classifiers: shap's Image masker with the Partition explainer.

The masker's axis-aligned partition tree over (H, W, C) defines the coalitions; every
masked image the explainer asks for is evaluated through the model in batches of
``batch_size``. Hidden pixels are first set to NaN by the masker and then replaced, on
the device, by this image's baseline (a box blur of the image, as shap's ``blur(k, k)``
masker does, or a constant), so one explainer serves all images without OpenCV.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExplainError
from .common import ScoredModel, check_class_targets, check_positive_int, output_count


def box_blur(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over a ``kernel`` x ``kernel`` window, edges replicated (separable)."""
    left = (kernel - 1) // 2
    right = kernel - 1 - left
    padded = F.pad(images, (left, right, left, right), mode="replicate")
    rows = F.avg_pool2d(padded, (1, kernel), stride=1)
    return F.avg_pool2d(rows, (kernel, 1), stride=1)


def masking_baselines(images: torch.Tensor, mask_value: float | str,
                      blur_kernel: int | None) -> torch.Tensor:
    """What hidden pixels show: ``'blur'`` (default kernel: half the shorter side) or a value."""
    if mask_value == "blur":
        kernel = blur_kernel if blur_kernel is not None else max(1, min(images.shape[2:]) // 2)
        return box_blur(images, check_positive_int("blur_kernel", kernel))
    if isinstance(mask_value, (int, float)) and not isinstance(mask_value, bool) and 0 <= mask_value <= 1:
        return torch.full_like(images, float(mask_value))
    raise ExplainError(f"mask_value must be 'blur' or a number in [0, 1], got {mask_value!r}",
                       field="mask_value")


def explain_shap(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[np.ndarray],
                 task: str, *, max_evals: int, batch_size: int, mask_value: float | str,
                 blur_kernel: int | None, output: str) -> list[np.ndarray]:
    """Owen values per pixel (summed over channels) for each image's targets."""
    import shap  # slow to import (numba); only this method needs it

    max_evals = check_positive_int("max_evals", max_evals, minimum=3)
    batch_size = check_positive_int("batch_size", batch_size)
    check_class_targets(targets, output_count(model, images))
    scored = ScoredModel(model, task, output)
    baselines = masking_baselines(images, mask_value, blur_kernel)
    _, _, height, width = images.shape
    current = {}

    def evaluate(masked: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(masked, dtype=np.float32))
        batch = batch.to(images.device).permute(0, 3, 1, 2)
        batch = torch.where(torch.isnan(batch), current["baseline"], batch)
        with torch.inference_mode():
            return scored(batch).double().cpu().numpy()

    masker = shap.maskers.Image(np.nan, (height, width, 3))
    # The fill depends on the image explained, so the explainer must not reuse one
    # image's base value for the next.
    masker.fixed_background = False
    explainer = shap.explainers.Partition(evaluate, masker)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    maps = []
    for index, ids in enumerate(targets):
        current["baseline"] = baselines[index:index + 1]
        explanation = explainer(pixels[index:index + 1], max_evals=max_evals, batch_size=batch_size,
                                outputs=np.asarray(ids, dtype=np.int64), silent=True)
        values = np.asarray(explanation.values[0]).reshape(height, width, 3, len(ids))
        maps.append(values.sum(axis=2).transpose(2, 0, 1).astype(np.float32))
    return maps
