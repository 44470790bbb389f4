"""Integrated Gradients, Guided Backprop and Guided Grad-CAM through captum 0.9.

Each works on all (image, target) pairs at once, ``batch_size`` examples (for IG: path
points) per forward/backward pass. Channel attributions are summed into one signed map
per pair, which keeps IG's completeness (the map sums to f(x) - f(baseline)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from captum.attr import GuidedBackprop, GuidedGradCam, IntegratedGradients

from ..errors import ExplainError
from .common import (ScoredModel, check_class_targets, check_positive_int, chunks, expand_targets,
                     output_count, quiet_captum, split_by_image)

IG_APPROXIMATIONS = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle",
                     "riemann_trapezoid")
INTERPOLATE_MODES = ("nearest", "bilinear", "area")


def integrated_gradients(scored: torch.nn.Module, inputs: torch.Tensor, baselines: torch.Tensor,
                         targets: list[int], *, n_steps: int, approximation: str,
                         batch_size: int) -> torch.Tensor:
    """IG attributions ``(N, 3, H, W)`` of ``scored`` for each input row and its target.

    ``batch_size`` bounds path points per pass: examples are taken ``batch_size`` at a time
    and captum splits their ``n_steps`` points into passes of at most ``batch_size``.
    """
    n_steps = check_positive_int("n_steps", n_steps)
    batch_size = check_positive_int("batch_size", batch_size)
    if approximation not in IG_APPROXIMATIONS:
        raise ExplainError(f"unknown IG approximation {approximation!r}", field="approximation",
                           choices=list(IG_APPROXIMATIONS))
    ig = IntegratedGradients(scored)
    parts = []
    with torch.enable_grad(), quiet_captum():
        for part in chunks(len(inputs), batch_size):
            parts.append(ig.attribute(inputs[part], baselines=baselines[part], target=targets[part],
                                      n_steps=n_steps, method=approximation,
                                      internal_batch_size=batch_size).detach())
    return torch.cat(parts)


def _pairs(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[np.ndarray]
           ) -> tuple[torch.Tensor, list[int]]:
    check_class_targets(targets, output_count(model, images))
    owners, flat = expand_targets(targets)
    return images[owners.to(images.device)], flat


def explain_ig(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[np.ndarray],
               task: str, *, n_steps: int, approximation: str, baseline: float, batch_size: int,
               output: str) -> list[np.ndarray]:
    """Integrated Gradients from a constant ``baseline`` image (0 = black)."""
    inputs, flat = _pairs(model, images, targets)
    scored = ScoredModel(model, task, output)
    attr = integrated_gradients(scored, inputs, torch.full_like(inputs, float(baseline)), flat,
                                n_steps=n_steps, approximation=approximation, batch_size=batch_size)
    return split_by_image(attr.sum(dim=1).cpu().numpy(), targets)


def explain_guided_backprop(model: torch.nn.Module, images: torch.Tensor,
                            targets: Sequence[np.ndarray], task: str, *, batch_size: int,
                            output: str) -> list[np.ndarray]:
    """Guided Backprop (ReLU modules pass only positive gradients back)."""
    inputs, flat = _pairs(model, images, targets)
    attribution = GuidedBackprop(ScoredModel(model, task, output))
    return split_by_image(_run(attribution, inputs, flat, batch_size), targets)


def explain_guided_gradcam(model: torch.nn.Module, images: torch.Tensor,
                           targets: Sequence[np.ndarray], task: str, *, layer: str | None,
                           interpolate_mode: str, batch_size: int, output: str) -> list[np.ndarray]:
    """Guided Backprop times the upsampled, rectified Grad-CAM of ``layer``.

    ``layer`` names a module of the model (``model.named_modules()``); by default the last
    ``Conv2d``, as in the Grad-CAM paper.
    """
    if interpolate_mode not in INTERPOLATE_MODES:
        raise ExplainError(f"unknown interpolate_mode {interpolate_mode!r}", field="interpolate_mode",
                           choices=list(INTERPOLATE_MODES))
    inputs, flat = _pairs(model, images, targets)
    attribution = GuidedGradCam(ScoredModel(model, task, output), _find_layer(model, layer))
    return split_by_image(_run(attribution, inputs, flat, batch_size,
                               interpolate_mode=interpolate_mode), targets)


def _run(attribution, inputs: torch.Tensor, targets: list[int], batch_size: int,
         **kwargs) -> np.ndarray:
    batch_size = check_positive_int("batch_size", batch_size)
    parts = []
    with torch.enable_grad(), quiet_captum():
        for part in chunks(len(inputs), batch_size):
            attr = attribution.attribute(inputs[part], target=targets[part], **kwargs)
            parts.append(attr.detach().sum(dim=1).cpu())
    return torch.cat(parts).numpy()


def _find_layer(model: torch.nn.Module, name: str | None) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or not name:
            raise ExplainError(f"the model has no layer {name!r}", field="layer",
                               choices=[n for n in modules if n])
        return modules[name]
    convs = [m for m in modules.values() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ExplainError("Guided Grad-CAM needs a convolutional layer; this model has none "
                           "(name one with params layer=...)", field="layer")
    return convs[-1]
