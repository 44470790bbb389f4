"""Heat-map overlays and detection boxes for the app and the PDF report.

Overlays are computed in torch, batched (on the GPU when present): each map is normalised,
upsampled bilinearly to its image's size, looked up in a 256-entry colour table and alpha
blended over the image; the results are encoded as JPEG by Pillow (faster here than
torchvision's encoders, which are deprecated) or as PNG by ``png_bytes`` (see there).
Normalisation, per map:

- ``signed=True``: ``v / q`` clipped to [-1, 1], centred on the table's middle colour, with
  ``q`` the ``clip_percentile`` of |v| (so a few extreme pixels do not wash the map out);
  use with a diverging map ('RdBu_r': positive red, negative blue).
- ``signed=False``: ``|v|`` rescaled from its minimum to its ``clip_percentile`` onto
  [0, 1]; maps that are all positive with an offset (D-RISE) use their full range too.

The colour tables are matplotlib's inferno (its 256 published entries) and ColorBrewer's
RdBu (11 anchors, linearly interpolated as matplotlib does); matplotlib is not needed.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .errors import VisionLensError

if TYPE_CHECKING:
    import torch

_INFERNO_HEX = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)
_RDBU_ANCHORS = ("67001f", "b2182b", "d6604d", "f4a582", "fddbc7", "f7f7f7",
                 "d1e5f0", "92c5de", "4393c3", "2166ac", "053061")

# Okabe-Ito colours (distinguishable with colour-vision deficiencies). Ground-truth kinds
# (fn, gt) are drawn dashed, predictions solid.
STATUS_COLORS = {"tp": "#009E73", "fp": "#D55E00", "fn": "#0072B2", "gt": "#56B4E9", "pred": "#CC79A7"}
GROUND_TRUTH_STATUSES = ("fn", "gt")
# PNG settings for overlays, which are transient (app, report): every row "Up"-filtered and
# deflated with zlib's run-length strategy, about 3x faster than Pillow at compress_level 1
# (whose per-row adaptive filter choice dominates its time) for files of about the same size
# on photographs; see ``png_bytes``.
PNG_FILTER_UP = 2
PNG_ZLIB_LEVEL = 1
PNG_ZLIB_STRATEGY = zlib.Z_RLE
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hex_rows(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), dtype=np.uint8).reshape(-1, 3).copy()


def _interpolated(anchors: np.ndarray, n: int = 256) -> np.ndarray:
    where = np.linspace(0.0, 1.0, len(anchors))
    grid = np.linspace(0.0, 1.0, n)
    channels = [np.interp(grid, where, anchors[:, c] / 255.0) for c in range(3)]
    return np.rint(np.stack(channels, axis=1) * 255).astype(np.uint8)


_RDBU = _interpolated(_hex_rows("".join(_RDBU_ANCHORS)))
COLORMAPS: dict[str, np.ndarray] = {
    "inferno": _hex_rows(_INFERNO_HEX),
    "RdBu": _RDBU,
    "RdBu_r": _RDBU[::-1].copy(),
}


def colormap(name: str) -> np.ndarray:
    """The (256, 3) uint8 colour table called ``name``."""
    if name not in COLORMAPS:
        raise VisionLensError(f"unknown colour map {name!r}", field="cmap", choices=list(COLORMAPS))
    return COLORMAPS[name]


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise VisionLensError(f"images must be uint8 RGB (H, W, 3), got {array.dtype} {array.shape}",
                              field="images")
    return array


def _percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    # Nearest-rank percentile per row (torch.quantile refuses inputs over 2**24 values). Both
    # branches select the same element; on the CPU numpy's introselect is about 10x faster
    # than torch.kthvalue.
    import torch

    rank = min(values.shape[1], max(1, int(np.ceil(percentile / 100.0 * values.shape[1]))))
    if values.device.type != "cpu":
        return torch.kthvalue(values, rank, dim=1, keepdim=True).values
    selected = np.partition(values.numpy(), rank - 1, axis=1)[:, rank - 1:rank]
    return torch.from_numpy(np.ascontiguousarray(selected))


def normalise(maps: torch.Tensor, *, signed: bool, clip_percentile: float) -> torch.Tensor:
    """(N, h, w) maps → values in [0, 1] for the colour table (see the module doc)."""
    if not 0.0 < clip_percentile <= 100.0:
        raise VisionLensError(f"clip_percentile must lie in (0, 100], got {clip_percentile}",
                              field="clip_percentile")
    magnitude = maps.reshape(len(maps), -1).float().abs()
    top = _percentile(magnitude, clip_percentile)
    if signed:
        flat = maps.reshape(len(maps), -1).float()
        values = (flat / top.clamp(min=1e-12)).clamp(-1.0, 1.0) * 0.5 + 0.5
    else:
        low = magnitude.amin(dim=1, keepdim=True)
        values = ((magnitude - low) / (top - low).clamp(min=1e-12)).clamp(0.0, 1.0)
    return values.reshape(maps.shape)


def blend(images: Sequence | np.ndarray, maps: Sequence | np.ndarray, *, alpha: float = 0.5,
          cmap: str = "inferno", signed: bool = False, clip_percentile: float = 99.0,
          device: str | torch.device | None = None) -> list[torch.Tensor]:
    """Blended overlays as uint8 (H, W, 3) CPU tensors, one per image.

    Few passes over the full-size pixels: the normalised map is scaled to table indices
    (+0.5, so truncation rounds) before upsampling, which is linear; the table is
    premultiplied by ``alpha`` (+0.5 for the final rounding); the image is added in place.
    """
    # torch is imported here, not with the module: box drawing and encoding need none of it,
    # and a Streamlit page that imports it pays about 500 MiB.
    import torch
    import torch.nn.functional as F

    arrays = [_as_array(im) for im in images]
    fields = [np.asarray(m, dtype=np.float32) for m in maps]
    if len(arrays) != len(fields):
        raise VisionLensError(f"{len(arrays)} images but {len(fields)} maps", field="maps")
    if any(f.ndim != 2 or f.size == 0 for f in fields):
        raise VisionLensError("each map must be a non-empty 2-D array", field="maps")
    if not 0.0 <= alpha <= 1.0:
        raise VisionLensError(f"alpha must lie in [0, 1], got {alpha}", field="alpha")
    dev = _device(device)
    table = torch.from_numpy(colormap(cmap)).to(dev).float() * alpha + 0.5
    out: list[torch.Tensor | None] = [None] * len(arrays)
    groups: dict[tuple, list[int]] = {}
    for i, (a, f) in enumerate(zip(arrays, fields)):
        groups.setdefault(a.shape[:2] + f.shape, []).append(i)
    for (height, width, *_), members in groups.items():
        values = normalise(torch.from_numpy(np.stack([fields[i] for i in members])).to(dev),
                           signed=signed, clip_percentile=clip_percentile)
        index = F.interpolate((values * 255.0 + 0.5)[:, None], size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0].long()
        mixed = F.embedding(index, table)  # (n, H, W, 3): alpha * colour + 0.5
        pixels = torch.from_numpy(np.stack([arrays[i] for i in members])).to(dev)
        mixed = mixed.add_(pixels, alpha=1.0 - alpha).to(torch.uint8).cpu()
        for slot, i in enumerate(members):
            out[i] = mixed[slot]
    return out


def _check_format(fmt: str) -> None:
    if fmt not in ("jpeg", "png"):
        raise VisionLensError(f"unknown format {fmt!r}", field="fmt", choices=["jpeg", "png"])


def render_overlays(images: Sequence | np.ndarray, maps: Sequence | np.ndarray, alpha: float = 0.5,
                    cmap: str = "inferno", signed: bool = False, fmt: str = "jpeg",
                    device: str | torch.device | None = None, *, quality: int = 90,
                    clip_percentile: float = 99.0) -> list[bytes]:
    """Encoded overlays (JPEG or PNG bytes), one per (image, map)."""
    _check_format(fmt)
    blended = blend(images, maps, alpha=alpha, cmap=cmap, signed=signed,
                    clip_percentile=clip_percentile, device=device)
    if fmt == "png":
        return [png_bytes(b.numpy()) for b in blended]
    return [encode(Image.fromarray(b.numpy()), fmt, quality) for b in blended]


def overlay(image, attribution: np.ndarray, *, alpha: float = 0.5, cmap: str = "inferno",
            signed: bool = False, clip_percentile: float = 99.0,
            device: str | torch.device | None = None) -> Image.Image:
    """One overlay as a PIL image (for further drawing, e.g. boxes)."""
    blended = blend([image], [attribution], alpha=alpha, cmap=cmap, signed=signed,
                    clip_percentile=clip_percentile, device=device)[0]
    return Image.fromarray(blended.numpy())


# --------------------------------------------------------------------------- boxes


def box_caption(row: pd.Series) -> str:
    text = row.get("text")
    if isinstance(text, str) and text:
        return text
    parts = []
    label = row.get("label")
    if label is not None and not pd.isna(label) and str(label):
        parts.append(str(label))
    for key, template in (("score", "{:.2f}"), ("iou", "IoU {:.2f}")):
        value = row.get(key)
        if value is not None and not pd.isna(value):
            parts.append(template.format(float(value)))
    return " ".join(parts)


def _colour(row: pd.Series) -> tuple[int, int, int]:
    colour = row.get("color")
    if colour is None or (not isinstance(colour, (str, tuple, list)) and pd.isna(colour)):
        status = row.get("status")
        if status not in STATUS_COLORS:
            raise VisionLensError(f"box has status {status!r} and no color", field="status",
                                  choices=list(STATUS_COLORS))
        colour = STATUS_COLORS[status]
    if isinstance(colour, str):
        colour = colour.lstrip("#")
        return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
    return tuple(int(c) for c in colour[:3])


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour, width: int) -> None:
    dash = max(4, 3 * width)
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)),
                               ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        starts = np.arange(0.0, length, 2 * dash)
        for s in starts:
            e = min(s + dash, length)
            f0, f1 = s / length, e / length
            draw.line([(ax + (bx - ax) * f0, ay + (by - ay) * f0),
                       (ax + (bx - ax) * f1, ay + (by - ay) * f1)], fill=colour, width=width)


def draw_boxes(image, boxes: pd.DataFrame) -> Image.Image:
    """A copy of ``image`` with ``boxes`` drawn and captioned.

    ``boxes``: pixel ``xmin, ymin, xmax, ymax``; a colour from ``color`` (hex or RGB) or
    ``status`` (tp, fp, fn, gt, pred; see ``STATUS_COLORS``); a caption from ``text``, or
    built from ``label`` (class name), ``score`` and ``iou`` when present. Ground-truth
    statuses (fn, gt) are dashed.
    """
    missing = [c for c in ("xmin", "ymin", "xmax", "ymax") if c not in boxes.columns]
    if missing:
        raise VisionLensError(f"boxes lack column {missing[0]!r}", field=missing[0])
    canvas = (image if isinstance(image, Image.Image) else Image.fromarray(_as_array(image)))
    canvas = canvas.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    width = max(1, round(side / 200))
    font = ImageFont.load_default(size=max(10, round(side / 32)))
    for _, row in boxes.iterrows():
        colour = _colour(row)
        box = [float(row["xmin"]), float(row["ymin"]), float(row["xmax"]), float(row["ymax"])]
        if row.get("status") in GROUND_TRUTH_STATUSES:
            _dashed_rectangle(draw, box, colour, width)
        else:
            draw.rectangle(box, outline=colour, width=width)
        caption = box_caption(row)
        if caption:
            left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
            text_h = bottom - top + 2
            y = box[1] - text_h if box[1] >= text_h else box[1]
            x = min(max(0.0, box[0]), max(0.0, canvas.size[0] - (right - left) - 2))
            draw.rectangle([x, y, x + right - left + 2, y + text_h], fill=colour)
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            draw.text((x + 1, y + 1 - top), caption, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255),
                      font=font)
    return canvas


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 RGB (H, W, 3) array, written directly.

    One filter for every row ("Up": each byte minus the byte above, modulo 256; one
    vectorised subtraction) instead of Pillow's per-row search over five filters, and zlib's
    run-length strategy, which only looks for repeats of the previous byte: filtered
    photographs are mostly runs of small differences, so this compresses about as well as
    Pillow's level 1 at a third of the time. Any PNG decoder reads the result.
    """
    array = _as_array(pixels)
    height, width, _ = array.shape
    rows = array.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = PNG_FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first is all zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    deflate = zlib.compressobj(PNG_ZLIB_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 9, PNG_ZLIB_STRATEGY)
    data = deflate.compress(filtered.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """PIL image → JPEG / PNG bytes (RGB PNGs through ``png_bytes``, other modes by Pillow)."""
    _check_format(fmt)
    if fmt == "png" and image.mode == "RGB":
        return png_bytes(np.asarray(image))
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
