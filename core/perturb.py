"""Image perturbations for what-if analysis and robustness sweeps, batched in torch.

One function, ``perturb(images, strengths, keys=, seed=)``, serves the flyout's
what-if sliders, ``visionlens robustness`` sweeps and counterfactual bisection:
``images`` is float32 ``(B, 3, H, W)`` in [0, 1] (what ``core.models`` feeds a
model), ``strengths`` maps a kind (and the occlusion centre) to one value per
row, so a batch mixes images and strengths freely. Every kind is the identity
at strength 0 (rows at 0 are passed through untouched, bit for bit), so a
sweep's level 0 reproduces the stored predictions.

Kinds and their strength (the ``KINDS`` registry of ``core.perturbation_kinds``, re-exported
here, holds ranges and labels):

- ``brightness``: added to every channel, clipped to [0, 1] (negative darkens);
- ``contrast``: distance from the image's mean grey scaled by ``1 + c`` (-1 gives flat grey);
- ``blur``: Gaussian sigma in pixels; each row's kernel is cut at its own 3 sigma,
  so a row's result never depends on the rest of the batch;
- ``noise``: standard deviation of additive Gaussian noise. The noise field comes
  from a counter-based integer hash of (seed, key, pixel), so it is the same on the
  CPU and on CUDA, for any batch, and the same field is scaled at every strength;
- ``jpeg``: compression = 100 - quality: baseline JPEG (4:2:0 chroma, 8x8 DCT, the
  IJG quantisation tables scaled as libjpeg scales them, rounding to 8 bits);
- ``rotation``: degrees, positive counter-clockwise, about the image centre;
- ``scale``: zoom factor ``1 + s`` about the centre (negative zooms out);
  geometry fills uncovered corners with the image's mean colour, so turning an
  image does not also darken it;
- ``occlusion``: side of a grey square as a fraction of the shorter image side,
  centred at (``occlusion_x``, ``occlusion_y``) in fractions of width and height.

They apply in the order of a camera: geometry, occlusion, contrast, brightness,
blur, noise, compression. ``transform_boxes`` moves boxes with the geometry.
CPU and CUDA give the same results within float32 rounding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvalError
from .perturbation_kinds import KINDS, POSITIONS, Settings  # also this module's API: P.KINDS, P.Settings

log = logging.getLogger(__name__)

OCCLUSION_FILL = 0.5
_BLUR_RADIUS = 3.0  # Gaussian kernels are cut at 3 sigma
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64


def table(settings: Sequence[Settings], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``perturb``'s strength table for one row per ``Settings``."""
    names = [f.name for f in fields(Settings)]
    values = np.array([[getattr(s, n) for n in names] for s in settings], dtype=np.float32).reshape(-1, len(names))
    return {n: torch.as_tensor(values[:, i], device=device) for i, n in enumerate(names)}


# --------------------------------------------------------------------------- the kinds, batched


