"""Kept images: the bytes of every recorded image, content-addressed by SHA-256, within a size cap.

`DIR/<first two hex digits>/<sha256><suffix>`: the same image sent twice is kept once, and a record finds
its image from its `sha256` alone. The suffix comes from the bytes' own signature (PNG, JPEG, TIFF, BMP,
WebP), so the name is a function of the content and image tools recognise the file. A file is written to a
temporary name and renamed, so a crash never leaves half an image under a final name.

Over the cap (`max_bytes`), the oldest images (by when they were kept) that no inspection's label
protects are deleted until the folder is at 90 % of the cap. A labelled image is never deleted, since
`update` learns from it; when the labels cannot be read (the store is down), nothing is deleted.
Failing to keep an image (a full disk) never fails its verdict: the record says `image kept: no` by the
file's absence, and the error is logged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from anomalyvfm.errors import UserInputError
from anomalyvfm.outputs import current_umask

log = logging.getLogger("anomalyvfm.error")
SIGNATURES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
              (b"BM", ".bmp"))
DEFAULT_MAX_BYTES = 10 * 2**30  # 10 GiB
DEFAULT = "default"  # --keep-images: a folder beside a SQLite file; none for PostgreSQL (`open_store`)


def suffix_of(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in SIGNATURES if data.startswith(signature)), ".img")


class ImageKeeper:
    """A content-addressed folder of images with a size cap (module doc)."""

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 protected: Callable[[], set[str]] = set) -> None:
        self.folder, self.max_bytes, self.protected = Path(folder), max_bytes, protected
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".probe-", dir=self.folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise UserInputError(f"--keep-images {self.folder}: cannot write there ({exc.strerror or exc})") from None
        self._lock = threading.Lock()
        self.used = sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[int, int, Path]]:
        """(time kept, size, path) of every kept image, oldest first (one another process deletes is skipped)."""
        found = []
        for path in self.folder.glob("??/*"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if not path.name.startswith("."):
                found.append((info.st_mtime_ns, info.st_size, path))
        return sorted(found, key=lambda item: item[0])

    def path(self, sha256: str) -> Path | None:
        """The kept image with this digest, if there is one."""
        return next(iter(sorted((self.folder / sha256[:2]).glob(f"{sha256}.*"))), None)

    def keep(self, data: bytes) -> str:
        """Keep `data` (once per content) and return its SHA-256; errors are logged, never raised."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.folder / digest[:2] / (digest + suffix_of(data))
        if target.exists():
            return digest
        try:
            target.parent.mkdir(exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=".keep-", dir=target.parent)
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, target)
        except OSError as exc:
            log.error(f"image not kept: {target}: {exc.strerror or exc}", extra={"fields": {"event": "image_not_kept"}})
            return digest
        with self._lock:
            self.used += len(data)
            over = self.used > self.max_bytes
        if over:
            self.prune()
        return digest

    def prune(self) -> int:
        """Delete the oldest unprotected images until the folder is at 90 % of the cap; return how many."""
        with self._lock:
            try:
                keep = self.protected()
            except Exception as exc:  # noqa: BLE001 — the store is down: a label may protect any image
                log.warning(f"images over the cap not pruned: labels unreadable ({type(exc).__name__})")
                return 0
            files = self._files()
            self.used = sum(size for _, size, _ in files)
            deleted = 0
            for _, size, path in files:
                if self.used <= 0.9 * self.max_bytes:
                    break
                if path.name.split(".")[0] in keep:
                    continue
                path.unlink(missing_ok=True)
                self.used, deleted = self.used - size, deleted + 1
            return deleted
