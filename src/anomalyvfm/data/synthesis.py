"""Synthetic anomalies made from normal images, so detectors can be trained and checked without real defects.

Three stages, each a family of defects seen on production lines:

* ``texture``   – contamination, rust, stains: noise or the image's own texture with altered
  intensity/contrast, inside an irregular region (thresholded fractal noise or a union of blobs).
* ``structure`` – foreign objects, holes, scratches: filled ellipses, rotated rectangles and thin
  polylines with varied colour, opacity and edge softness.
* ``context``   – misplaced parts: a patch cut from another normal image, optionally rotated and
  scaled, blended in with a soft irregular region.
* ``perlin``    – DRAEM-style (Zavrtanik et al., "DRAEM – A discriminatively trained reconstruction
  embedding for surface anomaly detection", ICCV 2021): a region of thresholded smooth noise, often
  several lobes, filled with texture from another normal image of the product passed through one of
  DRAEM's photometric augmentations (inversion, solarisation, posterisation, extreme gamma). It is
  not among the default (training) stages: LoRA model selection holds it out, so the validation
  criterion measures defects of a kind the adapter never saw (`STAGES`, `HELD_OUT_STAGES`).

Three more stages make *global* (logical) anomalies, whose patches each look normal, so that the image
score's global evidence (`scoring.image_evidence`) can be judged without real defects. Each makes one
large defect; `min_scale`, `max_scale` and `max_defects` do not apply to them:

* ``colour``    – a colour or brightness shift of the whole image or of a large region.
* ``missing``   – a large region replaced by surrounding texture (the neighbouring window) or by the
  background colour (the median of the image border): a part that is not there.
* ``duplicate`` – a large region copied elsewhere in the image: a part that is there twice.

They are not in the default `SynthesisConfig` (LoRA training and `--auto` use the local stages); name
them in `stages` (or `ALL_STAGES`) to use them.

Every defect is described by a signed distance to its outline (negative inside). The alpha is a
linear ramp of that distance, so the softness is a width in pixels, the alpha is exactly zero a few
pixels outside the outline and ``alpha > 0.5`` is exactly the inside of the shape. The returned mask
is then derived from what the blending really did to the pixels (see `_honest_mask`), so a training
target never marks an unchanged pixel nor misses a heavily changed one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

STAGES = ("texture", "structure", "context")  # what `SynthesisConfig()` draws: the families adapters are trained on
HELD_OUT_STAGES = ("perlin",)  # kept for validation only, so model selection sees unseen defect types
GLOBAL_STAGES = ("colour", "missing", "duplicate")
ALL_STAGES = STAGES + HELD_OUT_STAGES + GLOBAL_STAGES

_MIN_SIDE = 8  # smaller images cannot hold a defect with a soft edge around it
_REFERENCE_SIDE = 512.0  # absolute widths (line width, edge softness) are in pixels at this short side
_MAX_SOFTNESS = 2.5  # widest alpha ramp at the reference side; bounds how far a defect bleeds out
_MIN_DELTA = 40.0  # least mean-channel change a defect layer makes, so alpha > 0.5 means >= 20 levels
_VISIBLE = 10  # a pixel changed less than this is never marked, whatever its alpha
_HEAVY = 40  # a pixel changed at least this much is always marked, even on a soft edge
_MAX_ATTEMPTS = 8  # a defect can vanish only on pathological images (e.g. a bright layer on white)
_RED = np.array([255.0, 32.0, 32.0], dtype=np.float32)

Generator = np.random.Generator
_Defect = tuple[np.ndarray, np.ndarray]  # a stage's output: signed distance and colour layer over the window


@dataclass(frozen=True)
class SynthesisConfig:
    """How anomalies are drawn: which stages, how often each, how large and how many per image."""

    stages: tuple[str, ...] = STAGES
    weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # relative frequency of each entry of `stages`
    min_scale: float = 0.02  # defect size as a fraction of the image's short side
    max_scale: float = 0.2
    max_defects: int = 2  # each image gets 1..max_defects anomalies

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if not self.stages or unknown:
            raise ValueError(f"stages must be a non-empty subset of {ALL_STAGES}, got {self.stages}")
        if len(self.weights) != len(self.stages):
            raise ValueError(f"give one weight per stage: {len(self.stages)} stages, {len(self.weights)} weights")
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if self.max_defects < 1:
            raise ValueError(f"max_defects must be at least 1, got {self.max_defects}")


@dataclass(frozen=True)
class _Site:
    """Where one defect goes: the image window that holds it and coordinates relative to its centre.

    The window is the square of side ``2 * half + 1`` around the centre, clipped to the image; `y` and
    `x` are broadcastable ``(h, 1)`` and ``(1, w)`` offsets from the centre, in pixels.
    """

    rows: slice
    cols: slice
    y: np.ndarray
    x: np.ndarray
    radius: float  # the defect stays within this distance of the centre (before its soft edge)
    half: int
    short: int  # the image's short side, to bring donor patches to the target's scale
    res: float  # pixels per reference pixel, >= 1, for absolute widths


# ----------------------------------------------------------------------------------------------- geometry


def _place(rng: Generator, shape: tuple[int, ...], config: SynthesisConfig, res: float) -> _Site:
    """Draw a uniform centre anywhere in the image and a uniform diameter relative to the short side.

    Relative sizes make a 100 px and a 4000 px image get defects covering the same fraction.
    """
    height, width = shape[:2]
    short = min(height, width)
    radius = max(rng.uniform(config.min_scale, config.max_scale) * short / 2, 1.0)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    half = math.ceil(radius + _MAX_SOFTNESS * res / 2) + 1
    rows = slice(max(0, cy - half), min(height, cy + half + 1))
    cols = slice(max(0, cx - half), min(width, cx + half + 1))
    y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - cy
    x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - cx
    return _Site(rows, cols, y, x, radius, half, short, res)


def _implicit_sdf(field: np.ndarray, limit: float) -> np.ndarray:
    """Signed distance from an implicit function (negative inside), to first order: f / |grad f|.

    Smooth fields (ellipse equations, upsampled noise) have no closed-form distance; dividing by the
    gradient gives one accurate near the outline, where the alpha ramp lives. `limit` bounds it by the
    defect's radius so flat spots (zero gradient) do not produce huge depths.
    """
    gy, gx = np.gradient(field)
    return np.clip(field / np.maximum(np.hypot(gy, gx), 1e-6), -limit, limit).astype(np.float32)


def _ellipse_sdf(y: np.ndarray, x: np.ndarray, a: float, b: float, angle: float, limit: float) -> np.ndarray:
    """Signed distance to an ellipse with semi-axes `a`, `b` rotated by `angle`, centred at (0, 0)."""
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = x * cos + y * sin, y * cos - x * sin
    return _implicit_sdf(np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0, limit)


def _box_sdf(y: np.ndarray, x: np.ndarray, half_u: float, half_v: float, angle: float) -> np.ndarray:
    """Exact signed distance to a rectangle with half-sides `half_u`, `half_v` rotated by `angle`."""
    cos, sin = math.cos(angle), math.sin(angle)
    qu = np.abs(x * cos + y * sin) - half_u
    qv = np.abs(y * cos - x * sin) - half_v
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return (outside + np.minimum(np.maximum(qu, qv), 0)).astype(np.float32)


def _polyline_sdf(rng: Generator, site: _Site) -> np.ndarray:
    """A scratch: a 1–4 px wide polyline (wider on large images) of 1–4 bending segments.

    The path is a random walk whose heading drifts, centred and scaled to fit the defect radius.
    The width scales with the image so the scratch survives the resize to the backbone's input.
    """
    steps = int(rng.integers(1, 5))
    headings = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.5, steps))
    points = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([np.sin(headings), np.cos(headings)], 1), 0)])
    points -= (points.min(0) + points.max(0)) / 2
    points *= site.radius * rng.uniform(0.6, 1.0) / max(np.linalg.norm(points, axis=1).max(), 1e-6)
    distance = np.full(np.broadcast_shapes(site.y.shape, site.x.shape), np.inf, dtype=np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((site.y - y0) * dy + (site.x - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        distance = np.minimum(distance, np.hypot(site.y - y0 - t * dy, site.x - x0 - t * dx))
    return distance - rng.uniform(1.0, 4.0) * site.res / 2


def _fractal_noise(rng: Generator, shape: tuple[int, int], cell: float, octaves: int = 3) -> np.ndarray:
    """Value noise in [0, 1]: random grids upsampled bicubically, each octave twice as fine and half as strong.

    A cheap Perlin stand-in; `cell` (pixels) is the coarsest feature size, so the same call gives
    fine grain or large lobes depending on the defect's size.
    """
    height, width = shape
    total = np.zeros(shape, dtype=np.float32)
    for octave in range(octaves):
        step = max(cell / 2**octave, 1.0)
        grid = rng.random((int(height / step) + 2, int(width / step) + 2), dtype=np.float32)
        total += 0.5**octave * np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC))
    return (total - total.min()) / max(float(np.ptp(total)), 1e-6)


def _irregular_sdf(rng: Generator, site: _Site) -> np.ndarray:
    """An irregular region within the defect radius: thresholded fractal noise or a union of blobs.

    The noise is multiplied by a radial falloff that reaches zero at the radius, so the region never
    shows the straight edges of its window. The threshold is a fraction of the field's maximum over
    the visible window, so the region is never empty, even for a defect centred on the image border.
    """
    if rng.random() < 0.5:
        blobs = int(rng.integers(3, 8))
        offsets = rng.uniform(-0.4, 0.4, (blobs, 2)) * site.radius / math.sqrt(2)  # blobs end within radius
        return np.minimum.reduce([
            _ellipse_sdf(site.y - dy, site.x - dx, site.radius * rng.uniform(0.3, 0.6),
                         site.radius * rng.uniform(0.3, 0.6), rng.uniform(0, math.pi), site.radius)
            for dy, dx in offsets
        ])
    falloff = np.clip(1.0 - (site.y**2 + site.x**2) / site.radius**2, 0, None)
    noise = _fractal_noise(rng, falloff.shape, site.radius * rng.uniform(0.3, 0.8))
    field = (0.2 + 0.8 * noise) * falloff
    return _implicit_sdf(rng.uniform(0.15, 0.45) * field.max() - field, site.radius)


# ------------------------------------------------------------------------------------------------ stages
# Each stage returns a `_Defect`: the signed distance to its outline and its colour layer, over the site's window.


def _random_colour(rng: Generator) -> np.ndarray:
    """A dark, a bright or an arbitrary colour: real defects are mostly burns, glints or foreign matter."""
    low, high = [(0, 70), (185, 255), (0, 255)][int(rng.integers(3))]
    return rng.uniform(low, high, 3).astype(np.float32)


def _texture(rng: Generator, base: np.ndarray, site: _Site, donor: np.ndarray | None) -> _Defect:
    """Two-tone random-coloured noise, or the window's own texture with new contrast and brightness."""
    sdf = _irregular_sdf(rng, site)
    if rng.random() < 0.5:
        first, second = _random_colour(rng), _random_colour(rng)
        grain = _fractal_noise(rng, base.shape[:2], site.radius * rng.uniform(0.05, 0.3))
        return sdf, first + (second - first) * grain[..., None]
    mean = base.mean(axis=(0, 1))
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(20, 80)
    return sdf, mean + (base - mean) * rng.uniform(0.2, 3.0) + shift


