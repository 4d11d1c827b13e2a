"""What a detector computes (`Settings`) and how this process runs it (`Runtime`), each declared once.

`Settings` are fixed at fit time and saved with the model: changing one changes the scores. `Runtime`
options (device, batch size, precision, score mode) change only how fast or where the same model runs
(the score mode picks among thresholds fitted for every mode), so they are given again at each load and
never read from the model directory. Both are validated when built (`anomalyvfm.declare`): an invalid
value fails before any image is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.data.images import DEFAULT_MAX_ASPECT_RATIO
from anomalyvfm.declare import SettingError, from_dict, normalise, setting
from anomalyvfm.features.names import DEFAULT_BACKBONE, FOREGROUND_MODES, PATCH, PRECISIONS
from anomalyvfm.features.tiles import Tiling
from anomalyvfm.head.defects import DEFAULT_WEIGHT
from anomalyvfm.head.head import HeadConfig
from anomalyvfm.maps.binarize import BINARIZATIONS, HYSTERESIS_FRACTION
from anomalyvfm.maps.thresholds import THRESHOLD_RULES, ThresholdRule, make_rule
from anomalyvfm.scoring.names import AUTO, IMAGE_EVIDENCE, MEMORY_BANKS, SCORE_MODES, SCORERS

IMAGE_FALSE_ALARM_RATE = 0.01  # target rates of the quantile and gpd rules when the user gives none
PIXEL_FALSE_ALARM_RATE = 0.001
BACKENDS = ("auto", "torch", "openvino", "onnx")  # what runs the backbone (`deploy.load`)
# What a stored model that does not name a setting was fitted with: the setting's default when it was added, which a
# later default must not change (every model written since names every setting; older ones cut masks at the
# global threshold, on every image).
STORED_BEFORE: dict[str, Any] = {"binarize": "global", "outline_only_flagged": False}


@dataclass(frozen=True)
class Settings:
    """Every setting that defines what a detector computes."""

    backbone: str = setting(DEFAULT_BACKBONE, "DINOv2 hub id or local model directory")
    layers: tuple[int, ...] | None = setting(None, "1-based backbone blocks to take patch features from "
                                                   "(default: one and two thirds of the depth)", low=1)
    image_size: int = setting(448, "short side fed to the backbone (px)", low=PATCH)
    scorer: str = setting("knn", "patch scorer", choices=SCORERS)
    coreset_ratio: float = setting(0.1, "kNN memory-bank fraction kept", low=0, low_open=True, high=1)
    max_bank_candidates: int = setting(100_000, "kNN patches held before the coreset", flag=None, low=1)
    memory_bank: str = setting("reservoir", "kNN candidates: a random reservoir of the training patches, or all of "
                                            "them reduced chunk by chunk (merge) in the same memory",
                               choices=MEMORY_BANKS)
    top_percent: float = setting(1.0, "image score = mean of top %% patches", low=0, low_open=True, high=100)
    image_evidence: str = setting("patch", "image score from the patch scores alone, or plus the image's global "
                                           "distance to the training images (both standardised on validation, summed); "
                                           "auto: the fit chooses per product, on validation + synthetic local and "
                                           "global anomalies (recorded in the model)",
                                  choices=(*IMAGE_EVIDENCE, AUTO))
    sigma: float = setting(4.0, "Gaussian smoothing of maps (px at backbone size)", low=0)
    threshold_rule: str | None = setting(None, "how thresholds are read off normal scores: sigma (mean + N std), "
                                               "quantile, max (+ margin std), gpd (Pareto tail fit) on validation "
                                               "scores, or budget (false-alarm budget on out-of-fold training image "
                                               "scores and per-image map maxima, checked on validation); default "
                                               "sigma, or gpd at a level whose false-alarm rate is given",
                                         choices=THRESHOLD_RULES)
    threshold_sigma: float = setting(3.0, "sigma rule: thresholds = validation mean + N std")
    threshold_margin: float = setting(0.0, "max rule: thresholds = validation maximum + N std")
    false_alarm_rate: float | None = setting(None, "image level: reject at most this fraction of good parts "
                                                   f"(quantile/gpd/budget rules; unset: {IMAGE_FALSE_ALARM_RATE}); "
                                                   "budget: also the pixel level's, unless that is given",
                                             low=0, low_open=True, high=1)
    pixel_false_alarm_rate: float | None = setting(None, "pixel level: flag at most this fraction of good pixels "
                                                         f"(quantile/gpd rules; unset: {PIXEL_FALSE_ALARM_RATE}); "
                                                         "budget: of good images with any flagged pixel",
                                                   low=0, low_open=True, high=1)
    binarize: str = setting("mebin", "defect masks: global: pixels above the pixel threshold; mebin: above each "
                                      "image's own most stable threshold over it; hysteresis: regions above a lower "
                                      f"threshold ({HYSTERESIS_FRACTION:g} of the way up from the normal pixel mean) "
                                      "holding a pixel over it, at least one patch large; mebin+hysteresis: their union; "
                                      "mebin-grown: MEBin's regions grown down to a typical good part's maximum "
                                      "(fit --defects may choose it)",
                            choices=BINARIZATIONS)
    outline_only_flagged: bool = setting(True, "outline defects only on images judged anomalous (a pass verdict "
                                               "gets an empty mask)")
    defect_weight: float | None = setting(None, "with labelled defects (fit --defects): how far a patch nearer a known "
                                                "defect than anything normal is raised (score + W x how much nearer); "
                                                "default: chosen on held-out labelled defects", low=0)
    defect_flips: bool = setting(False, "with labelled defects (fit --defects): also learn each one mirrored left-right, "
                                        "up-down and both (three more backbone passes per defect; for products whose "
                                        "defects may appear mirrored)")
    tile_size: int = setting(0, "score overlapping tiles of this many px (multiple of 14; 0 = whole image)",
                             low=0)
    tile_overlap: int = setting(56, "tile overlap in px (multiple of 14)", low=0)
    tile_scale: float = setting(1.0, "resize the original image by this factor before tiling "
                                     "(1: native resolution)", low=0, low_open=True)
    scales: tuple[int, ...] = setting((), "several short sides, one scorer each, fused into one map", low=PATCH)
    foreground: str = setting("off", "suppress background patch scores: off, on, auto (decided on validation)", choices=FOREGROUND_MODES)
    auto: bool = setting(False, "choose image size, tiling, layers and scorer on validation + synthetic anomalies")
    seed: int = setting(0, "random seed")
    lora: AdaptationConfig | None = setting(None, "EXPERIMENTAL LoRA adaptation on synthetic anomalies, not better "
                                                  "than frozen features on the four test categories (docs/adaptation.md; "
                                                  "None: frozen backbone)",
                                            flag="--lora")

    def __post_init__(self) -> None:
        normalise(self)
        if self.tile_size and (self.tile_size % PATCH or self.tile_overlap % PATCH
                               or not self.tile_overlap < self.tile_size):
            raise SettingError(f"{{tile_size}} and {{tile_overlap}} must be multiples of {PATCH} with overlap < "
                               f"size, got {self.tile_size} and {self.tile_overlap}")
        if self.scales and self.tile_size:
            raise SettingError(f"{{scales}} needs no {{tile_size}}, got {list(self.scales)} and {self.tile_size}")
        if self.threshold_rule == "budget" and self.lora is not None:
            raise SettingError("{threshold_rule} budget needs out-of-fold scores, which LoRA-adapted models "
                               "do not have (their heads were trained on the training images): drop {lora}")

    def views(self) -> list[tuple[int, Tiling | None]]:
        """(image_size, tiling) of each view, coarsest first; the last one is the reference grid."""
        if self.tile_size:
            return [(self.image_size, Tiling(self.tile_size, self.tile_overlap, self.tile_scale))]
        return [(size, None) for size in sorted(self.scales or (self.image_size,))]

    @property
    def out_of_fold(self) -> bool:
        """Whether the fit scores the training images out of fold (the budget rule reads those scores)."""
        return self.threshold_rule == "budget"

    def threshold_rules(self) -> dict[str, ThresholdRule]:
        """The rule of each level ("image", "pixel"): `threshold_rule`, else sigma, or gpd at a level whose
        false-alarm rate the user gave (so `--false-alarm-rate 0.01` alone does what it says). The budget
        rule's pixel level counts good *images* with any flagged pixel, so its default rate is the image one."""
        rules = {}
        image_rate = self.false_alarm_rate or IMAGE_FALSE_ALARM_RATE
        pixel_default = image_rate if self.threshold_rule == "budget" else PIXEL_FALSE_ALARM_RATE
        for level, rate, default in (("image", self.false_alarm_rate, IMAGE_FALSE_ALARM_RATE),
                                     ("pixel", self.pixel_false_alarm_rate, pixel_default)):
            name = self.threshold_rule or ("sigma" if rate is None else "gpd")
            rules[level] = make_rule(name, self.threshold_sigma, default if rate is None else rate, self.threshold_margin)
        return rules

    def head_config(self) -> HeadConfig:
        """What the scoring head applies of these settings (the layers must be resolved: fitted or loaded)."""
        return HeadConfig(self.scorer, len(self.views()), len(self.layers), self.top_percent, self.sigma,
                          image_evidence="patch" if self.image_evidence == AUTO else self.image_evidence,  # until chosen
                          binarize=self.binarize, outline_only_flagged=self.outline_only_flagged,
                          defect_weight=DEFAULT_WEIGHT if self.defect_weight is None else self.defect_weight,
                          image_size=self.image_size, scales=self.scales, tile_size=self.tile_size,
                          tile_scale=self.tile_scale)

    def view_summary(self) -> str:
        if self.tile_size:
            return f"tiles {self.tile_size}/{self.tile_overlap} px @ x{self.tile_scale:g}"
        return "+".join(str(size) for size in sorted(self.scales or (self.image_size,))) + " px"

    def summary(self, background_suppressed: bool | None = None) -> str:
        """What is computed, in one line (fit output, benchmark tables); `background_suppressed`: the fitted
        foreground decision, if there is one."""
        layers = ",".join(map(str, self.layers)) if self.layers else "default"
        foreground = self.foreground + ("" if background_suppressed is None else
                                        f" ({'applied' if background_suppressed else 'not applied'})")
        evidence = f", image evidence {self.image_evidence}" if self.image_evidence != "patch" else ""
        return (f"{self.view_summary()}, layers {layers}, {self.scorer}, foreground {foreground}{evidence}"
                + (", auto" if self.auto else ""))


