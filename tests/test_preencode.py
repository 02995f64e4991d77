"""Pre-encoding: the scheduler's order, failures, interactive priority, and the backend's triggers
(/setup, automatic /predict, TASKS_CREATED), the shared store after a restart, replaced images."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.app import create_app
from ml_backend.sam.identity import model_identity
from ml_backend.embeddings.scheduler import PreEncodeScheduler, TaskImage, project_id
from ml_backend.images.storages import ProjectStorages
from ml_backend.sam.store import EmbeddingStore
from ml_backend.runtime import Runtime
from ml_backend.sam import Prompts, SamEngine
from ml_backend.sam.engine import image_key
from ml_backend.settings import Settings
from redis_fixture import redis_server  # noqa: F401  (fixture)

CONFIG = """<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Dog"/></KeyPointLabels></View>"""


def random_image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until(check, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not within {timeout_s} s")


# --- the scheduler alone ------------------------------------------------------
class Recorder:
    """An ``encode`` that records the order and can hold the first job until released."""

    def __init__(self, fail: set = frozenset()) -> None:
        self.order: list = []
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, job) -> str:
        self.order.append(job.ident)
        if len(self.order) == 1:
            assert self.release.wait(30)
        if job.ident in self.fail:
            raise RuntimeError(f"cannot read image {job.url}")
        return "encoded"


def tasks(*ids: int, labeled: set[int] = frozenset()) -> list[TaskImage]:
    return [TaskImage(task_id=i, url=f"/data/upload/1/{i}.png", labeled=i in labeled) for i in ids]


def test_unlabeled_tasks_come_first_then_labeled_ones_in_label_studio_order() -> None:
    encode = Recorder()
    scheduler = PreEncodeScheduler(encode, lookahead=0)
    scheduler.add_project(1, tasks(1, 2, 3, 4, 5, labeled={2, 4}))
    encode.release.set()
    assert scheduler.wait_idle(30)
    assert encode.order == [1, 3, 5, 2, 4]
    assert scheduler.status()["1"] == {"total": 5, "queued": 0, "running": 0, "done": 5, "failed": 0}


def test_an_opened_task_and_its_lookahead_jump_the_queue() -> None:
    encode = Recorder()
    scheduler = PreEncodeScheduler(encode, lookahead=2)
    scheduler.add_project(1, tasks(*range(1, 11), labeled={8}))
    wait_until(lambda: encode.order, what="first job")  # task 1 is being encoded
    scheduler.opened(1, tasks(7)[0])
    encode.release.set()
    assert scheduler.wait_idle(30)
    # 7 opened, then 8 and 9 follow it in the project's order (labeled or not); the rest as queued.
    assert encode.order == [1, 7, 8, 9, 2, 3, 4, 5, 6, 10]


def test_a_newer_opened_task_goes_before_an_older_ones_lookahead() -> None:
    encode = Recorder()
    scheduler = PreEncodeScheduler(encode, lookahead=2)
    scheduler.add_project(1, tasks(*range(1, 11)))
    wait_until(lambda: encode.order, what="first job")
    scheduler.opened(1, tasks(3)[0])
    scheduler.opened(1, tasks(6)[0])
    encode.release.set()
    assert scheduler.wait_idle(30)
    assert encode.order[:7] == [1, 6, 7, 8, 3, 4, 5]


def test_an_opened_task_the_scheduler_did_not_know_is_queued_first() -> None:
    encode = Recorder()
    encode.release.set()
    scheduler = PreEncodeScheduler(encode, lookahead=3)
    scheduler.opened(5, TaskImage(task_id=42, url="/data/upload/5/a.png"))
    assert scheduler.wait_idle(30)
    assert encode.order == [42] and scheduler.status()["5"]["done"] == 1


def test_one_failing_image_does_not_stop_the_rest() -> None:
    encode = Recorder(fail={2})
    encode.release.set()
    scheduler = PreEncodeScheduler(encode, lookahead=0)
    scheduler.add_project(1, tasks(1, 2, 3, 4))
    assert scheduler.wait_idle(30)
    assert encode.order == [1, 2, 3, 4]
    status = scheduler.status()["1"]
    assert (status["done"], status["failed"]) == (3, 1) and "2.png" in status["last_error"]


