"""Attribution maps for classifiers (SHAP, IG, Guided Backprop, Guided Grad-CAM, XRAI) and
detectors (D-RISE), computed in batches on the GPU when present, stored quantised.

    explain_images(model, images, method, targets, task, **params) -> (B, H, W) float32
    load_explanation(store, model_id, image_id, method, target) -> map | None
    available_explanations(store, model_id, image_id) -> DataFrame
    core.explain.precompute.precompute(store_path, methods, *, model_id=None, image_ids=None,
        targets='pred', top_k=1, device=None, batch_size=16, params=None, progress=None)
        -> rows written  (import it from its module: the name is also the module's)

Reading stored maps imports neither captum nor shap: the computing side loads on first use.
"""

from __future__ import annotations

from .storage import available_explanations, load_explanation

_LAZY = {"explain_images": "methods", "METHODS": "methods", "precompute_main": "precompute"}

__all__ = ["available_explanations", "load_explanation", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
