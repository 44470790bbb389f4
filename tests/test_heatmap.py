"""Colour tables, overlays (normalise, upsample, blend, encode) and box drawing."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import VisionLensError
from core.heatmap import (COLORMAPS, STATUS_COLORS, blend, box_caption, colormap, draw_boxes, encode,
                          normalise, overlay, png_bytes, render_overlays)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def picture(h=24, w=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["inferno", "RdBu", "RdBu_r"])
def test_colour_tables_match_matplotlib(name):
    import matplotlib

    expected = np.rint(matplotlib.colormaps[name](np.arange(256))[:, :3] * 255)
    got = colormap(name).astype(int)
    assert got.shape == (256, 3)
    assert np.abs(got - expected).max() <= 1


def test_unknown_colour_map_is_refused():
    with pytest.raises(VisionLensError, match="unknown colour map") as info:
        colormap("jet")
    assert set(info.value.choices) == set(COLORMAPS)


def test_normalise_signed_and_unsigned():
    maps = torch.tensor([[[-2.0, -1.0], [0.0, 2.0]]])
    signed = normalise(maps, signed=True, clip_percentile=100.0)
    np.testing.assert_allclose(signed.numpy(), [[[0.0, 0.25], [0.5, 1.0]]])
    unsigned = normalise(maps, signed=False, clip_percentile=100.0)
    np.testing.assert_allclose(unsigned.numpy(), [[[1.0, 0.5], [0.0, 1.0]]])
    offset = normalise(torch.tensor([[[10.0, 11.0], [12.0, 14.0]]]), signed=False, clip_percentile=100.0)
    np.testing.assert_allclose(offset.numpy(), [[[0.0, 0.25], [0.5, 1.0]]])  # D-RISE-like floor removed
    clipped = normalise(torch.arange(100.0).reshape(1, 10, 10), signed=False, clip_percentile=50.0)
    assert float(clipped.reshape(-1)[49]) == 1.0 and float(clipped.reshape(-1)[99]) == 1.0


def test_percentile_clip_is_the_nearest_rank_value_like_kthvalue():
    values = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 1000)).astype(np.float32))
    for percentile in (1.0, 50.0, 99.0, 99.95, 100.0):
        rank = int(np.ceil(percentile / 100.0 * 1000))
        top = torch.kthvalue(values.abs(), rank, dim=1).values
        got = normalise(values.reshape(3, 25, 40), signed=True, clip_percentile=percentile).reshape(3, -1)
        expected = (values / top[:, None]).clamp(-1.0, 1.0) * 0.5 + 0.5
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (24, 40), (113, 67)])
def test_png_bytes_decode_to_the_same_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    ramp = (np.arange(shape[0] * shape[1] * 3).reshape(shape + (3,)) * 37 % 256).astype(np.uint8)
    for pixels in (noise, ramp, np.zeros(shape + (3,), np.uint8), np.full(shape + (3,), 255, np.uint8)):
        data = png_bytes(pixels)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        decoded = Image.open(io.BytesIO(data))
        decoded.load()  # checks every chunk's CRC and the zlib stream
        assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_png_overlays_decode_to_the_blended_pixels_and_stay_compact():
    import skimage.data

    photo = skimage.data.chelsea()
    field = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    blended = blend([photo], [field], signed=True, cmap="RdBu_r")[0].numpy()
    data = render_overlays([photo], [field], signed=True, cmap="RdBu_r", fmt="png")[0]
    np.testing.assert_array_equal(decode(data), blended)
    pillow = io.BytesIO()
    Image.fromarray(blended).save(pillow, format="PNG", compress_level=1)
    assert len(data) < 1.1 * len(pillow.getvalue())  # no bigger than Pillow's fast setting
    assert len(data) < 0.8 * blended.nbytes  # and really compressed


def test_encode_keeps_pixels_for_rgb_and_other_modes():
    rgb = Image.fromarray(picture())
    np.testing.assert_array_equal(decode(encode(rgb, "png")), picture())
    rgba = Image.fromarray(np.dstack([picture(), np.full((24, 40), 7, np.uint8)]), "RGBA")
    again = Image.open(io.BytesIO(encode(rgba, "png")))
    assert again.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(again), np.asarray(rgba))
    assert encode(rgb, "jpeg")[:2] == b"\xff\xd8"
    with pytest.raises(VisionLensError, match="unknown format"):
        encode(rgb, "gif")
    with pytest.raises(VisionLensError, match="uint8 RGB"):
        png_bytes(np.zeros((4, 4), np.uint8))


def test_alpha_zero_keeps_the_image_and_alpha_one_shows_the_colours():
    image = picture()
    field = np.zeros((6, 10), np.float32)
    field[:, 5:] = 1.0  # right half hot
    kept = decode(render_overlays([image], [field], alpha=0.0, fmt="png")[0])
    np.testing.assert_array_equal(kept, image)
    shown = decode(render_overlays([image], [field], alpha=1.0, fmt="png", cmap="inferno")[0])
    np.testing.assert_array_equal(shown[:, -1], np.tile(COLORMAPS["inferno"][-1], (24, 1)))
    np.testing.assert_array_equal(shown[:, 0], np.tile(COLORMAPS["inferno"][0], (24, 1)))


def test_half_blend_is_the_mean_of_image_and_colour():
    image = picture()
    field = np.ones((3, 3), np.float32)  # no contrast: all at the table's first colour
    got = blend([image], [field], alpha=0.5)[0].numpy().astype(int)
    expected = np.rint(0.5 * image + 0.5 * COLORMAPS["inferno"][0]).astype(int)
    assert np.abs(got - expected).max() <= 1


def test_signed_maps_show_positive_red_and_negative_blue():
    field = np.array([[1.0, -1.0]], np.float32)
    out = blend([np.full((8, 8, 3), 128, np.uint8)], [field], alpha=1.0, cmap="RdBu_r", signed=True)[0]
    left, right = out[0, 0].numpy().astype(int), out[0, -1].numpy().astype(int)  # RGB
    assert left[0] > left[2] and right[2] > right[0]


def test_batches_of_mixed_sizes_equal_one_at_a_time_and_decode():
    images = [picture(24, 40, 1), picture(30, 30, 2), picture(24, 40, 3)]
    maps = [np.random.default_rng(i).normal(size=(8, 12)).astype(np.float32) for i in range(3)]
    together = render_overlays(images, maps, fmt="png", signed=True, cmap="RdBu_r")
    alone = [render_overlays([im], [m], fmt="png", signed=True, cmap="RdBu_r")[0]
             for im, m in zip(images, maps)]
    assert together == alone
    jpegs = render_overlays(images, maps, fmt="jpeg")
    assert [decode(j).shape for j in jpegs] == [(24, 40, 3), (30, 30, 3), (24, 40, 3)]
    assert all(j[:2] == b"\xff\xd8" for j in jpegs)
    assert render_overlays([], []) == []


def test_overlay_returns_a_pil_image_of_the_image_size():
    out = overlay(Image.fromarray(picture()), np.random.default_rng(0).random((4, 4)))
    assert isinstance(out, Image.Image) and out.size == (40, 24) and out.mode == "RGB"


@pytest.mark.parametrize("bad_images, bad_maps, message", [
    ([np.zeros((4, 4), np.uint8)], [np.zeros((2, 2))], "uint8 RGB"),
    ([np.zeros((4, 4, 3), np.float32)], [np.zeros((2, 2))], "uint8 RGB"),
    ([picture()], [np.zeros((2, 2)), np.zeros((2, 2))], "1 images but 2 maps"),
    ([picture()], [np.zeros((2, 2, 2))], "2-D"),
])
def test_bad_overlay_input_is_refused(bad_images, bad_maps, message):
    with pytest.raises(VisionLensError, match=message):
        render_overlays(bad_images, bad_maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_overlays_equal_cpu_overlays():
    images = [picture(64, 48, i) for i in range(4)]
    maps = [np.random.default_rng(i).random((16, 12)).astype(np.float32) for i in range(4)]
    cpu = [b.numpy().astype(int) for b in blend(images, maps, device="cpu")]
    gpu = [b.numpy().astype(int) for b in blend(images, maps, device="cuda")]
    assert max(np.abs(c - g).max() for c, g in zip(cpu, gpu)) <= 1


def test_boxes_are_drawn_in_status_colours_with_captions():
    image = np.full((120, 160, 3), 255, np.uint8)
    boxes = pd.DataFrame({"xmin": [20.0, 90.0], "ymin": [40.0, 40.0], "xmax": [70.0, 150.0],
                          "ymax": [110.0, 110.0], "status": ["tp", "fn"], "label": ["cat", "dog"],
                          "score": [0.91, np.nan], "iou": [0.75, np.nan]})
    out = np.asarray(draw_boxes(image, boxes)).astype(int)
    tp = np.array([int(STATUS_COLORS["tp"][i:i + 2], 16) for i in (1, 3, 5)])
    fn = np.array([int(STATUS_COLORS["fn"][i:i + 2], 16) for i in (1, 3, 5)])
    left_edge = out[60:100, 20]
    assert (np.abs(left_edge - tp).sum(axis=1) == 0).all()  # solid prediction box
    dashed = np.abs(out[45:105, 90] - fn).sum(axis=1) == 0
    assert 0.2 < dashed.mean() < 0.8  # dashed ground-truth box
    caption = out[25:40, 20:70]  # above the tp box: filled with its colour, with light text
    assert (np.abs(caption - tp).sum(axis=2) == 0).mean() > 0.3 and (caption.sum(axis=2) > 600).any()
    assert (out[5:15, 5:15] == 255).all()  # nothing drawn elsewhere


def test_box_colours_can_be_given_and_status_must_be_known():
    image = np.zeros((50, 50, 3), np.uint8)
    out = np.asarray(draw_boxes(image, pd.DataFrame({"xmin": [5], "ymin": [5], "xmax": [40], "ymax": [40],
                                                     "color": ["#ff0000"], "text": ["hello"]})))
    assert tuple(out[30, 5]) == (255, 0, 0)
    with pytest.raises(VisionLensError, match="status 'maybe'"):
        draw_boxes(image, pd.DataFrame({"xmin": [5], "ymin": [5], "xmax": [40], "ymax": [40],
                                        "status": ["maybe"]}))
    with pytest.raises(VisionLensError, match="ymax"):
        draw_boxes(image, pd.DataFrame({"xmin": [5], "ymin": [5], "xmax": [40]}))


@pytest.mark.parametrize("row, caption", [
    ({"label": "cat", "score": 0.912, "iou": 0.75}, "cat 0.91 IoU 0.75"),
    ({"label": 3, "score": np.nan, "iou": None}, "3"),
    ({"text": "hello", "label": "cat", "score": 0.5}, "hello"),
    ({"text": np.nan, "label": "cat"}, "cat"),
    ({"label": np.nan}, ""),
])
def test_box_captions(row, caption):
    assert box_caption(pd.Series(row, dtype=object)) == caption
