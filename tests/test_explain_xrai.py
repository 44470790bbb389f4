"""XRAI's vectorised region ranking against a line-by-line port of the authors' reference.

The reference below follows ``saliency/core/xrai.py`` of the PAIR saliency library
(``_unpack_segs_to_masks``, skimage ``dilation`` with ``disk``, ``_gain_density``, ``_xrai``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.morphology import dilation, disk
from skimage.segmentation import felzenszwalb

from core.explain.xrai import disk_offsets, region_masks, segment_labels, xrai_ranking


def reference_masks(segs, dilation_rad):
    masks = [seg == label for seg in segs for label in range(seg.min(), seg.max() + 1)]
    if dilation_rad:
        footprint = disk(dilation_rad)
        masks = [dilation(mask, footprint=footprint) for mask in masks]
    return masks


def reference_xrai(attr, segs, area_perc_th=1.0, min_pixel_diff=50):
    def gain_density(mask1, attr, mask2=None):
        added = mask1 if mask2 is None else np.logical_and(mask1, np.logical_not(mask2))
        return -np.inf if not np.any(added) else attr[added].mean()

    output_attr = -np.inf * np.ones(shape=attr.shape, dtype=float)
    current_area_perc = 0.0
    current_mask = np.zeros(attr.shape, dtype=bool)
    remaining = dict(enumerate(segs))
    while current_area_perc <= area_perc_th:
        best_gain, best_key, remove = -np.inf, None, []
        for key, mask in remaining.items():
            if np.sum(np.logical_and(mask, np.logical_not(current_mask))) < min_pixel_diff:
                remove.append(key)
                continue
            gain = gain_density(mask, attr, mask2=current_mask)
            if gain > best_gain:
                best_gain, best_key = gain, key
        for key in remove:
            del remaining[key]
        if not remaining:
            break
        added = remaining[best_key]
        diff = np.logical_and(added, np.logical_not(current_mask))
        current_mask = np.logical_or(current_mask, added)
        current_area_perc = np.mean(current_mask)
        output_attr[diff] = best_gain
        del remaining[best_key]
    uncomputed = output_attr == -np.inf
    output_attr[uncomputed] = gain_density(uncomputed, attr)
    return output_attr


def label_maps(seed: int, shape=(24, 20)):
    rng = np.random.default_rng(seed)
    image = rng.random((*shape, 3))
    image[:, : shape[1] // 2] *= 0.3  # two halves of different brightness: real segments
    return image, [felzenszwalb(image, scale=s, sigma=0.5, min_size=5) for s in (5, 30)]


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_dilated_region_masks_equal_skimage(radius):
    _, segs = label_maps(0)
    expected = np.stack([m.reshape(-1) for m in reference_masks(segs, radius)], axis=1)
    got = region_masks(segs, radius, torch.device("cpu")).numpy()
    np.testing.assert_array_equal(got, expected)


def test_disk_offsets_match_skimage_disk():
    footprint = disk(4)
    offsets = disk_offsets(4).numpy() + 4
    got = np.zeros_like(footprint)
    got[offsets[:, 0], offsets[:, 1]] = 1
    np.testing.assert_array_equal(got, footprint)


@pytest.mark.parametrize("seed, area, min_diff", [(0, 1.0, 5), (1, 0.4, 5), (2, 1.0, 30)])
def test_ranking_equals_the_reference(seed, area, min_diff):
    image, segs = label_maps(seed)
    attr = np.random.default_rng(seed + 10).normal(size=image.shape[:2])
    attr[:, :5] += 2.0  # a clear best region, then many close calls
    expected = reference_xrai(attr, reference_masks(segs, 1), area_perc_th=area, min_pixel_diff=min_diff)
    masks = region_masks(segs, 1, torch.device("cpu"))
    got = xrai_ranking(torch.from_numpy(attr.reshape(-1)), masks, area_threshold=area,
                       min_pixel_diff=min_diff).numpy().reshape(attr.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_segments_cover_the_image_at_every_scale():
    image, _ = label_maps(3, shape=(30, 40))
    labels = segment_labels(image, scales=[10, 100], sigma=0.8, min_segment_size=10, segment_size=48)
    assert len(labels) == 2
    assert all(seg.shape == (30, 40) and seg.dtype == np.int64 for seg in labels)
    assert len(np.unique(labels[0])) >= len(np.unique(labels[1])) > 1  # finer at the smaller scale