def _structure(rng: Generator, base: np.ndarray, site: _Site, donor: np.ndarray | None) -> _Defect:
    """A filled ellipse (or circle), a rotated rectangle or a scratch, in a colour that keeps some texture.

    Keeping a fraction of the underlying texture makes paint, dents and deposits look lit like the part.
    """
    kind, angle = int(rng.integers(3)), rng.uniform(0, math.pi)
    aspect = 1.0 if rng.random() < 0.3 else rng.uniform(0.25, 1.0)
    if kind == 0:
        sdf = _ellipse_sdf(site.y, site.x, site.radius, site.radius * aspect, angle, site.radius)
    elif kind == 1:
        half_u = site.radius / math.sqrt(1 + aspect**2)  # the corners stay within the radius
        sdf = _box_sdf(site.y, site.x, half_u, half_u * aspect, angle)
    else:
        sdf = _polyline_sdf(rng, site)
    texture = (base - base.mean(axis=(0, 1))) * rng.uniform(0.0, 0.6)
    return sdf, _random_colour(rng) + texture


def _donor_patch(rng: Generator, donor: np.ndarray, side: int, target_short: int) -> np.ndarray:
    """A `side` x `side` patch cut from `donor`, brought to the target's scale, then zoomed and rotated.

    Donors of another size are assumed to show the same scene at another resolution, so the crop is
    sized by the ratio of short sides. A rotated patch is cut larger by sqrt(2) and cropped back after
    rotating, so it has no empty corners.
    """
    zoom = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    angle = rng.uniform(0, 360) if rng.random() < 0.5 else 0.0
    span = math.ceil(side * math.sqrt(2)) if angle else side
    donor_h, donor_w = donor.shape[:2]
    scale = target_short / min(donor_h, donor_w) * zoom  # target pixels per donor pixel
    crop = int(np.clip(round(span / scale), 1, min(donor_h, donor_w)))
    top, left = int(rng.integers(donor_h - crop + 1)), int(rng.integers(donor_w - crop + 1))
    patch = Image.fromarray(donor[top : top + crop, left : left + crop]).resize((span, span), Image.BICUBIC)
    if angle:
        patch = patch.rotate(angle, Image.BICUBIC)
    offset = (span - side) // 2
    return np.asarray(patch, dtype=np.float32)[offset : offset + side, offset : offset + side]


