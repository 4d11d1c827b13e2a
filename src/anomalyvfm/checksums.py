"""File checksums for the manifests of model directories and exported bundles (a damaged or swapped file
must fail to load, not score wrongly)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (bounded memory for large weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