def _rows(strengths: Mapping[str, object], name: str, n: int, device: torch.device) -> torch.Tensor | None:
    """One float32 value per row, or None when every row is at the default."""
    if name not in strengths:
        return None
    value = torch.as_tensor(strengths[name], dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.expand(n)
    if value.shape != (n,):
        raise EvalError(f"{name} has {tuple(value.shape)} values for {n} images", field=name)
    default = POSITIONS.get(name, 0.0)
    low, high = (0.0, 1.0) if name in POSITIONS else (KINDS[name].low, KINDS[name].high)
    bad = ~((value >= low) & (value <= high))
    if bool(bad.any()):
        raise EvalError(f"{name} strength {float(value[bad][0]):g} is outside [{low:g}, {high:g}]", field=name)
    if name in POSITIONS:
        return value
    return value if bool((value != default).any()) else None


def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


def _sampling_theta(rotation: torch.Tensor, scale: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) maps from output to input normalised coordinates (``affine_grid``)."""
    angle = torch.deg2rad(rotation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zoom = 1.0 + scale
    theta = torch.zeros((len(rotation), 2, 3), dtype=torch.float32, device=rotation.device)
    # Pixel-space inverse of p_out = zoom * [[c, s], [-s, c]] p_in (y down: counter-clockwise on screen),
    # conjugated with diag(W/2, H/2) into normalised coordinates.
    theta[:, 0, 0] = cos / zoom
    theta[:, 0, 1] = -sin * (height / width) / zoom
    theta[:, 1, 0] = sin * (width / height) / zoom
    theta[:, 1, 1] = cos / zoom
    return theta


def _geometry(x: torch.Tensor, rotation: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    n, _, height, width = x.shape
    rotation = rotation if rotation is not None else torch.zeros(n, device=x.device)
    scale = scale if scale is not None else torch.zeros(n, device=x.device)
    active = torch.nonzero((rotation != 0) | (scale != 0)).squeeze(1)
    if not len(active):
        return x
    part = x[active]
    mean = _mean_colour(part)
    theta = _sampling_theta(rotation[active], scale[active], height, width)
    grid = F.affine_grid(theta, list(part.shape), align_corners=False)
    moved = F.grid_sample(part - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + mean
    out = x.clone()
    out[active] = moved.clamp_(0.0, 1.0)
    return out


def _occlusion(x: torch.Tensor, size: torch.Tensor | None, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    if size is None:
        return x
    _, _, height, width = x.shape
    half = (size * min(height, width) / 2).view(-1, 1, 1)
    xs = torch.arange(width, device=x.device, dtype=torch.float32).view(1, 1, -1) + 0.5
    ys = torch.arange(height, device=x.device, dtype=torch.float32).view(1, -1, 1) + 0.5
    inside = ((xs - (cx * width).view(-1, 1, 1)).abs() < half) & ((ys - (cy * height).view(-1, 1, 1)).abs() < half)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, OCCLUSION_FILL), x)


_LUMA = (0.299, 0.587, 0.114)


def _contrast(x: torch.Tensor, change: torch.Tensor | None) -> torch.Tensor:
    if change is None:
        return x
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    grey = (x * weights).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    out = (grey + (1.0 + change.view(-1, 1, 1, 1)) * (x - grey)).clamp_(0.0, 1.0)
    return torch.where((change != 0).view(-1, 1, 1, 1), out, x)


def _brightness(x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    if offset is None:
        return x
    out = (x + offset.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    return torch.where((offset != 0).view(-1, 1, 1, 1), out, x)


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(B, 2R + 1) normalised 1-D kernels, each cut at its own 3 sigma (R: the largest
    radius); sigma 0 gives the identity."""
    radius = torch.ceil(_BLUR_RADIUS * sigma).to(torch.int64)
    big = int(radius.max()) if len(radius) else 0
    offsets = torch.arange(-big, big + 1, device=sigma.device, dtype=torch.float32).view(1, -1)
    safe = sigma.clamp(min=1e-6).view(-1, 1)
    weights = torch.exp(-0.5 * (offsets / safe) ** 2)
    weights = torch.where(offsets.abs() <= radius.view(-1, 1), weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    if sigma is None:
        return x
    active = torch.nonzero(sigma > 0).squeeze(1)
    part = x[active]
    n, c, height, width = part.shape
    kernels = gaussian_kernels(sigma[active]).repeat_interleave(c, dim=0)  # (n * c, K)
    radius = (kernels.shape[1] - 1) // 2
    flat = part.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernels.view(n * c, 1, 1, -1),
                    groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernels.view(n * c, 1, -1, 1),
                    groups=n * c)
    out = x.clone()
    out[active] = flat.view(n, c, height, width)
    return out


def _hash32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 in, int64 in [0, 2**32) out); exact on every device."""
    h = values & _MASK32
    h = (((h >> 16) ^ h) * _HASH_MULTIPLIER) & _MASK32
    h = (((h >> 16) ^ h) * _HASH_MULTIPLIER) & _MASK32
    return (h >> 16) ^ h


def noise_field(keys: torch.Tensor, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Standard normal noise (B, C, H, W) determined by (seed, key, pixel) alone (Box-Muller
    on two hashed uniforms per pixel)."""
    device = keys.device
    count = shape[0] * shape[1] * shape[2]
    counters = _hash32(torch.arange(2 * count, device=device, dtype=torch.int64)).view(1, 2, count)
    seed_mix = int(_hash32(torch.tensor([seed * 2 + 1], dtype=torch.int64))[0])
    row = _hash32(_hash32(keys.to(torch.int64)) ^ seed_mix).view(-1, 1, 1)
    bits = _hash32(counters ^ row)
    uniform = (bits.to(torch.float64) + 0.5) / float(1 << 32)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, 0]))
    z = radius * torch.cos(2.0 * math.pi * uniform[:, 1])
    return z.to(torch.float32).view(-1, *shape)