def _context(rng: Generator, base: np.ndarray, site: _Site, donor: np.ndarray | None) -> _Defect:
    """A patch of another normal image, in a soft irregular region, as for a misplaced or foreign part."""
    assert donor is not None, "synthesize() supplies a donor for the context stage"
    patch = _donor_patch(rng, donor, 2 * site.half + 1, site.short)
    top, left = int(site.y[0, 0]) + site.half, int(site.x[0, 0]) + site.half
    layer = patch[top : top + base.shape[0], left : left + base.shape[1]]
    return _irregular_sdf(rng, site), layer


def _augment_texture(rng: Generator, patch: np.ndarray) -> np.ndarray:
    """One of DRAEM's photometric augmentations of a texture source, so the fill is the product's own
    surface made unfamiliar: inverted, solarised, posterised or through an extreme gamma curve."""
    kind = int(rng.integers(4))
    if kind == 0:
        return 255.0 - patch
    if kind == 1:
        level = rng.uniform(64, 192)
        return np.where(patch > level, 255.0 - patch, patch)
    if kind == 2:
        step = 256.0 / 2 ** int(rng.integers(1, 3))  # 2 or 4 levels per channel
        return np.floor(patch / step) * step + step / 2
    gamma = rng.uniform(0.25, 0.5) if rng.random() < 0.5 else rng.uniform(2.0, 4.0)
    return 255.0 * (patch / 255.0) ** gamma


