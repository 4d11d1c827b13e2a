"""Dataset layouts behind one interface: named splits of labelled samples.

Three layouts are read:

* ``mvtec_ad2`` — ``<root>/<cat>/train/good``, ``validation/good``, ``test_public/{good,bad}``,
  ``test_public/ground_truth/bad/<stem>_mask.png``, ``test_private``, ``test_private_mixed`` (unlabelled).
* ``mvtec_ad`` — ``<root>/<cat>/train/good``, ``test/<defect>/``, ``ground_truth/<defect>/<stem>_mask.png``.
  It has no validation split, so a seeded 10 % of ``train/good`` is held out for thresholds.
* ``folder`` — ``<root>[/<cat>]`` holding either good images directly, or ``good/`` plus optional
  ``bad/``, ``masks/`` (``<stem>_mask.png`` or ``<stem>.png``) and ``test_good/``. A seeded 10 % of the good
  images is held out as validation; ``test`` is ``test_good/`` + ``bad/``.

Thresholds and settings may only come from ``train`` and ``validation``; test splits are for reporting.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from anomalyvfm.data.images import IMAGE_SUFFIXES, list_images
from anomalyvfm.errors import UserInputError

LAYOUTS = ("mvtec_ad2", "mvtec_ad", "folder")
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Sample:
    """One image: `label` is 0 (good), 1 (defective) or None (unlabelled); `mask_path` only for defects."""

    path: Path
    label: int | None = None
    mask_path: Path | None = None
    defect_type: str | None = None


@dataclass
class Dataset:
    """A category's images by split name (``train``, ``validation``, ``test_public``, ``test`` …)."""

    root: Path
    category: str | None
    layout: str
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise UserInputError(f"{self.root}: split '{name}' not found in this {self.layout} dataset (has: {have})")
        return self.splits[name]


def _optional_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (mask_dir / name).is_file():
            return mask_dir / name
    return None


def hold_out(count: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) of a seeded `VALIDATION_FRACTION` split; validation gets ≥ 1 item.

    Used wherever no validation split exists, so thresholds never come from the images the model was
    fitted on.
    """
    if count < 2:
        raise UserInputError("need at least 2 good images to hold one out for validation")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(count * VALIDATION_FRACTION))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _hold_out(paths: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    try:
        train, validation = hold_out(len(paths), seed)
    except UserInputError as exc:
        raise UserInputError(f"{paths[0].parent}: {exc}") from None
    return [paths[i] for i in train], [paths[i] for i in validation]


def _category_dir(root: Path, category: str | None) -> Path:
    if not root.is_dir():
        raise UserInputError(f"{root}: no such data folder")
    if category is None:
        return root
    path = root / category
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserInputError(f"{path}: unknown category '{category}' (found: {', '.join(found) or 'none'})")
    return path


def _labelled_defects(images: list[Path], mask_dir: Path, defect_type: str) -> list[Sample]:
    return [Sample(p, 1, _find_mask(mask_dir, p.stem), defect_type) for p in images]


def _load_mvtec_ad2(base: Path) -> dict[str, list[Sample]]:
    splits = {
        "train": [Sample(p, 0) for p in list_images(base / "train" / "good")],
        "validation": [Sample(p, 0) for p in list_images(base / "validation" / "good")],
    }
    public = base / "test_public"
    if public.is_dir():
        good = [Sample(p, 0) for p in _optional_images(public / "good")]
        bad = _labelled_defects(_optional_images(public / "bad"), public / "ground_truth" / "bad", "bad")
        splits["test_public"] = good + bad
    for name in ("test_private", "test_private_mixed"):
        if (base / name).is_dir():
            splits[name] = [Sample(p) for p in _optional_images(base / name)]
    return splits


def _load_mvtec_ad(base: Path, seed: int) -> dict[str, list[Sample]]:
    if not (base / "test").is_dir() and any((base / name).is_dir() for name in ("validation", "test_public")):
        raise UserInputError(f"{base}: this is an MVTec AD 2 folder (validation/, test_public/, no test/); "
                             f"use --layout mvtec_ad2")
    train, validation = _hold_out(list_images(base / "train" / "good"), seed)
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for defect in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            images = _optional_images(defect)
            if defect.name == "good":
                test += [Sample(p, 0) for p in images]
            else:
                test += _labelled_defects(images, base / "ground_truth" / defect.name, defect.name)
    splits = {"train": [Sample(p, 0) for p in train], "validation": [Sample(p, 0) for p in validation]}
    if test:
        splits["test"] = test
    return splits


def _load_folder(base: Path, seed: int) -> dict[str, list[Sample]]:
    good_dir = base / "good" if (base / "good").is_dir() else base
    train, validation = _hold_out(list_images(good_dir), seed)
    splits = {"train": [Sample(p, 0) for p in train], "validation": [Sample(p, 0) for p in validation]}
    test = [Sample(p, 0) for p in _optional_images(base / "test_good")]
    test += _labelled_defects(_optional_images(base / "bad"), base / "masks", "bad")
    if test:
        splits["test"] = test
    return splits


def evenly_spaced(items: list, count: int) -> list:
    """At most `count` items spread over the whole list (not its head: folders are often sorted by time)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / max(count - 1, 1)
    return [items[round(i * step)] for i in range(count)]


def load_dataset(root: str | Path, category: str | None = None, layout: str = "mvtec_ad2", seed: int = 0) -> Dataset:
    """Index a dataset on disk. Raises `UserInputError` naming the path for anything missing."""
    if layout not in LAYOUTS:
        raise UserInputError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    root = Path(root)
    if layout != "folder" and category is None:
        raise UserInputError(f"{root}: --category is required for the {layout} layout")
    base = _category_dir(root, category)
    if layout == "mvtec_ad2":
        splits = _load_mvtec_ad2(base)
    elif layout == "mvtec_ad":
        splits = _load_mvtec_ad(base, seed)
    else:
        splits = _load_folder(base, seed)
    return Dataset(root=root, category=category, layout=layout, splits=splits)
