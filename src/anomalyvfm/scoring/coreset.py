"""Greedy k-center coreset selection (PatchCore): a small memory bank that still covers every normal region."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from tqdm.auto import tqdm


def greedy_coreset(features: torch.Tensor, size: int, seed: int = 0, projection_dim: int = 128) -> torch.Tensor:
    """Indices of a k-center greedy coreset (PatchCore): each step adds the point farthest from the set.

    Distances are computed in a random projection to `projection_dim` dimensions (Johnson–Lindenstrauss),
    which keeps selection fast without changing which regions get covered.
    """
    n, dim = features.shape
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if dim > projection_dim:
        x = x @ (torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim))
    with single_thread():
        return _greedy_select(x, size, int(torch.randint(n, (1,), generator=generator)))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: thousands of tiny sequential ops are slowed, not sped up, by thread
    synchronisation (10x slower on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _greedy_select(x: torch.Tensor, size: int, first: int) -> torch.Tensor:
    norms = x.square().sum(1)
    selected = [first]
    # ||x - c||² = ||x||² - 2·x·c + ||c||²: one matrix-vector product per step, no (n, dim) temporary
    min_dist = norms - 2 * (x @ x[selected[0]]) + norms[selected[0]]
    # a bar on a terminal only (tens of seconds for a 10 000-row bank from 100 000 patches); silent in logs
    for _ in tqdm(range(size - 1), desc="coreset", unit="row", leave=False, disable=None, mininterval=1.0):
        nxt = int(torch.argmax(min_dist))
        selected.append(nxt)
        torch.minimum(min_dist, norms - 2 * (x @ x[nxt]) + norms[nxt], out=min_dist)
    return torch.tensor(selected)


class StreamingCoreset:
    """A k-center coreset of every row of a stream, in bounded memory (merge and reduce).

    Rows are buffered until `capacity` are held; then the held rows (the summary so far plus the new
    ones) are reduced to a coreset of `ratio`·capacity rows, and buffering resumes. k-center coresets
    compose (a coreset of the union of coresets covers the union within the sum of their radii), so
    every row seen has been considered, unlike a reservoir that drops most rows of a large training set
    unseen. Fewer than `capacity` rows are held between calls (the incoming batch is consumed in slices);
    the final bank has round(`ratio`·min(rows seen, capacity)) rows (at most the rows held), the size
    a reservoir of `capacity` rows would give, so the two differ only in which rows they could choose from. While no more than `capacity` rows
    have been seen, the result equals the coreset of all of them.

    The state is mergeable (distributed fitting): `absorb(other)` adds another stream's held rows, as if
    they had been streamed here.

    Each row carries the index of the image it came from (`sources`, -1 when not given) through every
    reduction, so that a training image can later be scored against the bank without its own rows
    (out-of-fold scores); `result_sources` holds those of the final coreset.
    """

    def __init__(self, capacity: int, ratio: float, seed: int = 0) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2 rows")
        self.capacity, self.ratio, self.seed = capacity, ratio, seed
        # reductions must free room, so an intermediate summary never fills more than half the capacity
        self.summary_size = max(1, min(round(ratio * capacity), capacity // 2))
        self._rows: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []  # int32 image index of each held row, parallel to `_rows`
        self.result_sources: torch.Tensor | None = None
        self.held = 0  # rows in `_rows`
        self.seen = 0  # rows ever added (absorbed streams included)
        self.reductions = 0

    def add(self, rows: torch.Tensor, source: int = -1) -> None:
        """Stream `rows` in, all from image `source`."""
        self.seen += len(rows)
        self._hold(rows, torch.full((len(rows),), source, dtype=torch.int32))

    def _hold(self, rows: torch.Tensor, sources: torch.Tensor) -> None:
        while len(rows):
            room = self.capacity - self.held
            self._rows.append(rows[:room])
            self._sources.append(sources[:room])
            self.held += len(rows[:room])
            rows, sources = rows[room:], sources[room:]
            if self.held >= self.capacity:
                self._reduce(self.summary_size)

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._rows) > 1:
            self._rows, self._sources = [torch.cat(self._rows)], [torch.cat(self._sources)]
        return self._rows[0], self._sources[0]

    def _reduce(self, size: int) -> torch.Tensor:
        pool, sources = self._pool()
        keep = greedy_coreset(pool, size, self.seed + self.reductions)
        kept = pool[keep].contiguous()
        self._rows, self._sources, self.held = [kept], [sources[keep]], len(kept)
        self.reductions += 1
        return kept

    def absorb(self, other: "StreamingCoreset") -> None:
        """Merge another stream's state into this one (its held rows are streamed here)."""
        self.seen += other.seen
        if other.held:
            self._hold(*other._pool())

    def result(self) -> torch.Tensor:
        """The final coreset of everything seen (its rows' images in `result_sources`)."""
        if not self.held:
            raise ValueError("no rows were added")
        kept = self._reduce(max(1, round(self.ratio * min(self.seen, self.capacity))))
        self.result_sources = self._sources[0]
        return kept
