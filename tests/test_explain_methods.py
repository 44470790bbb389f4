"""Attribution methods on tiny models whose evidence location is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ExplainError
from core.explain.methods import METHODS, explain_images, run_method

SIZE = 32


class QuadrantClassifier(torch.nn.Module):
    """A CNN that only sees the top-left quadrant (the rest of the input is multiplied by 0)."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, n_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            self.head.weight.abs_()  # every class grows with the features: gradients are not all cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x)
        keep[:, :, : x.shape[2] // 2, : x.shape[3] // 2] = 1.0
        return self.head(self.features(x * keep).mean(dim=(2, 3)))


FAST_PARAMS = {
    "shap": {"max_evals": 120, "batch_size": 64},
    "ig": {"n_steps": 16},
    "guided_backprop": {},
    "guided_gradcam": {},
    "xrai": {"n_steps": 16, "segment_size": SIZE, "scales": [20, 60], "min_segment_size": 8,
             "dilation_radius": 1, "min_pixel_diff": 4},
}


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def quadrant_share(maps: np.ndarray) -> np.ndarray:
    mass = np.abs(maps)
    return mass[:, : SIZE // 2, : SIZE // 2].sum(axis=(1, 2)) / mass.sum(axis=(1, 2))


@pytest.mark.parametrize("method", list(FAST_PARAMS))
@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_attribution_concentrates_where_the_model_looks(method, task):
    maps = explain_images(QuadrantClassifier(), images(), method, np.array([0, 2]), task,
                          **FAST_PARAMS[method])
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (np.abs(maps).sum(axis=(1, 2)) > 0).all()
    assert (quadrant_share(maps) > 0.6).all(), quadrant_share(maps)


def test_several_targets_per_image_equal_one_at_a_time():
    model, x = QuadrantClassifier(), images(2)
    together = run_method(model, x, "ig", [np.array([0, 1]), np.array([2])], "multiclass",
                          {"n_steps": 8})
    alone = explain_images(model, x[[0, 0, 1]], "ig", np.array([0, 1, 2]), "multiclass", n_steps=8)
    np.testing.assert_allclose(np.concatenate(together), alone, rtol=1e-4, atol=1e-7)


def test_ig_completeness_holds_for_probabilities():
    # IG's attributions sum to f(x) - f(baseline); a check on the output being explained.
    model, x = QuadrantClassifier(), images(1)
    maps = explain_images(model, x, "ig", np.array([1]), "multilabel", n_steps=64)
    with torch.no_grad():
        gap = torch.sigmoid(model(x))[0, 1] - torch.sigmoid(model(torch.zeros_like(x)))[0, 1]
    assert maps.sum() == pytest.approx(float(gap), rel=1e-2)


def test_batched_results_equal_single_image_results():
    model, x = QuadrantClassifier(), images(3)
    batched = explain_images(model, x, "guided_gradcam", np.array([0, 1, 2]), "multiclass", batch_size=3)
    single = explain_images(model, x, "guided_gradcam", np.array([0, 1, 2]), "multiclass", batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_results():
    model, x = QuadrantClassifier(), images(2)
    for method in ("ig", "guided_backprop", "xrai"):
        cpu = explain_images(model, x, method, np.array([0, 1]), "multiclass", **FAST_PARAMS[method])
        gpu = explain_images(model, x.cuda(), method, np.array([0, 1]), "multiclass", **FAST_PARAMS[method])
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-5 * np.abs(cpu).max())


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 1, SIZE, SIZE), "RGB"),
    (torch.rand(2, 4, SIZE, SIZE), "RGB"),
    ((torch.rand(2, 3, SIZE, SIZE) * 255).to(torch.uint8), "float"),
    (torch.rand(2, 3, SIZE, SIZE) * 3, r"\[0, 1\]"),
    (np.zeros((2, 3, SIZE, SIZE), np.float32), "torch tensor"),
])
def test_bad_images_are_refused_clearly(bad, message):
    with pytest.raises(ExplainError, match=message) as info:
        explain_images(QuadrantClassifier(), bad, "ig", np.array([0, 1]), "multiclass")
    assert info.value.field == "images"


def test_wrong_input_size_targets_methods_and_params_are_refused():
    model, x = QuadrantClassifier(), images(2)
    with pytest.raises(ExplainError, match="model takes"):
        explain_images(model, x, "ig", np.array([0, 1]), "multiclass", input_size=(64, 64))
    with pytest.raises(ExplainError, match="outside the model's 3 outputs") as info:
        explain_images(model, x, "ig", np.array([0, 3]), "multiclass")
    assert info.value.row == 1
    with pytest.raises(ExplainError, match="2 images"):
        explain_images(model, x, "ig", np.array([0]), "multiclass")
    with pytest.raises(ExplainError, match="does not apply to multiclass"):
        explain_images(model, x, "drise", np.array([[0, 0, 4, 4, 0]] * 2), "multiclass")
    with pytest.raises(ExplainError, match="unknown explanation method"):
        explain_images(model, x, "lime", np.array([0, 1]), "multiclass")
    with pytest.raises(ExplainError, match="unknown parameter 'steps'") as info:
        explain_images(model, x, "ig", np.array([0, 1]), "multiclass", steps=3)
    assert "n_steps" in info.value.choices
    with pytest.raises(ExplainError, match="approximation"):
        explain_images(model, x, "ig", np.array([0, 1]), "multiclass", approximation="simpson")
    with pytest.raises(ExplainError, match="no layer 'head2'"):
        explain_images(model, x, "guided_gradcam", np.array([0, 1]), "multiclass", layer="head2")


def test_every_method_is_registered_with_its_documented_parameters():
    assert set(METHODS) == {"shap", "ig", "guided_backprop", "guided_gradcam", "xrai", "drise"}
    assert {"n_steps", "approximation"} <= set(METHODS["ig"].defaults)
    assert {"n_masks", "grid_size", "seed", "batch_size"} <= set(METHODS["drise"].defaults)
    assert "max_evals" in METHODS["shap"].defaults
