"""File checksums for the manifests of model directories and exported bundles (a damaged or swapped file
must fail to load, not score wrongly)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from anomalyvfm.errors import UserInputError


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (bounded memory for large weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_sha256(path: Path) -> str:
    """`sha256` for a loader: a file it cannot read (permissions, I/O error) is one `UserInputError` line."""
    try:
        return sha256(path)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc}); the model files must be readable "
                             "by the user who loads them") from None
