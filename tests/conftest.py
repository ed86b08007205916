"""Shared fixtures: tiny datasets written on the fly, never downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalyncd.config import DemoParams
from anomalyncd.demo import generate

ROOT = Path(__file__).resolve().parents[1]
MTD = ROOT.parent / "shared" / "datasets" / "mtd"


@pytest.fixture
def tiny_demo(tmp_path: Path) -> Path:
    """A demo dataset of 64-px images: 6 normal train, 2 normal test, 3 per defect type."""
    generate(tmp_path / "demo", DemoParams(image_size=64, n_train=6, n_test_normal=2, n_per_type=3))
    return tmp_path / "demo"


def requires_mtd():
    return pytest.mark.skipif(not MTD.is_dir(), reason=f"MTD dataset not found at {MTD} (see DEVELOPERS.md)")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
