"""Two backend replicas behave as one backend: two ``python -m ml_backend serve`` processes (gunicorn, one worker
each) behind a round-robin proxy (benchmarks/round_robin.py), as two hosts would run them: they share a real
redis-server (REDIS_URL), the embeddings directory and the models directory (where trimap versions are
published: ReadWriteMany in Kubernetes, a volume in compose), and nothing else -- each its own prompt-state
folder and download cache. Consecutive clicks reach alternating replicas (the proxy says which answered).

One pair of replicas for the whole file (starting them is most of its time), the tests in this order:
the editor's recorded click sequences give the masks of one backend; a first click on one replica while the
other encodes the same image waits for that encode (one encode in all); a promoted trimap version is served
by both; killing a replica mid-session loses no object.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from processes import REPO, PngServer, wait_for
from redis import Redis
from redis_fixture import redis_server  # noqa: F401  (fixture)
from test_faults_serving import Backends, Server, wait_ready
from test_preannotation import CONFIG as TRIMAP_CONFIG, store_random_model
from test_prompt_state import body, items, pixels

from benchmarks.round_robin import RoundRobinProxy
from ml_backend.brush import decode_rle
from ml_backend.sam import Prompts, SamEngine
from ml_backend.sam.engine import image_key
from training.layout import project_store_dir
from training.predict import predict_trimap
from training.store import ModelStore

WIDTH, HEIGHT = 400, 300  # the size the recorded bodies were clicked on
SLOW_ENCODE_S = 3.0  # each replica's encodes take this much longer (tests/replica_site): time to click meanwhile
REDIS_DB = 3  # a database of its own: other tests' keys never meet the backend's


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Replicas:
    servers: list[Server]
    proxy: RoundRobinProxy
    redis: Redis
    model_dir: Path
    image: np.ndarray
    other: np.ndarray

    def status(self, index: int) -> dict:
        return requests.get(self.servers[index].url + "/status", timeout=10).json()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_sam_preset: Path,
             redis_server: str) -> Iterator[Replicas]:  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("replicas")
    rng = np.random.default_rng(5)
    image, other = (rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(2))
    first, second = png(image), png(other)
    images = PngServer(lambda path: second if path.endswith("/other.png") else first)  # a second image, else the first
    url = redis_server.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis = Redis.from_url(url)
    redis.flushdb()
    backends = Backends(tmp_path, tiny_sam_preset, images)
    shared = {"REDIS_URL": url, "EMBEDDING_STORE_DIR": str(tmp_path / "embeddings"),
              "MODEL_DIR": str(tmp_path / "models"), "SLOW_ENCODE_S": str(SLOW_ENCODE_S), "WORKERS": "1",
              "PREENCODE": "false",  # only the clicks encode: the encode count is theirs
              "PYTHONPATH": f"{REPO / 'tests' / 'replica_site'}{os.pathsep}{REPO}"}
    try:
        servers = [backends.start(**shared, THREADS="4", PROMPT_STATE_DIR=str(tmp_path / f"host-{n}" / "prompts"),
                                  IMAGE_CACHE_DIR=str(tmp_path / f"host-{n}" / "image-cache")) for n in range(2)]
        for server in servers:
            wait_ready(server)
        proxy = RoundRobinProxy([server.url for server in servers])
        yield Replicas(servers, proxy, redis, tmp_path / "models", image, other)
        proxy.close()
    finally:
        backends.close()
        images.close()
        redis.flushdb()


def post(replicas: Replicas, request: dict) -> tuple[int, np.ndarray]:
    """The request through the proxy: (the replica that answered, the mask)."""
    response = requests.post(replicas.proxy.url + "/predict", json=request, timeout=120)
    assert response.status_code == 200, response.text
    [item] = response.json()["results"][0]["result"]
    return replicas.proxy.served[-1], decode_rle(item["value"]["rle"], item["original_height"],
                                                 item["original_width"])


def on_task(name: str, task_id: int, image_url: str | None = None) -> dict:
    request = body(name)
    request["tasks"][0]["id"] = task_id
    if image_url is not None:
        request["tasks"][0]["data"]["image"] = image_url
    return request


def points_of(name: str) -> list[tuple[float, float]]:
    return [pixels(body(name), item) for item in items(name)]


def box_of(name: str) -> tuple[float, float, float, float]:
    [rect] = items(name)
    x, y = rect["value"]["x"] * WIDTH / 100, rect["value"]["y"] * HEIGHT / 100
    return x, y, x + rect["value"]["width"] * WIDTH / 100, y + rect["value"]["height"] * HEIGHT / 100


def test_recorded_click_sequences_across_replicas_give_the_masks_of_one_backend(replicas: Replicas,
                                                                                 tiny_segmenter) -> None:
    engine = SamEngine(tiny_segmenter, source="tiny")
    served = []
    for name in ("keypoint", "alt_click"):
        served.append(post(replicas, on_task(name, 1))[0])
    replica, answer = post(replicas, on_task("background_alone", 1))  # 422 "click the object first" if not shared
    served.append(replica)
    points, background = points_of("alt_click"), points_of("background_alone")
    first = engine.segment(replicas.image, Prompts.from_lists(points[:1]))
    alt = engine.segment(replicas.image, Prompts.from_lists(points, [1, 0], mask_logits=first.low_res_logits))
    expected = engine.segment(replicas.image, Prompts.from_lists(points + background, [1, 0, 0],
                                                                 mask_logits=alt.low_res_logits))
    np.testing.assert_array_equal(answer, expected.mask)

    served.append(post(replicas, on_task("rectangle", 2))[0])
    replica, answer = post(replicas, on_task("keypoint_after_rectangle", 2))  # not shared: a new object, no box
    served.append(replica)
    box = box_of("rectangle")
    boxed = engine.segment(replicas.image, Prompts.from_lists(box=box))
    expected = engine.segment(replicas.image, Prompts.from_lists(points_of("keypoint_after_rectangle"), box=box,
                                                                 mask_logits=boxed.low_res_logits))
    np.testing.assert_array_equal(answer, expected.mask)
    alone = engine.segment(replicas.image, Prompts.from_lists(points_of("keypoint_after_rectangle")))
    assert not np.array_equal(answer, alone.mask)  # the box and the logits made a difference
    assert all(a != b for a, b in zip(served, served[1:])), served  # every click on the other replica
    assert list(Path(replicas.model_dir.parent).glob("host-*/prompts/*.state")) == []  # the state is in Redis


def test_a_first_click_while_the_other_replica_encodes_waits_for_that_encode(replicas: Replicas,
                                                                             tiny_segmenter) -> None:
    before = [replicas.status(n)["sam"]["images_encoded"] for n in range(2)]
    key = image_key(replicas.other)
    outcome: dict[int, tuple[int, np.ndarray]] = {}

    def first_click(task_id: int) -> None:
        outcome[task_id] = post(replicas, on_task("keypoint", task_id, "/data/upload/other.png"))

    encoding = threading.Thread(target=first_click, args=(10,))
    encoding.start()
    wait_for(lambda: replicas.redis.exists(f"sam-trimap:embeddings:encoding:{key}"), 30, "an encode lock in Redis")
    waiting = threading.Thread(target=first_click, args=(11,))  # the proxy sends it to the other replica
    waiting.start()

    def waits() -> list[int]:
        return [count for n in range(2) if (count := replicas.status(n)["sam"]["encodes"]["waiting_elsewhere"])]

    waits_seen = wait_for(waits, SLOW_ENCODE_S * 10, "a replica counting its wait for the other's encode",
                          interval_s=0.05)
    encoding.join(60)
    waiting.join(60)
    after = [replicas.status(n)["sam"]["images_encoded"] for n in range(2)]
    assert waits_seen == [1]
    assert {outcome[10][0], outcome[11][0]} == {0, 1}  # one click on each replica
    assert sum(after) - sum(before) == 1  # one encode in all: the waiting replica read it from the shared store
    engine = SamEngine(tiny_segmenter, source="tiny")
    expected = engine.segment(replicas.other, Prompts.from_lists(points_of("keypoint"))).mask
    for task_id in (10, 11):
        np.testing.assert_array_equal(outcome[task_id][1], expected)


def test_a_promoted_trimap_version_is_served_by_both_replicas(replicas: Replicas) -> None:
    task = {"id": 20, "data": {"image": "/data/upload/any.png"}}
    request = {"tasks": [task], "label_config": TRIMAP_CONFIG, "project": "1.1"}
    for seed in (1, 4):
        version = store_random_model(replicas.model_dir, seed=seed)  # published in the shared models directory
        classes = predict_trimap(ModelStore(project_store_dir(replicas.model_dir, 1)).load_model(version),
                                 replicas.image)
        expected = (classes == 0) | (classes == 2)
        served = set()
        for _ in range(2):
            response = requests.post(replicas.proxy.url + "/predict", json=request, timeout=120)
            assert response.status_code == 200, response.text
            [prediction] = response.json()["results"]
            served.add(replicas.proxy.served[-1])
            assert prediction["model_version"] == f"trimap-{version}"
            [item] = prediction["result"]
            np.testing.assert_array_equal(decode_rle(item["value"]["rle"], HEIGHT, WIDTH), expected)
        assert served == {0, 1}


def test_killing_a_replica_mid_session_loses_no_object(replicas: Replicas, tiny_segmenter) -> None:
    engine = SamEngine(tiny_segmenter, source="tiny")
    replica, _ = post(replicas, on_task("rectangle", 30))
    os.killpg(replicas.servers[replica].process.pid, signal.SIGKILL)  # the replica that knows the object dies
    replicas.servers[replica].process.wait(30)
    survivor, answer = post(replicas, on_task("keypoint_after_rectangle", 30))
    assert survivor != replica
    box = box_of("rectangle")
    boxed = engine.segment(replicas.image, Prompts.from_lists(box=box))
    expected = engine.segment(replicas.image, Prompts.from_lists(points_of("keypoint_after_rectangle"), box=box,
                                                                 mask_logits=boxed.low_res_logits))
    np.testing.assert_array_equal(answer, expected.mask)
