"""File checksums for the manifests of model directories and earlier bundles (a damaged or swapped file
must fail to load, not score wrongly)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from anomalyvfm.errors import UserInputError


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (bounded memory for large weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, files: Any, required: list[str], manifest: Path) -> None:
    """Every file `manifest` lists (`files`: name → SHA-256) exists under `directory` with its checksum, and it
    lists the `required` ones — every file the loader reads — so a manifest stripped of its list cannot switch
    the checks off. Each problem is one `UserInputError` naming the file."""
    if not isinstance(files, dict):
        raise UserInputError(f"{manifest}: 'files' must map file names to checksums")
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise UserInputError(f"{manifest}: lists no checksum for {', '.join(unlisted[:3])}"
                             f"{' …' if len(unlisted) > 3 else ''}, which loading reads (incomplete or edited)")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise UserInputError(f"{path}: missing (copy the whole folder again)")
        if checked_sha256(path) != digest:
            raise UserInputError(f"{path}: checksum mismatch (the file is damaged or was replaced)")


def checked_sha256(path: Path) -> str:
    """`sha256` for a loader: a file it cannot read (permissions, I/O error) is one `UserInputError` line."""
    try:
        return sha256(path)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc}); the model files must be readable "
                             "by the user who loads them") from None
