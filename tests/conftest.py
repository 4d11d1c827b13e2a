"""Shared fixtures: a tiny random DINOv2 and a generated MVTec AD 2-layout dataset (no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest

from anomalyvfm.demo import make_demo_dataset, make_random_backbone


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    return make_random_backbone(tmp_path_factory.mktemp("backbone") / "tiny-dinov2")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, "demo", n_train=12, n_val=5, n_test=8, seed=1)
    return root


@pytest.fixture(scope="session")
def fitted_model(tmp_path_factory, backbone_dir, data_root) -> Path:
    """A saved model (default settings) fitted through the CLI, reused by read-only tests."""
    from anomalyvfm.cli.main import main

    out = tmp_path_factory.mktemp("model") / "model"
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """The tiny backbone's many small calls run faster on one thread on a busy machine."""
    from anomalyvfm.scoring.coreset import single_thread

    with single_thread():
        yield
