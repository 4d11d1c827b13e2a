"""Threshold rules: a decision threshold from defect-free validation scores only, with the evidence behind it.

Validation sets are small (9–92 images) and patch-distance distributions heavy-tailed, so how a threshold
is read off the normal scores matters as much as the scores. Each rule is one small strategy class (in
the style of patchcore-inspection's samplers) taking a `NormalScores` sample of one level (image scores,
or map pixels) and returning a `Decision`: the threshold plus evidence (the rule, its parameters, the
figures it used, how many validation items it rejects with a Clopper–Pearson interval of the
false-alarm rate, and one line for reports). The interval assumes independent items: right for images,
too narrow for pixels (neighbours in a smoothed map move together), where it is a lower bound on the
uncertainty.

* `SigmaRule` — mean + k·std (the MVTec AD 2 baseline; the default, bit-identical to earlier versions);
* `QuantileRule` — the empirical upper quantile: at most a fraction `rate` of normal values above it;
* `MaxRule` — the largest normal value plus `margin`·std;
* `ParetoRule` — a generalized Pareto fit (`scipy.stats.genpareto`) to the largest normal values,
  extrapolated to a target false-alarm `rate` smaller than the validation set can show
  (peaks over threshold); inside what the data shows it is the empirical quantile.
* `BudgetRule` — a false-alarm budget: the `ParetoRule` threshold at `rate`, read off a larger normal
  sample than the validation set: the out-of-fold scores of the training images
  (`detector.out_of_fold`) and any good images added later (`anomalyvfm calibrate`). At the pixel level
  its values are each normal image's map *maximum*, so at most `rate` of good images show any outlined
  pixel. The validation images stay an independent check (`check`): how many of them the threshold
  rejects against the predicted rate, with the Clopper–Pearson interval of the observed rate.

Nothing here ever sees a defect: rules that would need labels do not belong in this module.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalyvfm.errors import UserInputError
from anomalyvfm.scoring.moments import RunningMoments

THRESHOLD_RULES = ("sigma", "quantile", "max", "gpd", "budget")
TAIL_KEPT = 200_000  # largest pixel values kept exactly: 1.6 MB, enough for rates down to 200 000 / pixels
GPD_MIN_TAIL = 5  # fewer exceedances than this cannot fit two parameters
GPD_MAX_FIT = 20_000  # exceedances the fit sees at most (evenly spaced order statistics): bounds its time
CONFIDENCE = 0.95


def sigma_threshold(moments: RunningMoments, num_sigma: float = 3.0) -> float:
    """mean + `num_sigma`·std of scores on defect-free validation data (the MVTec AD 2 baseline rule)."""
    return moments.mean + num_sigma * moments.std


class NormalScores:
    """Defect-free scores of one level in bounded memory: running moments of all values, the `keep`
    largest exactly (every rule here reads only the upper tail), and how many values were seen."""

    def __init__(self, keep: int = TAIL_KEPT) -> None:
        self.moments = RunningMoments()
        self.keep = keep
        self._top = np.empty(0)  # ascending

    def update(self, values: np.ndarray) -> None:
        """Add one image's values (its map, or its one score)."""
        values = np.asarray(values)
        self.moments.update(values)
        flat = values.ravel().astype(np.float64)
        if flat.size > self.keep:
            flat = np.partition(flat, flat.size - self.keep)[-self.keep:]
        merged = np.concatenate([self._top, flat])
        self._top = np.sort(merged)[-self.keep:]

    @property
    def n(self) -> int:
        return self.moments.n

    @property
    def kept(self) -> int:
        return len(self._top)

    @property
    def complete(self) -> bool:
        """Whether every value seen is kept (then every order statistic is known)."""
        return self.kept == self.n

    def largest(self, rank: int) -> float:
        """The `rank`-th largest value (1 = maximum); a one-line error when it was not kept."""
        if not 1 <= rank <= len(self._top):
            raise UserInputError(f"the rule needs the {rank}-th largest of {self.n} validation values but only "
                                 f"the {len(self._top)} largest are kept: ask for a smaller false-alarm rate")
        return float(self._top[-rank])

    def tail(self, count: int) -> np.ndarray:
        """The `count` largest values, ascending."""
        return self._top[-count:]

    def above(self, threshold: float) -> int | None:
        """How many values exceed `threshold`; None when the answer lies below the kept tail."""
        count = len(self._top) - int(np.searchsorted(self._top, threshold, side="right"))
        return None if count == len(self._top) and not self.complete else count


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate observed as `k` of `n`."""
    from scipy.stats import beta

    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


@dataclass
class Decision:
    """A threshold and the evidence for it (stored in the model, shown in reports)."""

    threshold: float
    evidence: dict[str, Any] = field(default_factory=dict)


class ThresholdRule(abc.ABC):
    """Reads a threshold off defect-free scores of one level; `what` names the values in the report line.

    `sample` says which normal values the rule reads: "validation" (map pixels / image scores of the
    validation images) or "normal" (out-of-fold and added good images, per-image map maxima at the pixel level).
    """

    name: str
    sample = "validation"

    @abc.abstractmethod
    def _threshold(self, sample: NormalScores) -> tuple[float, dict[str, Any], str]:
        """(threshold, the figures used, how it was computed in words)."""

    def decide(self, sample: NormalScores, what: str, check: NormalScores | None = None) -> Decision:
        """The threshold from `sample` with its evidence; `check` (rules whose sample is not the validation
        set) is the validation set, counted against the threshold as an independent test."""
        if sample.n == 0:
            raise UserInputError(f"no {what}: thresholds need defect-free images")
        threshold, figures, how = self._threshold(sample)
        evidence = {"rule": self.name, **self.parameters(), **figures, "values": sample.n}
        rejected = sample.above(threshold)
        line = f"{threshold:.6g} = {how} of {sample.n} {what}"
        if rejected is not None:
            low, high = clopper_pearson(rejected, sample.n)
            if self.sample == "validation":
                evidence.update(validation_false_alarms=rejected, false_alarm_ci95=[low, high])
                line += f"; validation false alarms {rejected}/{sample.n} (95 % CI of the rate {low:.2g}–{high:.2g})"
            else:
                evidence.update(sample_false_alarms=rejected, sample_false_alarm_ci95=[low, high])
                line += f" ({rejected} above it)"
        if check is not None and check.n and (observed := check.above(threshold)) is not None:
            line += "; " + _check_evidence(evidence, observed, check.n, getattr(self, "rate", None))
        evidence["text"] = line
        return Decision(float(threshold), evidence)

    def parameters(self) -> dict[str, float]:
        """The rule's own parameters (its dataclass fields), as stored in the evidence."""
        return dict(vars(self))