def test_tasks_queued_twice_are_encoded_once() -> None:
    encode = Recorder()
    encode.release.set()
    scheduler = PreEncodeScheduler(encode, lookahead=1)
    scheduler.add_project(1, tasks(1, 2))
    scheduler.add_tasks(1, tasks(2, 3))
    scheduler.opened(1, tasks(1)[0])
    assert scheduler.wait_idle(30)
    assert sorted(encode.order) == [1, 2, 3]


def test_progress_is_logged_every_n_images(caplog) -> None:
    encode = Recorder()
    encode.release.set()
    scheduler = PreEncodeScheduler(encode, lookahead=0, log_every=2)
    with caplog.at_level("INFO", logger="ml_backend.embeddings.scheduler"):
        scheduler.add_project(1, tasks(1, 2, 3, 4, 5))
        assert scheduler.wait_idle(30)
    lines = [r.getMessage() for r in caplog.records if "/5 done" in r.getMessage()]
    assert lines[0].startswith("pre-encoding project 1: 2/5 done") and "5/5 done, 0 failed, 0 to go" in lines[-1]


@pytest.mark.parametrize("value,expected", [(3, 3), ("3", 3), ("3.1732800000", 3), ("x", None), (True, None),
                                            (None, None), (0, None), (-2, None), ("9" * 40, None)])
def test_project_ids_as_label_studio_sends_them(value, expected) -> None:
    assert project_id(value) == expected


# --- through the backend --------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path, monkeypatch) -> Settings:
    # Project 1's (and 7's) local storage is the images folder (no Label Studio here to list it).
    monkeypatch.setattr(ProjectStorages, "paths", lambda self, *args: (str(tmp_path / "files" / "images"),))
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                               embedding_store_dir=tmp_path / "store", local_files_document_root=str(tmp_path / "files"),
                               label_studio_url="http://127.0.0.1:9", preencode_lookahead=2)  # files read from disk


def engine_with_store(segmenter, settings: Settings) -> SamEngine:
    store = EmbeddingStore(settings.embedding_store_dir, model_identity(segmenter.backbone.image_encoder),
                           max_bytes=settings.embedding_store_bytes)
    return SamEngine(segmenter, source="tiny", store=store)


