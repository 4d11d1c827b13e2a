"""Atomic folder writes, torch-free: a folder is built in a temporary sibling and swapped into place.

Shared by the model directory (`detector.model_dir`) and the exported bundle (`deploy.bundle`): a crash or
kill at any step leaves either the old folder or the new one at the target, never a mix.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def temporary_sibling(target: Path) -> Path:
    """An empty folder next to `target` (same filesystem, so it can be renamed onto it), as readable as
    any new folder (mkdtemp makes it private)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def sync_tree(directory: Path) -> None:
    """Flush every file to disk before the rename makes them visible (a power cut must not leave empty files)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def swap_into_place(new: Path, target: Path) -> None:
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


def write_edited_copy(source: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    """Copy folder `source`, let `edit` change the copy, and swap it into place at `target` atomically
    (`target` may be `source` itself); return `target`."""
    tmp = temporary_sibling(target)
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        edit(tmp)
        sync_tree(tmp)
        swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap this is the old folder; after a failure, the new one
    return target
