"""Calibration: every statistic a fitted detector takes from its validation (defect-free) images.

Held in one place and stored once per score mode: the image and pixel thresholds of each mode with the
validation statistics behind them, the per-view score statistics that let several views be fused, the
statistics that put distances and head logits on one scale (score mode `fusion`), and the foreground
decision. Nothing here is ever computed from test images (`detector.calibration.calibrate` fits it);
torch-free, so the exported runtime reads the same record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from anomalyvfm.declare import from_dict
from anomalyvfm.errors import UserInputError
from anomalyvfm.scoring.names import SCORE_MODES


@dataclass
class Thresholds:
    """One score mode's decision thresholds and the validation statistics they come from."""

    image_threshold: float
    pixel_threshold: float
    validation_stats: dict[str, float]
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)  # per level: the rule and its figures
    # per source ("validation", "out_of_fold", "added"): each normal image's score and map maximum, so
    # that budget thresholds can be re-estimated from more images without the features (`head.budget`)
    normal_samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class Calibration:
    """What fit learned from validation images; `mode` is the score mode used unless the runtime picks another."""

    mode: str
    modes: dict[str, Thresholds]
    head_stats: dict[str, list[float]] = field(default_factory=dict)  # distance/head mean and std (mode fusion)
    view_stats: list[dict[str, float]] = field(default_factory=list)  # per view: patch-score mean and std
    foreground: dict[str, Any] = field(default_factory=dict)  # mask coverage figures and whether it is applied
    image_stats: dict[str, list[float]] = field(default_factory=dict)  # patch/global image evidence: mean, std

    def thresholds(self, mode: str | None = None) -> Thresholds:
        """Thresholds of `mode` (default: the fitted mode); a one-line error if this model has no such mode."""
        mode = mode or self.mode
        if mode not in self.modes:
            raise UserInputError(f"this model has no '{mode}' scores (it has: {', '.join(self.modes)}); "
                                 "head and fusion need fit --lora")
        return self.modes[mode]

    @property
    def suppress_background(self) -> bool:
        return bool(self.foreground.get("active"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Calibration":
        calibration = from_dict(cls, data, where)
        calibration.modes = {mode: from_dict(Thresholds, t, f"{where} (thresholds of '{mode}')")
                             for mode, t in calibration.modes.items()}
        for mode, t in calibration.modes.items():
            if mode not in SCORE_MODES or not all(isinstance(v, (int, float)) for v in (t.image_threshold, t.pixel_threshold)):
                raise UserInputError(f"{where}: thresholds of score mode '{mode}' are not numbers")
        calibration.thresholds()  # the fitted mode must have thresholds
        return calibration
