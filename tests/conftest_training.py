"""Fixtures for the ``training`` tests: tiny synthetic data sets and a tiny fitted store.

Import the fixtures you use into the test module (``from conftest_training import ...``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import training  # noqa: F401  (selects the torch backend before keras)
from training.data import write_synthetic

TINY_IMAGE = 16  # model input size for tests that only need *a* fitted model


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run a seeded fit whose outcome a test relies on with one torch thread, then restore the count.

    The order of a multi-threaded float sum follows the thread count, and a small fit amplifies that
    difference: the same seeded 10-epoch fit gave validation IoU 0.47 on one thread and 0.0 (all
    background) on two. With one thread the fit is the same on a 2-core VM and a many-core CI runner.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic pairs of about 40 px."""
    root = tmp_path_factory.mktemp("tiny-data")
    write_synthetic(root, count=20, size=40, seed=11)
    return root


@pytest.fixture(scope="session")
def _fitted_store(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    from training.fit import fit
    from training.store import ModelStore

    model_dir = tmp_path_factory.mktemp("fitted") / "models"
    report = fit(tiny_data, model_dir, epochs=1, image_size=TINY_IMAGE, batch_size=8, verbose=0)
    # One epoch rarely beats the trivial baselines, so the rule keeps it unpromoted: promote by hand.
    ModelStore(model_dir).promote(report.version_id)
    return model_dir


@pytest.fixture
def fitted_store(_fitted_store: Path, tmp_path: Path) -> Path:
    """A private copy of a store holding one version fitted on ``tiny_data``, made current by hand."""
    copy = tmp_path / "models"
    shutil.copytree(_fitted_store, copy)
    return copy


DOMAIN_SIZE = 32  # image and model input size of the two-domain fixture
DOMAIN_WIDTH, DOMAIN_EPOCHS = 16, 30  # the base's budget: validation IoU 0.71-0.74 (seeds 0-2, 1 or 2 threads)
DOMAIN_BASE_FLOOR = 0.6  # below this the base is no model to test predictions of: the fixture fails


@pytest.fixture(scope="session")
def base_of_another_domain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(version directory, version id, root): a base model fitted in ``root/base`` on 'shapes' images only,
    ``root/own``: held-out images of its kind, and ``root/held-out``: images of the 'muted' kind it never saw."""
    import keras

    from training.fit import fit

    root = tmp_path_factory.mktemp("domains")
    write_synthetic(root / "shapes", count=40, size=DOMAIN_SIZE, seed=1, kind="shapes")
    write_synthetic(root / "own", count=8, size=DOMAIN_SIZE, seed=9, kind="shapes")
    write_synthetic(root / "held-out", count=8, size=DOMAIN_SIZE, seed=3, kind="muted")
    keras.utils.set_random_seed(0)
    with one_torch_thread():
        base = fit(root / "shapes", root / "base", epochs=DOMAIN_EPOCHS, image_size=DOMAIN_SIZE, batch_size=4,
                   verbose=0, workers=1, width=DOMAIN_WIDTH)
    assert base.val_foreground_iou >= DOMAIN_BASE_FLOOR, (
        f"the two-domain base model reached validation foreground IoU {base.val_foreground_iou:.4f} on its own "
        f"kind, below the floor {DOMAIN_BASE_FLOOR}: a collapsed fit, whose predictions test nothing "
        f"(give it a longer budget)")
    return base.path, base.version_id, root
