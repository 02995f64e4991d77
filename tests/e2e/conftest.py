"""Session fixtures for end-to-end tests: one Label Studio, backends started per configuration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.browser import logged_in_chromium, missing_browser
from e2e.servers import LS_PASSWORD, LS_USER, Backend, LabelStudio, start_backend, start_label_studio, stop


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def label_studio(e2e_dir: Path) -> Iterator[LabelStudio]:
    server = start_label_studio(e2e_dir)
    yield server
    stop(server.process)


@pytest.fixture(scope="session")
def backend_factory(e2e_dir: Path, label_studio: LabelStudio, tiny_sam_preset: Path) -> Iterator[Callable[..., Backend]]:
    """Start a backend with the tiny SAM; keyword arguments become environment variables."""
    started: list[Backend] = []

    def start(**env: str) -> Backend:
        base = {
            "SAM_MODEL": str(tiny_sam_preset),
            "MODEL_DIR": str(e2e_dir / f"models-{len(started)}"),
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root),
        }
        backend = start_backend(e2e_dir, {**base, **env})
        started.append(backend)
        return backend

    yield start
    for backend in started:
        stop(backend.process)


@pytest.fixture(scope="session")
def backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory()


@pytest.fixture(scope="module")
def browser_ready() -> None:
    reason = missing_browser()
    if reason:
        pytest.skip(reason)  # a failure under CI=true (tests/ci_policy.py)


@pytest.fixture(scope="module")
def driver(browser_ready, label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Chromium logged in to Label Studio as the annotator, one per test module."""
    with logged_in_chromium(label_studio.url, LS_USER, LS_PASSWORD, tmp_path_factory.mktemp("chromium")) as chrome:
        yield chrome
