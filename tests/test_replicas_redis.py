"""What replicas share through Redis (REDIS_URL), against a real redis-server: the prompt state
(ml_backend/prompt_state/redis_storage.py: same rules, one hold per task across replicas, bounds, no pickle,
never fatal), the URL index's records and the encode locks (ml_backend/embeddings/redis_shared.py), and the
encode gate counting a wait for another replica's encode. Each "replica" here is its own client and storage
object; tests/test_replicas.py runs two real backends."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from redis import Redis
from redis_fixture import redis_server  # noqa: F401  (fixture)
from test_prompt_state_shared import holders_at_once, one_object_from_two_memories, send
from test_prompt_state import body

from ml_backend.embeddings.redis_shared import RedisEncodeLocks, RedisUrlRecords
from ml_backend.embeddings.urls import UrlIndex
from ml_backend.errors import InvalidPromptError
from ml_backend.prompt_state import MemoryStorage, PromptMemory, task_key
from ml_backend.prompt_state import locking
from ml_backend.prompt_state.files import encode
from ml_backend.prompt_state.redis_storage import RedisStorage
from ml_backend.sam.encode_gate import EncodeGate
from ml_backend.settings import Settings

LIMITS = {"max_bytes": 64 << 20, "max_entries": 100, "ttl_s": 900.0}
prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    """Each test its own keys in the session's Redis."""
    return f"test-{next(prefixes)}:"


def replica(url: str, prefix: str, **limits) -> PromptMemory:
    """One replica's prompt memory: its own Redis client, the shared keys."""
    options = {**LIMITS, **limits}
    return PromptMemory(**options, storage=RedisStorage(Redis.from_url(url), prefix=prefix, **options))


def test_clicks_on_two_replicas_build_one_object(redis_server: str, prefix: str) -> None:  # noqa: F811
    first, second = replica(redis_server, prefix), replica(redis_server, prefix)
    plan = one_object_from_two_memories(first, second)
    stored = second.get(plan.key)
    assert stored.groups == plan.state.groups and float(stored.regions[0].answered.flat[0]) == 5.0


def test_the_value_is_the_files_format_under_a_hashed_name(redis_server: str, prefix: str) -> None:  # noqa: F811
    memory = replica(redis_server, prefix)
    request = body("keypoint")
    request["tasks"][0]["data"]["image"] = "data:image/png;base64," + "A" * 100_000  # a URL of any length
    plan, _ = send(memory, request, 1.0)
    client = Redis.from_url(redis_server)
    [name] = client.keys(prefix + "state:*")
    assert len(name) == len(prefix) + len("state:") + 64  # the SHA-256 of the task key, whatever the URL
    assert client.get(name) == encode(plan.key, memory.get(plan.key))  # safetensors: JSON + float32, no pickle


def test_redis_is_bounded_by_entries_bytes_and_time(redis_server: str, prefix: str) -> None:  # noqa: F811
    def fill(memory: PromptMemory, count: int, start: int = 0) -> list:
        keys = []
        for task_id in range(start, start + count):
            request = body("keypoint")
            request["tasks"][0]["id"] = task_id
            keys.append(send(memory, request, float(task_id))[0].key)
        return keys

    by_entries = replica(redis_server, prefix + "entries:", max_entries=3)
    keys = fill(by_entries, 6)
    assert [by_entries.get(k) is not None for k in keys] == [False] * 3 + [True] * 3 and len(by_entries) == 3

    one = len(encode(keys[0], by_entries.get(keys[-1])))  # one object's bytes in Redis
    by_bytes = replica(redis_server, prefix + "bytes:", max_bytes=int(2.5 * one))
    keys = fill(by_bytes, 5)
    assert [by_bytes.get(k) is not None for k in keys] == [False] * 3 + [True] * 2
    assert by_bytes.current_bytes == 2 * one

    by_time = replica(redis_server, prefix + "time:", ttl_s=0.5)
    [key] = fill(by_time, 1)
    time.sleep(0.7)
    assert by_time.get(key) is None
    with pytest.raises(InvalidPromptError, match="forgotten"):
        send(by_time, body("background_alone"), 2.0)
    fill(by_time, 1, start=50)
    assert len(by_time) == 1  # the expired object's records went with the next write
    client = Redis.from_url(redis_server)
    assert client.zcard(prefix + "time:lru") == 1 and client.hlen(prefix + "time:sizes") == 1


