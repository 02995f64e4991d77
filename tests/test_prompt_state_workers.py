"""The backend under gunicorn with WORKERS=2 (``python -m ml_backend serve``, as the README starts it): the
editor's recorded bodies (tests/fixtures/editor) posted to /predict so that consecutive clicks reach
*different* worker processes -- the other worker is stopped (SIGSTOP) while a click is sent, so the
running one must accept it -- still build one object: the answers are the engine's masks for every
prompt of the object with the previous logits, as with one process.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from processes import PngServer, wait_for
from test_faults_serving import Backends, Server, wait_ready
from test_prompt_state import body, items, pixels

from ml_backend.brush import decode_rle
from ml_backend.sam import Prompts, SamEngine

WIDTH, HEIGHT = 400, 300  # the size the recorded bodies were clicked on


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture
def two_workers(tmp_path: Path, tiny_sam_preset: Path, image: np.ndarray) -> Iterator[tuple[Server, list[int]]]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    png = buffer.getvalue()
    images = PngServer(lambda path: png)  # every path is the one PNG
    backends = Backends(tmp_path, tiny_sam_preset, images)
    try:
        # PROMPT_STATE_SHARED is left to "auto"; the folder is the test's, not /dev/shm.
        server = backends.start(WORKERS="2", THREADS="2", PROMPT_STATE_DIR=str(tmp_path / "prompt-state"))
        wait_for(lambda: len(server.children()) == 2, 120, "two workers", server.log)
        workers = server.children()
        for worker in workers:  # each worker loads its own SAM: wait until both answer
            with only(workers, worker):
                wait_ready(server)
        yield server, workers
    finally:
        backends.close()  # SIGKILL to the whole group, stopped workers included
        images.close()


@contextlib.contextmanager
def only(workers: list[int], serving: int) -> Iterator[None]:
    """Stop every worker but ``serving``: it alone accepts connections meanwhile."""
    others = [w for w in workers if w != serving]
    for worker in others:
        os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in others:
            os.kill(worker, signal.SIGCONT)


def post(server: Server, name: str) -> np.ndarray:
    response = requests.post(server.url + "/predict", json=body(name), timeout=120)
    assert response.status_code == 200, response.text
    [item] = response.json()["results"][0]["result"]
    return decode_rle(item["value"]["rle"], item["original_height"], item["original_width"])


def test_clicks_alternating_between_two_workers_build_one_object(two_workers, tiny_segmenter, image,
                                                                 tmp_path: Path) -> None:
    server, (a, b) = two_workers
    engine = SamEngine(tiny_segmenter, source="tiny")
    points = [pixels(body("alt_click"), i) for i in items("alt_click")]
    background = [pixels(body("background_alone"), i) for i in items("background_alone")]

    with only([a, b], a):
        post(server, "keypoint")
    with only([a, b], b):
        post(server, "alt_click")
    with only([a, b], a):
        answer = post(server, "background_alone")  # 422 "click the object first" with per-process state
    first = engine.segment(image, Prompts.from_lists(points[:1]))
    alt = engine.segment(image, Prompts.from_lists(points, [1, 0], mask_logits=first.low_res_logits))
    expected = engine.segment(image, Prompts.from_lists(points + background, [1, 0, 0],
                                                        mask_logits=alt.low_res_logits))
    np.testing.assert_array_equal(answer, expected.mask)

    [rect] = items("rectangle")
    x, y = rect["value"]["x"] * WIDTH / 100, rect["value"]["y"] * HEIGHT / 100
    box = (x, y, x + rect["value"]["width"] * WIDTH / 100, y + rect["value"]["height"] * HEIGHT / 100)
    with only([a, b], b):
        post(server, "rectangle")
    with only([a, b], a):
        answer = post(server, "keypoint_after_rectangle")  # with per-process state: a new object, no box
    boxed = engine.segment(image, Prompts.from_lists(box=box))
    expected = engine.segment(image, Prompts.from_lists(
        [pixels(body("keypoint_after_rectangle"), i) for i in items("keypoint_after_rectangle")], box=box,
        mask_logits=boxed.low_res_logits))
    np.testing.assert_array_equal(answer, expected.mask)
    alone = engine.segment(image, Prompts.from_lists(
        [pixels(body("keypoint_after_rectangle"), i) for i in items("keypoint_after_rectangle")]))
    assert not np.array_equal(answer, alone.mask)  # the box and the logits made a difference
    assert len(list((tmp_path / "prompt-state").glob("*.state"))) == 1  # one task, one object file
