"""XRAI (Kapishnikov et al., ICCV 2019), following the authors' reference implementation.

1. Integrated Gradients from a black and a white baseline (the image's minimum and maximum
   value), averaged, then the maximum over channels per pixel.
2. Felzenszwalb segmentations of the image at several scales (resized to
   ``segment_size``, values scaled to [-1, 1], labels resized back), every segment a
   candidate region, each dilated by a disk of ``dilation_radius``.
3. Greedy ranking: repeatedly add the region whose not-yet-covered pixels have the highest
   mean attribution ("gain density"); regions adding fewer than ``min_pixel_diff`` new
   pixels are dropped; stop when the covered fraction exceeds ``area_threshold`` or no
   region is left. Each pixel gets the gain of the region that first covered it; pixels
   never covered get their own mean attribution.

Step 3 is vectorised: region masks are one pixel-major boolean matrix, and after each
pick only the newly covered pixels' rows are subtracted from every region's count and
sum, so the whole ranking reads the matrix once instead of once per pick.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from skimage.segmentation import felzenszwalb
from skimage.transform import resize

from ..errors import ExplainError
from .captum_methods import integrated_gradients
from .common import ScoredModel, check_class_targets, check_positive_int, expand_targets, output_count

SCALES = (50, 100, 150, 250, 500, 1200)


def segment_labels(image: np.ndarray, *, scales: Sequence[float], sigma: float,
                   min_segment_size: int, segment_size: int) -> list[np.ndarray]:
    """One Felzenszwalb label map (H, W) per scale for an RGB float image (H, W, 3)."""
    height, width = image.shape[:2]
    small = resize(image, (segment_size, segment_size), order=3, mode="constant",
                   preserve_range=True, anti_aliasing=True)
    low, high = small.min(), small.max()
    small = (small - low) / (high - low) * 2.0 - 1.0 if high > low else np.zeros_like(small)
    labels = []
    for scale in scales:
        seg = felzenszwalb(small, scale=scale, sigma=sigma, min_size=min_segment_size)
        labels.append(resize(seg, (height, width), order=0, preserve_range=True, mode="constant",
                             anti_aliasing=False).astype(np.int64))
    return labels


def disk_offsets(radius: int) -> torch.Tensor:
    """(dy, dx) of the pixels in skimage's ``disk(radius)`` footprint."""
    span = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    inside = dy * dy + dx * dx <= radius * radius
    return torch.stack([dy[inside], dx[inside]], dim=1)


def region_masks(labels: list[np.ndarray], dilation_radius: int, device: torch.device) -> torch.Tensor:
    """Bool (H*W, R), pixel-major: every segment of every label map, dilated by a disk.

    A pixel belongs to a dilated segment when some pixel of its disk neighbourhood carries
    that segment's label, so all segments are dilated at once by scattering each offset's
    shifted labels.
    """
    height, width = labels[0].shape
    offset = 0
    stacked = []
    for seg in labels:
        seg = seg - seg.min()
        stacked.append(torch.from_numpy(seg + offset))
        offset += int(seg.max()) + 1
    flat_labels = torch.stack(stacked).to(device).reshape(len(labels), -1)  # unique across scales
    masks = torch.zeros(height * width, offset, dtype=torch.bool, device=device)
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    pixel = (rows * width + cols).expand(height, width)
    for dy, dx in disk_offsets(dilation_radius).tolist():
        src_r, src_c = rows + dy, cols + dx
        valid = ((src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)).expand(height, width)
        source = (src_r.clamp(0, height - 1) * width + src_c.clamp(0, width - 1)).expand(height, width)
        shifted = flat_labels[:, source[valid]]  # (S, n_valid) labels seen at each offset
        masks[pixel[valid].repeat(len(labels)), shifted.reshape(-1)] = True
    return masks


