"""Greedy k-center coreset selection (PatchCore): a small memory bank that still covers every normal region."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


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
    for _ in range(size - 1):
        nxt = int(torch.argmax(min_dist))
        selected.append(nxt)
        torch.minimum(min_dist, norms - 2 * (x @ x[nxt]) + norms[nxt], out=min_dist)
    return torch.tensor(selected)