def _perlin(rng: Generator, base: np.ndarray, site: _Site, donor: np.ndarray | None) -> _Defect:
    """A DRAEM-style defect: lobes of thresholded smooth noise filled with augmented donor texture.

    The noise cell is a fraction of the radius, so one site holds one to several lobes (DRAEM's Perlin
    masks); a gentle radial falloff only keeps the lobes off the window's straight edges.
    """
    assert donor is not None, "synthesize() supplies a donor for the perlin stage"
    falloff = np.clip(1.0 - (site.y**2 + site.x**2) / site.radius**2, 0, None) ** 0.25
    noise = _fractal_noise(rng, falloff.shape, site.radius * rng.uniform(0.25, 0.6), octaves=2)
    field = noise * falloff
    sdf = _implicit_sdf(rng.uniform(0.35, 0.55) * field.max() - field, site.radius)
    patch = _donor_patch(rng, donor, 2 * site.half + 1, site.short)
    top, left = int(site.y[0, 0]) + site.half, int(site.x[0, 0]) + site.half
    return sdf, _augment_texture(rng, patch[top : top + base.shape[0], left : left + base.shape[1]])


_StageFn = Callable[[Generator, np.ndarray, _Site, np.ndarray | None], _Defect]
_STAGE_FNS: dict[str, _StageFn] = {"texture": _texture, "structure": _structure, "context": _context, "perlin": _perlin}


