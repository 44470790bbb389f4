"""Image-quality metadata, safe EXIF and thumbnails, computed in batches.

``compute_metadata(uris)`` decodes every image once (threads: Pillow releases
the GIL while decoding and resizing) and returns one row per image with:

- ``width``, ``height``: the stored pixel size (EXIF orientation *not* applied,
  the frame boxes and models use), ``file_size`` in bytes, ``aspect_ratio`` =
  width / height.
- ``brightness``: mean luminance (ITU-R BT.601 luma of RGB) in 0..1;
  ``contrast``: its standard deviation, 0..0.5.
- ``sharpness``: variance of the 4-neighbour Laplacian of the luminance on the
  0..255 scale (the usual "variance of Laplacian" blur measure; low = blurry),
  over the valid interior (no padding).
- ``noise``: Immerkær's fast noise sigma (J. Immerkær, "Fast Noise Variance
  Estimation", CVIU 1996), luminance on the 0..255 scale.
- ``colorfulness``: Hasler & Süsstrunk (2003) M = σ_rgyb + 0.3 μ_rgyb, 0..255
  scale (0 for grey images).
- ``exif_*``: parsed EXIF fields (``core.exif``), only those present in at least one image;
  values of the wrong type, absurd size, undecodable bytes or zero denominators
  are dropped, never an error.
- ``thumbnail``: JPEG bytes, longest side at most 128 px, RGB, EXIF
  orientation applied (the way a viewer shows the photo).

Statistics are computed on a copy downscaled so the longest side is at most
``STATS_MAX_SIDE`` (512) px (JPEGs decoded at reduced DCT scale, then bilinear
resize), so sharpness and noise describe the image at that scale: a huge but
slightly soft photo and its 512 px version score alike. Pixel modes: grey,
RGB, RGBA/LA (alpha dropped, as the models see it), palette, CMYK, 1-bit,
16-bit and 32-bit integer grey (scaled from 0..65535), float grey (0..1 or 0..255).

Images of equal downscaled size are stacked and their statistics computed
together in exact integer arithmetic (numpy on the CPU, torch on CUDA when
available: identical results), floats only in the final per-image formulas.
"""

from __future__ import annotations

import io
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from .errors import IngestError
from .exif import EXIF_COLUMNS, read_exif, upright

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

STATS_MAX_SIDE = 512
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 85
BATCH_SIZE = 64
# Pixels per stacked statistics call: enough to vectorise small images, few
# enough that the int32/int64 temporaries stay small (4-8 MB).
STACK_PIXELS = 1 << 20

STAT_COLUMNS = ("brightness", "contrast", "sharpness", "noise", "colorfulness")
BASE_COLUMNS = ("width", "height", "file_size", "aspect_ratio") + STAT_COLUMNS

_INT_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}



@dataclass
class DecodedImage:
    """What one file contributes before the batched statistics."""

    width: int
    height: int
    file_size: int
    pixels: np.ndarray  # uint8 (h, w, 3), longest side <= STATS_MAX_SIDE
    exif: dict[str, object]
    thumbnail: bytes


