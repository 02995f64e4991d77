"""Shared fixtures (a tiny random-weight SAM saved as a local keras-hub preset) and the CI skip policy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # the benchmarks/ package

import ml_backend  # noqa: E402,F401  (selects the torch backend before keras)
# transformers decides once (cached) whether torchvision is installed; benchmarks.official_sam's torchvision
# stand-in has no __spec__, which makes that check raise when a test imports transformers after another test
# installed the stand-in. Importing it first (~1 s) makes the check look at the real packages, whatever the order.
import transformers  # noqa: E402,F401
from ci_policy import (  # noqa: E402,F401  (hooks: under CI=true a skipped test fails)
    pytest_configure,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)


@pytest.fixture(scope="session")
def tiny_sam_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam_factory import save_tiny_preset

    return save_tiny_preset(tmp_path_factory.mktemp("sam") / "tiny-sam")


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_sam_preset: Path):
    from ml_backend.sam import load_segmenter

    return load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "converted")


@pytest.fixture
def tiny_engine(tiny_segmenter):
    from ml_backend.sam import SamEngine

    return SamEngine(tiny_segmenter, cache_bytes=64 << 20, source="tiny")
