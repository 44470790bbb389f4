"""D-RISE: mask generation, the similarity formula, where saliency lands, batching and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from core.errors import ExplainError
from core.explain.drise import rise_masks
from core.explain.methods import explain_images

SIZE = 32


class LeftHalfDetector(torch.nn.Module):
    """Always proposes the left and the right half; class 0 grows with the left half's brightness."""

    def forward(self, x: torch.Tensor) -> list[dict]:
        b, _, h, w = x.shape
        left = x[:, :, :, : w // 2].mean(dim=(1, 2, 3))
        p0 = torch.sigmoid(12 * (left - 0.35))
        probs = torch.stack([p0, 1 - p0], dim=1)
        boxes = torch.tensor([[0, 0, w / 2, h], [w / 2, 0, w, h]], dtype=torch.float32)
        return [{"boxes": boxes, "scores": probs[i].max().repeat(2), "labels": probs[i].argmax().repeat(2),
                 "class_probs": probs[i].repeat(2, 1)} for i in range(b)]


class FixedDetector(torch.nn.Module):
    """Returns the same detection whatever it sees (to check the similarity formula)."""

    def __init__(self, box, class_probs=None, label=0, objectness=None):
        super().__init__()
        self.box, self.class_probs, self.label, self.objectness = box, class_probs, label, objectness

    def forward(self, x):
        out = {"boxes": torch.tensor([self.box], dtype=torch.float32), "scores": torch.tensor([0.9]),
               "labels": torch.tensor([self.label])}
        if self.class_probs is not None:
            out["class_probs"] = torch.tensor([self.class_probs])
        if self.objectness is not None:
            out["objectness"] = torch.tensor([self.objectness])
        return [dict(out) for _ in range(len(x))]


def bright_images(n: int = 2) -> torch.Tensor:
    return 0.5 + 0.5 * torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


PARAMS = {"n_masks": 200, "grid_size": 4}


def test_saliency_lands_where_the_detector_looks_not_under_the_box():
    # The target is the right-half box, but its class evidence is the left half.
    targets = np.array([[16, 0, 32, 32, 0], [0, 0, 16, 32, 0]])
    maps = explain_images(LeftHalfDetector(), bright_images(), "drise", targets, "detection", **PARAMS)
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    above_floor = maps - maps.min(axis=(1, 2), keepdims=True)
    share = above_floor[:, :, : SIZE // 2].sum(axis=(1, 2)) / above_floor.sum(axis=(1, 2))
    assert (share > 0.6).all(), share


def test_similarity_is_iou_times_cosine_times_objectness():
    target = [4.0, 4.0, 20.0, 20.0, 0]
    shifted = [8.0, 4.0, 24.0, 20.0]
    iou = float(box_iou(torch.tensor([shifted]), torch.tensor([target[:4]]))[0, 0])
    masks = rise_masks(50, 4, 0.5, (SIZE, SIZE), seed=3).numpy()
    cases = [
        (FixedDetector(shifted, [0.6, 0.8], objectness=0.5), iou * 0.6 * 0.5),
        (FixedDetector(shifted, [0.6, 0.8]), iou * 0.6),  # no objectness: 1
        (FixedDetector(shifted, label=0), iou * 1.0),  # no class_probs: one-hot of the label
        (FixedDetector(shifted, label=1), 0.0),
    ]
    for detector, weight in cases:
        got = explain_images(detector, bright_images(1), "drise", np.array([target]), "detection",
                             n_masks=50, grid_size=4, seed=3)[0]
        np.testing.assert_allclose(got, weight * masks.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_a_detector_that_finds_nothing_gives_a_zero_map():
    class Blind(torch.nn.Module):
        def forward(self, x):
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                     "labels": torch.zeros(0, dtype=torch.long),
                     "class_probs": torch.zeros(0, 2)} for _ in range(len(x))]

    maps = explain_images(Blind(), bright_images(1), "drise", np.array([[0, 0, 8, 8, 1]]), "detection",
                          n_masks=20, grid_size=4)
    assert maps.shape == (1, SIZE, SIZE) and not maps.any()


def test_masks_are_seeded_smooth_and_keep_about_keep_prob():
    a = rise_masks(400, 8, 0.3, (SIZE, 24), seed=5)
    b = rise_masks(400, 8, 0.3, (SIZE, 24), seed=5)
    assert a.shape == (400, SIZE, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, rise_masks(400, 8, 0.3, (SIZE, 24), seed=6))
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert float(a.mean()) == pytest.approx(0.3, abs=0.03)


def test_batching_does_not_change_the_result_and_seed_does():
    targets = np.array([[16, 0, 32, 32, 0], [0, 0, 16, 32, 1]])
    model, x, params = LeftHalfDetector(), bright_images(), {"n_masks": 40, "grid_size": 4}
    big = explain_images(model, x, "drise", targets, "detection", batch_size=80, **params)
    small = explain_images(model, x, "drise", targets, "detection", batch_size=7, **params)
    np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-8)
    other = explain_images(model, x, "drise", targets, "detection", seed=9, **params)
    assert not np.allclose(big, other)


def test_targets_can_be_a_dataframe():
    import pandas as pd

    frame = pd.DataFrame({"xmin": [16.0], "ymin": [0.0], "xmax": [32.0], "ymax": [32.0], "class_id": [0]})
    from_frame = explain_images(LeftHalfDetector(), bright_images(1), "drise", frame, "detection", **PARAMS)
    from_array = explain_images(LeftHalfDetector(), bright_images(1), "drise",
                                np.array([[16, 0, 32, 32, 0]]), "detection", **PARAMS)
    np.testing.assert_array_equal(from_frame, from_array)


@pytest.mark.parametrize("targets, message", [
    (np.zeros((0, 5)), "2 images"),
    (np.array([[16, 0, 8, 32, 0], [0, 0, 16, 32, 0]]), "xmax > xmin"),
    (np.array([[16, 0, 32, 32, -1], [0, 0, 16, 32, 0]]), "class id"),
    (np.array([[16, 0, 32, 32], [0, 0, 16, 32]]), r"\[xmin, ymin, xmax, ymax, class_id\]"),
])
def test_bad_detection_targets_are_refused(targets, message):
    with pytest.raises(ExplainError, match=message):
        explain_images(LeftHalfDetector(), bright_images(), "drise", targets, "detection", **PARAMS)


def test_classification_methods_do_not_apply_to_detectors():
    with pytest.raises(ExplainError, match="does not apply to detection") as info:
        explain_images(LeftHalfDetector(), bright_images(), "ig", np.array([[0, 0, 8, 8, 0]] * 2),
                       "detection")
    assert info.value.choices == ["drise"]


def test_bad_mask_parameters_are_refused():
    with pytest.raises(ExplainError, match="keep_prob"):
        explain_images(LeftHalfDetector(), bright_images(1), "drise", np.array([[0, 0, 8, 8, 0]]),
                       "detection", keep_prob=1.5)
    with pytest.raises(ExplainError, match="n_masks"):
        explain_images(LeftHalfDetector(), bright_images(1), "drise", np.array([[0, 0, 8, 8, 0]]),
                       "detection", n_masks=0)
