"""What a perturbation is, without torch: the kinds, their strength ranges, one image's settings.

``KINDS`` holds each kind's range, slider step, default sweep levels and
counterfactual search bounds; ``Settings`` is the what-if of one image (a
strength per kind and the occlusion centre), checked against those ranges.
Pages and URL parsing use these without loading torch; ``core.perturb``
applies them to images (and re-exports ``KINDS`` and ``Settings``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping

from .errors import EvalError


@dataclass(frozen=True)
class Kind:
    """One perturbation: its strength's range, slider step, default sweep levels and
    counterfactual search bounds (one per direction: signed kinds search both ways)."""

    name: str
    label: str
    unit: str
    low: float
    high: float
    step: float
    levels: tuple[float, ...]
    bounds: tuple[float, ...]
    geometric: bool = False

    @property
    def signed(self) -> bool:
        return self.low < 0


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("brightness", "Brightness", "added to [0, 1] intensities", -1.0, 1.0, 0.05,
         (0.0, -0.1, -0.2, -0.3, -0.4, -0.5), (-1.0, 1.0)),
    Kind("contrast", "Contrast", "relative change", -1.0, 1.0, 0.05,
         (0.0, -0.15, -0.3, -0.45, -0.6, -0.75), (-1.0, 1.0)),
    Kind("blur", "Blur", "sigma, px", 0.0, 8.0, 0.25, (0.0, 0.5, 1.0, 2.0, 3.0, 4.0), (8.0,)),
    Kind("noise", "Noise", "std of [0, 1] intensities", 0.0, 0.5, 0.01,
         (0.0, 0.02, 0.05, 0.1, 0.15, 0.2), (0.5,)),
    Kind("jpeg", "JPEG compression", "100 - quality", 0.0, 99.0, 1.0,
         (0.0, 50.0, 70.0, 85.0, 90.0, 95.0), (99.0,)),
    Kind("rotation", "Rotation", "degrees, counter-clockwise", -180.0, 180.0, 1.0,
         (0.0, 5.0, 10.0, 20.0, 30.0, 45.0), (-90.0, 90.0), geometric=True),
    Kind("scale", "Scale", "zoom factor - 1", -0.75, 1.0, 0.05,
         (0.0, -0.1, -0.2, -0.3, -0.4, -0.5), (-0.75, 1.0), geometric=True),
    Kind("occlusion", "Occlusion", "patch side / shorter image side", 0.0, 1.0, 0.05,
         (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), (1.0,)),
)}
# Parameters that are not strengths: where the occlusion patch sits (fractions of W and H).
POSITIONS = {"occlusion_x": 0.5, "occlusion_y": 0.5}


def kind(name: str) -> Kind:
    """The registry entry of ``name``; EvalError naming the valid kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise EvalError(f"unknown perturbation {name!r}", field="perturbation", choices=list(KINDS)) from None


def check_strength(name: str, value: float) -> float:
    """``value`` as a float inside the kind's (or position's) range, else EvalError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EvalError(f"{name} strength {value!r} is not a number", field=name) from None
    low, high = (0.0, 1.0) if name in POSITIONS else (kind(name).low, kind(name).high)
    if not (low <= number <= high):
        raise EvalError(f"{name} strength {number:g} is outside [{low:g}, {high:g}]", field=name)
    return number


# --------------------------------------------------------------------------- settings of one image


@dataclass(frozen=True)
class Settings:
    """The what-if of one image: a strength per kind (0 = off) and the occlusion centre."""

    brightness: float = 0.0
    contrast: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0
    rotation: float = 0.0
    scale: float = 0.0
    occlusion: float = 0.0
    occlusion_x: float = POSITIONS["occlusion_x"]
    occlusion_y: float = POSITIONS["occlusion_y"]

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_strength(f.name, getattr(self, f.name)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "Settings":
        """From ``{name: value}`` (e.g. URL parameters); unknown names are an EvalError."""
        names = {f.name for f in fields(cls)}
        unknown = [k for k in values if k not in names]
        if unknown:
            raise EvalError(f"unknown what-if setting {unknown[0]!r}", field=unknown[0], choices=sorted(names))
        return cls(**{k: float(v) for k, v in values.items()})

    def changed(self) -> dict[str, float]:
        """Settings that differ from the default (the occlusion centre only with a patch)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name in KINDS and getattr(self, f.name) != 0.0}
        if self.occlusion:
            out.update({n: getattr(self, n) for n in POSITIONS if getattr(self, n) != POSITIONS[n]})
        return out

    @property
    def is_identity(self) -> bool:
        return not any(getattr(self, name) for name in KINDS)

    def strengths(self) -> dict[str, float]:
        """Strength per kind plus the occlusion centre: one row of ``perturb``'s table."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """``blur 2 (sigma, px), noise 0.05 (...)`` or ``no perturbation``."""
        parts = []
        for name, value in self.changed().items():
            if name in KINDS:
                parts.append(f"{KINDS[name].label.lower()} {value:g} ({KINDS[name].unit})")
        if self.occlusion:
            parts.append(f"patch at ({self.occlusion_x:g}, {self.occlusion_y:g})")
        return ", ".join(parts) or "no perturbation"

    def with_(self, **changes: float) -> "Settings":
        return replace(self, **changes)
