"""The model directory: the one module that reads and writes a fitted detector's files.

    config.json          format version, settings, calibration, fit record, sha256 of every other file
    scorer.safetensors   fitted tensors: view 0's scorer unprefixed, `view<i>.` further views, `foreground.`,
                         `global.` (training images' embeddings; absent in models older than image evidence)
    backbone/            the backbone blocks the detector uses (transformers layout), unless saved by reference
    adapter/, heads.safetensors   LoRA adapter (peft) and anomaly heads of an adapted detector

Writing is atomic: the directory is built in a temporary sibling and swapped into place in one rename,
so a crash or kill at any step leaves either the old model or the new one, never a mix. Reading checks
the format version, every setting's type and range, unknown keys and each file's checksum, and turns
every problem into one `UserInputError` line naming the directory.

Format 1 (anomalyvfm 0.1, a flat `config.json` with thresholds copied per mode and no checksums) is
still read; it is converted on load and written back as format 2.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anomalyvfm.adaptation.heads import AnomalyHeads
from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.checksums import sha256
from anomalyvfm.declare import from_dict, to_dict
from anomalyvfm.detector.pipeline import Pipeline
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import UserInputError
from anomalyvfm.files import swap_into_place as _swap_into_place, sync_tree as _sync, temporary_sibling, write_edited_copy
from anomalyvfm.features.foreground import ForegroundModel
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.scoring.scorers import ImageBank, make_scorer

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
SCORER_FILE = "scorer.safetensors"
BACKBONE_DIR = "backbone"
ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"


@dataclass
class FitRecord:
    """What fitting did (for people reading the model, not for scoring)."""

    train_images: int = 0
    package_version: str = ""
    fitted_at: str = ""  # ISO 8601, UTC
    lora: dict[str, Any] = field(default_factory=dict)  # LoRA training: steps, best step, seconds, parameters
    auto_choice: dict[str, Any] = field(default_factory=dict)  # what --auto chose and the figures behind it


@dataclass
class StoredModel:
    """A model directory's contents, checked, before any model weights are loaded."""

    directory: Path
    settings: Settings
    calibration: Calibration
    record: FitRecord
    state: dict[str, dict[str, torch.Tensor]]  # scorer tensors by part ("", "view1", "foreground")

    @property
    def backbone_dir(self) -> Path | None:
        path = self.directory / BACKBONE_DIR
        return path if path.is_dir() else None