@dataclass
class SigmaRule(ThresholdRule):
    """mean + k·std: cheap and stable, but on heavy tails with few images it lands far inside the tail."""

    k: float = 3.0
    name = "sigma"

    def _threshold(self, sample: NormalScores) -> tuple[float, dict[str, Any], str]:
        m = sample.moments
        return (sigma_threshold(m, self.k), {"mean": m.mean, "std": m.std},
                f"mean {m.mean:.6g} + {self.k:g} × std {m.std:.6g}")


@dataclass
class QuantileRule(ThresholdRule):
    """The empirical upper quantile: the smallest order statistic with at most ⌊rate·n⌋ values above."""

    rate: float
    name = "quantile"

    def _threshold(self, sample: NormalScores) -> tuple[float, dict[str, Any], str]:
        allowed = math.floor(self.rate * sample.n)
        return sample.largest(allowed + 1), {}, f"upper {self.rate:g} quantile (value ranked {allowed + 1} from the top)"


@dataclass
class MaxRule(ThresholdRule):
    """The largest validation value plus `margin`·std: no validation item is rejected."""

    margin: float = 0.0
    name = "max"

    def _threshold(self, sample: NormalScores) -> tuple[float, dict[str, Any], str]:
        top, std = sample.largest(1), sample.moments.std
        return (top + self.margin * std, {"max": top, "std": std},
                f"max {top:.6g} + {self.margin:g} × std {std:.6g}")


