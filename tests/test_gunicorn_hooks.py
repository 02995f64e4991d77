"""gunicorn's master puts the workers' large torch tensors on transparent huge pages, unless told otherwise."""

from __future__ import annotations

import os
import shutil

import pytest

from ml_backend import gunicorn_hooks


@pytest.fixture
def started(monkeypatch):
    """Run ``on_starting`` as gunicorn's master does; remove the metrics folder it makes."""
    # setenv before delenv: monkeypatch then restores both after on_starting sets them (a delenv of an absent
    # variable records nothing, and the removed metrics folder leaked into every later test and subprocess)
    for name in (gunicorn_hooks.METRICS_DIR_ENV, "THP_MEM_ALLOC_ENABLE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def start() -> None:
        gunicorn_hooks.on_starting(None)
        shutil.rmtree(os.environ[gunicorn_hooks.METRICS_DIR_ENV], ignore_errors=True)

    return start


def test_workers_get_huge_page_tensors(started) -> None:
    started()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def test_the_environment_wins(monkeypatch, started) -> None:
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    started()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
