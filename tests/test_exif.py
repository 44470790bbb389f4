"""Boxes turned with their image by its EXIF orientation, against Pillow's own turning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.exif import orientation_codes, turn_boxes, upright


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_turns_with_its_image_and_back(orientation):
    width, height = 40, 24
    boxes = np.array([[5, 3, 17, 10], [0, 0, 40, 24], [39, 20, 40, 24]], dtype=float)
    for box in boxes:
        pixels = np.zeros((height, width), np.uint8)
        x0, y0, x1, y1 = box.astype(int)
        pixels[y0:y1, x0:x1] = 255
        ys, xs = np.nonzero(np.asarray(upright(Image.fromarray(pixels), orientation)))
        turned = turn_boxes(box, width, height, orientation)
        assert turned.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    # Many boxes at once, each with its own image's size and orientation, and back again.
    sizes = np.array([[40, 24], [24, 40], [40, 24]])
    codes = [orientation, 1, orientation]
    turned = turn_boxes(boxes, sizes[:, 0], sizes[:, 1], codes)
    np.testing.assert_array_equal(turned[1], boxes[1])
    np.testing.assert_array_equal(turn_boxes(turned, sizes[:, 0], sizes[:, 1], codes, to_upright=False), boxes)


def test_missing_or_invalid_orientations_leave_boxes_as_stored():
    assert orientation_codes([None, float("nan"), 0, 9, "x", 6.0, 3]).tolist() == [1, 1, 1, 1, 1, 6, 3]
    box = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(turn_boxes(box, 10, 10, None), box)
    assert turn_boxes(np.zeros((0, 4)), [], [], []).shape == (0, 4)
