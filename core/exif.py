"""Safe EXIF fields of an image file, and turning an image the way a viewer shows it.

Torch-free (``core.metadata``, which computes the statistics, imports torch): the
flyout reads a file's orientation without loading a model library.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

import numpy as np
import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

# EXIF tag ids: IFD0 and the Exif sub-IFD (0x8769).
_EXIF_IFD = 0x8769
_TAG_MAKE, _TAG_MODEL, _TAG_ORIENTATION, _TAG_DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_TAG_EXPOSURE, _TAG_FNUMBER, _TAG_ISO = 0x829A, 0x829D, 0x8827
_TAG_DATETIME_ORIGINAL, _TAG_FOCAL_LENGTH, _TAG_LENS_MODEL = 0x9003, 0x920A, 0xA434

# Column order of the EXIF fields; each appears only if some image has it.
EXIF_COLUMNS = ("exif_make", "exif_model", "exif_lens_model", "exif_orientation",
                "exif_datetime", "exif_exposure_time", "exif_f_number", "exif_iso",
                "exif_focal_length")
_MAX_EXIF_TEXT = 64

# Rotations/flips that display an image stored with EXIF orientation 2..8.
_ORIENTATION_OPS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _exif_text(value: object) -> str | None:
    if isinstance(value, str):
        # Pillow decodes EXIF ASCII as latin-1; cameras often write UTF-8.
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            pass
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", " ").strip()
    if not text or len(text) > _MAX_EXIF_TEXT or not text.isprintable():
        return None
    return text


def _exif_number(value: object, *, low: float, high: float) -> float | None:
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        number = float(value)  # IFDRational with a zero denominator gives nan
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not math.isfinite(number) or not low <= number <= high:
        return None
    return number


def _exif_datetime(value: object) -> pd.Timestamp | None:
    text = _exif_text(value)
    if text is None:
        return None
    try:
        return pd.Timestamp(datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S"))
    except ValueError:
        return None


def read_exif(image: Image.Image) -> dict[str, object]:
    """The safe EXIF fields of an open image; anything malformed is left out."""
    try:
        exif = image.getexif()
        sub = exif.get_ifd(_EXIF_IFD) if _EXIF_IFD in exif else {}
        fields: dict[str, object] = {
            "exif_make": _exif_text(exif.get(_TAG_MAKE)),
            "exif_model": _exif_text(exif.get(_TAG_MODEL)),
            "exif_lens_model": _exif_text(sub.get(_TAG_LENS_MODEL)),
            "exif_orientation": _exif_number(exif.get(_TAG_ORIENTATION), low=1, high=8),
            "exif_datetime": (_exif_datetime(sub.get(_TAG_DATETIME_ORIGINAL))
                              or _exif_datetime(exif.get(_TAG_DATETIME))),
            "exif_exposure_time": _exif_number(sub.get(_TAG_EXPOSURE), low=1e-9, high=1e5),
            "exif_f_number": _exif_number(sub.get(_TAG_FNUMBER), low=0.1, high=1e3),
            "exif_iso": _exif_number(sub.get(_TAG_ISO), low=1, high=1e7),
            "exif_focal_length": _exif_number(sub.get(_TAG_FOCAL_LENGTH), low=0.1, high=1e5),
        }
    except Exception as exc:  # noqa: BLE001 - EXIF is untrusted bytes; Pillow's parser raises many kinds
        log.debug("EXIF of %s skipped: %s", getattr(image, "filename", "?"), exc)
        return {}
    orientation = fields["exif_orientation"]
    if orientation is not None and orientation != int(orientation):
        fields["exif_orientation"] = None
    return {k: v for k, v in fields.items() if v is not None}


def upright(image: Image.Image, orientation: object) -> Image.Image:
    """``image`` (in the stored frame, where boxes and maps are drawn) the way a viewer shows
    it: turned by its EXIF orientation (1..8; None, NaN or 1: as it is)."""
    try:
        code = int(orientation)
    except (TypeError, ValueError):
        return image
    for op in _ORIENTATION_OPS.get(code, ()):
        image = image.transpose(op)
    return image


# Where a stored-frame point (x, y) of an image stored w x h lands once the image is turned upright,
# per EXIF orientation; and back. Rotations and flips map boxes to boxes: each box's two corners are
# mapped and re-sorted.
def _turned_points(x: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray, code: np.ndarray,
                   *, inverse: bool) -> tuple[np.ndarray, np.ndarray]:
    if inverse:  # (x, y) is an upright point; w, h the stored size
        cases = {2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x), 6: (y, h - x), 7: (w - y, h - x),
                 8: (w - y, x)}
    else:
        cases = {2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x), 6: (h - y, x), 7: (h - y, w - x),
                 8: (y, w - x)}
    conditions = [code == c for c in cases]
    return (np.select(conditions, [p[0] for p in cases.values()], x),
            np.select(conditions, [p[1] for p in cases.values()], y))


QUARTER_TURNS = (5, 6, 7, 8)  # orientations whose upright picture swaps width and height


def upright_size(width: float, height: float, orientation: object) -> tuple[float, float]:
    """The size of an image stored ``width`` x ``height`` once turned upright."""
    return (height, width) if orientation_codes(orientation)[0] in QUARTER_TURNS else (width, height)


def orientation_codes(orientation: object) -> np.ndarray:
    """EXIF orientations as integers 1..8 (missing or invalid: 1, as stored)."""
    values = pd.to_numeric(pd.Series(np.atleast_1d(np.asarray(orientation, dtype=object))), errors="coerce")
    return values.where(values.between(1, 8), 1).fillna(1).to_numpy(np.int64)


def turn_boxes(boxes: np.ndarray, width: object, height: object, orientation: object, *,
               to_upright: bool = True) -> np.ndarray:
    """``(n, 4)`` boxes ``xmin, ymin, xmax, ymax`` of images stored ``width`` x ``height`` (one per
    box, or one for all) moved from the stored frame to the upright one (how ``upright`` shows the
    image), or back with ``to_upright=False``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = (np.broadcast_to(np.asarray(v, dtype=np.float64), len(boxes)) for v in (width, height))
    code = np.broadcast_to(orientation_codes(orientation), len(boxes)) if len(boxes) else np.ones(0, np.int64)
    x0, y0 = _turned_points(boxes[:, 0], boxes[:, 1], w, h, code, inverse=not to_upright)
    x1, y1 = _turned_points(boxes[:, 2], boxes[:, 3], w, h, code, inverse=not to_upright)
    return np.stack([np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)], axis=1)