@dataclass(frozen=True)
class Runtime:
    """How this process runs a model; never part of what the model computes."""

    batch_size: int = setting(8, "images (tiles, when tiling) per backbone batch", low=1)
    device: str = setting("cpu", "cpu, cuda, cuda:1 …")
    precision: str = setting("fp32", "autocast dtype on GPU", choices=PRECISIONS)
    max_aspect_ratio: float = setting(DEFAULT_MAX_ASPECT_RATIO, "refuse images whose long side is over N times the "
                                      "short one, unless tiling (their backbone input would be N times as long)", low=1)
    backend: str = setting("auto", "what runs the backbone: torch, openvino or onnx (a form added by export), or auto: "
                                   "the fastest form present that this machine runs, else torch", choices=BACKENDS,
                           flag="--runtime")
    score: str | None = setting(None, "distance (patch scorer), head or fusion (need --lora); fit: default distance; "
                                      "saved models: default the fitted one (thresholds of all modes are saved)",
                                choices=SCORE_MODES)

    def __post_init__(self) -> None:
        normalise(self)


def stored_settings(values: Mapping[str, Any], where: str) -> Settings:
    """The settings of a stored model; a setting it does not name is what the version that wrote it used."""
    return from_dict(Settings, {**STORED_BEFORE, **values}, where)