def keypoint(x: float, y: float) -> dict:
    return {"original_width": 64, "original_height": 48, "image_rotation": 0, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "is_positive": True, "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["Dog"]}}


def click(client, task: dict, x: float = 40, y: float = 50):
    return client.post("/predict", json={"tasks": [task], "label_config": CONFIG, "project": "1.1",
                                         "params": {"context": {"result": [keypoint(x, y)]}}})


def local_tasks(settings: Settings, count: int, project: int = 1) -> tuple[list[dict], list[np.ndarray]]:
    root = Path(settings.local_files_document_root) / "images"
    root.mkdir(parents=True, exist_ok=True)
    images, task_list = [], []
    for i in range(count):
        image = random_image(i)
        (root / f"{i}.png").write_bytes(png(image))
        images.append(image)
        task_list.append({"id": i + 1, "project": project, "data": {"img": f"/data/local-files/?d=images/{i}.png"}})
    return task_list, images


def test_interactive_clicks_never_wait_behind_the_queue(settings, tiny_segmenter, monkeypatch) -> None:
    engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    task_list, images = local_tasks(settings, 5)
    click_key = image_key(images[4])
    events: list[str] = []
    first_started = threading.Event()
    real_encode = engine._encode

    def observed(key, image):
        name = "click" if key == click_key else "bg"
        events.append(f"{name} start")
        if name == "bg" and not first_started.is_set():
            first_started.set()
            time.sleep(1.0)  # the click arrives while this one runs
        result = real_encode(key, image)
        events.append(f"{name} end")
        return result

    monkeypatch.setattr(engine, "_encode", observed)
    assert client.post("/warmup", json={"tasks": task_list[:4], "label_config": CONFIG}).status_code == 202
    assert first_started.wait(30)
    response = click(client, task_list[4])
    assert response.status_code == 200, response.json
    assert runtime.preencoder.wait_idle(60)
    # One encode slot on a CPU: the click waited only for the encode already running, then
    # went before the three queued images.
    assert events[:4] == ["bg start", "bg end", "click start", "click end"]
    assert events.count("bg start") == 4 and runtime.preencoder.status()["0"]["done"] == 4


def test_setup_queues_the_project_and_clicks_on_its_images_do_not_encode(settings, tiny_segmenter) -> None:
    from fake_label_studio import LABEL_CONFIG, TOKEN, fake_label_studio

    with fake_label_studio(n_tasks=4) as ls:
        settings = dataclasses.replace(settings, label_studio_url=ls.url, label_studio_api_key=TOKEN)
        engine = engine_with_store(tiny_segmenter, settings)
        runtime = Runtime(settings, engine=engine)
        client = create_app(settings, runtime=runtime).test_client()
        answer = client.post("/setup", json={"project": "1.1732800000", "schema": LABEL_CONFIG,
                                             "hostname": ls.url, "access_token": TOKEN})
        assert answer.status_code == 200
        wait_until(lambda: runtime.preencoder.status().get("1", {}).get("done") == 4, what="4 images pre-encoded")
        status = client.get("/status").json
        assert status["preencode"]["projects"]["1"] == {"total": 4, "queued": 0, "running": 0, "done": 4, "failed": 0}
        assert status["preencode"]["store"]["files"] == 4 and status["sam"]["images_encoded"] == 4
        assert client.post("/setup", json={"project": "1.1732800099", "schema": LABEL_CONFIG}).status_code == 200
        task = dict(ls.tasks[2], project=1)
        kp = {**keypoint(50, 50), "from_name": "kp", "original_width": 32, "original_height": 32}
        response = client.post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG,
                                                 "params": {"context": {"result": [kp]}}})
        assert response.status_code == 200 and response.json["results"][0]["result"]
        assert engine.images_encoded == 4, "the click used the pre-encoded embedding; a second /setup queued nothing new"


def test_without_a_token_or_with_preencode_off_setup_queues_nothing(settings, tiny_segmenter) -> None:
    for changed in (settings, dataclasses.replace(settings, preencode=False, label_studio_url="http://127.0.0.1:9",
                                                  label_studio_api_key="f" * 40)):
        runtime = Runtime(changed, engine=engine_with_store(tiny_segmenter, changed))
        client = create_app(changed, runtime=runtime).test_client()
        assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        time.sleep(0.2)
        assert runtime.preencoder.status() == {}


def test_opening_a_task_queues_it_and_its_lookahead(settings, tiny_segmenter) -> None:
    engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    task_list, images = local_tasks(settings, 5)
    runtime.preencoder.add_project(1, [])  # known project: opening does not try to list it
    runtime.preencoding._connected.add(1)
    for task in task_list:  # Label Studio's automatic /predict (no context) as each task is opened
        assert client.post("/predict", json={"tasks": [task], "label_config": CONFIG}).status_code == 200
    assert runtime.preencoder.wait_idle(60)
    assert runtime.preencoder.status()["1"]["done"] == 5
    assert all(engine.is_ready(image_key(image)) for image in images)


def test_tasks_created_webhook_queues_the_new_tasks(settings, tiny_segmenter) -> None:
    engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    task_list, images = local_tasks(settings, 3, project=7)
    payload = {"action": "TASKS_CREATED", "project": {"id": 7, "label_config": CONFIG},
               "tasks": task_list + [{"id": 99, "data": {}}, "junk"]}
    answer = client.post("/webhook", json=payload)
    assert answer.status_code == 200 and answer.json["preencode_queued"] == 3
    assert runtime.preencoder.wait_idle(60)
    assert runtime.preencoder.status()["7"]["done"] == 3 and engine.images_encoded == 3
    assert all(engine.is_ready(image_key(image)) for image in images)