def _noise(x: torch.Tensor, std: torch.Tensor | None, keys: torch.Tensor, seed: int) -> torch.Tensor:
    if std is None:
        return x
    active = torch.nonzero(std > 0).squeeze(1)
    field = noise_field(keys[active], tuple(x.shape[1:]), seed)
    out = x.clone()
    out[active] = (x[active] + std[active].view(-1, 1, 1, 1) * field).clamp_(0.0, 1.0)
    return out


# Annex K of the JPEG standard (ITU T.81), as libjpeg uses them.
_LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
               14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
               49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                 47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))


def quantisation_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 8, 8) luma and chroma tables for integer qualities 1..100 (libjpeg's scaling)."""
    q = quality.round().clamp(1, 100)
    factor = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q).view(-1, 1, 1)

    def scaled(base: tuple[int, ...]) -> torch.Tensor:
        t = torch.tensor(base, dtype=torch.float32, device=quality.device).view(1, 8, 8)
        return torch.floor((t * factor + 50.0) / 100.0).clamp(1.0, 255.0)
    return scaled(_LUMA_TABLE), scaled(_CHROMA_TABLE)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64).view(-1, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, -1)
    m = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.to(device=device, dtype=torch.float32)


def _blocks_round_trip(plane: torch.Tensor, tables: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise a (B, H, W) plane (H, W multiples of 8, values centred on 0) in 8x8 DCT blocks."""
    b, height, width = plane.shape
    blocks = plane.view(b, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    t = tables.view(b, 1, 1, 8, 8)
    restored = dct.T @ (torch.round(coef / t) * t) @ dct
    return restored.permute(0, 1, 3, 2, 4).reshape(b, height, width)


def _upsample_triangle(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Double ``dim`` as libjpeg's "fancy" upsampling does: each new sample is 3/4 of the nearer
    and 1/4 of the farther original sample (edges repeated)."""
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    after = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), x.narrow(dim, x.shape[dim] - 1, 1)], dim=dim)
    even, odd = 0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after
    shape = list(x.shape)
    shape[dim] *= 2
    return torch.stack([even, odd], dim=dim + 1).reshape(shape)