def xrai_ranking(attr: torch.Tensor, masks: torch.Tensor, *, area_threshold: float,
                 min_pixel_diff: int) -> torch.Tensor:
    """XRAI map (H*W,) float64 from flat attributions (H*W,) and region masks (H*W, R)."""
    attr = attr.double()
    n_regions = masks.shape[1]
    covered = torch.zeros(len(attr), dtype=torch.bool, device=attr.device)
    result = torch.full_like(attr, -np.inf)
    counts = torch.zeros(n_regions, dtype=attr.dtype, device=attr.device)
    sums = torch.zeros_like(counts)
    _subtract_pixels(counts, sums, masks, attr, torch.arange(len(attr), device=attr.device), sign=1.0)
    alive = torch.ones(n_regions, dtype=torch.bool, device=attr.device)
    minus_inf = torch.tensor(-np.inf, dtype=attr.dtype, device=attr.device)
    area = 0.0
    while area <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        gain = torch.where(alive, sums / counts.clamp(min=1.0), minus_inf)
        best = int(torch.argmax(gain))  # first maximum, as the reference's strict '>'
        new = masks[:, best] & ~covered
        result[new] = gain[best]
        covered |= new
        alive[best] = False
        _subtract_pixels(counts, sums, masks, attr, new.nonzero().squeeze(1), sign=-1.0)
        area = float(covered.double().mean())
    rest = torch.isinf(result)
    if bool(rest.any()):
        result[rest] = attr[rest].mean()
    return result


def _subtract_pixels(counts: torch.Tensor, sums: torch.Tensor, masks: torch.Tensor,
                     attr: torch.Tensor, pixels: torch.Tensor, sign: float) -> None:
    # Add (sign=1) or remove (sign=-1) ``pixels`` from every region's uncovered count and sum.
    member = masks[pixels].nonzero()  # (k, 2): (row in pixels, region)
    regions = member[:, 1]
    counts.index_add_(0, regions, torch.full_like(regions, 1, dtype=counts.dtype) * sign)
    sums.index_add_(0, regions, attr[pixels[member[:, 0]]] * sign)


def explain_xrai(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[np.ndarray],
                 task: str, *, n_steps: int, approximation: str, batch_size: int, scales: Sequence[float],
                 sigma: float, min_segment_size: int, segment_size: int, dilation_radius: int,
                 area_threshold: float, min_pixel_diff: int, output: str) -> list[np.ndarray]:
    """XRAI maps: each pixel carries the gain density of the region that covered it."""
    check_class_targets(targets, output_count(model, images))
    if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
        raise ExplainError(f"scales must be positive numbers, got {scales!r}", field="scales")
    segment_size = check_positive_int("segment_size", segment_size, minimum=2)
    dilation_radius = check_positive_int("dilation_radius", dilation_radius, minimum=0)
    min_pixel_diff = check_positive_int("min_pixel_diff", min_pixel_diff)
    min_segment_size = check_positive_int("min_segment_size", min_segment_size, minimum=0)
    owners, flat = expand_targets(targets)
    inputs = images[owners.to(images.device)]
    scored = ScoredModel(model, task, output)
    black = inputs.amin(dim=(1, 2, 3), keepdim=True).expand_as(inputs)
    white = inputs.amax(dim=(1, 2, 3), keepdim=True).expand_as(inputs)
    both = torch.cat([inputs, inputs])
    attr = integrated_gradients(scored, both, torch.cat([black, white]), flat + flat,
                                n_steps=n_steps, approximation=approximation, batch_size=batch_size)
    attr = (attr[:len(inputs)] + attr[len(inputs):]) / 2
    attr = attr.amax(dim=1)  # (N, H, W): channel maximum, as the reference
    _, _, height, width = images.shape
    pixels = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    maps, row = [], 0
    for index, ids in enumerate(targets):
        labels = segment_labels(pixels[index], scales=scales, sigma=sigma,
                                min_segment_size=min_segment_size, segment_size=segment_size)
        masks = region_masks(labels, dilation_radius, images.device)
        per_target = [xrai_ranking(attr[row + k].reshape(-1), masks, area_threshold=area_threshold,
                                   min_pixel_diff=min_pixel_diff) for k in range(len(ids))]
        row += len(ids)
        maps.append(torch.stack(per_target).reshape(len(ids), height, width).float().cpu().numpy())
    return maps
