"""Paging through a project's tasks the way Label Studio pages them."""

from __future__ import annotations

import pytest
from fake_label_studio import TOKEN, fake_label_studio

from ml_backend.label_studio_api import TASK_PAGE_SIZE, LabelStudioAPIError, api_get, iter_project_tasks


@pytest.mark.parametrize("count", [3, TASK_PAGE_SIZE, TASK_PAGE_SIZE + 7])
def test_every_task_once_without_asking_past_the_last_page(count: int) -> None:
    with fake_label_studio(n_tasks=count, size=8) as ls:  # the fake answers 404 past the last page
        ids = [task["id"] for task in iter_project_tasks(ls.url, TOKEN, 1)]
    assert ids == list(range(1, count + 1))


def test_limit_stops_early() -> None:
    with fake_label_studio(n_tasks=TASK_PAGE_SIZE + 7, size=8) as ls:
        assert [t["id"] for t in iter_project_tasks(ls.url, TOKEN, 1, limit=5)] == [1, 2, 3, 4, 5]


def test_a_wrong_token_names_the_status() -> None:
    with fake_label_studio(n_tasks=1, size=8) as ls:
        with pytest.raises(LabelStudioAPIError, match="HTTP 401"):
            api_get(ls.url, "0" * 40, "/api/projects/1")