# --------------------------------------------------------------------------- decoding


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    scale = side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB for any pixel mode; 16/32-bit integer grey is scaled from 0..65535 (not clipped)."""
    if image.mode not in _INT_GREY_MODES and image.mode != "F":
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0
    scaled = np.nan_to_num(values / top, nan=0.0).clip(0.0, 1.0)
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L").convert("RGB")


def _thumbnail(small_rgb: Image.Image, orientation: object) -> bytes:
    """JPEG of ``small_rgb`` (changed in place) turned upright by its EXIF orientation."""
    thumb = upright(small_rgb, orientation)
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def decode_image(uri: str) -> DecodedImage:
    """Open, fully decode and downscale one image; IngestError naming the file if unusable."""
    try:
        file_size = os.stat(uri).st_size
    except FileNotFoundError as exc:
        raise IngestError("image file not found", file=uri) from exc
    except OSError as exc:
        raise IngestError(f"cannot stat image file: {exc.strerror or exc}", file=uri) from exc
    try:
        with Image.open(uri) as image:
            width, height = image.size
            target = _fit(width, height, STATS_MAX_SIDE)
            if image.mode not in _INT_GREY_MODES and image.mode != "F":
                image.draft(None, target)  # JPEG: decode at a reduced DCT scale
            image.load()  # raises on truncated or corrupt data
            exif = read_exif(image)
            rgb = as_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise IngestError(f"not a readable image: {exc}", file=uri) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow signals truncated/corrupt data with OSError, bad headers with
        # SyntaxError/ValueError/EOFError depending on the plugin.
        raise IngestError(f"corrupt or truncated image: {exc}", file=uri) from exc
    if width < 1 or height < 1:
        raise IngestError(f"image has no pixels ({width}x{height})", file=uri)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.array(rgb, dtype=np.uint8)  # a copy: the thumbnail step shrinks rgb in place
    return DecodedImage(width=width, height=height, file_size=file_size, pixels=pixels, exif=exif,
                        thumbnail=_thumbnail(rgb, exif.get("exif_orientation")))


def _decode_or_error(uri: str) -> DecodedImage | IngestError:
    try:
        return decode_image(uri)
    except IngestError as exc:
        return exc


# --------------------------------------------------------------------------- statistics


def _planes(pixels) -> tuple:
    """Contiguous int32 red, green and blue planes ``(B, H, W)`` of a uint8 ``(B, H, W, 3)`` batch."""
    if isinstance(pixels, torch.Tensor):
        planes = pixels.permute(3, 0, 1, 2).to(torch.int32).contiguous()
    else:
        planes = np.ascontiguousarray(np.moveaxis(pixels, -1, 0), dtype=np.int32)
    return planes[0], planes[1], planes[2]


def _int64(x):
    return x.to(torch.int64) if isinstance(x, torch.Tensor) else x.astype(np.int64)


def _row_sums(x) -> np.ndarray:
    """Exact int64 sum of each image's values: numpy (B,) whatever the input lives on."""
    flat = x.reshape(x.shape[0], -1)
    if isinstance(flat, torch.Tensor):
        return flat.sum(dim=1, dtype=torch.int64).cpu().numpy()
    return flat.sum(axis=1, dtype=np.int64)


def image_statistics(pixels) -> dict[str, np.ndarray]:
    """Per-image statistics of a uint8 batch ``(B, H, W, 3)``: a numpy array, or a torch tensor (CUDA).

    Everything up to the per-image sums is integer arithmetic: luma is kept as
    ``1000 * Y = 299 R + 587 G + 114 B`` (BT.601 exactly), the 3x3 filters are
    shifted-slice sums of it (the Immerkær mask is the outer product of
    ``[1, -2, 1]`` with itself: two 1-D passes), and every sum is an exact int64.
    So CPU and GPU give identical results, and only the final per-image
    formulas use floats. Sharpness and noise need at least 3x3 pixels; smaller
    images get NaN.
    """
    batch, height, width = pixels.shape[:3]
    n = float(height * width)
    red, green, blue = _planes(pixels)
    luma = red * 299  # 1000 x Y = 299 R + 587 G + 114 B, 0..255000
    luma += green * 587
    luma += blue * 114
    rg = red - green
    yb2 = red + green  # 2 x (0.5 (R + G) - B)
    yb2 -= blue * 2

    def mean_var(values, squares):
        mean = _row_sums(values) / n
        return mean, np.maximum(_row_sums(squares) / n - mean * mean, 0.0)

    luma_mean, luma_var = mean_var(luma, _int64(luma) * luma)
    rg_mean, rg_var = mean_var(rg, rg * rg)
    yb_mean, yb_var = mean_var(yb2, yb2 * yb2)
    out = {
        "brightness": luma_mean / 255000.0,
        "contrast": np.sqrt(luma_var) / 255000.0,
        "colorfulness": (np.sqrt(rg_var + yb_var / 4.0)
                         + 0.3 * np.sqrt(rg_mean * rg_mean + yb_mean * yb_mean / 4.0)),
        "sharpness": np.full(batch, np.nan),
        "noise": np.full(batch, np.nan),
    }
    if height >= 3 and width >= 3:
        laplacian = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1]  # in place from here: fewer temporaries
        laplacian += luma[:, 1:-1, :-2]
        laplacian += luma[:, 1:-1, 2:]
        laplacian -= luma[:, 1:-1, 1:-1] * 4
        interior = float((height - 2) * (width - 2))
        lap_mean = _row_sums(laplacian) / interior
        lap_var = np.maximum(_row_sums(_int64(laplacian) * laplacian) / interior - lap_mean * lap_mean, 0.0)
        out["sharpness"] = lap_var / 1e6
        along_x = luma[:, :, :-2] + luma[:, :, 2:]
        along_x -= luma[:, :, 1:-1] * 2
        mask = along_x[:, :-2] + along_x[:, 2:]
        mask -= along_x[:, 1:-1] * 2
        out["noise"] = math.sqrt(math.pi / 2.0) * _row_sums(abs(mask)) / (6.0 * interior) / 1000.0
    return out


