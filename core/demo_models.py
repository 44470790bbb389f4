"""The small torch models of the demo stores, and their loader.

``load_demo_model(path, kind)`` rebuilds a model from a saved ``state_dict``;
``kind`` names an entry of ``MODEL_KINDS`` (architecture and fixed settings),
so ``models.params`` = ``{"loader": "core.demo:load_demo_model", "kwargs":
{"path": ..., "kind": ...}}`` is enough to re-run any demo model.

- ``DigitClassifier``: (B, 3, H, W) in [0, 1] → logits (B, C). Three conv
  blocks and a global average pool. Every image is centred per channel; the
  candidates also divide by the spread, which makes them indifferent to
  exposure: that, and training on dim scenes, is what separates them from
  the baselines in the dark.
- ``PanelClassifier``: the same trunk, features max-pooled into the 2×2 panels
  of a multilabel image, each panel classified (a digit or empty); the logits
  say which digits are present (sigmoid).
- ``DigitDetector``: proposals from the pixels that stand out from a fitted
  background plane (threshold, connected components on a coarse grid, tight
  pixel boxes), each crop scored by a ``DigitClassifier`` with an extra
  background class. Batched torch (connected components by scipy on the CPU).

Only torch, numpy and scipy: torchvision's import alone costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .errors import IngestError

N_DIGITS = 10


class DigitClassifier(nn.Module):
    """A three-block CNN for small digit images."""

    def __init__(self, n_out: int, width: int, *, downsample: int = 1, standardise: bool = False):
        super().__init__()
        self.downsample = downsample
        self.standardise = standardise

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, n_out)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv block's activations (B, 4·width, H/(4·downsample), W/(4·downsample))."""
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        # Per image and channel: centring removes the colour cast; dividing by the spread
        # also removes exposure and contrast (noise stays).
        x = x - x.mean(dim=(2, 3), keepdim=True)
        if self.standardise:
            x = x / (x.std(dim=(2, 3), keepdim=True) + 0.02)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x).mean(dim=(2, 3)))