# ------------------------------------------------------------------------------------------------ blending


def _alpha(rng: Generator, sdf: np.ndarray, res: float) -> np.ndarray:
    """Opacity (0.6–1) times a linear ramp of the signed distance, `softness` pixels wide.

    The softness is capped at twice the shape's depth so a thin scratch keeps full alpha on its centre
    line instead of fading below 0.5; opacity stays above 0.5 so the inside is always marked.
    """
    depth = max(-float(sdf.min()), 0.05)
    softness = min(rng.uniform(0.5, _MAX_SOFTNESS) * res, 2 * depth)
    return (rng.uniform(0.6, 1.0) * np.clip(0.5 - sdf / softness, 0, 1)).astype(np.float32)


def _lift(layer: np.ndarray, base: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Push the layer at least `_MIN_DELTA` (channel mean) away from the base, in one direction per defect.

    Without this a layer that happens to match the image (a donor patch of the same background, a
    colour close to the surface) would be marked but invisible. The direction is the layer's dominant
    one, or away from the base's brightness, so the push is smooth and adds no speckle; it is equal
    on all channels, so grey stays grey.
    """
    change = (layer - base).mean(axis=2)
    core = alpha > 0.5
    direction = float(np.sign(change[core].mean())) if core.any() else 0.0
    if direction == 0.0:
        direction = 1.0 if base.mean() < 127.5 else -1.0
    lift = np.maximum(0.0, _MIN_DELTA - direction * change)
    return np.clip(layer + direction * lift[..., None], 0, 255)


def _honest_mask(new: np.ndarray, old: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Mark what was materially changed: inside a shape and visibly changed, or heavily changed anywhere.

    Alpha alone would mark pixels where the layer happened to equal the image, and would miss soft
    edge pixels (alpha < 0.5) where a strong colour still moved the pixel a lot.
    """
    diff = np.abs(new.astype(np.int16) - old.astype(np.int16)).max(axis=2)
    return (inside & (diff >= _VISIBLE)) | (diff >= _HEAVY)


def _attempt(
    rng: Generator, image: np.ndarray, config: SynthesisConfig, stage_fn: _StageFn, donor: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1..max_defects defects of one stage, each in its own window, and derive the honest mask."""
    height, width = image.shape[:2]
    res = max(1.0, min(height, width) / _REFERENCE_SIDE)
    gray = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    out = image.copy()
    inside = np.zeros((height, width), dtype=bool)
    windows = []
    for _ in range(int(rng.integers(1, config.max_defects + 1))):
        site = _place(rng, image.shape, config, res)
        window = (site.rows, site.cols)
        base = out[window].astype(np.float32)
        sdf, layer = stage_fn(rng, base, site, donor)
        alpha = _alpha(rng, sdf, site.res)
        if gray:  # colour choices and donors become grey, so a grey part stays plausible
            layer = np.repeat(layer.mean(axis=2, keepdims=True), 3, axis=2)
        layer = _lift(layer, base, alpha)
        out[window] = np.clip(np.rint(base + alpha[..., None] * (layer - base)), 0, 255).astype(np.uint8)
        inside[window] |= alpha > 0.5
        windows.append(window)
    mask = np.zeros_like(inside)
    for window in windows:  # pixels outside every window are untouched, so only windows need checking
        mask[window] = _honest_mask(out[window], image[window], inside[window])
    return out, mask


def _large_box(rng: Generator, shape: tuple[int, ...], low: float, high: float) -> tuple[int, int, int, int]:
    """(centre y, centre x, half height, half width) of a box of `low`–`high` x the short side, inside the image."""
    height, width = shape[:2]
    short = min(height, width)
    hy, hx = (max(2, int(rng.uniform(low, high) * short / 2)) for _ in range(2))
    return int(rng.integers(hy, height - hy + 1)), int(rng.integers(hx, width - hx + 1)), hy, hx


def _box_alpha(rng: Generator, shape: tuple[int, ...], box: tuple[int, int, int, int]) -> np.ndarray:
    """Full-image alpha of a soft-edged `box` (full opacity inside: a global defect is not translucent)."""
    cy, cx, hy, hx = box
    y = np.arange(shape[0], dtype=np.float32)[:, None] - cy
    x = np.arange(shape[1], dtype=np.float32)[None, :] - cx
    res = max(1.0, min(shape[:2]) / _REFERENCE_SIDE)
    return np.clip(0.5 - _box_sdf(y, x, hx, hy, 0.0) / (rng.uniform(1.0, _MAX_SOFTNESS) * res), 0, 1)


def _shifted(image: np.ndarray, box: tuple[int, int, int, int], dy: int, dx: int) -> np.ndarray:
    """The image with the window `box` + (dy, dx) moved onto `box` (the rest unchanged)."""
    cy, cx, hy, hx = box
    out = image.astype(np.float32)
    rows, cols = slice(cy - hy, cy + hy), slice(cx - hx, cx + hx)
    out[rows, cols] = image[cy - hy + dy : cy + hy + dy, cx - hx + dx : cx + hx + dx]
    return out


def _global_attempt(rng: Generator, image: np.ndarray, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """One global defect of `stage` (see the module doc) and its honest mask."""
    height, width = image.shape[:2]
    gray = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    base = image.astype(np.float32)
    if stage == "colour":
        whole = rng.random() < 0.5
        alpha = np.ones((height, width), np.float32) if whole else _box_alpha(rng, image.shape, _large_box(rng, image.shape, 0.4, 0.7))
        # a tint: some channels (at least one; all of them on grey parts) pushed one way, away from clipping
        channels = np.ones(3, bool) if gray else rng.random(3) < 0.5
        channels[int(rng.integers(3))] = True
        amount = rng.uniform(_MIN_DELTA / 2, _MIN_DELTA * 1.25, 1 if gray else 3)
        layer = base + (1.0 if base.mean() < 127.5 else -1.0) * amount * channels
    elif stage == "missing":
        box = _large_box(rng, image.shape, 0.25, 0.45)
        cy, cx, hy, hx = box
        moves = [(dy, dx) for dy, dx in ((-2 * hy, 0), (2 * hy, 0), (0, -2 * hx), (0, 2 * hx))
                 if hy <= cy + dy <= height - hy and hx <= cx + dx <= width - hx]
        if moves and rng.random() < 0.5:
            layer = _shifted(image, box, *moves[int(rng.integers(len(moves)))])
        else:  # the background: the median colour of the image border, with a little noise
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            layer = np.median(border, axis=0) + rng.normal(0, 3, base.shape)
        alpha = _box_alpha(rng, image.shape, box)
    else:  # duplicate: a same-size window from anywhere (one too close to differ is retried by `synthesize`)
        box = _large_box(rng, image.shape, 0.2, 0.35)
        cy, cx, hy, hx = box
        sy, sx = int(rng.integers(hy, height - hy + 1)), int(rng.integers(hx, width - hx + 1))
        layer = _shifted(image, box, sy - cy, sx - cx)
        alpha = _box_alpha(rng, image.shape, box)
    out = np.clip(np.rint(base + alpha[..., None] * (layer - base)), 0, 255).astype(np.uint8)
    if gray:
        out = np.repeat(out.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    return out, _honest_mask(out, image, alpha > 0.5)


def _check_image(image: np.ndarray, name: str) -> None:
    """Reject anything but an HxWx3 uint8 array large enough to hold a defect."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be an HxWx3 uint8 array, got {getattr(image, 'shape', type(image))}")
    if min(image.shape[:2]) < _MIN_SIDE:
        raise ValueError(f"{name} is {image.shape[1]}x{image.shape[0]}; both sides must be >= {_MIN_SIDE} px")


def _self_donor(rng: Generator, image: np.ndarray) -> np.ndarray:
    """The image rotated by 90/180/270° and maybe mirrored, so a patch lands in a context it does not fit."""
    turned = np.rot90(image, k=int(rng.integers(1, 4)))
    return np.ascontiguousarray(turned[:, ::-1] if rng.random() < 0.5 else turned)


# ------------------------------------------------------------------------------------------------ public API


def synthesize(
    image: np.ndarray,
    seed: int,
    config: SynthesisConfig = SynthesisConfig(),
    donor: np.ndarray | None = None,
    stage: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(anomalous image, mask)` made from a normal `HxWx3 uint8` image, deterministic per seed.

    `stage` None draws one of `config.stages` by `config.weights`. The context stage cuts its patches
    (and the perlin stage its texture) from `donor` (any size); without one it uses the image itself
    rotated or mirrored. The mask is a
    non-empty `HxW` bool array of the pixels the defects materially changed.
    """
    _check_image(image, "image")
    if donor is not None:
        _check_image(donor, "donor")
    rng = np.random.default_rng(seed)
    if stage is None:
        weights = np.asarray(config.weights, dtype=np.float64)
        stage = config.stages[int(rng.choice(len(config.stages), p=weights / weights.sum()))]
    elif stage not in ALL_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {ALL_STAGES}")
    if stage in ("context", "perlin") and donor is None:
        donor = _self_donor(rng, image)
    for _ in range(_MAX_ATTEMPTS):
        if stage in GLOBAL_STAGES:
            out, mask = _global_attempt(rng, image, stage)
        else:
            out, mask = _attempt(rng, image, config, _STAGE_FNS[stage], donor)
        if mask.any():
            return out, mask
    raise RuntimeError(f"no visible {stage} defect after {_MAX_ATTEMPTS} attempts (seed {seed})")


def synthetic_set(
    images: Sequence[np.ndarray], per_stage: int = 30, seed: int = 0, config: SynthesisConfig = SynthesisConfig()
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """`per_stage` samples of every stage in `config.stages`, as a deterministic list of (image, mask, stage).

    Each sample starts from a randomly drawn image of `images`; context patches come from another
    image of the list (from the image itself when the list holds only one).
    """
    if not images:
        raise ValueError("synthetic_set needs at least one normal image")
    if per_stage < 0:
        raise ValueError(f"per_stage must be >= 0, got {per_stage}")
    rng = np.random.default_rng(seed)
    count = len(images)
    samples = []
    for stage in config.stages:
        for _ in range(per_stage):
            index = int(rng.integers(count))
            donor = images[(index + int(rng.integers(1, count))) % count] if count > 1 else None
            anomalous, mask = synthesize(images[index], int(rng.integers(2**31)), config, donor, stage)
            samples.append((anomalous, mask, stage))
    return samples


def _preview_tile(image: np.ndarray, mask: np.ndarray, label: str, tile: int) -> Image.Image:
    """One sample letterboxed into a `tile` square: red tint inside the mask, red outline, stage name."""
    inner = tile - 2  # one dark pixel around every tile keeps neighbours apart
    height, width = mask.shape
    factor = inner / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    picture = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    # Area-averaged, then any coverage: a defect smaller than one tile pixel must still show.
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
    outline = small & ~binary_erosion(small)
    picture[small] = 0.7 * picture[small] + 0.3 * _RED
    picture[outline] = _RED
    canvas = Image.new("RGB", (tile, tile), (24, 24, 24))
    canvas.paste(Image.fromarray(picture.astype(np.uint8)), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((4, 3), label, font=font)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((4, 3), label, fill=(255, 255, 255), font=font)
    return canvas


def preview_grid(samples: list[tuple[np.ndarray, np.ndarray, str]], columns: int = 6, tile: int = 192) -> Image.Image:
    """A contact sheet of samples for eyeballing: `min(columns, n)` tiles across, as many rows as needed.

    Each tile shows the anomalous image with its mask tinted and outlined in red and the stage name.
    """
    if not samples:
        raise ValueError("preview_grid needs at least one sample")
    if columns < 1 or tile < 16:
        raise ValueError(f"need columns >= 1 and tile >= 16, got {columns}, {tile}")
    across = min(columns, len(samples))
    sheet = Image.new("RGB", (across * tile, math.ceil(len(samples) / across) * tile), (24, 24, 24))
    for k, (image, mask, label) in enumerate(samples):
        sheet.paste(_preview_tile(image, mask, label, tile), ((k % across) * tile, (k // across) * tile))
    return sheet