def _batch_statistics(decoded: list[DecodedImage]) -> dict[str, np.ndarray]:
    # Stack images whose downscaled shapes agree; compute each stack at once.
    out = {name: np.full(len(decoded), np.nan) for name in STAT_COLUMNS}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(decoded):
        by_shape.setdefault(item.pixels.shape, []).append(i)
    cuda = torch.cuda.is_available()
    for shape, same in by_shape.items():
        per_stack = max(1, STACK_PIXELS // (shape[0] * shape[1]))
        for start in range(0, len(same), per_stack):
            positions = same[start:start + per_stack]
            stack = np.stack([decoded[i].pixels for i in positions])
            for name, values in image_statistics(torch.from_numpy(stack).to("cuda") if cuda else stack).items():
                out[name][positions] = values
    return out


# --------------------------------------------------------------------------- public entry


def compute_metadata(uris: Sequence[str], *, skip_bad: bool = False,
                     progress: Progress | None = None) -> tuple[pd.DataFrame, list[IngestError]]:
    """Metadata rows for ``uris`` (same order) and the errors of skipped images.

    The frame's index holds each row's position in ``uris`` and its ``uri``
    column the path, so rows stay joinable when bad images are dropped
    (``skip_bad``). Without ``skip_bad`` every image is still read, then one
    ``IngestError`` names the first bad file and lists the others: one run finds them all.
    """
    uris = [str(u) for u in uris]
    positions: list[int] = []
    columns: dict[str, list] = {name: [] for name in BASE_COLUMNS}
    exif_rows: list[dict[str, object]] = []
    thumbnails: list[bytes] = []
    errors: list[IngestError] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(start: int) -> list:
            return [pool.submit(_decode_or_error, u) for u in uris[start:start + BATCH_SIZE]]

        pending = submit(0)
        for start in range(0, len(uris), BATCH_SIZE):
            # The pool decodes the next batch while this thread computes this one's statistics.
            current, pending = pending, submit(start + BATCH_SIZE)
            good: list[DecodedImage] = []
            for offset, future in enumerate(current):
                result = future.result()
                if isinstance(result, IngestError):
                    errors.append(result)
                    continue
                good.append(result)
                positions.append(start + offset)
            stats = _batch_statistics(good)
            for name in STAT_COLUMNS:
                columns[name].extend(stats[name].tolist())
            for item in good:
                columns["width"].append(item.width)
                columns["height"].append(item.height)
                columns["file_size"].append(item.file_size)
                columns["aspect_ratio"].append(item.width / item.height)
                exif_rows.append(item.exif)
                thumbnails.append(item.thumbnail)
            if progress:
                progress(min(start + BATCH_SIZE, len(uris)), len(uris))
    index = pd.Index(positions, dtype=np.int64)
    frame = pd.DataFrame({"uri": pd.Series([uris[p] for p in positions], index=index, dtype=object)})
    frame["width"] = np.asarray(columns["width"], dtype=np.int32)
    frame["height"] = np.asarray(columns["height"], dtype=np.int32)
    frame["file_size"] = np.asarray(columns["file_size"], dtype=np.int64)
    for name in ("aspect_ratio",) + STAT_COLUMNS:
        frame[name] = np.asarray(columns[name], dtype=np.float64)
    for name in EXIF_COLUMNS:
        values = [row.get(name) for row in exif_rows]
        if any(v is not None for v in values):
            frame[name] = _exif_series(name, values, index)
    frame["thumbnail"] = pd.Series(thumbnails, index=index, dtype=object)
    if errors and not skip_bad:
        raise _all_unreadable(errors)
    if errors:
        log.warning("skipped %d unreadable image(s)", len(errors))
    return frame, errors


def _all_unreadable(errors: list[IngestError], shown: int = 10) -> IngestError:
    """The first bad image's error, naming the others too."""
    first = errors[0]
    if len(errors) == 1:
        return first
    others = [str(e.file) for e in errors[1:shown + 1]]
    more = f" and {len(errors) - 1 - len(others)} more" if len(errors) - 1 > len(others) else ""
    return IngestError(f"{first.message}; {len(errors) - 1} more unreadable image(s): {', '.join(others)}{more} "
                       "(--skip-bad leaves them out)", file=first.file, row=first.row, field=first.field)


def _exif_series(name: str, values: list, index: pd.Index) -> pd.Series:
    if name == "exif_datetime":
        return pd.Series(pd.to_datetime(values), index=index, dtype="datetime64[us]")
    if name in ("exif_make", "exif_model", "exif_lens_model"):
        return pd.Series(values, index=index, dtype="string")
    if name in ("exif_orientation", "exif_iso"):
        return pd.Series([None if v is None else round(v) for v in values], index=index, dtype="Int64")
    return pd.Series([np.nan if v is None else v for v in values], index=index, dtype=np.float64)
