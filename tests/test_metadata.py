"""core.metadata: statistics against independent formulas, pixel modes, EXIF, thumbnails, bad files."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin
from scipy.signal import convolve2d

from core.errors import IngestError
from core.exif import upright
from core.metadata import BATCH_SIZE, STATS_MAX_SIDE, THUMBNAIL_SIDE, compute_metadata, image_statistics

LUMA = np.array([0.299, 0.587, 0.114])


def reference_stats(rgb: np.ndarray) -> dict[str, float]:
    """The documented definitions, computed the slow obvious way with numpy/scipy."""
    rgb = rgb.astype(np.float64)
    luma = rgb @ LUMA
    lap = convolve2d(luma, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]]), mode="valid")
    imm = convolve2d(luma, np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]]), mode="valid")
    h, w = luma.shape
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return {
        "brightness": luma.mean() / 255,
        "contrast": (luma / 255).std(),
        "sharpness": lap.var(),
        "noise": math.sqrt(math.pi / 2) * np.abs(imm).sum() / (6 * (w - 2) * (h - 2)),
        "colorfulness": math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()),
    }


def save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_statistics_match_reference_formulas(tmp_path, rng):
    arrays = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
              np.full((30, 30, 3), (200, 30, 60), dtype=np.uint8),
              rng.integers(100, 140, (64, 20, 3), dtype=np.uint8)]
    uris = [save(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    frame, errors = compute_metadata(uris)
    assert errors == []
    assert frame["uri"].tolist() == uris
    for i, array in enumerate(arrays):
        expected = reference_stats(array)
        for name, value in expected.items():
            assert frame[name].iloc[i] == pytest.approx(value, rel=1e-9, abs=1e-9), name
        assert frame["width"].iloc[i] == array.shape[1]
        assert frame["height"].iloc[i] == array.shape[0]
        assert frame["aspect_ratio"].iloc[i] == pytest.approx(array.shape[1] / array.shape[0])
        assert frame["file_size"].iloc[i] == (tmp_path / f"{i}.png").stat().st_size
    # A flat colour has no contrast, no edges and no noise; grey has no colourfulness.
    assert frame.loc[1, ["contrast", "sharpness", "noise"]].to_numpy(float) == pytest.approx([0, 0, 0], abs=1e-9)


def test_noise_estimate_recovers_gaussian_sigma(tmp_path, rng):
    sigma = 8.0
    flat = np.clip(128 + rng.normal(0, sigma, (256, 256)), 0, 255).round().astype(np.uint8)
    frame, _ = compute_metadata([save(tmp_path / "noisy.png", flat)])
    assert frame["noise"].iloc[0] == pytest.approx(sigma, rel=0.1)
    assert frame["colorfulness"].iloc[0] == 0


def test_blur_lowers_sharpness(tmp_path, rng):
    from PIL import ImageFilter

    sharp = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    sharp.save(tmp_path / "sharp.png")
    sharp.filter(ImageFilter.GaussianBlur(3)).save(tmp_path / "blur.png")
    frame, _ = compute_metadata([str(tmp_path / "sharp.png"), str(tmp_path / "blur.png")])
    assert frame["sharpness"].iloc[1] < frame["sharpness"].iloc[0] / 10


def test_batched_equals_one_by_one(rng):
    stack = rng.integers(0, 256, (5, 17, 23, 3), dtype=np.uint8)
    batched = image_statistics(stack)
    for i in range(5):
        single = image_statistics(stack[i:i + 1])
        for name, values in batched.items():
            assert values[i] == single[name][0]  # exact integer sums: batching changes nothing
        expected = reference_stats(stack[i])
        for name, value in expected.items():
            assert batched[name][i] == pytest.approx(value, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_equal_cpu(rng):
    stack = rng.integers(0, 256, (6, 40, 30, 3), dtype=np.uint8)
    cpu = image_statistics(stack)
    gpu = image_statistics(torch.from_numpy(stack).to("cuda"))
    for name in cpu:
        np.testing.assert_array_equal(gpu[name], cpu[name], err_msg=name)


def test_tiny_images_have_nan_filters(tmp_path):
    frame, _ = compute_metadata([save(tmp_path / "t.png", np.zeros((2, 2, 3), np.uint8))])
    assert math.isnan(frame["sharpness"].iloc[0]) and math.isnan(frame["noise"].iloc[0])
    assert frame["brightness"].iloc[0] == 0


def test_many_images_across_batches_keep_order(tmp_path):
    n = BATCH_SIZE + 7
    uris = []
    for i in range(n):
        size = (8 + i % 3, 9)  # several shapes per batch
        uris.append(save(tmp_path / f"{i}.png", np.full((size[1], size[0], 3), i, np.uint8)))
    seen = []
    frame, _ = compute_metadata(uris, progress=lambda done, total: seen.append((done, total)))
    assert frame["uri"].tolist() == uris
    assert frame["brightness"].to_numpy() == pytest.approx(np.arange(n) / 255)
    assert seen[-1] == (n, n) and len(seen) == 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "LA"])
def test_pixel_modes(tmp_path, rng, mode):
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    frame, errors = compute_metadata([str(path)])
    assert errors == []
    expected = np.asarray(Image.open(path).convert("RGB"))
    if mode != "CMYK":  # JPEG: our reduced-size decode may differ from a full decode by rounding
        assert frame["brightness"].iloc[0] == pytest.approx(reference_stats(expected)["brightness"], rel=1e-9)
    else:
        assert frame["brightness"].iloc[0] == pytest.approx(reference_stats(expected)["brightness"], abs=0.01)
    thumb = Image.open(io.BytesIO(frame["thumbnail"].iloc[0]))
    assert thumb.format == "JPEG" and thumb.mode == "RGB" and thumb.size == (32, 24)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.full((20, 20), 32768, dtype=np.uint16)
    values[:10] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    frame, _ = compute_metadata([str(path)])
    expected = (0.5 * 255 + 0.5 * round(32768 / 65535 * 255)) / 255
    assert frame["brightness"].iloc[0] == pytest.approx(expected, abs=1e-9)


def test_large_images_are_measured_downscaled_but_keep_their_size(tmp_path, rng):
    base = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((1800, 900), Image.Resampling.BILINEAR))
    frame, _ = compute_metadata([save(tmp_path / "big.png", big)])
    assert (frame["width"].iloc[0], frame["height"].iloc[0]) == (1800, 900)
    assert frame["brightness"].iloc[0] == pytest.approx(reference_stats(big)["brightness"], abs=2e-3)
    thumb = Image.open(io.BytesIO(frame["thumbnail"].iloc[0]))
    assert max(thumb.size) == THUMBNAIL_SIDE and thumb.size == (128, 64)
    assert STATS_MAX_SIDE == 512


def exif_jpeg(path, size=(40, 20), **tags):
    exif = Image.Exif()
    sub = exif.get_ifd(0x8769)
    ifd0 = {"make": 0x010F, "model": 0x0110, "orientation": 0x0112, "datetime": 0x0132}
    exif_ifd = {"exposure": 0x829A, "fnumber": 0x829D, "iso": 0x8827, "original": 0x9003,
                "focal": 0x920A, "lens": 0xA434}
    for key, value in tags.items():
        if key in ifd0:
            exif[ifd0[key]] = value
        else:
            sub[exif_ifd[key]] = value
    Image.new("RGB", size, (90, 120, 150)).save(path, "JPEG", exif=exif)
    return str(path)


def test_exif_fields_parsed(tmp_path):
    uri = exif_jpeg(tmp_path / "cam.jpg", make="Canon", model="EOS 5D", orientation=6,
                    original="2021:06:07 08:09:10", exposure=TiffImagePlugin.IFDRational(1, 250),
                    fnumber=TiffImagePlugin.IFDRational(28, 10), iso=400,
                    focal=TiffImagePlugin.IFDRational(50, 1), lens="EF50mm")
    plain = save(tmp_path / "plain.png", np.zeros((10, 10, 3), np.uint8))
    frame, _ = compute_metadata([uri, plain])
    row = frame.iloc[0]
    assert row["exif_make"] == "Canon" and row["exif_model"] == "EOS 5D" and row["exif_lens_model"] == "EF50mm"
    assert row["exif_orientation"] == 6 and row["exif_iso"] == 400
    assert str(row["exif_datetime"]) == "2021-06-07 08:09:10"
    assert row["exif_exposure_time"] == pytest.approx(1 / 250)
    assert row["exif_f_number"] == pytest.approx(2.8) and row["exif_focal_length"] == 50
    assert frame["exif_make"].isna().iloc[1] and frame["exif_iso"].isna().iloc[1]
    # Orientation 6 = rotate 90° clockwise for display: a 40x20 photo shows as 20x40.
    thumb = Image.open(io.BytesIO(row["thumbnail"]))
    assert thumb.size == (20, 40)
    assert (row["width"], row["height"]) == (40, 20)


@pytest.mark.parametrize("orientation,corner", [(None, (0, 0)), (float("nan"), (0, 0)), (1, (0, 0)), (3, (2, 1)),
                                                (6, (1, 0)), (8, (0, 2)), (42, (0, 0))])
def test_upright_turns_the_stored_frame_as_a_viewer_does(orientation, corner):
    stored = np.zeros((2, 3, 3), np.uint8)  # 3 wide, 2 high; the top-left pixel marked
    stored[0, 0] = 255
    shown = np.asarray(upright(Image.fromarray(stored), orientation))
    assert shown.shape[:2] == ((3, 2) if orientation in (6, 8) else (2, 3))
    assert tuple(np.argwhere(shown[:, :, 0] == 255)[0][::-1]) == corner  # (x, y) where the mark lands


def test_odd_exif_is_skipped_never_fatal(tmp_path):
    uri = exif_jpeg(tmp_path / "odd.jpg", make=b"\xff\xfe\xfa", model="M" * 5000, orientation=42,
                    original="0000:00:00 00:00:00", datetime="garbage",
                    exposure=TiffImagePlugin.IFDRational(1, 0), fnumber="f/2.8", iso="fast",
                    focal=TiffImagePlugin.IFDRational(0, 0), lens="ok lens")
    frame, errors = compute_metadata([uri])
    assert errors == []
    assert frame["exif_lens_model"].iloc[0] == "ok lens"
    for column in ("exif_make", "exif_model", "exif_orientation", "exif_datetime", "exif_exposure_time",
                   "exif_f_number", "exif_iso", "exif_focal_length"):
        assert column not in frame.columns, column


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_block_is_ignored(tmp_path):
    path = tmp_path / "broken.jpg"
    Image.new("RGB", (16, 16), "red").save(path, "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 20)
    frame, errors = compute_metadata([str(path)])
    assert errors == [] and len(frame) == 1
    assert not any(c.startswith("exif_") for c in frame.columns)


@pytest.fixture
def bad_files(tmp_path, rng):
    good = save(tmp_path / "good.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return good, str(truncated), str(junk), str(empty), str(tmp_path / "missing.jpg")


def test_bad_images_raise_naming_the_file(bad_files):
    good, *bad = bad_files
    for uri in bad:
        with pytest.raises(IngestError) as info:
            compute_metadata([good, uri])
        assert info.value.file == uri
        assert uri in str(info.value)


def test_every_bad_image_is_named_in_one_error(bad_files):
    good, truncated, junk, empty, missing = bad_files
    with pytest.raises(IngestError) as info:
        compute_metadata([good, truncated, good, junk, empty, missing])
    assert info.value.file == truncated and "truncated" in info.value.message
    assert f"3 more unreadable image(s): {junk}, {empty}, {missing} (--skip-bad leaves them out)" in info.value.message


def test_skip_bad_drops_rows_and_reports_each(bad_files):
    good, truncated, junk, empty, missing = bad_files
    uris = [truncated, good, junk, empty, missing, good.replace("good", "good")]
    frame, errors = compute_metadata(uris, skip_bad=True)
    assert sorted(e.file for e in errors) == sorted([truncated, junk, empty, missing])
    assert frame.index.tolist() == [1, 5]  # positions in the input
    assert frame["uri"].tolist() == [good, good]
    assert "truncated" in str(next(e for e in errors if e.file == truncated))
    assert "not found" in str(next(e for e in errors if e.file == missing))
