"""The tiny SAM 3 the SAM 3 tests share: a random-weight Hugging Face checkpoint directory and our engine on it.

Import the fixtures into a test module (``from sam3_fixture import checkpoint, sam3_engine``); each module
gets its own, built once. ``weight_scale=3.0`` spreads the random weights so that scores are not all ~0.5
and masks not all empty (see :func:`sam3_factory.save_tiny_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam3_factory import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("sam3") / "sam3-tiny", weight_scale=3.0)


@pytest.fixture(scope="module")
def sam3_engine(checkpoint: Path):
    """Our SAM 3 engine on :func:`checkpoint`, on the CPU (what a test compares the backend's answers with)."""
    from ml_backend.sam3.loading import load_sam3_engine

    return load_sam3_engine(str(checkpoint), device="cpu")


def assert_same_regions(got: list, expected: list) -> None:
    """``(score, mask)`` regions the backend answered equal the engine's own, one for one (and some there are)."""
    assert len(expected) > 0 and len(got) == len(expected)  # some instances pass the threshold
    for (score, mask), (want_score, want_mask) in zip(got, expected):
        assert score == pytest.approx(want_score, abs=1e-5)
        assert mask.shape == want_mask.shape and np.array_equal(mask, want_mask)
