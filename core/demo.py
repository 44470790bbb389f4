"""Demo stores built offline from scikit-learn's digits (``load_digits``, 1797 8×8 bitmaps).

``build_demos(out_dir)`` writes ``demo-multiclass``, ``demo-multilabel`` and
``demo-detection``: scenes composed from upscaled digits under nuisance
factors that really move accuracy, so error analysis and fairness views find
slices with a cause one can name:

- ``site`` (lab, office, warehouse, outdoor): background colours, gradients,
  lighting and clutter. The warehouse is dim; outdoor backgrounds are
  colourful with strong gradients.
- ``camera`` (dslr, phone, webcam): the phone blurs, the webcam is noisy; in
  dim light every camera is noisier (it raises its gain).
- ``digit_size`` / ``smallest_digit`` (px): small digits keep less detail.
- ``clutter`` (stray strokes) and ``occluded`` (a patch over part of a digit;
  for detection also digits overlapping each other); multilabel and
  detection add ``digits`` (how many), detection ``crowd`` (a row of tiny
  copies annotated as one iscrowd box).

Half of the digit bitmaps of each class are held out for the stored (test)
images; models train on scenes made from the other half. Two models per task,
``baseline`` and ``candidate``, are trained on the CPU in seconds (baselines
are narrower, see only well-lit scenes and do not normalise exposure, so
they fail in the dark; the detection baseline also has cruder proposals), saved as
``<out>/<store>.models/<model_id>.pt`` and re-runnable through
``core.models.load_model`` (loader ``core.demo:load_demo_model``). The stored
predictions are made by ``core.models`` from the written PNG files, exactly as
the app would re-run them. In the multiclass store 2 % of the labels are
flipped on purpose; meta ``injected_label_errors`` lists their image ids.

Everything is seeded: the same arguments give the same stores.

Background steps (for ``make run`` and the app's first start on an empty data folder):
``visionlens demo --explain`` computes the explanation sample (``explain_demos``: the
first ``EXPLAIN_IMAGES`` images of each store, both models, every method that applies,
written to ``PLAN_FILE``), resumable; ``--then-explain`` starts it after a build. Each step
holds a lock file in the data folder (``DemoLock``) and writes a status file
(``StatusFile``) that the app polls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .demo_jobs import (EXPLAIN_IMAGES, PLAN_FILE, PLAN_KEYS, BUILD_LOCK, BUILD_STATUS, EXPLAIN_LOCK, EXPLAIN_STATUS, EXPLAIN_LOG, BUILD_STAGES, DemoLock, StatusFile, lock_holder, start_explaining)
from .demo_models import N_DIGITS, DigitDetector, build_demo_model, load_demo_model
from .embeddings import compute_embeddings
from .errors import IngestError
from .ingest.build import Dataset, ModelRun, build_store
from .label_quality import write_label_quality
from .models import predict_classifier, predict_detector

log = logging.getLogger(__name__)

__all__ = ["build_demos", "demo_main", "load_demo_model", "TASKS", "CLASS_NAMES"]

Progress = Callable[[str, int, int], None]

TASKS = ("multiclass", "multilabel", "detection")
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SITES = ("lab", "office", "warehouse", "outdoor")
CAMERAS = ("dslr", "phone", "webcam")
LABEL_ERROR_RATE = 0.02
RENDER_CHUNK = 256  # scenes rendered together (bounds memory)


# --------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class Glyphs:
    """Digit bitmaps (N, 8, 8) in [0, 1] and their labels (N,)."""

    bitmaps: np.ndarray
    labels: np.ndarray


def digit_glyphs(seed: int) -> tuple[Glyphs, Glyphs]:
    """scikit-learn's digits split in half per class: (train, test); no bitmap in both."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    bitmaps = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(N_DIGITS):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: len(members) // 2]] = True
    return Glyphs(bitmaps[~test], labels[~test]), Glyphs(bitmaps[test], labels[test])


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class SiteProfile:
    weight: float
    gain: tuple[float, float]  # illumination multiplier
    background: tuple[float, float]  # background grey level
    saturation: float  # how far background colours stray from grey
    gradient: float  # strength of the lighting gradient across the scene
    clutter: float  # mean number of stray strokes


@dataclass(frozen=True)
class CameraProfile:
    weight: float
    blur: tuple[float, float]  # gaussian sigma, px
    noise: tuple[float, float]  # gaussian sigma, in [0, 1] intensity units


SITE_PROFILES = {
    "lab": SiteProfile(0.43, (0.8, 1.05), (0.75, 0.95), 0.04, 0.05, 0.2),
    "office": SiteProfile(0.25, (0.55, 1.0), (0.6, 0.9), 0.12, 0.15, 0.6),
    "warehouse": SiteProfile(0.12, (0.12, 0.45), (0.5, 0.8), 0.08, 0.2, 1.2),
    "outdoor": SiteProfile(0.2, (0.75, 1.15), (0.45, 0.85), 0.3, 0.35, 0.8),
}
CAMERA_PROFILES = {
    "dslr": CameraProfile(0.7, (0.0, 0.5), (0.004, 0.02)),
    "phone": CameraProfile(0.15, (1.5, 2.8), (0.01, 0.03)),
    "webcam": CameraProfile(0.15, (0.3, 0.8), (0.1, 0.2)),
}
# Baseline models train under good light only (the cameras are the same).
WELL_LIT = (0.8, 1.05)
OCCLUSION_RATE = 0.06
SMALL_DIGIT_RATE = 0.12
# In low light the camera raises its gain, and its noise with it (up to a ceiling).
LOW_LIGHT_NOISE = 2.5
MAX_NOISE = 0.25


@dataclass(frozen=True)
class Conditions:
    """Per-scene nuisance factors; every array has one entry per scene."""

    site: np.ndarray  # index into SITES
    camera: np.ndarray  # index into CAMERAS
    gain: np.ndarray
    blur: np.ndarray
    noise: np.ndarray
    clutter: np.ndarray  # number of stray strokes
    occluded: np.ndarray  # bool: a patch covers part of one digit
    background: np.ndarray  # (n, 3) colour
    gradient: np.ndarray  # (n, 2) lighting slope along x and y
    ink: np.ndarray  # (n, 3) digit colour
    stroke: np.ndarray  # (n, 3) clutter colour
    patch: np.ndarray  # (n, 3) occluder colour


