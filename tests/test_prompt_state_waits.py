"""A click never waits for a click on another task (issue 21, item 12): holds are per task, in memory and in
the shared files, and a click holds its task's prompt state only around plan, decode and write, never while its
image waits for an encode. Deterministic: ``LOCK_TIMEOUT_S`` is 0, so a click that would have had to wait goes
on at once with the warning "going on without it", which the tests look for."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from test_app import CONFIG, data_uri, keypoint

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.prompt_state import MemoryStorage, TaskKey, locking, task_key
from ml_backend.prompt_state.files import FileStorage
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.settings import Settings

LIMITS = {"max_bytes": 64 << 20, "max_entries": 1000, "ttl_s": 900.0}
WAITED = "going on without it"


@pytest.fixture
def no_waiting(monkeypatch) -> None:
    monkeypatch.setattr(locking, "LOCK_TIMEOUT_S", 0.0)


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_a_held_task_never_holds_up_another_task(tmp_path: Path, no_waiting, caplog, kind: str) -> None:
    storage = MemoryStorage(**LIMITS) if kind == "memory" else FileStorage(tmp_path, **LIMITS)
    held = TaskKey("1", "1", "/data/upload/1/a.png")
    others = [TaskKey("1", str(task), f"/data/upload/1/{task}.png") for task in range(2, 2002)]  # > any stripe count
    with caplog.at_level(logging.WARNING, logger="ml_backend.prompt_state"):
        with storage.hold(held):
            for key in others:
                with storage.hold(key):
                    pass
        assert WAITED not in caplog.text
        with storage.hold(held), storage.hold(held):  # the hold is real: a second click on the task would wait
            pass
    assert caplog.text.count(WAITED) == 1


def test_idle_lock_files_are_removed_and_a_removed_one_is_never_held(tmp_path: Path, monkeypatch) -> None:
    storage = FileStorage(tmp_path, **LIMITS, sweep_interval_s=0)
    keys = [TaskKey("1", str(task), "u") for task in range(20)]
    for key in keys:
        with storage.hold(key):
            pass
    assert len(list((tmp_path / "locks").iterdir())) == 20
    held = keys[0]
    with storage.hold(held):
        storage._sweep()  # what a save does at most once a second
        assert [p.name for p in (tmp_path / "locks").iterdir()] == [storage.lock_path_for(held).name]
    storage._sweep()
    assert list((tmp_path / "locks").iterdir()) == []

    real_open, opened = storage._open_lock, []

    def open_then_lose(path: Path, quiet: bool = False) -> int | None:
        fd = real_open(path, quiet=quiet)
        if not opened:  # a sweep removes the file right after this click opened it
            opened.append(fd)
            path.rename(tmp_path / "removed.lock")
        return fd

    monkeypatch.setattr(storage, "_open_lock", open_then_lose)
    with storage.hold(held):
        other = os.open(storage.lock_path_for(held), os.O_RDWR)  # what the next click on the task opens
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: the click took the file at the path
        finally:
            os.close(other)
    assert opened


def test_a_click_waiting_for_its_encode_holds_no_prompt_state_and_other_tasks_go_on(
        tmp_path: Path, tiny_segmenter, no_waiting, caplog) -> None:
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache")
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"))
    client = create_app(settings, runtime=runtime).test_client()
    rng = np.random.default_rng(8)
    slow_url, fast_url = (data_uri(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)) for _ in range(2))
    encoding, release = threading.Event(), threading.Event()
    embed = runtime.task_embedding

    def task_embedding(url: str, task_id: int | None = None, project: int | None = None):
        if url == slow_url:  # this image's encode waits behind others (the encode gate's queue)
            encoding.set()
            assert release.wait(60)
        return embed(url, task_id, project)

    runtime.task_embedding = task_embedding

    def click(task_id: int, url: str):
        return client.post("/predict", json={"tasks": [{"id": task_id, "data": {"img": url}}], "label_config": CONFIG,
                                             "project": "1.1", "params": {"context": {"result": [keypoint(30, 40)]}}})

    answers: dict = {}
    first = threading.Thread(target=lambda: answers.setdefault("slow", click(1, slow_url)))
    first.start()
    try:
        assert encoding.wait(60)
        with caplog.at_level(logging.WARNING, logger="ml_backend.prompt_state"):
            with runtime.prompt_state.hold(task_key("1.1", {"id": 1}, slow_url)):  # the waiting click's task
                pass
            other = click(2, fast_url)  # another annotator's click while the first still waits
        assert WAITED not in caplog.text
        assert other.status_code == 200 and first.is_alive()
        assert decode_rle(other.json["results"][0]["result"][0]["value"]["rle"], 60, 100).any()
    finally:
        release.set()
        first.join(60)
    assert answers["slow"].status_code == 200, answers["slow"].json


def test_first_clicks_preparing_their_images_count_as_queued_so_the_next_is_refused_at_once() -> None:
    from ml_backend.sam.encode_gate import EncodeBusyError, EncodeGate

    now = [0.0]
    gate = EncodeGate(slots=1, max_wait_s=25, clock=lambda: now[0])
    with gate.slot():  # one encode measured: 10 s
        now[0] += 10
    with gate.slot():  # one running, just started: a slot frees in 10 s
        with gate.preparing():  # a first click downloading its image: its encode ends in 20 s
            with gate.preparing():  # the next one's would start in 20 s: within 25 s
                with pytest.raises(EncodeBusyError, match="2 waiting, about 30 s of work ahead"):
                    with gate.preparing():  # the third's in 30 s: refused before it downloads anything
                        pass
        with gate.preparing():  # the others went on (or gave up): room again
            pass