def test_after_a_restart_stored_images_are_served_without_encoding(settings, tiny_segmenter) -> None:
    task_list, images = local_tasks(settings, 3)
    first = Runtime(settings, engine=engine_with_store(tiny_segmenter, settings))
    first.preencoding.warm(task_list, "img", 1)
    assert first.preencoder.wait_idle(60) and first.sam().images_encoded == 3
    restarted_engine = engine_with_store(tiny_segmenter, settings)
    restarted = Runtime(settings, engine=restarted_engine)
    client = create_app(settings, runtime=restarted).test_client()
    loads: list[str] = []
    real_load = restarted.images.load
    restarted.images.load = lambda url, **kw: loads.append(url) or real_load(url, **kw)
    for task, image in zip(task_list, images):
        response = click(client, task)
        assert response.status_code == 200
    assert restarted_engine.images_encoded == 0 and loads == [], "served from the store by URL: no download, no encode"


def test_a_replaced_local_file_at_the_same_url_gets_a_fresh_embedding(settings, tiny_segmenter) -> None:
    from ml_backend.brush import decode_rle

    engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    [task], [old] = local_tasks(settings, 1)
    assert click(client, task).status_code == 200 and engine.images_encoded == 1
    path = Path(settings.local_files_document_root) / "images" / "0.png"
    new = random_image(100)
    stamp = path.stat().st_mtime_ns
    path.write_bytes(png(new))
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a replacement within the same clock tick still counts
    response = click(client, task)
    assert response.status_code == 200 and engine.images_encoded == 2
    mask = decode_rle(response.json["results"][0]["result"][0]["value"]["rle"], 48, 64)
    np.testing.assert_array_equal(mask, engine.segment(new, Prompts.from_lists([(25.6, 24)])).mask)
    assert click(client, task).status_code == 200 and engine.images_encoded == 2, "unchanged file: no new encode"


def test_http_url_entries_expire_after_their_ttl(settings, tiny_segmenter, monkeypatch) -> None:
    from ml_backend.embeddings import urls

    settings = dataclasses.replace(settings, url_key_ttl_s=60, allowed_hosts=("images.example.com",))
    runtime = Runtime(settings, engine=engine_with_store(tiny_segmenter, settings))
    index = runtime.url_index
    url = "http://images.example.com/a.png"
    validator = index.validator(url)
    index.remember(url, "ab" * 32, validator)
    assert index.lookup(url, validator) == "ab" * 32
    now = time.time()
    monkeypatch.setattr(urls.time, "time", lambda: now + 61)
    assert index.lookup(url, validator) is None


def test_with_rq_the_worker_encodes_and_the_web_process_only_reads_the_store(settings, tiny_segmenter,
                                                                              redis_server) -> None:  # noqa: F811
    from rq import Queue, SimpleWorker

    from ml_backend.embeddings import jobs
    from ml_backend.embeddings.urls import UrlIndex
    from ml_backend.images import ImageLoader
    from ml_backend.retrain.jobs import redis_connection

    settings = dataclasses.replace(settings, redis_url=redis_server, preencode_executor="rq")
    web_engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=web_engine)
    worker_engine = engine_with_store(tiny_segmenter, settings)  # another process in production: same store
    loader = ImageLoader(settings)
    url_index = UrlIndex(lambda url, project: loader.local_file(url, label_studio_url=settings.label_studio_url,
                                                            project=project), ttl_s=60)
    url_index.store = worker_engine.store
    jobs._context = jobs.WorkerContext(settings, loader, worker_engine, url_index)
    try:
        task_list, images = local_tasks(settings, 3)
        runtime.preencoding.warm(task_list + [{"id": 9, "data": {"img": "/data/local-files/?d=images/missing.png"}}],
                                 "img", 1)
        connection = redis_connection(redis_server)
        worker = SimpleWorker([Queue(jobs.QUEUE_NAME, connection=connection)], connection=connection)
        deadline = time.monotonic() + 120
        while runtime.preencoder.status()["1"]["done"] + runtime.preencoder.status()["1"]["failed"] < 4:
            assert time.monotonic() < deadline, runtime.preencoder.status()
            worker.work(burst=True)
            time.sleep(0.1)
        status = runtime.preencoder.status()["1"]
        assert (status["done"], status["failed"]) == (3, 1) and "missing.png" in status["last_error"]
        assert worker_engine.images_encoded == 3 and web_engine.images_encoded == 0
        client = create_app(settings, runtime=runtime).test_client()
        for task in task_list:
            assert click(client, task).status_code == 200
        assert web_engine.images_encoded == 0, "the web process decoded from the worker's embeddings"
    finally:
        jobs._context = None


