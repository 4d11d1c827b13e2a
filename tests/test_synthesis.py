"""Synthetic anomalies: shapes, determinism, honest masks, uniform placement, relative sizes, preview."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, center_of_mass, gaussian_filter

from anomalyvfm.data.synthesis import (ALL_STAGES, GLOBAL_STAGES, HELD_OUT_STAGES, STAGES, SynthesisConfig, preview_grid,
                                      synthesize, synthetic_set)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A woven, grainy, tinted surface: enough texture that a defect has something to differ from."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(float)
    weave = 0.5 + 0.25 * np.sin(x / 3.0) * np.sin(y / 3.0)
    grain = gaussian_filter(rng.normal(0, 1, (height, width)), 1.5)
    base = np.clip(weave + 0.15 * grain / grain.std(), 0, 1)
    return (base[..., None] * np.array([0.75, 0.62, 0.45]) * 255).astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
    return np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)


IMAGE = textured(96, 128)
DONOR = textured(150, 210, seed=1)  # another size than IMAGE


def change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_shapes_dtypes_and_non_empty_mask(stage: str) -> None:
    for seed in range(10):
        out, mask = synthesize(IMAGE, seed, donor=DONOR, stage=stage)
        assert out.shape == IMAGE.shape and out.dtype == np.uint8
        assert mask.shape == IMAGE.shape[:2] and mask.dtype == bool
        assert mask.any() and (stage == "colour" or not mask.all())  # a colour shift may cover the whole image


@pytest.mark.parametrize("stage", [*ALL_STAGES, None])
def test_same_seed_same_output_other_seed_other_output(stage: str | None) -> None:
    first = synthesize(IMAGE, 7, donor=DONOR, stage=stage)
    again = synthesize(IMAGE, 7, donor=DONOR, stage=stage)
    other = synthesize(IMAGE, 8, donor=DONOR, stage=stage)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("donor", [None, DONOR, textured(20, 12, seed=2), textured(400, 300, seed=3)],
                         ids=["no-donor", "other-size", "tiny-donor", "large-donor"])
def test_context_works_with_any_donor(donor: np.ndarray | None) -> None:
    for seed in range(5):
        out, mask = synthesize(IMAGE, seed, donor=donor, stage="context")
        assert mask.any()
        assert change(out, IMAGE)[mask].mean() > 20


@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("image", [IMAGE, grey(IMAGE)], ids=["colour", "grey"])
def test_mask_agrees_with_changed_pixels(stage: str, image: np.ndarray) -> None:
    for seed in range(15):
        out, mask = synthesize(image, seed, donor=DONOR, stage=stage)
        diff = change(out, image)
        assert diff[mask].mean() > 10 * max(diff[~mask].mean() if (~mask).any() else 0, 0.1)
        assert diff[mask].min() >= 5, "a marked pixel was left (nearly) unchanged"
        assert mask.all() or diff[~mask].max() < 64, "a heavily changed pixel was left unmarked"
        far = ~binary_dilation(mask, iterations=3)
        assert not far.any() or (diff[far] == 0).mean() >= 0.99, "changes reach beyond the soft edge of the mask"


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_grey_images_stay_grey(stage: str) -> None:
    image = grey(IMAGE)
    for seed in range(5):
        out, _ = synthesize(image, seed, donor=DONOR, stage=stage)  # a colour donor, too
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_defects_land_in_every_quadrant() -> None:
    image = textured(90, 120)  # not square, so swapped axes would show
    config = SynthesisConfig(max_defects=1)
    quadrants = set()
    for seed in range(60):
        _, mask = synthesize(image, seed, config, donor=DONOR)
        cy, cx = center_of_mass(mask)
        quadrants.add((cy >= 45, cx >= 60))
    assert len(quadrants) == 4


def test_defect_area_scales_with_image_size() -> None:
    def mean_fraction(size: int) -> float:
        image = textured(size, size)
        return float(np.mean([synthesize(image, seed, donor=DONOR)[1].mean() for seed in range(40)]))

    small, large = mean_fraction(100), mean_fraction(400)
    assert 0.5 < large / small < 2.0, (small, large)


def test_large_image_gets_defects_of_relative_size() -> None:
    image = np.full((1200, 1600, 3), 128, dtype=np.uint8)
    config = SynthesisConfig(min_scale=0.1, max_scale=0.2, max_defects=1)
    _, mask = synthesize(image, 0, config, stage="structure")
    assert 1e-4 < mask.mean() < 0.05


def test_synthetic_set_has_per_stage_samples_of_every_stage_and_is_deterministic() -> None:
    images = [IMAGE, textured(96, 128, seed=5), DONOR]
    samples = synthetic_set(images, per_stage=4, seed=3)
    assert len(samples) == 3 * 4
    assert [name for _, _, name in samples] == [stage for stage in STAGES for _ in range(4)]
    again = synthetic_set(images, per_stage=4, seed=3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(samples, again))
    assert all(mask.any() and mask.shape == image.shape[:2] for image, mask, _ in samples)


def test_synthetic_set_with_one_image_and_chosen_stages() -> None:
    config = SynthesisConfig(stages=("context",), weights=(1.0,))
    samples = synthetic_set([IMAGE], per_stage=3, config=config)
    assert [name for _, _, name in samples] == ["context"] * 3


def test_preview_grid_size() -> None:
    samples = synthetic_set([IMAGE, DONOR], per_stage=3)[:7]
    sheet = preview_grid(samples, columns=3, tile=64)
    assert sheet.size == (3 * 64, 3 * 64) and sheet.mode == "RGB"
    assert preview_grid(samples[:2], columns=6, tile=50).size == (100, 50)
    pixels = np.asarray(sheet)
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 32)).any(), "mask outline in red"


@pytest.mark.parametrize("kwargs", [
    {"stages": ("paint",)},
    {"stages": ("texture",)},  # default weights no longer match
    {"weights": (1.0, -1.0, 1.0)},
    {"min_scale": 0.3, "max_scale": 0.2},
    {"max_defects": 0},
])
def test_invalid_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SynthesisConfig(**kwargs)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        synthesize(IMAGE[..., 0], 0)
    with pytest.raises(ValueError):
        synthesize(IMAGE.astype(np.float32), 0)
    with pytest.raises(ValueError):
        synthesize(IMAGE, 0, stage="paint")
    with pytest.raises(ValueError):
        preview_grid([])


@pytest.mark.parametrize("stage", GLOBAL_STAGES)
def test_global_stages_change_a_large_part_of_the_image(stage: str) -> None:
    """A global defect is one large change (a part missing, doubled, recoloured), not a small blemish."""
    fractions = [synthesize(IMAGE, seed, stage=stage)[1].mean() for seed in range(10)]
    local = [synthesize(IMAGE, seed, stage="structure")[1].mean() for seed in range(10)]
    assert np.median(fractions) > 3 * np.median(local) and np.median(fractions) > 0.03, (fractions, local)


def test_global_stages_are_opt_in() -> None:
    """LoRA training and --auto keep drawing the local stages unless asked for the global ones."""
    assert SynthesisConfig().stages == STAGES
    config = SynthesisConfig(stages=GLOBAL_STAGES, weights=(1.0,) * 3)
    assert [name for *_, name in synthetic_set([IMAGE, DONOR], per_stage=2, config=config)] == [
        stage for stage in GLOBAL_STAGES for _ in range(2)]


def test_held_out_perlin_family_is_not_drawn_by_default_and_paints_donor_texture() -> None:
    assert set(HELD_OUT_STAGES) == {"perlin"} and not set(HELD_OUT_STAGES) & set(STAGES)
    assert SynthesisConfig().stages == STAGES
    assert "perlin" not in {name for _, _, name in synthetic_set([IMAGE, DONOR], per_stage=2)}
    flat = np.full((192, 256, 3), 90, dtype=np.uint8)  # a flat part: any texture inside the mask came from the donor
    config = SynthesisConfig(min_scale=0.2, max_scale=0.3, max_defects=1)
    spreads = []
    for seed in range(8):
        out, mask = synthesize(flat, seed, config, donor=DONOR, stage="perlin")
        assert 0 < mask.mean() < 0.5
        spreads.append(out[binary_erosion(mask, iterations=2)].std())
    assert np.median(spreads) > 3, "the defect should carry the donor's texture, not a flat colour"
