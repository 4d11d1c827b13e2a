"""Everything the tool writes for a user goes through here: the output folder, output names, text files,
file permissions and the one-line error for a failed write.

* **Output folder** (`prepare_output_folder`): refused, before any work, when it equals or lies inside a
  folder the command reads from (an input folder, the folder of an input file, the model): otherwise a
  user's own `b_mask.png` would be replaced by the mask predicted for `b.png`, and the next run would
  score the previous run's pictures. It is created there and then, so an `--out` that cannot be created
  (under `/proc`, read-only, a file in the way) is one line before the model is loaded.
* **Output names** (`output_names`): one name per input, unique among themselves even compared without
  case (shares from other systems are often case-insensitive), never hidden, never longer than a file
  name may be; every picture is `<name><suffix>` for a suffix of `PICTURE_SUFFIXES`, so two inputs can
  never share a picture. Every `predict` engine names its pictures with this one function.
* **Text files** (`open_text`, `write_text`): UTF-8 with `errors="surrogateescape"`. Linux file names are
  bytes; Python reads a name that is not valid UTF-8 as a `str` with lone surrogates, and surrogateescape
  writes those back as the original bytes. So a CSV's `path` holds exactly the bytes of the file name
  (lossless; read it back with the same error handler, e.g. pandas `encoding_errors="surrogateescape"`).
* **Whole files** (`write_atomic`): written under a hidden temporary name, then renamed over the target,
  so a reader (a browser, a resumed run) sees the old file or the new one, never half of one.
* **Permissions** (`follow_umask`): safetensors and `tempfile` create files and folders 0600/0700; the
  model and bundle writers call this once on the finished tree, so every file is as readable as any
  file the user creates (a service account can read a model fitted by another user).
* **Write errors** (`output_errors`): an `OSError` while writing (a full disk, a read-only or vanished
  folder) becomes one `UserInputError` line naming the file and what was already written.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

from anomalyvfm.errors import UserInputError

TEXT_ENCODING = "utf-8"
TEXT_ERRORS = "surrogateescape"  # lossless for file names that are not valid UTF-8 (module doc)
PREDICTIONS_CSV = "predictions.csv"
PICTURE_SUFFIXES = ("_overlay.png", "_mask.png")
NAME_MAX_BYTES = 255  # a file name on Linux file systems
PARTIAL = ".partial"  # a picture is written to `.<file>.partial` first (maps.render.save_pictures)
# longest stem an output name may have: its picture's temporary `.<name>_overlay.png.partial` must fit too
MAX_NAME_BYTES = NAME_MAX_BYTES - 1 - max(map(len, PICTURE_SUFFIXES)) - len(PARTIAL)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")  # control characters (newlines, tabs) and separators


# -- the output folder -------------------------------------------------------------------------------
def prepare_output_folder(out: str | Path, inputs: Iterable[str | Path], model: str | Path | None = None) -> Path:
    """Check that `out` is a folder no input is read from, and create it; one line for any problem.

    `inputs` are the image files to score (a folder's images included): their folders, and `model`, are
    what the command reads. Paths are compared resolved, so `.`, `..` and symbolic links do not hide an
    overlap.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: --out exists and is not a folder")
    try:
        target = out.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic-link loop
        raise UserInputError(f"{out}: cannot resolve --out ({exc})") from None
    read = {Path(p).parent for p in inputs} | ({Path(model)} if model is not None else set())
    for folder in sorted(read, key=str):
        source = folder.resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise UserInputError(f"{out}: --out {where} {folder}, a folder this command reads from; "
                                 "choose an output folder outside the inputs and the model")
    try:  # created, and a file written and removed in it: a read-only --out is found before the model loads
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".anomalyvfm-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(f"{out}: cannot create the output folder or write in it ({exc.strerror or exc})") from None
    return out


# -- output names ------------------------------------------------------------------------------------
def output_names(files: Sequence[str | Path], taken: Iterable[str] = ()) -> list[str]:
    """One output name per file, in order: its stem where that is unique, else qualified by its folder,
    then its extension, then a number, until no other name (nor one of `taken`) is equal ignoring case.

    The first candidate every input with a unique stem can have is claimed before any qualified one, so a
    qualified name (`a_x`) never takes the plain name of another input (`a_x.png`); `taken` holds names
    already used in the output folder (a resumed run). Names are single file-name components: control
    characters and separators become `_`, a leading `.` becomes `_`, and long names are cut to
    `MAX_NAME_BYTES` (by their file-system bytes) before any qualifier, so the qualifier survives.
    """
    paths = [Path(f) for f in files]
    stems = [_component(p.stem) for p in paths]
    claimed = {name.casefold() for name in taken}
    counts = Counter(stem.casefold() for stem in stems)
    names: list[str | None] = [None] * len(paths)
    for i, stem in enumerate(stems):
        if counts[stem.casefold()] == 1 and stem.casefold() not in claimed:
            names[i] = stem
            claimed.add(stem.casefold())
    for i, path in enumerate(paths):
        if names[i] is None:
            names[i] = next(c for c in _candidates(path, stems[i]) if c.casefold() not in claimed)
            claimed.add(names[i].casefold())
    return names  # type: ignore[return-value]  # every entry was set above


def picture_files(name: str) -> list[str]:
    """The file names of one input's pictures."""
    return [name + suffix for suffix in PICTURE_SUFFIXES]


def _candidates(path: Path, stem: str) -> Iterator[str]:
    """Ever longer qualifications of a stem that is not unique (endless, so a free one always exists)."""
    folder = _component(path.parent.name) if path.parent.name else ""
    extension = _component(path.suffix.lstrip(".")) if path.suffix else ""
    base = f"{folder}_{stem}" if folder else stem
    yield _fit(base)
    if extension:
        yield _fit(base, f"_{extension}")
    number = 2
    while True:
        yield _fit(base, f"_{extension}~{number}" if extension else f"~{number}")
        number += 1


def _component(text: str) -> str:
    """`text` as one readable file-name component (see `output_names`)."""
    text = _UNSAFE.sub("_", text)
    if text.startswith("."):
        text = "_" + text[1:]
    return _fit(text or "_")


def _fit(text: str, qualifier: str = "") -> str:
    """`text` cut so that `text + qualifier` is at most `MAX_NAME_BYTES` as file-system bytes (whole
    characters only; an undecodable byte, a lone surrogate, counts as one)."""
    room = MAX_NAME_BYTES - len(os.fsencode(qualifier))
    while len(os.fsencode(text)) > room:
        text = text[: max(0, len(text) - max(1, (len(os.fsencode(text)) - room) // 4))]
    return text + qualifier


# -- text files and permissions ------------------------------------------------------------------------
def open_text(path: str | Path, mode: str = "w") -> TextIO:
    """A text file for writing, with the tool's one policy for undecodable names (module doc); newline=""
    so the csv module controls line ends."""
    return open(path, mode, encoding=TEXT_ENCODING, errors=TEXT_ERRORS, newline="")


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text` with the tool's text policy."""
    with open_text(path) as handle:
        handle.write(text)


def write_atomic(target: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary_path)`, then rename over `target`: readers see the old file or the new, never half."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask: from /proc on Linux (Python can read it only by setting it, which would race with
    other threads creating files), else set and set straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def follow_umask(root: str | Path) -> None:
    """Give `root` and everything under it the permissions a new file or folder gets under the umask.

    Writers that use `tempfile` or safetensors create private (0600/0700) files; a model or bundle must
    be readable wherever its folder is, e.g. by a service account that did not fit it.
    """
    umask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# -- write errors --------------------------------------------------------------------------------------
@contextmanager
def output_errors(path: str | Path, written: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn an `OSError` while writing `path` into one `UserInputError` line naming the file (the one the
    error names, if any) and, via `written()`, what had already been written."""
    try:
        yield
    except OSError as exc:
        done = f"; {written()}" if written is not None else ""
        raise UserInputError(f"{path}: cannot write ({exc.strerror or exc}){done}") from None


# -- predictions.csv -----------------------------------------------------------------------------------
CSV_COLUMNS = ("path", "score", "is_anomalous", "error")


def csv_row(path: str, score: float | None, is_anomalous: bool | None, error: str | None) -> list[str]:
    """One predictions.csv row, the same for every engine: an error row has no score and no verdict."""
    if error is not None:
        return [path, "", "", error]
    return [path, f"{score:.6g}", str(int(bool(is_anomalous))), ""]


class PredictionsCsv:
    """predictions.csv written row by row with the text policy, each row whole or not at all.

    Rows go straight to the file (no buffer that a later close could retry), so a row is on disk as soon
    as `add` returns: a crash later loses nothing before it. A failed write (a full disk) truncates the
    file back to its last whole row and is one line naming the file and how many rows it holds.
    """

    def __init__(self, path: str | Path, shown_as: str | Path | None = None) -> None:
        self.path, self.shown_as, self.rows = Path(path), Path(shown_as or path), 0

    def __enter__(self) -> PredictionsCsv:
        with output_errors(self.shown_as, lambda: "nothing was written"):
            self._file = open(self.path, "wb", buffering=0)
        self._whole = 0  # bytes up to the end of the last whole row
        self._write(CSV_COLUMNS, "nothing was written")
        return self

    def add(self, path: str, score: float | None, is_anomalous: bool | None, error: str | None) -> None:
        self._write(csv_row(path, score, is_anomalous, error), f"it holds the header and the first {self.rows} rows")
        self.rows += 1

    def _write(self, row: Sequence[str], written: str) -> None:
        text = io.StringIO()
        csv.writer(text).writerow(row)
        data = memoryview(text.getvalue().encode(TEXT_ENCODING, TEXT_ERRORS))
        try:
            with output_errors(self.shown_as, lambda: written):
                while data:
                    data = data[self._file.write(data):]
        except UserInputError:
            try:
                self._file.truncate(self._whole)  # no half row: freeing space never fails for lack of it
            except OSError:
                pass
            raise
        self._whole = self._file.tell()

    def __exit__(self, *_: Any) -> None:
        self._file.close()