def _uniform(rng: np.random.Generator, bounds: np.ndarray) -> np.ndarray:
    """One draw per row of ``bounds`` (n, 2) = (low, high)."""
    return bounds[:, 0] + rng.random(len(bounds)) * (bounds[:, 1] - bounds[:, 0])


def sample_conditions(rng: np.random.Generator, n: int, *, well_lit: bool = False) -> Conditions:
    """Nuisance factors of ``n`` scenes (with ``well_lit``, no site is dim)."""
    sites = [SITE_PROFILES[s] for s in SITES]
    cameras = [CAMERA_PROFILES[c] for c in CAMERAS]

    def table(profiles: list, field: str) -> np.ndarray:
        return np.array([getattr(p, field) for p in profiles], dtype=np.float64)

    site_weight, camera_weight = table(sites, "weight"), table(cameras, "weight")
    site = rng.choice(len(SITES), n, p=site_weight / site_weight.sum())
    camera = rng.choice(len(CAMERAS), n, p=camera_weight / camera_weight.sum())
    gain = _uniform(rng, np.array([WELL_LIT] * n) if well_lit else table(sites, "gain")[site])
    blur = _uniform(rng, table(cameras, "blur")[camera])
    noise = _uniform(rng, table(cameras, "noise")[camera])
    noise = np.minimum(noise * (1 + LOW_LIGHT_NOISE * np.clip(1 - gain, 0, 1)), MAX_NOISE)
    clutter = np.minimum(rng.poisson(table(sites, "clutter")[site]), 4)
    occluded = rng.random(n) < OCCLUSION_RATE
    grey = _uniform(rng, table(sites, "background")[site])
    tint = rng.normal(0, 1, (n, 3)) * table(sites, "saturation")[site, None]
    background = np.clip(grey[:, None] + tint, 0.2, 1.0)
    gradient = rng.normal(0, 1, (n, 2)) * table(sites, "gradient")[site, None]
    # Dark ink of any hue: at least 0.35 below the background's luminance.
    ink = np.clip(background.mean(axis=1, keepdims=True) - 0.35 - 0.3 * rng.random((n, 1))
                  + rng.normal(0, 0.08, (n, 3)), 0.0, 1.0)
    stroke = np.clip(ink + rng.normal(0, 0.15, (n, 3)), 0.0, 1.0)
    patch = rng.uniform(0.2, 0.9, (n, 3))
    return Conditions(site, camera, gain, blur, noise, clutter, occluded, background, gradient,
                      ink, stroke, patch)


# --------------------------------------------------------------------------- layout and rendering


@dataclass(frozen=True)
class Layout:
    """Digit instances: scene index, glyph index, box (x0, y0, w, h) in px; sorted by scene."""

    scene: np.ndarray
    glyph: np.ndarray
    box: np.ndarray  # (K, 4) x0, y0, w, h
    crowd: np.ndarray  # (K,) -1, or the id of the crowd group the instance belongs to


@dataclass(frozen=True)
class Scenes:
    """Rendered scenes and per-instance ground truth."""

    images: np.ndarray  # (n, S, S, 3) uint8
    layout: Layout
    gt_boxes: np.ndarray  # (K, 4) xyxy px, tight around each instance's ink


