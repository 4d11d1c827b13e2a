"""The model directory: the one module that reads and writes a fitted model's files (torch-free).

    config.json          format version, settings, calibration, fit record, backbone forms, sha256 of every other file
    head.safetensors     the scoring head's arrays (`head.head`): `view<i>.bank` or `view<i>.mean`/`whitener`,
                         `foreground.*`, `global.embeddings`
    backbone/            the backbone blocks the detector uses (transformers layout), unless saved by reference
    openvino-bf16/, onnx-fp32/ …   exported backbone graphs (`anomalyvfm export`), one folder per form
    adapter/, heads.safetensors   LoRA adapter (peft) and anomaly heads of an adapted detector

A model is one format whatever runs it: the torch detector reads `backbone/`, the torch-free runtime a graph
form, and both score with the same head arrays, settings and calibration read here.

Writing is atomic: the directory is built in a temporary sibling and swapped into place in one rename,
so a crash or kill at any step leaves either the old model or the new one, never a mix. Reading checks
the format version, every setting's type and range, unknown keys and each file's checksum, and turns
every problem into one `UserInputError` line naming the directory.

Formats 1 (anomalyvfm 0.1, a flat `config.json` with thresholds copied per mode and no checksums) and 2
(`scorer.safetensors` with view 0 unprefixed, no forms) are still read, and written back as format 3.
Bundles of the earlier separate format (manifest.json + scorer.npz) are read by `deploy.bundle`.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.checksums import sha256, verify
from anomalyvfm.declare import from_dict, to_dict
from anomalyvfm.detector.settings import Settings, stored_settings
from anomalyvfm.errors import UserInputError
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.outputs import follow_umask, write_text

FORMAT_VERSION = 3
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
SCORER_FILE = "scorer.safetensors"  # format 2's name for the head's arrays
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
    updates: list[dict[str, Any]] = field(default_factory=list)  # `anomalyvfm update` lineage, oldest first
    calibration_defects: dict[str, Any] = field(default_factory=dict)  # labelled defects the thresholds used
    defects: dict[str, Any] = field(default_factory=dict)  # labelled defects learnt as evidence (`fit --defects`)


@dataclass
class StoredModel:
    """A model directory's contents, checked, before any model weights are loaded."""

    directory: Path
    settings: Settings
    calibration: Calibration
    record: FitRecord
    head: dict[str, np.ndarray]  # the scoring head's arrays, keyed `<part>.<name>`
    forms: dict[str, dict[str, Any]] = field(default_factory=dict)  # exported backbone graphs, by folder name
    version: str = ""  # what judged an image (`model_version`); "" until written and read back

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
    try:  # `write` builds the model in a temporary sibling: the parent must take one (not /proc, not read-only)
        directory.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{directory.name}.check-", dir=directory.parent)).rmdir()
    except OSError as exc:
        raise UserInputError(f"{directory}: cannot create the model folder there ({exc.strerror or exc})") from None
    return directory


