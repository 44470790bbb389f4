"""D-RISE (Petsiuk et al., CVPR 2021): saliency of one detection from random masks.

Masks are RISE masks: a ``grid_size`` x ``grid_size`` grid of cells kept with probability
``keep_prob``, upsampled bilinearly to ``grid_size + 1`` cells and cropped at a random
shift. The same seeded masks (drawn on the CPU, so every device sees the same ones) serve
every image. Each masked image ``I * M_i`` goes through the detector, ``batch_size``
masked images per forward pass; a mask's weight for a target detection d_t is the best
similarity over the masked image's detections d_j:

    s(d_t, d_j) = IoU(L_t, L_j) * cos(P_t, P_j) * O_j

with P_t the one-hot vector of the target's class, P_j the detection's ``class_probs``
(one-hot of its label when the detector gives none) and O_j its ``objectness`` (1 when the
detector has none). The saliency map is the weighted mean of the masks.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from ..errors import ExplainError
from .common import check_positive_int, chunks


def rise_masks(n_masks: int, grid_size: int, keep_prob: float, size: tuple[int, int],
               seed: int) -> torch.Tensor:
    """Float32 masks (n_masks, H, W) in [0, 1], the same for a given seed on every machine."""
    height, width = size
    generator = torch.Generator().manual_seed(int(seed))
    cell_h, cell_w = math.ceil(height / grid_size), math.ceil(width / grid_size)
    cells = (torch.rand(n_masks, 1, grid_size, grid_size, generator=generator) < keep_prob).float()
    smooth = F.interpolate(cells, size=((grid_size + 1) * cell_h, (grid_size + 1) * cell_w),
                           mode="bilinear", align_corners=False)[:, 0]
    shift_y = torch.randint(0, cell_h, (n_masks,), generator=generator)
    shift_x = torch.randint(0, cell_w, (n_masks,), generator=generator)
    rows = (shift_y[:, None] + torch.arange(height))[:, :, None]
    cols = (shift_x[:, None] + torch.arange(width))[:, None, :]
    return smooth[torch.arange(n_masks)[:, None, None], rows, cols]


def check_box_targets(targets: Sequence[np.ndarray]) -> None:
    for row, boxes in enumerate(targets):
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 5 or len(boxes) == 0:
            raise ExplainError("each image needs at least one target detection given as "
                               "[xmin, ymin, xmax, ymax, class_id]", row=row, field="targets")
        if not np.isfinite(boxes).all() or (boxes[:, 2] <= boxes[:, 0]).any() \
                or (boxes[:, 3] <= boxes[:, 1]).any() or (boxes[:, 4] < 0).any():
            raise ExplainError("target boxes need xmax > xmin, ymax > ymin and a class id >= 0",
                               row=row, field="targets")


def _detections(outputs: list[dict], n_classes: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated boxes, class probabilities, objectness and owning row of a batch's output."""
    counts = torch.tensor([len(out["boxes"]) for out in outputs], device=device)
    owner = torch.repeat_interleave(torch.arange(len(outputs), device=device), counts)
    boxes = torch.cat([out["boxes"].float().reshape(-1, 4) for out in outputs]).to(device)
    probs = []
    for out in outputs:
        if "class_probs" in out:
            found = len(out["boxes"])
            class_probs = out["class_probs"].float()
            probs.append(class_probs.reshape(found, -1) if found else class_probs.new_zeros(0, n_classes))
        else:
            labels = out["labels"].long().reshape(-1)
            columns = max(n_classes, int(labels.max()) + 1 if len(labels) else 0)
            probs.append(F.one_hot(labels, columns).float())
    width = max(n_classes, max(p.shape[1] for p in probs))
    probs = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in probs]).to(device)
    objectness = torch.cat([out["objectness"].float().reshape(-1) if "objectness" in out
                            else torch.ones(len(out["boxes"]), device=device) for out in outputs])
    return boxes, probs, objectness.to(device), owner


def explain_drise(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[np.ndarray],
                  task: str, *, n_masks: int, grid_size: int, keep_prob: float, seed: int,
                  batch_size: int) -> list[np.ndarray]:
    """D-RISE maps, one per target detection of each image."""
    check_box_targets(targets)
    n_masks = check_positive_int("n_masks", n_masks)
    grid_size = check_positive_int("grid_size", grid_size)
    batch_size = check_positive_int("batch_size", batch_size)
    if not 0.0 < keep_prob < 1.0:
        raise ExplainError(f"keep_prob must lie in (0, 1), got {keep_prob!r}", field="keep_prob")
    device = images.device
    n_images, _, height, width = images.shape
    masks = rise_masks(n_masks, grid_size, keep_prob, (height, width), seed).to(device)
    flat_masks = masks.reshape(n_masks, -1)
    target_rows = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.float64) for t in targets]))
    target_image = torch.repeat_interleave(torch.arange(n_images),
                                           torch.tensor([len(t) for t in targets])).to(device)
    target_boxes = target_rows[:, :4].float().to(device)
    target_class = target_rows[:, 4].long().to(device)
    n_classes = int(target_class.max()) + 1
    saliency = torch.zeros(len(target_rows), height * width, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for part in chunks(n_images * n_masks, batch_size):
            pairs = torch.arange(part.start, part.stop, device=device)
            image_of, mask_of = pairs // n_masks, pairs % n_masks
            outputs = model(images[image_of] * masks[mask_of][:, None])
            boxes, probs, objectness, owner = _detections(outputs, n_classes, device)
            weights = torch.zeros(len(pairs), len(target_rows), dtype=torch.float64, device=device)
            if len(boxes):
                known = target_class < probs.shape[1]
                cosine = probs[:, target_class.clamp(max=probs.shape[1] - 1)] * known
                cosine = cosine / probs.norm(dim=1, keepdim=True).clamp(min=1e-12)
                similarity = box_iou(boxes, target_boxes) * cosine * objectness[:, None]
                similarity = similarity * (image_of[owner][:, None] == target_image[None, :])
                weights.scatter_reduce_(0, owner[:, None].expand_as(similarity),
                                        similarity.double(), reduce="amax", include_self=True)
            # Rows of other images carry weight 0 for a target, so one product serves all.
            saliency += weights.T @ flat_masks[mask_of].double()
    saliency /= n_masks
    maps = saliency.reshape(-1, height, width).float().cpu().numpy()
    bounds = np.cumsum([len(t) for t in targets])[:-1]
    return list(np.split(maps, bounds))
