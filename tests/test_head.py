"""The scoring head: its kNN backends agree, and an unfitted model fails with one typed error."""
from __future__ import annotations

import numpy as np
import pytest

from anomalyvfm.errors import NotFittedError, UserInputError
from anomalyvfm.head.head import HeadConfig, ScoringHead
from anomalyvfm.head.search import make_search


def _bank_and_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(500, 64)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    return bank, rng.normal(size=(9, 11, 64)).astype(np.float32)


@pytest.mark.parametrize("kind", ["torch", "openvino"])
def test_every_search_backend_gives_the_numpy_distances(kind):
    pytest.importorskip(kind)
    bank, features = _bank_and_features()
    want = make_search(bank, "numpy")(features)
    got = make_search(bank, kind)(features)
    assert got.shape == want.shape == (99,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # brute force: one row at a time in float64
    unit = features.reshape(-1, 64) / np.linalg.norm(features.reshape(-1, 64), axis=1, keepdims=True)
    np.testing.assert_allclose(want, 1 - (unit.astype(np.float64) @ bank.T).max(axis=1), atol=1e-5)


def test_a_head_without_its_fitted_arrays_is_not_fitted():
    bank, _ = _bank_and_features()
    config = HeadConfig("knn", views=2, blocks=1)
    with pytest.raises(NotFittedError, match="view1.bank"):
        ScoringHead(config, {"view0.bank": bank})
    assert issubclass(NotFittedError, UserInputError)  # the CLI prints it as one line, exit 2


def test_an_unfitted_detector_says_so_in_one_typed_error():
    from anomalyvfm.detector.detector import AnomalyDetector

    detector = AnomalyDetector()
    for call in (lambda: detector.predict([np.zeros((32, 32, 3), np.uint8)], progress=False),
                 lambda: detector.save("unused"), detector.thresholds):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