def _interpolation(start: torch.Tensor, extent: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear weights (K, size, 8) from 8 glyph cells onto ``size`` canvas pixels, the glyph
    spanning [start, start + extent); zero outside (like grid_sample with zero padding)."""
    centre = torch.arange(size, dtype=torch.float32) + 0.5
    q = (centre.view(1, -1) - start.view(-1, 1)) / extent.view(-1, 1) * 8 - 0.5
    cells = torch.arange(8, dtype=torch.float32)
    return (1 - (q.unsqueeze(2) - cells).abs()).clamp_(min=0)


def _glyph_ink(glyphs: np.ndarray, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each glyph drawn into its box on an empty ``size``² canvas: (K, size, size) in [0, 1]."""
    x0, y0, w, h = boxes.unbind(1)
    # Bilinear upscaling is separable: rows then columns, as two small batched matmuls.
    rows, cols = _interpolation(y0, h, size), _interpolation(x0, w, size)
    sampled = rows @ torch.from_numpy(glyphs) @ cols.transpose(1, 2)
    # Sharpen the upscaled bitmap into strokes with soft edges.
    return sampled.sub_(0.25).div_(0.35).clamp_(0, 1)


def _stroke_ink(rng: np.random.Generator, counts: np.ndarray, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Stray line segments: (owner scene of each stroke, (M, size, size) ink)."""
    owner = np.repeat(np.arange(len(counts)), counts)
    m = len(owner)
    start = rng.uniform(0, size, (m, 2))
    angle = rng.uniform(0, np.pi, m)
    length = rng.uniform(0.2, 0.6, m) * size
    end = start + length[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    width = rng.uniform(1.0, 2.5, m) * max(1.0, size / 64)
    p = torch.arange(size, dtype=torch.float32) + 0.5
    px, py = p.view(1, 1, size), p.view(1, size, 1)
    a = torch.from_numpy(start).float()
    d = torch.from_numpy(end - start).float()
    ax, ay = a[:, 0].view(m, 1, 1), a[:, 1].view(m, 1, 1)
    dx, dy = d[:, 0].view(m, 1, 1), d[:, 1].view(m, 1, 1)
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    dist = torch.hypot(px - ax - t * dx, py - ay - t * dy)
    half = torch.from_numpy(width / 2).float().view(m, 1, 1)
    return owner, (half + 0.5 - dist).clamp_(0, 1)


def _per_scene_max(values: torch.Tensor, owner: np.ndarray, n: int) -> torch.Tensor:
    """Max over the maps (M, S, S) that belong to each of ``n`` scenes: (n, S, S)."""
    size = values.shape[-1]
    out = torch.zeros(n, size * size)
    if len(owner):
        index = torch.from_numpy(owner).view(-1, 1).expand(-1, size * size)
        out.scatter_reduce_(0, index, values.reshape(len(owner), -1), reduce="amax")
    return out.view(n, size, size)


def _tight_boxes(ink: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge boxes around where each map (K, S, S) reaches half its maximum."""
    size = ink.shape[-1]
    row_peak, col_peak = ink.amax(dim=2), ink.amax(dim=1)
    half = 0.5 * row_peak.amax(dim=1, keepdim=True).clamp_min(1e-6)
    rows, cols = row_peak >= half, col_peak >= half
    y0 = rows.float().argmax(dim=1)
    y1 = size - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = size - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _blur(images: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Gaussian blur with one sigma per image (separable, depthwise), in place: (n, 3, S, S).

    Images are grouped by kernel radius so sharp images pay for small kernels only."""
    radius = np.ceil(3 * sigma).astype(np.int64)
    for r in np.unique(radius[radius > 0]):
        which = torch.from_numpy(np.flatnonzero(radius == r))
        group = images[which]
        n, c, h, w = group.shape
        offsets = torch.arange(-r, r + 1, dtype=torch.float32)
        s = torch.from_numpy(sigma[which.numpy()]).float().view(-1, 1)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        flat = F.pad(group.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate")
        flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
        flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
        images[which] = flat.view(n, c, h, w)
    return images


def _patch_masks(boxes: np.ndarray, side: np.ndarray, depth: np.ndarray, size: int) -> torch.Tensor:
    """Occluding patches (n, size, size): a band over one side (top, bottom, left, right)
    of each box, ``depth`` of its height or width deep, 1 px wider than the box."""
    x0, y0, x1, y1 = (boxes[:, i].copy() for i in range(4))
    cut_y, cut_x = (y1 - y0) * depth, (x1 - x0) * depth
    y1 = np.where(side == 0, y0 + cut_y, y1)
    y0 = np.where(side == 1, y1 - cut_y, y0)
    x1 = np.where(side == 2, x0 + cut_x, x1)
    x0 = np.where(side == 3, x1 - cut_x, x0)
    centre = torch.arange(size, dtype=torch.float32).view(1, -1) + 0.5

    def within(lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
        return (centre >= torch.from_numpy(lo - 1).float().view(-1, 1)) & \
            (centre <= torch.from_numpy(hi + 1).float().view(-1, 1))

    return within(y0, y1).unsqueeze(2) & within(x0, x1).unsqueeze(1)


def render(glyphs: Glyphs, layout: Layout, cond: Conditions, size: int, rng: np.random.Generator,
           occlusion_target: np.ndarray) -> Scenes:
    """Compose scenes: background, clutter, digits, occluding patch, light, blur, noise, uint8.

    ``occlusion_target`` (n,) names the instance each occluded scene's patch covers.
    """
    n = len(cond.gain)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    gt_boxes = np.empty((len(layout.scene), 4), dtype=np.float32)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    side = rng.integers(0, 4, n)
    depth = rng.uniform(0.15, 0.3, n)
    for lo in range(0, n, RENDER_CHUNK):
        hi = min(n, lo + RENDER_CHUNK)
        m = hi - lo
        first, last = np.searchsorted(layout.scene, [lo, hi])
        boxes = torch.from_numpy(layout.box[first:last]).float()
        ink = _glyph_ink(glyphs.bitmaps[layout.glyph[first:last]], boxes, size)
        gt_boxes[first:last] = _tight_boxes(ink).numpy()
        digit = _per_scene_max(ink, layout.scene[first:last] - lo, m).unsqueeze(1)
        del ink
        owner, strokes = _stroke_ink(rng, cond.clutter[lo:hi], size)
        clutter = _per_scene_max(strokes, owner, m).unsqueeze(1)
        target = gt_boxes[np.maximum(occlusion_target[lo:hi], 0)]
        patch = _patch_masks(target, side[lo:hi], depth[lo:hi], size).unsqueeze(1)
        patch &= torch.from_numpy(cond.occluded[lo:hi]).view(m, 1, 1, 1)
        # Light is linear, so the gain scales every colour before compositing.
        gain = torch.from_numpy(cond.gain[lo:hi]).float().view(m, 1, 1, 1)

        def colour(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values[lo:hi]).float().view(m, 3, 1, 1) * gain

        slope = torch.from_numpy(cond.gradient[lo:hi]).float()
        light = slope[:, 0].view(m, 1, 1, 1) * coords.view(1, 1, 1, size) \
            + slope[:, 1].view(m, 1, 1, 1) * coords.view(1, 1, size, 1)
        background = torch.from_numpy(cond.background[lo:hi]).float().view(m, 3, 1, 1)
        img = (background + light).clamp_(0, 1).mul_(gain)
        img.lerp_(colour(cond.stroke), clutter)
        img.lerp_(colour(cond.ink), digit)
        img.lerp_(colour(cond.patch), patch.float())
        _blur(img, cond.blur[lo:hi])
        noise = torch.randn(img.shape, generator=noise_gen)
        img.add_(noise.mul_(torch.from_numpy(cond.noise[lo:hi]).float().view(m, 1, 1, 1)))
        img.mul_(255).add_(0.5).clamp_(0, 255)
        images[lo:hi] = img.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return Scenes(images, layout, gt_boxes)


def _glyph_choice(rng: np.random.Generator, glyphs: Glyphs, k: int) -> np.ndarray:
    return rng.integers(0, len(glyphs.labels), k)


def single_digit_layout(rng: np.random.Generator, glyphs: Glyphs, n: int, size: int) -> Layout:
    """One digit per scene near the centre, like a crop around an object: mostly 45-85 % of
    the canvas tall, some small (30-45 %)."""
    small = rng.random(n) < SMALL_DIGIT_RATE
    h = np.where(small, rng.uniform(0.3, 0.45, n), rng.uniform(0.45, 0.85, n)) * size
    w = h * rng.uniform(0.7, 0.95, n)
    x0 = (0.5 + rng.uniform(-0.2, 0.2, n)) * (size - w)
    y0 = (0.5 + rng.uniform(-0.2, 0.2, n)) * (size - h)
    return Layout(np.arange(n), _glyph_choice(rng, glyphs, n), np.stack([x0, y0, w, h], 1),
                  np.full(n, -1))


def quadrant_layout(rng: np.random.Generator, glyphs: Glyphs, n: int, size: int,
                    max_digits: int = 3) -> Layout:
    """1..max_digits digits per scene, each in its own quadrant (no overlap)."""
    counts = rng.integers(1, max_digits + 1, n)
    scene = np.repeat(np.arange(n), counts)
    k = len(scene)
    # The j-th digit of a scene takes the j-th quadrant of a random order of the four.
    order = np.argsort(rng.random((n, 4)), axis=1)
    slot = np.arange(k) - np.repeat(np.cumsum(counts) - counts, counts)
    quadrant = order[scene, slot]
    half = size / 2
    h = rng.uniform(0.4, 0.95, k) * half
    w = h * rng.uniform(0.7, 0.95, k)
    x0 = (quadrant % 2) * half + rng.uniform(0, 1, k) * (half - w)
    y0 = (quadrant // 2) * half + rng.uniform(0, 1, k) * (half - h)
    return Layout(scene, _glyph_choice(rng, glyphs, k), np.stack([x0, y0, w, h], 1), np.full(k, -1))


CROWD_RATE = 0.05


def detection_layout(rng: np.random.Generator, glyphs: Glyphs, n: int, size: int) -> Layout:
    """1..5 digits per scene at random places (they may overlap), sizes from tiny to large;
    a few scenes also hold a crowd: a row of tiny copies of one digit."""
    counts = rng.choice(np.arange(1, 6), n, p=[0.15, 0.25, 0.25, 0.2, 0.15])
    scene = np.repeat(np.arange(n), counts)
    k = len(scene)
    band = rng.choice(3, k, p=[0.2, 0.55, 0.25])
    lows, highs = np.array([7.0, 14.0, 30.0]), np.array([12.0, 28.0, 46.0])
    h = rng.uniform(lows[band], highs[band])
    w = h * rng.uniform(0.7, 0.95, k)
    x0 = rng.uniform(0, 1, k) * (size - w)
    y0 = rng.uniform(0, 1, k) * (size - h)
    glyph = _glyph_choice(rng, glyphs, k)
    crowd = np.full(k, -1)
    # Crowds: 4..7 copies of one glyph, 6..9 px tall, side by side.
    crowded = np.flatnonzero(rng.random(n) < CROWD_RATE)
    copies = rng.integers(4, 8, len(crowded))
    c_scene = np.repeat(crowded, copies)
    c_slot = np.arange(len(c_scene)) - np.repeat(np.cumsum(copies) - copies, copies)
    c_h = np.repeat(rng.uniform(6, 9, len(crowded)), copies)
    c_w = c_h * 0.8
    row_w = np.repeat(copies, copies) * c_w * 1.1
    c_x0 = np.repeat(rng.uniform(0, 1, len(crowded)), copies) * (size - row_w) + c_slot * c_w * 1.1
    c_y0 = np.repeat(rng.uniform(0, 1, len(crowded)), copies) * (size - c_h)
    c_glyph = np.repeat(_glyph_choice(rng, glyphs, len(crowded)), copies)
    scene = np.concatenate([scene, c_scene])
    order = np.argsort(scene, kind="stable")
    box = np.concatenate([np.stack([x0, y0, w, h], 1), np.stack([c_x0, c_y0, c_w, c_h], 1)])
    glyph = np.concatenate([glyph, c_glyph])
    crowd = np.concatenate([crowd, np.repeat(np.arange(len(crowded)), copies)])
    return Layout(scene[order], glyph[order], box[order], crowd[order])


def occlusion_targets(rng: np.random.Generator, layout: Layout, n: int) -> np.ndarray:
    """For each scene, one of its non-crowd instances (the one a patch may cover)."""
    plain = np.flatnonzero(layout.crowd < 0)
    counts = np.bincount(layout.scene[plain], minlength=n)
    first = np.searchsorted(layout.scene[plain], np.arange(n))
    pick = first + (rng.random(n) * counts).astype(np.int64)
    return np.where(counts > 0, plain[np.minimum(pick, len(plain) - 1)], -1)


# --------------------------------------------------------------------------- training


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) → uint8 (n, 3, H, W); converted to float per batch like core.models."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


Loss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def class_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def panel_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each of the 2×2 panels (y: (B, 2, 2), 10 = empty)."""
    return F.cross_entropy(model.panel_logits(x), y)


def train_classifier(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                     loss: Loss, epochs: int, seed: int, batch_size: int = 64,
                     lr: float = 1e-2) -> torch.nn.Module:
    """Adam with a one-cycle schedule; ``inputs`` uint8 (n, 3, H, W) or float in [0, 1].
    ``seed`` orders the batches (the caller seeds the weights)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(inputs)
    steps = epochs * -(-n // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    # channels_last: oneDNN's faster convolution layout on CPU (about a third less time).
    model.to(memory_format=torch.channels_last).train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = inputs[idx]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
            value = loss(model, x.contiguous(memory_format=torch.channels_last), targets[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            schedule.step()
    return model.to(memory_format=torch.contiguous_format).eval()


@dataclass(frozen=True)
class TrainingPlan:
    """How one model of a task is trained."""

    well_lit: bool  # trained without dim scenes
    epochs: int


PLANS = {
    "multiclass": {"baseline": TrainingPlan(True, 6), "candidate": TrainingPlan(False, 8)},
    "multilabel": {"baseline": TrainingPlan(True, 5), "candidate": TrainingPlan(False, 6)},
    "detection": {"baseline": TrainingPlan(True, 3), "candidate": TrainingPlan(False, 4)},
}
# Training scenes per model (whatever the store's size): what the time budget affords.
TRAIN_SCENES = {"multiclass": 3000, "multilabel": 1600, "detection": 800}
MODEL_NAMES = {"baseline": "Baseline CNN", "candidate": "Candidate CNN"}
SIZES = {"multiclass": 48, "multilabel": 64, "detection": 96}
# Relative build time of each task (for scheduling only).
TASK_WORK = {"multiclass": 1.0, "multilabel": 1.2, "detection": 1.6}


def _multi_hot(layout: Layout, glyphs: Glyphs, n: int) -> np.ndarray:
    y = np.zeros((n, N_DIGITS), dtype=np.float32)
    y[layout.scene, glyphs.labels[layout.glyph]] = 1.0
    return y


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix (N, M) of xyxy boxes."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def _detector_crops(detector: DigitDetector, scenes: Scenes, glyphs: Glyphs,
                    rng: np.random.Generator, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier training crops from the detector's own proposals on training scenes.

    A proposal with IoU >= 0.5 to a digit takes its class, below 0.3 to all digits it is
    background (class 10), between it is left out; jittered ground-truth boxes add positives.
    """
    layout = scenes.layout
    plain = layout.crowd < 0
    labels = glyphs.labels[layout.glyph]
    n = len(scenes.images)
    crops, targets = [], []
    with torch.inference_mode():
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            x = _as_tensor(scenes.images[lo:hi]).float().div_(255.0)
            boxes, image_index = detector.propose(x)
            first, last = np.searchsorted(layout.scene, [lo, hi])
            keep = plain[first:last]
            gt = torch.from_numpy(scenes.gt_boxes[first:last][keep])
            gt_scene = torch.from_numpy(layout.scene[first:last][keep] - lo)
            gt_label = torch.from_numpy(labels[first:last][keep])
            iou = box_iou(boxes, gt) * (image_index.view(-1, 1) == gt_scene.view(1, -1))
            best, which = iou.max(dim=1)  # every scene holds a digit, so gt is never empty
            cls = torch.where(best >= 0.5, gt_label[which], torch.full_like(which, N_DIGITS))
            usable = (best >= 0.5) | (best < 0.3)
            size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
            jitter = torch.from_numpy(rng.uniform(-0.1, 0.1, tuple(gt.shape))).float() * size
            all_boxes = torch.cat([boxes[usable], gt + jitter])
            all_index = torch.cat([image_index[usable], gt_scene])
            crops.append(detector.crops(x, all_boxes, all_index))
            targets.append(torch.cat([cls[usable], gt_label]))
    return torch.cat(crops), torch.cat(targets)


def train_model(task: str, model_id: str, train_glyphs: Glyphs, rng: np.random.Generator,
                n_train: int, seed: int) -> torch.nn.Module:
    """Render this model's training scenes and train it (the same seed, the same weights,
    whatever ran before in the process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_model(task, model_id, train_glyphs, rng, n_train, seed)


def _train_model(task: str, model_id: str, train_glyphs: Glyphs, rng: np.random.Generator,
                 n_train: int, seed: int) -> torch.nn.Module:
    plan = PLANS[task][model_id]
    size = SIZES[task]
    model = build_demo_model(f"{task}-{model_id}")
    cond = sample_conditions(rng, n_train, well_lit=plan.well_lit)
    layout = LAYOUTS[task](rng, train_glyphs, n_train, size)
    scenes = render(train_glyphs, layout, cond, size, rng, occlusion_targets(rng, layout, n_train))
    if task == "detection":
        crops, targets = _detector_crops(model, scenes, train_glyphs, rng)
        train_classifier(model.classifier, crops, targets, loss=class_loss, epochs=plan.epochs, seed=seed)
        return model.eval()
    inputs = _as_tensor(scenes.images)
    if task == "multiclass":
        return train_classifier(model, inputs, torch.from_numpy(train_glyphs.labels[layout.glyph]),
                                loss=class_loss, epochs=plan.epochs, seed=seed)
    panels = torch.from_numpy(_panel_targets(layout, train_glyphs, n_train, size))
    return train_classifier(model, inputs, panels, loss=panel_loss, epochs=plan.epochs, seed=seed)


def _panel_targets(layout: Layout, glyphs: Glyphs, n: int, size: int) -> np.ndarray:
    """(n, 2, 2) digit in each panel of a quadrant layout, 10 where the panel is empty."""
    targets = np.full((n, 2, 2), N_DIGITS, dtype=np.int64)
    centre = layout.box[:, :2] + layout.box[:, 2:] / 2
    col, row = (centre >= size / 2).astype(np.int64).T
    targets[layout.scene, row, col] = glyphs.labels[layout.glyph]
    return targets


LAYOUTS = {"multiclass": single_digit_layout, "multilabel": quadrant_layout, "detection": detection_layout}


# --------------------------------------------------------------------------- store


def _write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    """One PNG per scene (lossless, so models see exactly these pixels); absolute paths."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = [str((folder / f"{i:06d}.png").resolve()) for i in range(len(images))]

    def save(i: int) -> None:
        Image.fromarray(images[i]).save(paths[i], compress_level=1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(save, range(len(images))))
    return paths


def _image_table(task: str, scenes: Scenes, cond: Conditions, glyphs: Glyphs,
                 uris: list[str]) -> pd.DataFrame:
    """The images table: ids, uris, ground truth and the user metadata columns."""
    layout = scenes.layout
    n = len(uris)
    plain = layout.crowd < 0
    heights = scenes.gt_boxes[:, 3] - scenes.gt_boxes[:, 1]
    smallest = np.full(n, np.inf)
    np.minimum.at(smallest, layout.scene[plain], heights[plain])
    frame = pd.DataFrame({"image_id": np.arange(n, dtype=np.int32), "uri": uris})
    labels = glyphs.labels[layout.glyph]
    if task == "multiclass":
        frame["true_label"] = labels.astype(np.int32)
    elif task == "multilabel":
        multi_hot = _multi_hot(layout, glyphs, n)
        frame["true_label"] = [np.flatnonzero(row).astype(np.int32) for row in multi_hot]
    else:
        frame["true_label"] = [np.zeros(0, np.int32)] * n  # build_store derives it from gt_boxes
    frame["site"] = np.array(SITES)[cond.site]
    frame["camera"] = np.array(CAMERAS)[cond.camera]
    frame["digit_size" if task == "multiclass" else "smallest_digit"] = smallest.astype(np.int32)
    if task != "multiclass":
        frame["digits"] = np.bincount(layout.scene[plain], minlength=n).astype(np.int32)
    frame["clutter"] = cond.clutter.astype(np.int32)
    occluded = cond.occluded.copy()
    if task == "detection":
        frame["crowd"] = np.bincount(layout.scene[~plain], minlength=n) > 0
        occluded |= _overlapping_scenes(scenes.gt_boxes[plain], layout.scene[plain], n)
    frame["occluded"] = occluded
    return frame


def _overlapping_scenes(boxes: np.ndarray, scene: np.ndarray, n: int, min_cover: float = 0.1) -> np.ndarray:
    """Scenes where some digit's box covers at least ``min_cover`` of another's."""
    counts = np.bincount(scene, minlength=n)
    slots = int(counts.max(initial=0))
    grid = np.zeros((n, slots, 4), dtype=np.float32)
    slot = np.arange(len(scene)) - np.repeat(np.cumsum(counts) - counts, counts)
    grid[scene, slot] = boxes
    lo = np.maximum(grid[:, :, None, :2], grid[:, None, :, :2])
    hi = np.minimum(grid[:, :, None, 2:], grid[:, None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=3)
    area = (grid[:, :, 2:] - grid[:, :, :2]).prod(axis=2)
    cover = inter / np.maximum(area[:, :, None], 1e-6)
    cover[:, np.arange(slots), np.arange(slots)] = 0
    return (cover >= min_cover).any(axis=(1, 2))


def _gt_frame(scenes: Scenes, glyphs: Glyphs) -> pd.DataFrame:
    """Ground-truth boxes; each crowd becomes one iscrowd box around its copies."""
    layout = scenes.layout
    frame = pd.DataFrame(scenes.gt_boxes.astype(np.float64), columns=["xmin", "ymin", "xmax", "ymax"])
    frame["image_id"] = layout.scene.astype(np.int32)
    frame["class_id"] = glyphs.labels[layout.glyph].astype(np.int32)
    frame["group"] = np.where(layout.crowd >= 0, layout.crowd, -1 - np.arange(len(frame)))
    boxes = frame.groupby("group", sort=False).agg(
        image_id=("image_id", "first"), class_id=("class_id", "first"), xmin=("xmin", "min"),
        ymin=("ymin", "min"), xmax=("xmax", "max"), ymax=("ymax", "max"))
    boxes["iscrowd"] = boxes.index >= 0
    boxes = boxes.sort_values(["image_id", "iscrowd"], kind="stable").reset_index(drop=True)
    boxes.insert(1, "gt_id", np.arange(len(boxes), dtype=np.int32))
    boxes["area"] = (boxes["xmax"] - boxes["xmin"]) * (boxes["ymax"] - boxes["ymin"])
    return boxes


def build_task(task: str, out_dir: Path, n_images: int, seed: int, *, n_train: int | None = None,
               glyphs: tuple[Glyphs, Glyphs] | None = None, progress: Progress | None = None) -> Path:
    """Build one demo store; returns the path of its base file. ``glyphs`` = ``digit_glyphs(seed)``
    when the caller has them already."""
    if task not in TASKS:
        raise IngestError(f"unknown demo task {task!r}", field="task", choices=list(TASKS))

    logged = [""]

    def step(stage: str, done: int = 0, total: int = 1) -> None:
        if stage != logged[0]:
            log.info("%s: %s", task, stage)
            logged[0] = stage
        if progress:
            progress(f"{task}: {stage}", done, total)

    name = f"demo-{task}"
    task_seed = seed * 1000 + TASKS.index(task)
    rng = np.random.default_rng(task_seed)
    train_glyphs, test_glyphs = glyphs or digit_glyphs(seed)
    n_train = n_train or TRAIN_SCENES[task]
    size = SIZES[task]

    step("rendering scenes")
    cond = sample_conditions(rng, n_images)
    layout = LAYOUTS[task](rng, test_glyphs, n_images, size)
    scenes = render(test_glyphs, layout, cond, size, rng, occlusion_targets(rng, layout, n_images))
    uris = _write_pngs(scenes.images, out_dir / f"{name}.images")
    images = _image_table(task, scenes, cond, test_glyphs, uris)
    extra_meta: dict = {"demo_seed": seed}
    if task == "multiclass":
        flipped = np.sort(rng.choice(n_images, int(round(LABEL_ERROR_RATE * n_images)), replace=False))
        shift = rng.integers(1, N_DIGITS, len(flipped))
        true = images["true_label"].to_numpy().copy()
        true[flipped] = (true[flipped] + shift) % N_DIGITS
        images["true_label"] = true
        extra_meta["injected_label_errors"] = [int(i) for i in flipped]
    gt_boxes = _gt_frame(scenes, test_glyphs) if task == "detection" else None

    models_dir = out_dir / f"{name}.models"
    models_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, model_id in enumerate(("baseline", "candidate")):
        step(f"training {model_id}", i, 2)
        model = train_model(task, model_id, train_glyphs, np.random.default_rng([task_seed, i]),
                            n_train, seed=task_seed * 10 + i)
        path = (models_dir / f"{model_id}.pt").resolve()
        torch.save(model.state_dict(), path)
        kind = f"{task}-{model_id}"
        params = {"loader": "core.demo:load_demo_model", "kwargs": {"path": str(path), "kind": kind},
                  "input_size": [size, size], "task": task}
        step(f"predicting {model_id}", i, 2)
        ids = images["image_id"].to_numpy()
        if task == "detection":
            dets = predict_detector(model, uris, ids, input_size=(size, size), device="cpu")
            runs.append(ModelRun(model_id, MODEL_NAMES[model_id], params, det_boxes=dets))
        else:
            preds = predict_classifier(model, uris, ids, task=task, input_size=(size, size), device="cpu")
            runs.append(ModelRun(model_id, MODEL_NAMES[model_id], params, predictions=preds))

    dataset = Dataset(name, task, CLASS_NAMES, images, gt_boxes, extra_meta=extra_meta)
    store_path = out_dir / name
    build_store(store_path, dataset, runs,
                progress=lambda stage, done, total: step(stage, done, total))
    base = out_dir / f"{name}.duckdb"
    # The Label review page opens on flagged labels and the embedding map, not on a command to run.
    for i, run in enumerate(runs):
        step("label review", i, len(runs))
        write_label_quality(base, run.model_id)
        if task != "detection":  # a detector has no per-image head to take features from
            compute_embeddings(base, run.model_id, device="cpu")
    step(BUILD_STAGES[-1], 1, 1)
    return base


def _build_in_worker(task: str, out_dir: str, n_images: int, seed: int, n_train: int,
                     glyphs: tuple[Glyphs, Glyphs], queue) -> Path:
    """One task in a worker process, reporting progress through ``queue``."""
    torch.set_num_threads(1)
    return build_task(task, Path(out_dir), n_images, seed, n_train=n_train, glyphs=glyphs,
                      progress=lambda stage, done, total: queue.put((stage, done, total)))


def build_demos(out_dir: str | Path, tasks: Sequence[str] = TASKS, n_images: int = 2000, seed: int = 0,
                progress: Progress | None = None, *, n_train: int | Mapping[str, int] | None = None,
                workers: int | None = None) -> dict[str, Path]:
    """Build the demo stores into ``out_dir``: task → path of the store's base file.

    ``n_train``: training scenes per model, for every task or per task (default
    ``TRAIN_SCENES``).

    Tasks run in parallel worker processes (``workers``, default one per CPU core up to one
    per task), each torch-single-threaded: small convolutions gain little from a second
    thread, and torch's threads slow to a crawl when other programs hold the cores, while
    processes do not. The results are the same either way.
    """
    if n_images < 10:
        raise IngestError(f"a demo needs at least 10 images, got {n_images}", field="images")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise IngestError(f"unknown demo task {unknown[0]!r}", field="task", choices=list(TASKS))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The explanation plan names the old stores' images and predictions.
    (out / PLAN_FILE).unlink(missing_ok=True)
    tasks = list(dict.fromkeys(tasks))
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    train_sizes = {t: (n_train.get(t) if isinstance(n_train, Mapping) else n_train) or TRAIN_SCENES[t]
                   for t in tasks}
    glyphs = digit_glyphs(seed)  # once here, so workers need not import scikit-learn
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {task: build_task(task, out, n_images, seed, n_train=train_sizes[task],
                                     glyphs=glyphs, progress=progress) for task in tasks}
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue = manager.Queue()
        # Largest first, so the longest task starts at once.
        futures = {task: pool.submit(_build_in_worker, task, str(out), n_images, seed,
                                     train_sizes[task], glyphs, queue)
                   for task in sorted(tasks, key=TASK_WORK.get, reverse=True)}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while not queue.empty():
                stage, done, total = queue.get()
                if progress:
                    progress(stage, done, total)
        return {task: futures[task].result() for task in tasks}


# --------------------------------------------------------------------------- explanation sample
#
# The demo stores ship explanations for their first ``EXPLAIN_IMAGES`` images, from both
# models and every method that applies to the task. They are computed after the build by
# ``visionlens demo --explain`` (started in the background by ``make run`` and by the app's
# first start), which writes a part every ``EXPLAIN_CHUNK`` images, so the flyout shows a
# map as soon as its part lands, and skips what is stored, so a stopped run resumes.


# Targets per image: the predicted class; the two most probable labels; the three
# highest-scored boxes (D-RISE explains the boxes of one image from the same masks).
EXPLAIN_TOP_K = {"multiclass": 1, "multilabel": 2, "detection": 3}
# Overrides of the methods' defaults that keep the sample within a few minutes on two
# cores: D-RISE's time grows with its masks, and at the default 1000 it would take most of it.
EXPLAIN_PARAMS = {"drise": {"n_masks": 300}}
EXPLAIN_CHUNK = 10
EXPLAIN_STAGE = "explanations: chunks"


def explanation_methods(task: str) -> dict[str, dict]:
    """Method → parameter overrides for the demo sample: every method that applies to ``task``.

    XRAI's segmentation defaults are sized for 224-px inputs; the demo's scenes are
    ``SIZES[task]`` px, so its segment size, smallest segment and dilation scale with them.
    """
    from .explain.methods import METHODS

    params = {name: dict(EXPLAIN_PARAMS.get(name, {})) for name, method in METHODS.items()
              if task in method.tasks}
    if "xrai" in params:
        defaults = METHODS["xrai"].defaults
        ratio = SIZES[task] / defaults["segment_size"]
        params["xrai"].update(segment_size=SIZES[task],
                              min_segment_size=max(1, round(defaults["min_segment_size"] * ratio ** 2)),
                              dilation_radius=max(1, round(defaults["dilation_radius"] * ratio)))
    return params


def plan_explanations(out_dir: str | Path, n_images: int = EXPLAIN_IMAGES) -> dict:
    """The explanation sample of the demo stores in ``out_dir``, also written to ``PLAN_FILE``.

    ``{"images": n, "stores": {name: {"task", "image_ids", "top_k", "methods": {method:
    params}, "maps": [[model_id, method, image_id, target], ...]}}}``; ``maps`` lists every
    map the sample holds when complete, so progress is stored maps over planned ones.
    """
    if n_images < 1:
        raise IngestError(f"the explanation sample needs at least 1 image, got {n_images}",
                          field="explain_images")
    out = Path(out_dir).resolve()
    bases = {task: out / f"demo-{task}.duckdb" for task in TASKS if (out / f"demo-{task}.duckdb").is_file()}
    if not bases:
        raise IngestError(f"no demo store in {out} to explain; build them with `visionlens demo --out {out}`",
                          file=str(out))
    from .explain.precompute import planned_maps  # imports captum: only once there is work
    from .store import Store

    stores = {}
    for task, base in bases.items():
        store = Store(base)
        try:
            image_ids = list(range(min(n_images, store.image_count())))
        finally:
            store.close()
        methods = explanation_methods(task)
        maps = planned_maps(base, list(methods), image_ids=image_ids, top_k=EXPLAIN_TOP_K[task])
        stores[f"demo-{task}"] = {
            "task": task, "image_ids": image_ids, "top_k": EXPLAIN_TOP_K[task], "methods": methods,
            "maps": [[str(m), str(k), int(i), int(t)] for m, k, i, t in maps[PLAN_KEYS].itertuples(index=False)]}
    plan = {"images": n_images, "stores": stores}
    temporary = out / f".{PLAN_FILE}.tmp"
    temporary.write_text(json.dumps(plan))
    temporary.replace(out / PLAN_FILE)
    return plan




def explain_chunks(plan: dict) -> list[tuple[str, dict]]:
    """The plan's work as (store, spec of ``EXPLAIN_CHUNK`` images), the stores' chunks taken
    in turn, so every store gets its first maps early."""
    per_store = [[(name, {**spec, "image_ids": spec["image_ids"][start:start + EXPLAIN_CHUNK]})
                  for start in range(0, len(spec["image_ids"]), EXPLAIN_CHUNK)]
                 for name, spec in plan["stores"].items()]
    return [chunk for turn in itertools.zip_longest(*per_store) for chunk in turn if chunk is not None]


def explain_chunk(out_dir: str | Path, name: str, spec: dict) -> int:
    """Explain one chunk of a store's sample (a part of its own); rows written."""
    from .explain.precompute import precompute

    return precompute(Path(out_dir) / f"{name}.duckdb", list(spec["methods"]), image_ids=spec["image_ids"],
                      top_k=spec["top_k"], params=spec["methods"])


def _explain_in_worker(out_dir: str, name: str, spec: dict) -> int:
    torch.set_num_threads(1)
    return explain_chunk(out_dir, name, spec)


def explain_demos(out_dir: str | Path, n_images: int = EXPLAIN_IMAGES, *, workers: int | None = None,
                  progress: Progress | None = None) -> int:
    """Plan and compute the explanation sample of the demo stores in ``out_dir``; rows written.

    Chunks run in worker processes as the tasks of ``build_demos`` do, each writing a part,
    so the app shows maps as they land; maps already stored are skipped, so a stopped run
    resumes. ``progress`` gets ``("explanations: chunks", done, total)``.
    """
    plan = plan_explanations(out_dir, n_images)
    out = str(Path(out_dir).resolve())
    chunks = explain_chunks(plan)
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    report = progress or (lambda stage, done, total: None)
    report(EXPLAIN_STAGE, 0, len(chunks))
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            written = 0
            for done, (name, spec) in enumerate(chunks, 1):
                written += explain_chunk(out, name, spec)
                report(EXPLAIN_STAGE, done, len(chunks))
            return written
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_explain_in_worker, out, name, spec) for name, spec in chunks]
        for done, future in enumerate(as_completed(futures), 1):
            report(EXPLAIN_STAGE, done, len(chunks))
        return sum(future.result() for future in futures)










# --------------------------------------------------------------------------- CLI


def _describe(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = str(error)
    return text if isinstance(error, IngestError) or not text else f"{type(error).__name__}: {text}"


def demo_main(argv: list[str] | None = None) -> int:
    """``visionlens demo [--task T|all] [--images N] [--out DIR] [--explain] ...``."""
    parser = argparse.ArgumentParser(prog="visionlens demo", description="build the demo stores")
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--images", type=int, default=2000, help="images per store (default 2000)")
    parser.add_argument("--out", default="data", help="folder for the stores (default data/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-scenes", type=int,
                        help="training scenes per model (default per task: "
                             + ", ".join(f"{t} {n}" for t, n in TRAIN_SCENES.items()) + ")")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core, "
                                                    "at most one per task)")
    parser.add_argument("--explain", action="store_true",
                        help="instead of building, compute the explanation sample of the demo stores "
                             "in --out (resumable; ends at once if another process is computing it)")
    parser.add_argument("--explain-images", type=int, default=EXPLAIN_IMAGES,
                        help=f"images per store in the explanation sample (default {EXPLAIN_IMAGES})")
    parser.add_argument("--then-explain", action="store_true",
                        help="after building, compute the explanation sample in a background process")
    # The descriptor of the lock (BUILD_LOCK, or EXPLAIN_LOCK with --explain) when the
    # process that started this one took it already.
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    out = Path(args.out)
    started = time.perf_counter()
    last = [""]

    def report(stage: str, done: int, total: int) -> None:
        status.progress(stage, done, total)
        if stage != last[0]:
            print(f"[{time.perf_counter() - started:5.1f}s] {stage}", flush=True)
            last[0] = stage

    if args.explain:
        if args.lock_fd is not None:
            lock = DemoLock.adopt(out / EXPLAIN_LOCK, args.lock_fd)
        else:
            lock = DemoLock(out / EXPLAIN_LOCK)
            if not lock.acquire():
                print(f"explanations are being computed by process {lock_holder(out / EXPLAIN_LOCK)}; "
                      "nothing to do")
                return 0
        try:
            status = StatusFile(out / EXPLAIN_STATUS, ["explanations"])
            try:
                written = explain_demos(out, args.explain_images, workers=args.workers, progress=report)
            except BaseException as error:
                status.fail(_describe(error))
                raise
            status.finish()
        finally:
            lock.release()
        print(f"wrote {written} explanation rows in {time.perf_counter() - started:.1f}s")
        return 0

    # One build at a time in a folder: the app shows a running build's progress instead of
    # starting another, and a second command refuses.
    if args.lock_fd is not None:
        build_lock = DemoLock.adopt(out / BUILD_LOCK, args.lock_fd)
    else:
        build_lock = DemoLock(out / BUILD_LOCK)
        if not build_lock.acquire():
            raise IngestError(f"another demo build is running in {out} (process "
                              f"{lock_holder(out / BUILD_LOCK)})", file=str(out))
    try:
        status = StatusFile(out / BUILD_STATUS, tasks)
        try:
            built = build_demos(out, tasks, args.images, args.seed, progress=report,
                                n_train=args.train_scenes, workers=args.workers)
        except BaseException as error:
            status.fail(_describe(error))
            raise
        status.finish()
        for task, path in built.items():
            print(f"{task}: {path}")
        print(f"built {len(built)} demo store(s) of {args.images} images in "
              f"{time.perf_counter() - started:.1f}s")
        if args.then_explain:
            # Started while the build still holds its lock: the app never sees a moment with
            # neither step running.
            child = start_explaining(out, args.explain_images, args.workers)
            print(f"computing the explanation sample in the background (process {child.pid}, log "
                  f"{out / EXPLAIN_LOG})" if child else
                  f"explanations are being computed by process {lock_holder(out / EXPLAIN_LOCK)}")
    finally:
        build_lock.release()
    return 0