def test_an_image_another_process_is_encoding_is_awaited_outside_the_encode_gate(settings, tiny_segmenter) -> None:
    engine = engine_with_store(tiny_segmenter, settings)
    runtime = Runtime(settings, engine=engine)
    image = random_image(7)
    key = image_key(image)
    other = engine_with_store(tiny_segmenter, settings)  # stands for another worker process
    answer: list = []
    with engine.store.lock(key):  # "the other process" holds the image's encode lock (its own descriptor)
        waiting = threading.Thread(target=lambda: answer.append(runtime.embed(image)))
        waiting.start()
        time.sleep(0.5)
        assert not answer and runtime.encode_gate.status()["active"] == 0, "waits without taking a slot"
        expected = other._encode(key, image)
        other.store.put(key, expected.features.detach().float().cpu().numpy(), (48, 64))
    waiting.join(30)
    assert answer and engine.images_encoded == 0
    np.testing.assert_allclose(np.asarray(answer[0].features), np.asarray(expected.features), atol=1e-6)


def test_relative_urls_of_two_label_studio_servers_never_share_an_entry() -> None:
    """The same /data/upload/ path on another Label Studio is another image: no embedding key is reused."""
    from ml_backend.embeddings.urls import REMOTE, UrlIndex

    origin = {"url": "http://ls-a:8080"}
    index = UrlIndex(lambda url, project: None, ttl_s=60, origin=lambda: origin["url"])
    index.remember("/data/upload/1/cat.png", "key-of-a", REMOTE)
    assert index.lookup("/data/upload/1/cat.png", REMOTE) == "key-of-a"
    origin["url"] = "http://ls-b:8080"
    assert index.lookup("/data/upload/1/cat.png", REMOTE) is None
    index.remember("/data/upload/1/cat.png", "key-of-b", REMOTE)
    assert index.lookup("/data/upload/1/cat.png", REMOTE) == "key-of-b"
    origin["url"] = "http://ls-a:8080"
    assert index.lookup("/data/upload/1/cat.png", REMOTE) == "key-of-a"


def test_the_scheduler_bounds_the_urls_it_holds_forgets_finished_ones_and_is_capped() -> None:
    """Issue 21 item 3: a padded data: URI is kept compact, URLs beyond max_url_chars are not queued, a finished
    task keeps no URL, and at most max_entries tasks are known (a finished project makes room)."""
    encode = Recorder()
    encode.release.set()
    scheduler = PreEncodeScheduler(encode, lookahead=0, max_entries=8, max_url_chars=4000)
    padded = "data:image/png;base64,AAAA" + " " * (1 << 20) + "AAAA"
    dense = "data:image/png;base64," + "A" * 8000
    queued = scheduler.add_project(1, [TaskImage(task_id=1, url=padded), TaskImage(task_id=4, url=dense),
                                       *tasks(2, 3)])
    assert queued == 3 and scheduler._projects[1].urls[1] == "data:image/png;base64,AAAAAAAA"
    assert scheduler.wait_idle(30)
    entry = scheduler._projects[1]
    assert sorted(encode.order) == [1, 2, 3] and entry.urls == {} and entry.task_ids == {}
    assert scheduler._url_chars == 0
    assert scheduler.add_project(2, tasks(*range(10, 20))) == 8  # project 1 (finished) forgotten to make room
    assert 1 not in scheduler._projects and scheduler.held() == 8
    assert scheduler.wait_idle(30) and scheduler.status()["2"]["done"] == 8