def jpeg_round_trip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG encode + decode of (B, 3, H, W) in [0, 1] at per-row quality 1..100."""
    b, _, height, width = x.shape
    pad_h, pad_w = (-height) % 16, (-width) % 16
    v = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") * 255.0 if pad_h or pad_w else x * 255.0
    r, g, bl = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl  # centred on 0 (the +128 cancels out)
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    luma_table, chroma_table = quantisation_tables(quality)
    dct = _dct_matrix(x.device)
    y = _blocks_round_trip(y - 128.0, luma_table, dct) + 128.0
    # 4:2:0: chroma at half resolution (the padding to 16 keeps its planes whole blocks).
    chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)
    ch, cw = chroma.shape[2], chroma.shape[3]
    chroma = _blocks_round_trip(chroma.reshape(b * 2, ch, cw),
                                chroma_table.repeat_interleave(2, dim=0), dct).view(b, 2, ch, cw)
    chroma = _upsample_triangle(_upsample_triangle(chroma, 2), 3)
    cb, cr = chroma[:, 0], chroma[:, 1]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return (torch.round(rgb.clamp(0.0, 255.0)) / 255.0)[:, :, :height, :width]


def _jpeg(x: torch.Tensor, compression: torch.Tensor | None) -> torch.Tensor:
    if compression is None:
        return x
    active = torch.nonzero(compression > 0).squeeze(1)
    out = x.clone()
    out[active] = jpeg_round_trip(x[active], 100.0 - compression[active])
    return out


# --------------------------------------------------------------------------- the one entry point


def perturb(images: torch.Tensor, strengths: Mapping[str, object], *,
            keys: torch.Tensor | Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
    """Perturbed copies of ``images`` (B, 3, H, W) in [0, 1], on their device.

    ``strengths``: kind name (and ``occlusion_x`` / ``occlusion_y``) → one value or
    one value per row; missing kinds are off. ``keys`` (one integer per row, e.g. the
    image id; default the row number) and ``seed`` fix the noise, so the same image
    gets the same noise in the flyout, in a sweep and in a test.
    """
    unknown = [k for k in strengths if k not in KINDS and k not in POSITIONS]
    if unknown:
        raise EvalError(f"unknown perturbation {unknown[0]!r}", field="perturbation",
                        choices=[*KINDS, *POSITIONS])
    if images.ndim != 4 or images.shape[1] != 3:
        raise EvalError(f"images must be (B, 3, H, W), got {tuple(images.shape)}", field="images")
    x = images.to(torch.float32)
    n, device = x.shape[0], x.device
    row = {name: _rows(strengths, name, n, device) for name in (*KINDS, *POSITIONS)}
    if keys is None:
        key_rows = torch.arange(n, device=device, dtype=torch.int64)
    else:
        key_rows = torch.as_tensor(keys, dtype=torch.int64, device=device).reshape(-1)
        if key_rows.shape != (n,):
            raise EvalError(f"{len(key_rows)} keys for {n} images", field="keys")
    for name in POSITIONS:
        if row[name] is None:
            row[name] = torch.full((n,), POSITIONS[name], device=device)
    x = _geometry(x, row["rotation"], row["scale"])
    x = _occlusion(x, row["occlusion"], row["occlusion_x"], row["occlusion_y"])
    x = _contrast(x, row["contrast"])
    x = _brightness(x, row["brightness"])
    x = _blur(x, row["blur"])
    x = _noise(x, row["noise"], key_rows, seed)
    return _jpeg(x, row["jpeg"])


def transform_boxes(boxes: np.ndarray, rotation: np.ndarray | float, scale: np.ndarray | float,
                    width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) pixel xyxy after ``perturb``'s geometry on a ``width`` x ``height`` image.

    A rotated box becomes the axis-aligned box around its turned corners; boxes are
    clipped to the image. Returns (boxes, kept): ``kept`` is False for a box that
    left the image (clipped to nothing). Rows whose rotation and scale are 0 are
    returned unchanged.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    angle = np.deg2rad(np.broadcast_to(np.asarray(rotation, dtype=np.float64), (n,)))
    zoom = 1.0 + np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,))
    moved = (angle != 0) | (zoom != 1)
    cx, cy = width / 2.0, height / 2.0
    xs = boxes[:, [0, 2, 2, 0]] - cx
    ys = boxes[:, [1, 1, 3, 3]] - cy
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    # Forward map of the sampling in _geometry: p_out = zoom * [[c, s], [-s, c]] p_in (y down).
    ox = zoom[:, None] * (cos * xs + sin * ys) + cx
    oy = zoom[:, None] * (-sin * xs + cos * ys) + cy
    out = np.stack([ox.min(axis=1), oy.min(axis=1), ox.max(axis=1), oy.max(axis=1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0.0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0.0, height)
    out = np.where(moved[:, None], out, boxes)
    kept = ~moved | ((out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1]))
    return out, kept
