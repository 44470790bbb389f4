"""What the explanation methods share: input checks, the explained output, batching helpers.

Every method is a function ``(model, images, targets, task, **params) -> list[np.ndarray]``:
``images`` float32 ``(B, 3, H, W)`` in [0, 1] on the device to run on, ``targets`` one array
per image (class / label ids for classifiers; rows ``xmin, ymin, xmax, ymax, class_id`` in
model-input pixels for detectors) and the result one float32 ``(K_i, H, W)`` map per image,
a map per target. Several targets of one image share its evaluations.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ExplainError

CLASSIFICATION_TASKS = ("multiclass", "multilabel")
TASKS = (*CLASSIFICATION_TASKS, "detection")
OUTPUTS = ("prob", "logit")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ExplainError(f"unknown task {task!r}", field="task", choices=list(TASKS))


def check_images(images: object) -> torch.Tensor:
    """A float ``(B, 3, H, W)`` tensor in [0, 1], or a clear error saying what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise ExplainError(f"images must be a torch tensor (B, 3, H, W), got {type(images).__name__}",
                           field="images")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ExplainError(f"images must be RGB of shape (B, 3, H, W), got {tuple(images.shape)}; "
                           "load them with core.models.image_tensor (it converts any mode to RGB)",
                           field="images")
    if not images.is_floating_point():
        raise ExplainError(f"images must be float in [0, 1], got {images.dtype}", field="images")
    if images.shape[0] == 0 or images.shape[2] < 2 or images.shape[3] < 2:
        raise ExplainError(f"no pixels to explain in images of shape {tuple(images.shape)}",
                           field="images")
    if images.numel() and (float(images.amin()) < 0.0 or float(images.amax()) > 1.0):
        raise ExplainError("image values must lie in [0, 1]", field="images")
    return images.float()


def check_input_size(images: torch.Tensor, input_size: Sequence[int] | None) -> None:
    """The model was stored with ``input_size`` = (H, W): images of another size are refused."""
    if input_size is not None and tuple(images.shape[2:]) != tuple(int(s) for s in input_size):
        raise ExplainError(f"images are {tuple(images.shape[2:])} (H, W) but the model takes "
                           f"{tuple(input_size)}", field="input_size")


def check_class_targets(targets: Sequence[np.ndarray], n_outputs: int) -> None:
    for row, ids in enumerate(targets):
        bad = ids[(ids < 0) | (ids >= n_outputs)]
        if len(ids) == 0:
            raise ExplainError("no target class given for this image", row=row, field="targets")
        if len(bad):
            raise ExplainError(f"target class {int(bad[0])} is outside the model's "
                               f"{n_outputs} outputs", row=row, field="targets")


class ScoredModel(torch.nn.Module):
    """The classifier output a method explains: probabilities or raw logits.

    Probabilities are softmax for multiclass and per-label sigmoid for multilabel, so a
    multilabel explanation is about one label's own sigmoid output.
    """

    def __init__(self, model: torch.nn.Module, task: str, output: str):
        super().__init__()
        if output not in OUTPUTS:
            raise ExplainError(f"unknown output {output!r}", field="output", choices=list(OUTPUTS))
        self.model, self.task, self.output = model, task, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.output == "logit":
            return logits
        return torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=1)


def output_count(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Number of classifier outputs, from one image."""
    with torch.inference_mode():
        return int(model(images[:1]).shape[1])


def expand_targets(targets: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """Image index per (image, target) pair and the flat target list, in image order."""
    owners = torch.repeat_interleave(torch.arange(len(targets)),
                                     torch.tensor([len(t) for t in targets]))
    flat = [int(v) for t in targets for v in t]
    return owners, flat


def split_by_image(maps: np.ndarray, targets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of ``expand_targets`` for the computed maps."""
    bounds = np.cumsum([len(t) for t in targets])[:-1]
    return [part.astype(np.float32) for part in np.split(maps, bounds)]


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ExplainError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
    return int(value)


@contextlib.contextmanager
def quiet_captum() -> Iterator[None]:
    """Captum warns on every call that it hooks ReLUs and turns on input grads; both expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
        yield