class PanelClassifier(DigitClassifier):
    """Which digits a 2×2 panel image holds: logits (B, 10), one per digit (sigmoid → presence).

    Features are max-pooled into the 2×2 grid of panels, each panel classified 11-way
    (a digit, or empty); a digit is present unless every panel says it is not there."""

    PANELS = 2

    def __init__(self, width: int, *, downsample: int = 1, standardise: bool = False):
        super().__init__(N_DIGITS + 1, width, downsample=downsample, standardise=standardise)

    def panel_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-panel logits (B, 11, 2, 2); class 10 = empty panel."""
        h = F.adaptive_max_pool2d(self.feature_map(x), self.PANELS)
        return self.head(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(self.panel_logits(x), dim=1)[:, :N_DIGITS].flatten(2)
        # log P(digit absent) = Σ_panels log(1 - p); the logit of presence follows from it.
        log_absent = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).sum(dim=2)
        return torch.log((-torch.expm1(log_absent)).clamp(min=1e-12)) - log_absent


def _distance(pixels: torch.Tensor, coef: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """Euclidean RGB distance (B, N) of pixels (B, C, N) from the planes ``coef`` (B, 3, C)."""
    diff = pixels - coef.transpose(1, 2) @ design
    return diff.mul_(diff).sum(dim=1).sqrt_()


def background_residual(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Distance (over RGB) of each pixel from its image's background, modelled as a colour
    plane (constant + linear gradient) fitted by least squares, refitted without the pixels
    the first fit leaves far off (the digits and strokes): (B, H, W).

    The plane is fitted on every ``stride``-th pixel in each direction: a plane needs few."""
    b, c, h, w = x.shape
    v, u = torch.meshgrid(torch.linspace(-0.5, 0.5, h, device=x.device, dtype=x.dtype),
                          torch.linspace(-0.5, 0.5, w, device=x.device, dtype=x.dtype), indexing="ij")
    design = torch.stack([torch.ones_like(u), u, v])  # (3, H, W)
    fit_design = design[:, ::stride, ::stride].reshape(3, -1)
    fit_pixels = x[:, :, ::stride, ::stride].reshape(b, c, -1)
    weights = torch.ones(b, 1, fit_design.shape[1], device=x.device, dtype=x.dtype)
    for _ in range(2):
        weighted = fit_design.unsqueeze(0) * weights  # (B, 3, N)
        # A tiny ridge keeps the 3×3 system solvable whatever the weights leave.
        normal = weighted @ fit_design.T + 1e-6 * torch.eye(3, device=x.device, dtype=x.dtype)
        coef = torch.linalg.solve(normal, weighted @ fit_pixels.transpose(1, 2))
        residual = _distance(fit_pixels, coef, fit_design)
        typical = residual.kthvalue(residual.shape[1] // 2, dim=1, keepdim=True).values
        weights = (residual <= 3 * typical + 1e-3).to(x.dtype).unsqueeze(1)
    return _distance(x.reshape(b, c, h * w), coef, design.reshape(3, -1)).view(b, h, w)


# 8-connectivity within each image of a (B, h, w) stack, none across images.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


def grid_components(cells: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected component labels of a boolean grid (B, h, w): 0 off, else 1..n, unique
    over the batch; and n. (scipy's C labelling: one call for the whole batch.)"""
    labels, count = ndimage.label(cells.cpu().numpy(), structure=_IN_PLANE)
    return torch.from_numpy(labels.astype(np.int64)).to(cells.device), int(count)


@dataclass(frozen=True)
class ProposalSettings:
    """How the detector turns pixels into candidate boxes."""

    cell: int  # grid cell (px): components are found on cells, so strokes closer than this join
    adaptive: bool  # smoothed, threshold relative to each image's noise and contrast; or raw, absolute
    threshold: float  # absolute threshold, or fraction of the way from median to top contrast
    min_pixels: int  # smaller components are dropped
    max_proposals: int  # per image, largest first


class DigitDetector(nn.Module):
    """Contrast proposals + a crop classifier with a background class."""

    def __init__(self, proposals: ProposalSettings, width: int, *, crop: int = 16,
                 min_score: float = 0.05):
        super().__init__()
        self.settings = proposals
        self.crop = crop
        self.min_score = min_score
        self.classifier = DigitClassifier(N_DIGITS + 1, width, standardise=True)

    def foreground(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean (B, H, W) mask of pixels that stand out from the background."""
        s = self.settings
        residual = background_residual(x)
        if not s.adaptive:
            return residual > s.threshold
        residual = F.avg_pool2d(residual.unsqueeze(1), 3, stride=1, padding=1,
                                count_include_pad=False).squeeze(1)
        ordered = residual[:, ::2, ::2].flatten(1).sort(dim=1).values
        n = ordered.shape[1]
        median, top = ordered[:, n // 2], ordered[:, int(n * 0.995)]
        level = median + s.threshold * (top - median)
        return residual > level.view(-1, 1, 1)

    def propose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (N, 4) xyxy pixels and their image index (N,) for a batch."""
        s = self.settings
        b, _, height, width = x.shape
        fg = self.foreground(x)
        gh, gw = -(-height // s.cell), -(-width // s.cell)
        padded = F.pad(fg.unsqueeze(1).float(), (0, gw * s.cell - width, 0, gh * s.cell - height))
        cells = F.max_pool2d(padded, s.cell).squeeze(1) > 0
        labels, count = grid_components(cells)
        pixel_labels = labels.repeat_interleave(s.cell, 1).repeat_interleave(s.cell, 2)
        pixel_labels = pixel_labels[:, :height, :width] * fg
        on = pixel_labels > 0
        ids = pixel_labels[on]
        where = on.nonzero()  # (P, 3): image, y, x
        n_labels = count + 1
        pixel_count = torch.zeros(n_labels, device=x.device, dtype=torch.int64).index_add_(
            0, ids, torch.ones_like(ids))
        big = torch.full((n_labels,), height + width, device=x.device, dtype=torch.int64)
        small = torch.full((n_labels,), -1, device=x.device, dtype=torch.int64)
        x0 = big.scatter_reduce(0, ids, where[:, 2], "amin")
        y0 = big.scatter_reduce(0, ids, where[:, 1], "amin")
        x1 = small.scatter_reduce(0, ids, where[:, 2], "amax") + 1
        y1 = small.scatter_reduce(0, ids, where[:, 1], "amax") + 1
        owner = small.scatter_reduce(0, ids, where[:, 0], "amax")
        keep = torch.nonzero(pixel_count >= s.min_pixels).squeeze(1)
        boxes = torch.stack([x0[keep], y0[keep], x1[keep], y1[keep]], dim=1).to(torch.float32)
        image_index = owner[keep]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        # Largest first within each image, at most max_proposals each.
        order = torch.argsort(image_index * (height * width + 1) - area.to(torch.int64), stable=True)
        boxes, image_index = boxes[order], image_index[order]
        first = torch.searchsorted(image_index, image_index, right=False)
        rank = torch.arange(len(image_index), device=x.device) - first
        keep = rank < s.max_proposals
        return boxes[keep], image_index[keep]

    def crops(self, x: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Square crops around each box with a margin, resized to ``crop`` px: (N, 3, crop, crop).

        Bilinear samples on a grid twice as fine, averaged 2×2 (like RoIAlign's sampling
        ratio 2), so large digits shrink without aliasing."""
        n = len(boxes)
        height, width = x.shape[2:]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * 1.25 + 2
        # Crop grid (normalised -1..1) → image coordinates (align_corners=False).
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = side / width
        theta[:, 0, 2] = 2 * centre[:, 0] / width - 1
        theta[:, 1, 1] = side / height
        theta[:, 1, 2] = 2 * centre[:, 1] / height - 1
        grid = F.affine_grid(theta, [n, 3, 2 * self.crop, 2 * self.crop], align_corners=False)
        fine = F.grid_sample(x[image_index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return F.avg_pool2d(fine, 2)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        boxes, image_index = self.propose(x)
        if len(boxes):
            probs = torch.softmax(self.classifier(self.crops(x, boxes, image_index)), dim=1)
        else:
            probs = torch.zeros((0, N_DIGITS + 1), device=x.device)
        class_probs = probs[:, :N_DIGITS]
        scores, labels = class_probs.max(dim=1)
        keep = scores >= self.min_score
        boxes, image_index = boxes[keep], image_index[keep]
        class_probs, scores, labels = class_probs[keep], scores[keep], labels[keep]
        # Proposals come sorted by image, so each image's detections are one slice.
        counts = torch.bincount(image_index, minlength=x.shape[0]).tolist()
        return [{"boxes": b, "scores": s, "labels": lab, "class_probs": p}
                for b, s, lab, p in zip(boxes.split(counts), scores.split(counts),
                                        labels.split(counts), class_probs.split(counts))]


BASELINE_PROPOSALS = ProposalSettings(cell=2, adaptive=False, threshold=0.15, min_pixels=6,
                                      max_proposals=20)
CANDIDATE_PROPOSALS = ProposalSettings(cell=3, adaptive=True, threshold=0.3, min_pixels=8,
                                       max_proposals=20)

# kind → builder. The kind, with the state_dict, fully determines the model.
MODEL_KINDS = {
    "multiclass-baseline": lambda: DigitClassifier(N_DIGITS, 12, downsample=2),
    "multiclass-candidate": lambda: DigitClassifier(N_DIGITS, 16, downsample=2, standardise=True),
    "multilabel-baseline": lambda: PanelClassifier(12, downsample=2),
    "multilabel-candidate": lambda: PanelClassifier(16, downsample=2, standardise=True),
    "detection-baseline": lambda: DigitDetector(BASELINE_PROPOSALS, 8),
    "detection-candidate": lambda: DigitDetector(CANDIDATE_PROPOSALS, 16),
}


def build_demo_model(kind: str) -> nn.Module:
    """A fresh (untrained) model of ``kind``."""
    if kind not in MODEL_KINDS:
        raise IngestError(f"unknown demo model kind {kind!r}", field="kind", choices=sorted(MODEL_KINDS))
    return MODEL_KINDS[kind]()


def load_demo_model(path: str, kind: str) -> nn.Module:
    """Rebuild a trained demo model from its saved state_dict, in eval mode."""
    model = build_demo_model(kind)
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise IngestError(f"cannot read demo model weights: {exc}", file=str(path)) from exc
    model.load_state_dict(state)
    return model.eval()
