"""The spill file: records that could not be written to the store wait here, in order, until they can.

JSON lines, append-only, each append fsync'd before it returns, so a record the service answered for is
on disk even if the process is killed the next moment. Several processes may share one file (two `serve`
workers on one store): every append and every replay holds an exclusive `flock`, and an appender checks
after locking that the path still names the file it opened (a replay may have replaced it).

A replay reads the complete lines present, writes them to the store (each record's id is its primary
key, so one written before a crash is not written twice), then removes exactly those lines. A line cut
short by a kill in the middle of an append (never acknowledged: the fsync had not returned) is dropped.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from anomalyvfm.errors import UserInputError


class Spill:
    """An append-only JSON-lines file of records waiting for the store (module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            raise UserInputError(f"{self.path}: cannot create the store's spill file ({exc.strerror or exc})") from None
        with self._locked() as fd:
            self.waiting = len(self._complete_lines(fd)[0])

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """This file, opened and exclusively locked against this process's threads and other processes."""
        with self._lock:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            try:
                yield fd
            finally:
                os.close(fd)  # closing releases the flock

    @staticmethod
    def _complete_lines(fd: int) -> tuple[list[bytes], int]:
        """The file's whole lines and the number of bytes they span (a torn last line is left out)."""
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        end = data.rfind(b"\n") + 1
        return [line for line in data[:end].split(b"\n") if line], end

    def append(self, records: list[dict[str, Any]]) -> None:
        """Add records at the end and fsync them; a torn line left by a killed appender is cut off first."""
        payload = b"".join(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)
        with self._locked() as fd:
            _, end = self._complete_lines(fd)
            if end != os.fstat(fd).st_size:
                os.ftruncate(fd, end)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            self.waiting = len(self._complete_lines(fd)[0])

    def replay(self, write: Callable[[list[dict[str, Any]]], None], chunk: int = 500) -> int:
        """Write the waiting records with `write` (in order, `chunk` at a time), then remove them; return how
        many. If `write` raises, what it did not write stays (a later replay writes the rest once).

        The lock is held to take the snapshot and to remove it, not while `write` runs, so appends (the
        service's verdicts) never wait for a long replay. Another process may replay the same lines meanwhile:
        writes are idempotent, and lines are removed only if the file still starts with them.
        """
        with self._locked() as fd:
            lines, end = self._complete_lines(fd)
        done = 0
        try:
            for start in range(0, len(lines), chunk):
                part = lines[start:start + chunk]
                write([json.loads(line) for line in part])
                done = start + len(part)
        finally:
            with self._locked() as fd:
                rest = self._drop_first(fd, lines[:done]) if done else os.pread(fd, os.fstat(fd).st_size, 0)
                self.waiting = rest.count(b"\n")
        return done

    def _drop_first(self, fd: int, written: list[bytes]) -> bytes:
        """Remove the written lines if the file still starts with them: truncate when they are all it holds,
        else rewrite the rest (to a temporary file renamed over this one, so a crash leaves the old file or
        the new one, both replayable). Return what the file holds afterwards."""
        cut = sum(len(line) + 1 for line in written)
        size = os.fstat(fd).st_size
        if os.pread(fd, cut, 0) != b"".join(line + b"\n" for line in written):
            return os.pread(fd, size, 0)  # another process replayed and removed them already
        if cut == size:
            os.ftruncate(fd, 0)
            os.fsync(fd)
            return b""
        rest = os.pread(fd, size - cut, cut)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as file:
            file.write(rest)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)
        return rest