def write(directory: str | Path, stored: StoredModel, write_parts: Callable[[Path], None] | None = None,
          copy_from: Path | None = None, leave_out: tuple[str, ...] = ()) -> Path:
    """Write a model to `directory` atomically (see module doc); return the directory.

    `write_parts(folder)` adds what only torch can write (backbone weights, LoRA adapter and heads);
    `copy_from` first copies the files of a model directory, but for `leave_out` (a model gaining a backbone
    form, or its copy without torch files for a line PC).
    """
    directory = check_writable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if copy_from is not None:  # top-level names only: backbone/ has a config.json of its own
            skip = {CONFIG_FILE, SCORER_FILE, HEAD_FILE, *leave_out}
            shutil.copytree(copy_from, tmp, dirs_exist_ok=True,
                            ignore=lambda folder, names: [n for n in names if Path(folder) == Path(copy_from) and n in skip])
        save_file({key: np.ascontiguousarray(value) for key, value in stored.head.items()}, str(tmp / HEAD_FILE))
        if write_parts is not None:
            write_parts(tmp)
        config = {"format_version": FORMAT_VERSION, "settings": to_dict(stored.settings),
                  "calibration": stored.calibration.to_dict(), "record": asdict(stored.record),
                  "forms": stored.forms, "files": _checksums(tmp)}
        write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        follow_umask(tmp)  # mkdtemp and safetensors write private files; a model is as readable as a new file
        _sync(tmp)
        _swap_into_place(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap this is the old model; after a failure, the new one
    return directory


def _checksums(directory: Path) -> dict[str, str]:
    """Every file but the top-level config.json that holds the list (`backbone/config.json` included)."""
    return {str(path.relative_to(directory)): sha256(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path != directory / CONFIG_FILE}


def _sync(directory: Path) -> None:
    """Flush every file to disk before the rename makes them visible (a power cut must not leave empty files)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _swap_into_place(new: Path, target: Path) -> None:
    """Make `new` appear at `target` in one step; the old `target` (if any) ends up at `new`'s path.

    Linux's renameat2(RENAME_EXCHANGE) swaps two directories atomically. Where it is missing, the old
    directory is first moved aside, which leaves a moment with no directory at `target` but never a mix.
    """
    if not target.exists():
        os.rename(new, target)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, bytes(new), at_fdcwd, bytes(target), rename_exchange) == 0:
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, aside / target.name)
    os.rename(new, target)
    os.rename(aside / target.name, new)
    aside.rmdir()


# -- reading ------------------------------------------------------------------------------------------
def read(directory: str | Path) -> StoredModel:
    """Read and check a model directory; every problem is one `UserInputError` line naming it."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UserInputError(f"{directory}: not a model directory (needs {CONFIG_FILE})")
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
    config = _from_format_1(raw, config_path) if version == 1 else raw
    try:
        unknown = sorted(set(config) - {"format_version", "settings", "calibration", "record", "forms", "files"})
        if unknown:
            raise UserInputError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
        settings = stored_settings(config["settings"], "settings")
        calibration = Calibration.from_dict(config["calibration"], "calibration")
        record = from_dict(FitRecord, config.get("record", {}), "record")
    except KeyError as exc:
        raise UserInputError(f"{config_path}: missing {exc}") from None
    except (UserInputError, TypeError) as exc:
        raise UserInputError(f"{config_path}: {exc}") from None
    forms = config.get("forms", {})
    if not isinstance(forms, dict) or not all(isinstance(f, dict) for f in forms.values()):
        raise UserInputError(f"{config_path}: 'forms' must map folder names to their descriptions")
    head_path = directory / (HEAD_FILE if version >= 3 else SCORER_FILE)
    if version >= 2:  # format 1 has no checksums
        verify(directory, config.get("files"), [head_path.name, *_loaded_files(directory, forms)], config_path)
    try:
        arrays = load_file(str(head_path))
    except Exception as exc:  # a missing file, or the safetensors parser's own error types for damaged ones
        raise UserInputError(f"{head_path}: unreadable ({str(exc).splitlines()[0][:160]})") from None
    if version < 3:  # format 2 kept view 0's scorer unprefixed
        arrays = {key if "." in key else f"view0.{key}": value for key, value in arrays.items()}
    if settings.layers:  # (format 1 may leave them to the backbone's defaults)
        missing = [key for key in settings.head_config().required_arrays() if key not in arrays]
        if missing:
            raise UserInputError(f"{head_path}: no {', '.join(missing)} for this model's settings; it does not "
                                 f"belong to this {CONFIG_FILE}")
    return StoredModel(directory, settings, calibration, record, arrays, forms, model_version(config, head_path))


def model_version(config: dict[str, Any], head_path: Path) -> str:
    """A short content identity of what decides a verdict: settings, calibration and the head's arrays.

    Records of the inspection store name it, so two models that judge alike share it whatever their folder:
    adding a backbone form (`export`) keeps it; refitting, `calibrate` or `update` change it.
    """
    head = (config.get("files") or {}).get(head_path.name) or sha256(head_path)
    identity = json.dumps({"settings": config["settings"], "calibration": config["calibration"], "head": head},
                          sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _loaded_files(directory: Path, forms: dict[str, Any]) -> list[str]:
    """The files of a model directory that loading reads besides config.json, as manifest names.

    Earlier writers left every file named config.json out of the list, so a subfolder's
    config.json (small JSON that transformers/peft parse and check themselves) is not required; all the
    weights are.
    """
    loaded = (BACKBONE_DIR, ADAPTER_DIR, HEADS_FILE, *forms)
    return [str(path.relative_to(directory)) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.relative_to(directory).parts[0] in loaded and path.name != CONFIG_FILE]


_V1_RUNTIME = ("device", "batch_size", "precision")  # how a model ran; no longer saved


def _from_format_1(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """A format-1 (flat) config in format 2's shape (format 3 without forms)."""
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
