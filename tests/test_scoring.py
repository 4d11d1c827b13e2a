import numpy as np
import torch
from sklearn.covariance import OAS

from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.scoring.coreset import greedy_coreset
from anomalyvfm.scoring.pooling import image_score
from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer, oas_shrinkage


def test_oas_matches_scikit_learn():
    x = np.random.default_rng(0).normal(size=(40, 60))  # fewer samples than dimensions
    cov = np.cov(x, rowvar=False, bias=True)
    assert abs(oas_shrinkage(cov, 40) - OAS(assume_centered=False).fit(x).shrinkage_) < 1e-10


def test_mahalanobis_streaming_equals_direct_and_ranks_outliers():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(500, 8)) * np.arange(1, 9)).float()
    scorer = MahalanobisScorer(ridge=0.0)
    for chunk in a.split(77):
        scorer.partial_fit(chunk)
    scorer.finalize()
    cov = np.cov(a.numpy(), rowvar=False)
    s = scorer.shrinkage
    mu = np.trace(cov) / 8
    precision = np.linalg.inv((1 - s) * cov + s * mu * np.eye(8))
    d = a.numpy()[:5] - a.numpy().mean(0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", d, precision, d))
    assert np.allclose(scorer.score(a[:5]).numpy(), expected, rtol=1e-4)
    outlier = torch.zeros(1, 8)
    outlier[0, 0] = 30  # 30 along the low-variance axis is far; along the high-variance one it is not
    far, near = scorer.score(outlier), scorer.score(torch.roll(outlier, 7, dims=1))
    assert far > 3 * near


def test_greedy_coreset_covers_clusters():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 16)) * 10
    x = torch.from_numpy(np.concatenate([c + rng.normal(size=(200, 16)) for c in centers])).float()
    idx = greedy_coreset(x, 5, seed=0)
    assert sorted(set((idx // 200).tolist())) == [0, 1, 2, 3, 4]


def test_knn_reservoir_is_bounded_and_scores_distance():
    rng = np.random.default_rng(3)
    scorer = KNNScorer(coreset_ratio=0.5, max_candidates=300, seed=0)
    for _ in range(10):
        scorer.partial_fit(torch.from_numpy(rng.normal(size=(100, 4)) + [5, 0, 0, 0]).float())
    assert len(scorer._reservoir) == 300
    scorer.finalize()
    assert len(scorer.bank) == 150
    normal, odd = torch.tensor([[5.0, 0, 0, 0]]), torch.tensor([[-5.0, 0, 0, 0]])
    assert scorer.score(odd) > scorer.score(normal) + 0.5


def test_image_score_and_map_size():
    scores = torch.zeros(10, 10)
    scores[2, 3] = 100.0
    assert image_score(scores, top_percent=1.0) == 100.0
    assert image_score(scores, top_percent=2.0) == 50.0
    amap = anomaly_map(scores, (140, 140), (97, 203), sigma=2.0)
    assert amap.shape == (97, 203) and amap.dtype == np.float32
    y, x = np.unravel_index(amap.argmax(), amap.shape)
    assert abs(y / 97 - 2.5 / 10) < 0.06 and abs(x / 203 - 3.5 / 10) < 0.06