@dataclass
class ParetoRule(ThresholdRule):
    """Peaks over threshold: P(X > t) = (m/n)·(1 − G(t − u)), G a generalized Pareto fitted (location 0)
    to the m largest values' excesses over u, the next one down; solved for P = `rate`.

    The fit is used where the empirical quantile would rest on fewer than 5 values (rate·n < 5), i.e.
    beyond what the validation set shows; elsewhere the empirical quantile is returned. It takes
    m = 10·rate·n exceedances (the fitted tail reaches ten times past the target), at least 5 and at
    most what is kept.
    """

    rate: float
    name = "gpd"

    def _threshold(self, sample: NormalScores) -> tuple[float, dict[str, Any], str]:
        from scipy.stats import genpareto

        m = min(max(math.ceil(10 * self.rate * sample.n), GPD_MIN_TAIL), sample.kept - 1)
        if m < GPD_MIN_TAIL or self.rate * sample.n >= GPD_MIN_TAIL:
            threshold, _, how = QuantileRule(self.rate)._threshold(sample)
            return threshold, {"method": "empirical"}, how
        tail = sample.tail(m + 1)
        u, excess = float(tail[0]), tail[1:] - tail[0]
        if len(excess) > GPD_MAX_FIT:
            excess = excess[np.linspace(0, len(excess) - 1, GPD_MAX_FIT).round().astype(int)]
        shape, _, scale = genpareto.fit(excess, floc=0)
        level = 1 - self.rate * sample.n / m
        threshold = u + float(genpareto.ppf(level, shape, loc=0, scale=scale))
        figures = {"method": "gpd", "tail": m, "u": u, "shape": float(shape), "scale": float(scale)}
        return threshold, figures, (f"generalized Pareto tail (ξ {shape:.3g}, σ {scale:.3g}, {m} values over "
                                    f"{u:.6g}) extrapolated to a false-alarm rate of {self.rate:g}")


class BudgetRule(ParetoRule):
    """A false-alarm budget read off the normal sample (out of fold + added good images), checked on
    validation: see the module docstring."""

    name = "budget"
    sample = "normal"


def _check_evidence(evidence: dict[str, Any], observed: int, n: int, predicted: float | None) -> str:
    """Record in `evidence` how many of `n` validation values lie above the threshold, the Clopper–Pearson
    interval of that rate, and whether the `predicted` rate lies inside it; return the report phrase."""
    low, high = clopper_pearson(observed, n)
    evidence.update(validation_false_alarms=observed, validation_values=n, false_alarm_ci95=[low, high])
    phrase = f"validation false alarms {observed}/{n} (95 % CI of the rate {low:.2g}–{high:.2g})"
    if predicted is not None:
        within = low <= predicted <= high
        evidence.update(predicted_rate=predicted, prediction_within_ci=within)
        phrase += f", predicted {predicted:g}: {'consistent' if within else 'NOT consistent'}"
    return phrase


def make_rule(name: str, num_sigma: float = 3.0, rate: float = 0.01, margin: float = 0.0) -> ThresholdRule:
    """A rule by name with its one parameter: k for sigma, the false-alarm rate for quantile, gpd and
    budget, the margin (in std) for max."""
    if name == "sigma":
        return SigmaRule(num_sigma)
    if name == "quantile":
        return QuantileRule(rate)
    if name == "max":
        return MaxRule(margin)
    if name == "gpd":
        return ParetoRule(rate)
    if name == "budget":
        return BudgetRule(rate)
    raise ValueError(f"unknown threshold rule '{name}' (choose from {', '.join(THRESHOLD_RULES)})")