# -- writing ------------------------------------------------------------------------------------------
def check_writable(directory: str | Path) -> Path:
    """Refuse, before any work, a target that `write` could not replace (run this before a long fit)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise UserInputError(f"{directory}: folder is not empty and not a model directory; choose a new --out")
    return directory


def write(directory: str | Path, pipeline: Pipeline, calibration: Calibration, record: FitRecord,
          store_backbone: bool = True) -> Path:
    """Write a fitted detector to `directory` atomically (see module doc); return the directory."""
    directory = check_writable(directory)
    tmp = temporary_sibling(directory)
    try:
        save_file(_scorer_state(pipeline), str(tmp / SCORER_FILE))
        if store_backbone:
            _save_backbone(pipeline, tmp / BACKBONE_DIR)
        if pipeline.settings.lora is not None:
            pipeline.adapter.save_pretrained(str(tmp / ADAPTER_DIR))
            pipeline.heads.save(tmp / HEADS_FILE)
        config = {"format_version": FORMAT_VERSION, "settings": to_dict(pipeline.settings),
                  "calibration": calibration.to_dict(), "record": asdict(record), "files": _checksums(tmp)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _sync(tmp)
        _swap_into_place(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap this is the old model; after a failure, the new one
    return directory


def write_calibration(source: str | Path, target: str | Path, calibration: Calibration) -> Path:
    """Model directory `source` with `calibration` in place of its own, written atomically at `target` (which
    may be `source`): new thresholds without refitting (`anomalyvfm calibrate`). Every other file is copied
    unchanged, so the checksums in config.json still hold."""
    source, target = Path(source), check_writable(target)
    read(source)  # a damaged or foreign directory fails here, in one line, before anything is copied
    config = json.loads((source / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"{source}: model format {config.get('format_version', 1)}; load and save it with this "
                             "anomalyvfm first (AnomalyDetector.load(M).save(M)) to calibrate it")
    config["calibration"] = calibration.to_dict()
    return write_edited_copy(source, target,
                             lambda tmp: (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n"))


def _scorer_state(pipeline: Pipeline) -> dict[str, torch.Tensor]:
    parts = {f"view{i}" if i else "": scorer.state_dict() for i, scorer in enumerate(pipeline.scorers)}
    if pipeline.foreground_model:
        parts["foreground"] = pipeline.foreground_model.state_dict()
    if pipeline.image_bank is not None:
        parts["global"] = pipeline.image_bank.state_dict()
    return {f"{part}.{key}" if part else key: v.contiguous() for part, state in parts.items() for key, v in state.items()}


def _save_backbone(pipeline: Pipeline, out: Path) -> None:
    """The pretrained blocks up to the deepest one used, re-read from where the backbone came from.

    Re-reading (rather than saving the loaded module) keeps LoRA weights out of the base weights: an
    adapted detector stores its adapter beside them, exactly as it is trained.
    """
    from transformers import AutoModel

    model = AutoModel.from_pretrained(pipeline.backbone_source)
    depth = max(pipeline.settings.layers)
    model.encoder.layer = model.encoder.layer[:depth]
    config = model.config.to_dict()
    for derived in ("out_features", "out_indices", "stage_names"):  # recomputed from the depth
        config.pop(derived, None)
    model.config = type(model.config)(**{**config, "num_hidden_layers": depth})
    model.save_pretrained(str(out))


def _checksums(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): sha256(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != CONFIG_FILE}


# -- reading ------------------------------------------------------------------------------------------
def read(directory: str | Path) -> StoredModel:
    """Read and check a model directory; every problem is one `UserInputError` line naming it."""
    directory = Path(directory)
    config_path, scorer_path = directory / CONFIG_FILE, directory / SCORER_FILE
    if not config_path.is_file() or not scorer_path.is_file():
        raise UserInputError(f"{directory}: not a model directory (needs {CONFIG_FILE} and {SCORER_FILE})")
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{directory}: unreadable model directory ({CONFIG_FILE}: {exc})") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserInputError(f"{config_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserInputError(f"{directory}: written by a newer anomalyvfm (model format {version}; this one reads up "
                             f"to {FORMAT_VERSION}): upgrade with pip install -U anomalyvfm")
    config = raw if version == FORMAT_VERSION else _from_format_1(raw, config_path)
    try:
        unknown = sorted(set(config) - {"format_version", "settings", "calibration", "record", "files"})
        if unknown:
            raise UserInputError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
        settings = from_dict(Settings, config["settings"], "settings")
        calibration = Calibration.from_dict(config["calibration"], "calibration")
        record = from_dict(FitRecord, config.get("record", {}), "record")
    except KeyError as exc:
        raise UserInputError(f"{config_path}: missing {exc}") from None
    except (UserInputError, TypeError) as exc:
        raise UserInputError(f"{config_path}: {exc}") from None
    _verify(directory, config.get("files"))
    try:
        tensors = load_file(str(scorer_path))
    except Exception as exc:  # the safetensors parser raises its own error types for damaged files
        raise UserInputError(f"{scorer_path}: unreadable ({str(exc).splitlines()[0][:160]})") from None
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part, _, name = key.rpartition(".")
        state.setdefault(part, {})[name] = value
    return StoredModel(directory, settings, calibration, record, state)


def _verify(directory: Path, files: Any) -> None:
    """Every file the manifest lists exists with its checksum (format 1 has no manifest)."""
    if files is None:
        return
    if not isinstance(files, dict):
        raise UserInputError(f"{directory / CONFIG_FILE}: 'files' must map file names to checksums")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise UserInputError(f"{path}: missing (the model directory is incomplete)")
        if sha256(path) != digest:
            raise UserInputError(f"{path}: checksum mismatch (the file is damaged or was replaced)")


_V1_RUNTIME = ("device", "batch_size", "precision")  # how a model ran; no longer saved


def _from_format_1(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """A format-1 (flat) config as format 2."""
    raw = dict(raw)
    setting_names = {f.name for f in fields(Settings)}
    record_keys = {"train_images": "train_images", "lora_record": "lora", "auto_choice": "auto_choice",
                   "version": "package_version"}
    calibration_keys = ("score", "mode_thresholds", "fusion_stats", "view_stats", "foreground_stats",
                        "pixel_threshold", "image_threshold", "validation_stats")
    unknown = sorted(set(raw) - setting_names - set(record_keys) - set(calibration_keys) - set(_V1_RUNTIME))
    if unknown:
        raise UserInputError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
    settings = {k: raw[k] for k in setting_names if k in raw}
    if isinstance(settings.get("lora"), dict):
        lora = dict(settings["lora"])
        lora["crop_size"] = lora.pop("image_size", AdaptationConfig.crop_size) or 0
        settings["lora"] = lora
    modes = raw.get("mode_thresholds") or {
        "distance": {k: raw.get(k) for k in ("image_threshold", "pixel_threshold", "validation_stats")}}
    calibration = {"mode": raw.get("score", "distance"), "modes": modes, "head_stats": raw.get("fusion_stats", {}),
                   "view_stats": raw.get("view_stats", []), "foreground": raw.get("foreground_stats", {})}
    record = {new: raw[old] for old, new in record_keys.items() if old in raw}
    return {"format_version": 1, "settings": settings, "calibration": calibration, "record": record}


def restore(stored: StoredModel, runtime: Runtime, backbone: str | Path | None = None) -> Pipeline:
    """A pipeline with the stored parts loaded; the backbone from the directory, else `backbone`, else the
    settings' reference (models saved by reference)."""
    settings = stored.settings
    pipeline = Pipeline(settings, runtime)
    for i in range(len(settings.views())):
        part = f"view{i}" if i else ""
        scorer = make_scorer(settings.scorer, settings.coreset_ratio, settings.max_bank_candidates, settings.seed,
                             settings.memory_bank)
        try:
            scorer.load_state_dict(stored.state[part])
        except KeyError as exc:
            raise UserInputError(f"{stored.directory / SCORER_FILE}: no {settings.scorer} scorer for view {i} "
                                 f"(missing {exc}); it does not belong to this config.json") from None
        pipeline.scorers.append(scorer)
    if settings.foreground != "off":
        pipeline.foreground_model = ForegroundModel()
        try:
            pipeline.foreground_model.load_state_dict(stored.state["foreground"])
        except KeyError as exc:
            raise UserInputError(f"{stored.directory / SCORER_FILE}: foreground model missing ({exc})") from None
    if "global" in stored.state:  # models written before image evidence have none: they score "patch"
        pipeline.image_bank = ImageBank(len(settings.layers))
        pipeline.image_bank.load_state_dict(stored.state["global"])
    elif settings.image_evidence != "patch":
        raise UserInputError(f"{stored.directory / SCORER_FILE}: no global image embeddings for image_evidence "
                             f"'{settings.image_evidence}'; it does not belong to this config.json")
    adapter_dir = None
    if settings.lora is not None:
        pipeline.heads = AnomalyHeads.load(stored.directory / HEADS_FILE)
        adapter_dir = stored.directory / ADAPTER_DIR
    pipeline.load_backbone(stored.backbone_dir or backbone, adapter_dir)
    pipeline.build_head()
    return pipeline