@pytest.mark.parametrize("damage", ["garbage", "another task", "truncated"])
def test_a_damaged_value_is_no_object_with_a_warning(redis_server: str, prefix: str, damage: str,  # noqa: F811
                                                     caplog) -> None:
    memory = replica(redis_server, prefix)
    plan, _ = send(memory, body("keypoint"), 1.0)
    client = Redis.from_url(redis_server)
    [name] = client.keys(prefix + "state:*")
    payload = client.get(name)
    if damage == "garbage":
        client.set(name, b"\x80\x04pickle? no" * 10)
    elif damage == "another task":
        import dataclasses

        client.set(name, encode(dataclasses.replace(plan.key, task="999"), memory.get(plan.key)))
    else:
        client.set(name, payload[: len(payload) // 2])
    with caplog.at_level(logging.WARNING, logger="ml_backend.prompt_state"):
        with pytest.raises(InvalidPromptError, match="click the object"):  # rule 3's 422, never a 500
            send(memory, body("background_alone"), 2.0)
    assert "unreadable" in caplog.text and client.keys(prefix + "state:*") == []


def test_one_hold_per_task_across_replicas_and_only_its_holder_releases_it(redis_server: str, prefix: str,  # noqa: F811
                                                                           monkeypatch, caplog) -> None:
    monkeypatch.setattr(locking, "LOCK_TIMEOUT_S", 0.3)
    first, second = replica(redis_server, prefix).storage, replica(redis_server, prefix).storage
    key, other = task_key(1, {"id": 1}, "u"), task_key(1, {"id": 2}, "u")
    with caplog.at_level(logging.WARNING, logger="ml_backend.prompt_state"):
        with first.hold(key):
            started = time.monotonic()
            with second.hold(other):  # another task: never waits
                assert time.monotonic() - started < 0.2
            with second.hold(key):  # the same task, on the other replica: waits, then goes on unheld
                assert time.monotonic() - started >= 0.25  # redis-py counts its own way
        assert caplog.text.count("going on without it") == 1

        caplog.clear()
        hold = first.hold(key)
        hold.__enter__()  # a click that stalls past its hold's expiry (1 s at least)
        time.sleep(1.2)
        with second.hold(key):  # the expired hold is taken over ...
            hold.__exit__(None, None, None)  # ... and the late holder's release leaves it alone
            assert Redis.from_url(redis_server).exists(f"{prefix}hold:" + _digest(key))
    assert "the hold expired" in caplog.text and "going on without it" not in caplog.text


def _digest(key) -> str:
    from ml_backend.prompt_state.files import key_digest

    return key_digest(key)


def test_threads_of_one_replica_are_held_apart(redis_server: str, prefix: str) -> None:  # noqa: F811
    overlaps = holders_at_once(replica(redis_server, prefix).storage, rounds=10, pause_s=0.002)
    assert len(overlaps) == 40 and max(overlaps) == 1


def test_redis_unreachable_answers_the_click_anyway(caplog) -> None:
    from processes import free_port

    from ml_backend.retrain.jobs import redis_connection

    down = redis_connection(f"redis://127.0.0.1:{free_port()}/0", fail_fast=True)
    memory = PromptMemory(**LIMITS, storage=RedisStorage(down, **LIMITS))
    with caplog.at_level(logging.WARNING):
        plan, _ = send(memory, body("keypoint"), 1.0)  # held (unheld), planned, not kept: no exception
    assert plan.regions and memory.get(plan.key) is None and len(memory) == 0
    assert "Redis unreachable" in caplog.text and "cannot write to Redis" in caplog.text


def test_the_settings_and_a_client_choose_redis(redis_server: str, tmp_path: Path) -> None:  # noqa: F811
    client = Redis.from_url(redis_server)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "REDIS_URL": redis_server, "WORKERS": "2"})
    assert isinstance(PromptMemory.from_settings(settings, redis=client).storage, RedisStorage)
    off = Settings.from_env({"MODEL_DIR": str(tmp_path), "REDIS_URL": redis_server, "PROMPT_STATE_SHARED": "off"})
    assert isinstance(PromptMemory.from_settings(off, redis=client).storage, MemoryStorage)


# --- the URL index --------------------------------------------------------------------------------------------
def test_a_url_read_on_one_replica_is_known_on_the_other(redis_server: str, prefix: str,  # noqa: F811
                                                         tmp_path: Path) -> None:
    def index() -> UrlIndex:
        records = RedisUrlRecords(Redis.from_url(redis_server), remote_ttl_s=600, prefix=prefix)
        return UrlIndex(lambda url, project: None, ttl_s=600, shared=records)

    first, second = index(), index()
    url, key = "https://images.example/" + "x" * 3000, "ab" * 32
    assert second.lookup(url, "") is None
    first.remember(url, key, "")
    assert second.lookup(url, "") == key
    client = Redis.from_url(redis_server)
    [name] = client.keys(prefix + "url:*")
    assert len(name) < 100 and 0 < client.pttl(name) <= 600_000  # hashed name; an http(s) record lives URL_KEY_TTL_S
    client.set(name, '{"key": "../../etc", "validator": "", "seen": 0}')
    assert index().lookup(url, "") is None  # a malformed record is no record


