"""What to score: folders (their images), image files, and lists of paths in .txt, .csv or .parquet files.

Paths are made absolute (workers may run in another directory or on another machine with the same
mount) and de-duplicated in order, so each image is scored once however often it is listed.
A relative path inside a list is relative to the list's folder, so a list travels with its images.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

from anomalyvfm.data import IMAGE_SUFFIXES, list_images
from anomalyvfm.errors import UserInputError

LIST_SUFFIXES = (".txt", ".csv", ".parquet")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Absolute image paths of every source, in order, each once; a missing source or empty result is an error."""
    seen: dict[str, None] = {}
    for raw in sources:
        path = Path(raw)
        if path.is_dir():
            found: Iterable[Path] = list_images(path)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found = (p if p.is_absolute() else path.parent / p for p in map(Path, read_path_list(path)))
        elif path.is_file():
            found = [path]
        else:
            raise UserInputError(f"{path}: no such file or folder")
        seen.update((os.path.abspath(p), None) for p in found)
    if not seen:
        raise UserInputError(f"no images to score in {', '.join(sources)} "
                             f"(folders are searched for {', '.join(IMAGE_SUFFIXES)}, not recursively)")
    return list(seen)


def read_path_list(path: Path) -> list[str]:
    """The paths in a list file: one per line (.txt), or the `path` column (else the first) of a .csv/.parquet."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = (line.strip() for line in path.read_text().splitlines())
            return [line for line in lines if line and not line.startswith("#")]
        if suffix == ".csv":
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            column = rows[0].index("path") if rows and "path" in rows[0] else 0
            body = rows[1:] if rows and "path" in rows[0] else rows
            return [row[column] for row in body if len(row) > column and row[column]]
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = "path" if "path" in table.column_names else table.column_names[0]
        return [p for p in table.column(column).to_pylist() if p]
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise UserInputError(f"{path}: cannot read the path list ({exc})") from None
