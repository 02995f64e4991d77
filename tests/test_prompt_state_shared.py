"""The prompt state shared by worker processes (ml_backend/prompt_state/files.py): clicks of one annotator
reaching different processes build one object; files never tear; bounds hold on the folder; a bad file is
no object, never an error. The rules themselves run on both storages in tests/test_prompt_state.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_prompt_state import Clock, body, items

from ml_backend.errors import InvalidPromptError
from ml_backend.labeling import parse_label_config, read_context
from ml_backend.prompt_state import MemoryStorage, Plan, PromptMemory, task_key
from ml_backend.prompt_state.files import SUFFIX, FileStorage, encode, state_directory
from ml_backend.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("prompt_state_worker.py")
LIMITS = {"max_bytes": 64 << 20, "max_entries": 100, "ttl_s": 900.0}


def shared(directory: Path, clock=time.time, sweep_interval_s: float = 0, **limits) -> PromptMemory:
    options = {**LIMITS, **limits}
    return PromptMemory(**options, storage=FileStorage(directory, clock=clock, sweep_interval_s=sweep_interval_s,
                                                       **options))


def send(memory: PromptMemory, request: dict, fill: float) -> tuple:
    prompts = read_context(request["params"]["context"], parse_label_config(request["label_config"]))
    task = request["tasks"][0]
    key = task_key(request["project"], task, task["data"]["image"])
    with memory.hold(key):
        plan = memory.plan(key, prompts, task)
        answered = [np.full((256, 256), fill, np.float32) for _ in plan.regions]
        memory.remember(plan, answered, [f"id-{fill}"])
    return plan, answered


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))


def one_object_from_two_memories(first: PromptMemory, second: PromptMemory) -> Plan:
    """The editor's clicks on one object, alternating between two memories (workers, replicas) that share a
    storage: each click must see the other's. Returns the last click's plan."""
    send(first, body("rectangle"), 1.0)
    plan, _ = send(second, body("keypoint_after_rectangle"), 2.0)
    assert plan.reason == "same object: same label, within reach"
    [region] = plan.regions
    assert region.prompts.box is not None and len(region.prompts.points) == len(items("keypoint_after_rectangle"))
    assert float(region.prompts.mask_logits.flat[0]) == 1.0 and region.prompts.mask_logits.shape == (256, 256)

    send(first, body("keypoint"), 3.0)
    send(second, body("alt_click"), 4.0)
    plan, _ = send(first, body("background_alone"), 5.0)  # 422 "click the object first" without sharing
    assert plan.reason == "same object: negative-label keypoints"
    [region] = plan.regions
    assert region.prompts.labels.tolist() == [1, 0, 0] and float(region.prompts.mask_logits.flat[0]) == 4.0
    return plan


def test_a_rectangle_in_one_process_and_keypoints_in_another_build_one_object(tmp_path: Path) -> None:
    one_object_from_two_memories(shared(tmp_path), shared(tmp_path))  # two workers' memories on one folder


def test_in_memory_the_other_process_knows_nothing(tmp_path: Path) -> None:
    """The failure the shared storage removes, shown with two in-memory states (two worker processes)."""
    first, second = PromptMemory(**LIMITS), PromptMemory(**LIMITS)
    send(first, body("keypoint"), 1.0)
    with pytest.raises(InvalidPromptError, match="click the object"):
        send(second, body("background_alone"), 2.0)


def start_worker(directory: Path, base: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), "serve", str(directory), str(base)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(worker: subprocess.Popen, request: dict) -> dict:
    worker.stdin.write(json.dumps(request) + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"worker exited with {worker.poll()}"
    return json.loads(line)


def test_two_real_processes_alternating_clicks_build_one_object(tmp_path: Path) -> None:
    a, b = start_worker(tmp_path, 1000), start_worker(tmp_path, 2000)
    try:
        rectangle = ask(a, body("rectangle"))
        assert rectangle["reason"] == "new object: none on this task" and rectangle["answered"] == [1001.0]
        refined = ask(b, body("keypoint_after_rectangle"))
        assert refined == {"reason": "same object: same label, within reach", "given": [1001.0],
                           "answered": [2001.0], "boxes": [True]}

        assert ask(b, body("keypoint"))["reason"] == "new object: another label"
        assert ask(a, body("alt_click"))["given"] == [2002.0]
        background = ask(b, body("background_alone"))
        assert background["reason"] == "same object: negative-label keypoints" and background["given"] == [1002.0]
        after = ask(a, body("keypoint_after_background"))
        assert after["reason"] == "same object: its group again" and after["given"] == [2003.0]
    finally:
        for worker in (a, b):
            worker.stdin.close()
            worker.wait(30)


def test_concurrent_read_modify_writes_lose_nothing_and_never_tear(tmp_path: Path) -> None:
    from prompt_state_worker import HAMMER_KEY

    writers = [subprocess.Popen([sys.executable, str(WORKER), "hammer", str(tmp_path), f"w{n}", "40"], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"})
               for n in range(3)]
    reader = FileStorage(tmp_path, **LIMITS)
    reads = 0
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger("ml_backend.prompt_state").addHandler(handler)
    try:
        while any(w.poll() is None for w in writers):
            state = reader.load(HAMMER_KEY)  # unheld, as a torn file would show
            if state is not None:
                [region] = state.regions
                assert np.all(region.answered == region.answered.flat[0]) and region.answered.shape == (256, 256)
                reads += 1
    finally:
        logging.getLogger("ml_backend.prompt_state").removeHandler(handler)
    assert [w.wait(60) for w in writers] == [0, 0, 0]
    assert warnings == [] and reads > 0
    final = reader.load(HAMMER_KEY)
    assert final.result_ids == {f"w{n}-{i}" for n in range(3) for i in range(40)}  # no update lost
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def holders_at_once(storage, rounds: int, pause_s: float) -> list[int]:
    """How many threads were inside ``storage.hold`` of one task each time one entered (4 threads, ``rounds`` each)."""
    inside, overlaps = [0], []

    def work() -> None:
        for _ in range(rounds):
            with storage.hold(task_key(1, {"id": 1}, "u")):
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(pause_s)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return overlaps


def test_threads_of_one_process_are_held_apart_too(tmp_path: Path) -> None:
    overlaps = holders_at_once(FileStorage(tmp_path, **LIMITS), rounds=20, pause_s=0.001)
    assert len(overlaps) == 80 and max(overlaps) == 1


def test_expired_files_are_not_read_and_are_deleted_by_the_next_write(tmp_path: Path) -> None:
    clock = Clock()
    clock.now = 1_000_000.0
    memory = shared(tmp_path, clock=clock, ttl_s=60)
    send(memory, body("keypoint"), 1.0)
    [path] = files(tmp_path)
    assert path.stat().st_mtime == pytest.approx(1_000_000.0)  # the last click
    clock.now += 61
    with pytest.raises(InvalidPromptError, match="forgotten"):
        send(memory, body("background_alone"), 2.0)
    other = body("keypoint")
    other["tasks"][0]["id"] += 1
    clock.now += 1
    send(memory, other, 3.0)
    assert len(files(tmp_path)) == 1 and len(memory) == 1


def test_the_folder_is_bounded_by_entries_and_by_bytes(tmp_path: Path) -> None:
    def fill_tasks(memory: PromptMemory, count: int) -> list:
        keys = []
        for task_id in range(count):
            request = body("keypoint")
            request["tasks"][0]["id"] = task_id
            plan, _ = send(memory, request, float(task_id))
            keys.append(plan.key)
        return keys

    by_entries = shared(tmp_path / "entries", max_entries=3)
    keys = fill_tasks(by_entries, 6)
    assert len(files(tmp_path / "entries")) == 3
    assert [by_entries.get(k) is not None for k in keys] == [False] * 3 + [True] * 3

    one = 256 * 256 * 4  # one region's answered logits (the first click is given none)
    by_bytes = shared(tmp_path / "bytes", max_bytes=int(2.5 * one))
    keys = fill_tasks(by_bytes, 5)
    sizes = [p.stat().st_size for p in files(tmp_path / "bytes")]
    assert len(sizes) == 2 and sum(sizes) <= 2.5 * one and by_bytes.current_bytes == sum(sizes)
    assert [by_bytes.get(k) is not None for k in keys] == [False] * 3 + [True] * 2


def test_the_folder_is_swept_at_most_once_per_interval(tmp_path: Path) -> None:
    memory = shared(tmp_path, max_entries=1, sweep_interval_s=3600)
    for task_id in range(3):
        request = body("keypoint")
        request["tasks"][0]["id"] = task_id
        send(memory, request, float(task_id))
    assert len(files(tmp_path)) == 3  # swept after the first write only
    memory.storage.sweep_interval_s = 0
    send(memory, body("keypoint"), 9.0)
    assert len(files(tmp_path)) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another task", "wrong dtype", "bad json",
                                    "wrong types", "another format"])
def test_a_damaged_file_is_no_object_with_a_warning(tmp_path: Path, damage: str, caplog) -> None:
    memory = shared(tmp_path)
    plan, _ = send(memory, body("keypoint"), 1.0)
    [path] = files(tmp_path)
    payload = path.read_bytes()
    state = memory.get(plan.key)
    header_size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + header_size])
    meta = json.loads(header["__metadata__"]["state"])

    def with_meta(**changes) -> bytes:
        from safetensors.numpy import load, save
        return save(load(payload), metadata={"state": json.dumps({**meta, **changes})})

    if damage == "truncated":
        path.write_bytes(payload[: len(payload) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "another task":
        other = dataclasses.replace(plan.key, task="999")
        path.write_bytes(encode(other, state))
    elif damage == "wrong dtype":
        from safetensors.numpy import save
        path.write_bytes(save({"answered.0": np.zeros((256, 256), np.float64)},
                              metadata=header["__metadata__"]))
    elif damage == "bad json":
        from safetensors.numpy import load, save
        path.write_bytes(save(load(payload), metadata={"state": "{not json"}))
    elif damage == "wrong types":
        path.write_bytes(with_meta(groups=[{"group": ["click", ["cat"]], "items": [{"kind": "point", "x": "a"}]}]))
    else:
        path.write_bytes(with_meta(format=99))
    with caplog.at_level(logging.WARNING, logger="ml_backend.prompt_state"):
        assert memory.get(plan.key) is None
        with pytest.raises(InvalidPromptError, match="click the object"):  # the 422 of rule 3, never a 500
            send(memory, body("background_alone"), 2.0)
    assert "unreadable" in caplog.text and files(tmp_path) == []
    assert send(memory, body("keypoint"), 3.0)[0].reason == "new object: none on this task"


def test_a_write_that_fails_answers_anyway(tmp_path: Path, monkeypatch, caplog) -> None:
    from ml_backend import lru_files

    memory = shared(tmp_path)

    def full(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lru_files, "write_atomically", full)
    with caplog.at_level(logging.WARNING):
        plan, _ = send(memory, body("keypoint"), 1.0)
    assert plan.regions and "cannot write" in caplog.text and memory.get(plan.key) is None


def test_the_round_trip_keeps_every_field(tmp_path: Path) -> None:
    memory = shared(tmp_path)
    send(memory, body("rectangle"), 1.0)
    plan, _ = send(memory, body("keypoint_after_rectangle"), 2.0)
    stored = memory.get(plan.key)
    in_memory = PromptMemory(**LIMITS)
    in_memory.remember(plan, [np.full((256, 256), 2.0, np.float32)], ["id-2.0"])
    expected = in_memory.get(plan.key)
    assert (stored.groups, stored.label, stored.size, stored.result_ids) == \
        (expected.groups, expected.label, expected.size, expected.result_ids)
    [region], [expected_region] = stored.regions, expected.regions
    assert region.signature == expected_region.signature
    np.testing.assert_array_equal(region.given, expected_region.given)
    np.testing.assert_array_equal(region.answered, expected_region.answered)


def test_the_settings_choose_the_storage(tmp_path: Path) -> None:
    def storage(**env: str):
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), **env})
        return PromptMemory.from_settings(settings).storage

    assert isinstance(storage(), MemoryStorage)
    assert isinstance(storage(WORKERS="2", PROMPT_STATE_SHARED="off"), MemoryStorage)
    chosen = storage(WORKERS="2", PROMPT_STATE_DIR=str(tmp_path / "shared"))
    assert isinstance(chosen, FileStorage) and chosen.directory == tmp_path / "shared"
    assert (chosen.directory.stat().st_mode & 0o777) == 0o700
    assert isinstance(storage(PROMPT_STATE_SHARED="ON", PROMPT_STATE_DIR=str(tmp_path / "s2")), FileStorage)
    with pytest.raises(SettingsError, match="PROMPT_STATE_SHARED"):
        Settings.from_env({"PROMPT_STATE_SHARED": "yes"})

    one = state_directory(Settings.from_env({"MODEL_DIR": str(tmp_path / "a")}))
    other = state_directory(Settings.from_env({"MODEL_DIR": str(tmp_path / "b")}))
    assert one != other  # two backends of one host never share objects
    if Path("/dev/shm").is_dir():
        assert one.parent == Path("/dev/shm")


def test_a_small_dev_shm_is_not_used(tmp_path: Path, monkeypatch) -> None:
    from ml_backend.prompt_state import files as prompt_state_files

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), "PROMPT_STATE_MB": "64"})
    monkeypatch.setattr(prompt_state_files, "_free_bytes", lambda folder: 64 << 20)  # Docker's default shm_size
    assert state_directory(settings) == tmp_path / "models" / "prompt-state"
    monkeypatch.setattr(prompt_state_files, "SHM", tmp_path / "no-such-folder")
    assert state_directory(settings) == tmp_path / "models" / "prompt-state"


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_a_click_held_up_too_long_goes_on_with_a_warning(tmp_path: Path, monkeypatch, caplog, kind: str) -> None:
    from ml_backend.prompt_state import locking

    monkeypatch.setattr(locking, "LOCK_TIMEOUT_S", 0.2)
    memory = shared(tmp_path) if kind == "files" else PromptMemory(**LIMITS)
    key = task_key(1, {"id": 1}, "u")
    taken, release = threading.Event(), threading.Event()

    def stuck_click() -> None:
        with memory.hold(key):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=stuck_click)
    thread.start()
    assert taken.wait(10)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), memory.hold(key):
        waited = time.monotonic() - started
    release.set()
    thread.join()
    assert 0.2 <= waited < 5 and "going on without it" in caplog.text
    with memory.hold(key):  # and the lock is free again
        pass


def test_a_folder_that_vanished_is_made_again(tmp_path: Path) -> None:
    import shutil

    memory = shared(tmp_path / "state")
    send(memory, body("keypoint"), 1.0)
    shutil.rmtree(tmp_path / "state")  # e.g. systemd's RemoveIPC cleaning /dev/shm
    with pytest.raises(InvalidPromptError, match="click the object"):
        send(memory, body("background_alone"), 2.0)  # the object is gone, the click is answered (422, not 500)
    send(memory, body("keypoint"), 3.0)
    assert len(files(tmp_path / "state")) == 1 and send(memory, body("alt_click"), 4.0)[0].regions


def test_the_masters_exit_removes_the_derived_shm_folder_only(tmp_path: Path, monkeypatch) -> None:
    from ml_backend import gunicorn_hooks
    from ml_backend.prompt_state import files as prompt_state_files

    monkeypatch.setattr(prompt_state_files, "SHM", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("PROMPT_STATE_DIR", raising=False)
    derived = state_directory(Settings.from_env())
    assert derived.parent == tmp_path / "shm"
    send(shared(derived), body("keypoint"), 1.0)
    gunicorn_hooks.on_exit(None)
    assert not derived.exists()

    monkeypatch.setenv("PROMPT_STATE_DIR", str(tmp_path / "mine"))
    send(shared(tmp_path / "mine"), body("keypoint"), 1.0)
    gunicorn_hooks.on_exit(None)
    assert len(files(tmp_path / "mine")) == 1