# --- encode de-duplication ------------------------------------------------------------------------------------
def test_a_dead_holders_encode_lock_expires_and_the_waiter_takes_it(redis_server: str, prefix: str) -> None:  # noqa: F811
    client = Redis.from_url(redis_server)
    locks = RedisEncodeLocks(client, max_wait_s=10, expiry_s=0.6, prefix=prefix)
    client.lock(locks.name("ab12"), timeout=0.6).acquire()  # a replica that died while encoding: never renewed
    started = time.monotonic()
    with locks.lock("ab12") as held:
        waited = time.monotonic() - started
    assert held and 0.3 < waited < 5


def test_a_live_holder_keeps_its_lock_past_the_expiry_and_a_waiter_gives_up_after_its_bound(
        redis_server: str, prefix: str) -> None:  # noqa: F811
    locks = RedisEncodeLocks(Redis.from_url(redis_server), max_wait_s=1.0, expiry_s=0.3, prefix=prefix)
    other = RedisEncodeLocks(Redis.from_url(redis_server), max_wait_s=1.0, expiry_s=0.3, prefix=prefix)
    with locks.lock("cd34") as held:
        assert held
        started = time.monotonic()
        with other.lock("cd34") as taken:  # renewed every 0.1 s: still held after 1 s
            assert not taken and time.monotonic() - started >= 0.9  # three times the expiry
    with other.lock("cd34", blocking=False) as taken:
        assert taken


def test_a_replica_waits_for_anothers_encode_and_the_gate_counts_the_wait(
        redis_server: str, prefix: str, tiny_segmenter, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from ml_backend.sam import SamEngine
    from ml_backend.sam.engine import image_key
    from ml_backend.sam.store import EmbeddingStore

    def engine() -> SamEngine:
        store = EmbeddingStore(tmp_path / "embeddings", "tiny", max_bytes=64 << 20)  # the shared directory
        made = SamEngine(tiny_segmenter, cache_bytes=16 << 20, source="tiny", store=store)
        made.encode_locks = RedisEncodeLocks(Redis.from_url(redis_server), max_wait_s=30, prefix=prefix)
        return made

    first, second = engine(), engine()
    image = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    key = image_key(image)
    encoding, finish = threading.Event(), threading.Event()
    run_encoder = first._run_encoder

    def slow_encoder(*args):
        encoding.set()
        finish.wait(10)
        return run_encoder(*args)

    monkeypatch.setattr(first, "_run_encoder", slow_encoder)
    thread = threading.Thread(target=first.embed, args=(image,))
    thread.start()
    assert encoding.wait(10)
    client = Redis.from_url(redis_server)
    assert client.exists(f"{prefix}encoding:{key}")  # the lock is Redis's, which any host sees
    assert second.encoding_elsewhere(key)
    gate = EncodeGate(slots=1, max_wait_s=45)
    seen = []
    with gate.waiting_elsewhere():
        seen.append(gate.status()["waiting_elsewhere"])
        threading.Timer(0.3, finish.set).start()
        second.wait_for_encode_elsewhere(key)
    thread.join(10)
    assert seen == [1] and gate.status()["waiting_elsewhere"] == 0
    embedding = second.cached(key)  # read from the shared directory
    assert embedding is not None and second.images_encoded == 0 and first.images_encoded == 1
    np.testing.assert_array_equal(np.asarray(embedding.features), np.asarray(first.cached(key).features))
    assert not second.encoding_elsewhere(key)


def test_the_rq_embedding_worker_uses_the_replicas_locks_and_records(redis_server: str, tiny_sam_preset: Path,  # noqa: F811
                                                                     tmp_path: Path, monkeypatch) -> None:
    from ml_backend.embeddings import jobs

    monkeypatch.setattr(jobs, "_context", None)
    settings = Settings.from_env({"REDIS_URL": redis_server, "SAM_MODEL": str(tiny_sam_preset),
                                  "MODEL_DIR": str(tmp_path / "models"),
                                  "EMBEDDING_STORE_DIR": str(tmp_path / "embeddings")})
    context = jobs.load_worker_context(settings)
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    client = Redis.from_url(redis_server)
    seen = []
    run_encoder = context.engine._run_encoder

    def watched(key, pixels):
        seen.append(client.exists(f"sam-trimap:embeddings:encoding:{key}"))
        return run_encoder(key, pixels)

    monkeypatch.setattr(context.engine, "_run_encoder", watched)
    context.engine.embed(image)
    assert seen == [1]  # the worker encodes under the lock the web replicas wait on
    context.url_index.remember("https://images.example/a.png", "ab" * 32, "")
    assert RedisUrlRecords(client, remote_ttl_s=600).get_url("https://images.example/a.png")[0] == "ab" * 32
    monkeypatch.setattr(jobs, "_context", None)
