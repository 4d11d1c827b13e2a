"""The full-coverage kNN memory bank (merge and reduce) against the reservoir it can replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalyvfm.scoring.coreset import StreamingCoreset, greedy_coreset
from anomalyvfm.scoring.scorers import KNNScorer


def stream_with_rare_pattern(seed: int = 0) -> list[torch.Tensor]:
    """40 'images' of 500 patches around one direction; 10 patches of a rare, distinct pattern in one image."""
    g = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(1, 32, generator=g), dim=1)
    rare = F.normalize(torch.randn(1, 32, generator=g), dim=1)
    images = [common + 0.05 * torch.randn(500, 32, generator=g) for _ in range(40)]
    images[7][:10] = rare + 0.01 * torch.randn(10, 32, generator=g)
    return images


def test_equals_reservoir_while_everything_fits() -> None:
    images = stream_with_rare_pattern()[:3]
    banks = []
    for bank in ("reservoir", "merge"):
        scorer = KNNScorer(coreset_ratio=0.1, max_candidates=5000, seed=3, bank=bank)
        for x in images:
            scorer.partial_fit(x)
        scorer.finalize()
        banks.append(scorer.bank)
    torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=0)


def test_rare_normal_pattern_is_kept_where_the_reservoir_drops_it() -> None:
    images = stream_with_rare_pattern()
    rare = F.normalize(images[7][:10], dim=1)
    distance = {}
    for bank in ("reservoir", "merge"):
        scorer = KNNScorer(coreset_ratio=0.1, max_candidates=1000, seed=0, bank=bank)
        for x in images:
            scorer.partial_fit(x)
        scorer.finalize()
        assert len(scorer.bank) == 100  # same bank size: only the candidates differ
        distance[bank] = float(scorer.score(rare).max())
    assert distance["merge"] < 0.01 < distance["reservoir"]


def test_memory_stays_within_capacity() -> None:
    stream = StreamingCoreset(capacity=700, ratio=0.1, seed=0)
    for x in stream_with_rare_pattern():
        stream.add(x)
        assert stream.held < 700
    assert stream.seen == 20_000 and stream.reductions > 20
    assert len(stream.result()) == 70


def test_ratio_one_terminates_and_merging_equals_one_stream() -> None:
    images = stream_with_rare_pattern()[:6]
    stream = StreamingCoreset(capacity=800, ratio=1.0)
    for x in images:
        stream.add(x)
    assert len(stream.result()) == stream.held <= 800
    left, right = StreamingCoreset(800, 0.1), StreamingCoreset(800, 0.1)
    for k, x in enumerate(images):
        (left if k < 3 else right).add(x)
    left.absorb(right)
    assert left.seen == 3000 and len(left.result()) == 80


def test_capacity_and_bank_are_checked() -> None:
    with pytest.raises(ValueError, match="capacity"):
        StreamingCoreset(1, 0.1)
    with pytest.raises(ValueError, match="memory bank"):
        KNNScorer(bank="everything")
    assert len(greedy_coreset(torch.randn(5, 3), 10)) == 5


def test_memory_bank_is_a_cli_option() -> None:
    from anomalyvfm.cli.main import build_parser
    from anomalyvfm.cli.options import settings_from_args

    args = build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--memory-bank", "merge"])
    assert settings_from_args(args).memory_bank == "merge"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--memory-bank", "all"])
