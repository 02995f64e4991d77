"""The encode gate: N at once, priority then arrival order, bounded waits, 503 + Retry-After through the app."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.sam.encode_gate import encode_slots
from ml_backend.sam import SamEngine
from ml_backend.sam.encode_gate import EncodeBusyError, EncodeGate, Priority
from ml_backend.settings import Settings, SettingsError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hold(gate: EncodeGate, priority: Priority, order: list[str], name: str, release: threading.Event,
         entered: threading.Event | None = None, **kwargs) -> threading.Thread:
    def run() -> None:
        try:
            with gate.slot(priority, **kwargs):
                order.append(name)
                if entered is not None:
                    entered.set()
                release.wait(10)
        except EncodeBusyError:
            order.append(f"{name}:refused")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_until(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_one_slot_admits_one_encode_and_the_rest_in_priority_then_arrival_order() -> None:
    gate = EncodeGate(slots=1, max_wait_s=30)
    order: list[str] = []
    releases = {name: threading.Event() for name in ("first", "bg", "a", "b")}
    entered = threading.Event()
    threads = [hold(gate, Priority.INTERACTIVE, order, "first", releases["first"], entered)]
    assert entered.wait(5)
    threads.append(hold(gate, Priority.BACKGROUND, order, "bg", releases["bg"]))
    wait_until(lambda: gate.status()["waiting"] == 1)
    threads.append(hold(gate, Priority.INTERACTIVE, order, "a", releases["a"]))
    wait_until(lambda: gate.status()["waiting"] == 2)
    threads.append(hold(gate, Priority.INTERACTIVE, order, "b", releases["b"]))
    wait_until(lambda: gate.status()["waiting"] == 3)
    assert gate.status()["active"] == 1 and order == ["first"]
    for event in releases.values():  # let each encode finish as soon as it is admitted
        event.set()
    for thread in threads:
        thread.join(5)
    # The background encode arrived second but went last: interactive clicks go first.
    assert order == ["first", "a", "b", "bg"]
    status = gate.status()
    assert (status["active"], status["waiting"], status["admitted"], status["refused"]) == (0, 0, 4, 0)


def test_two_slots_run_two_encodes_at_once_never_three() -> None:
    gate = EncodeGate(slots=2, max_wait_s=30)
    running, peak, lock = [0], [0], threading.Lock()

    def encode() -> None:
        with gate.slot():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=encode) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 2 and gate.status()["admitted"] == 6


def test_a_click_that_would_wait_past_the_bound_is_refused_at_once_with_retry_after() -> None:
    clock = FakeClock()
    gate = EncodeGate(slots=1, max_wait_s=45, clock=clock)
    with gate.slot():  # one measured encode of 20 s
        clock.now += 20
    assert gate.mean_encode_s == pytest.approx(20)
    assert gate.estimated_wait_s() == 0.0

    order: list[str] = []
    release = threading.Event()
    entered = threading.Event()
    threads = [hold(gate, Priority.INTERACTIVE, order, "running", release, entered)]
    assert entered.wait(5)
    clock.now += 5  # the running encode is 5 s in: about 15 s left
    assert gate.estimated_wait_s() == pytest.approx(15)
    threads.append(hold(gate, Priority.INTERACTIVE, order, "second", release))
    wait_until(lambda: gate.status()["waiting"] == 1)
    assert gate.estimated_wait_s() == pytest.approx(35)  # 15 s left + the second's 20 s
    threads.append(hold(gate, Priority.INTERACTIVE, order, "third", release))
    wait_until(lambda: gate.status()["waiting"] == 2)
    # A fourth would wait 15 + 20 + 20 = 55 s > 45 s: refused without waiting.
    started = time.monotonic()
    with pytest.raises(EncodeBusyError) as refused:
        with gate.slot():
            pytest.fail("admitted past the bound")
    assert time.monotonic() - started < 0.5
    assert refused.value.status_code == 503 and refused.value.retry_after_s == 10  # 55 - 45
    assert "busy" in refused.value.message and "10 s" in refused.value.message
    # check(): the same verdict before any work (download, decoding), and nothing queued.
    with pytest.raises(EncodeBusyError) as checked:
        gate.check()
    assert checked.value.retry_after_s == 10 and gate.status()["waiting"] == 2
    # Background encodes are never refused: they wait for a free slot.
    threads.append(hold(gate, Priority.BACKGROUND, order, "background", release))
    wait_until(lambda: gate.status()["waiting"] == 3)
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["running", "second", "third", "background"]
    assert gate.status()["refused"] == 2
    gate.check()  # idle again: no refusal


def test_a_click_still_waiting_at_the_bound_is_refused_then() -> None:
    gate = EncodeGate(slots=1, max_wait_s=0.2)  # no encode measured yet: no estimate, the bound decides
    release, entered = threading.Event(), threading.Event()
    order: list[str] = []
    holder = hold(gate, Priority.INTERACTIVE, order, "running", release, entered)
    assert entered.wait(5)
    started = time.monotonic()
    with pytest.raises(EncodeBusyError) as refused:
        with gate.slot():
            pytest.fail("admitted while the slot was taken")
    assert 0.15 < time.monotonic() - started < 2
    assert refused.value.retry_after_s >= 1
    assert gate.status()["waiting"] == 0  # the refused ticket left the queue
    release.set()
    holder.join(5)
    with gate.slot(max_wait_s=0.2):  # and the queue still moves
        pass


def test_an_encode_that_fails_frees_its_slot_and_is_not_timed() -> None:
    clock = FakeClock()
    gate = EncodeGate(slots=1, max_wait_s=1, clock=clock)
    with pytest.raises(RuntimeError):
        with gate.slot():
            clock.now += 50
            raise RuntimeError("bad image")
    assert gate.mean_encode_s is None and gate.status()["active"] == 0
    with gate.slot() as slot:
        clock.now += 50
        slot.untimed()  # found in a cache: no encode measured
    assert gate.mean_encode_s is None


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        EncodeGate(slots=0, max_wait_s=1)


@pytest.mark.parametrize("env, slots", [({}, 1), ({"ENCODE_CONCURRENCY": "3"}, 3),
                                        ({"SAM_DEVICE": "cuda"}, 2), ({"SAM_DEVICE": "cpu"}, 1)])
def test_encode_slots_from_the_settings_and_device(env, slots) -> None:
    assert encode_slots(Settings.from_env(env)) == slots  # this machine has no GPU: auto means CPU


def test_encode_settings_are_checked() -> None:
    settings = Settings.from_env({"ENCODE_QUEUE_TIMEOUT_S": "20"})
    assert settings.encode_queue_timeout_s == 20 and settings.encode_concurrency == 0
    with pytest.raises(SettingsError):
        Settings.from_env({"ENCODE_CONCURRENCY": "-1"})


# --- through the app ---------------------------------------------------------------

CONFIG = """<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Dog"/></KeyPointLabels></View>"""


def click_body(url: str) -> dict:
    point = {"original_width": 64, "original_height": 48, "image_rotation": 0, "from_name": "kp", "to_name": "image",
             "type": "keypointlabels", "is_positive": True, "value": {"x": 50, "y": 50, "width": 1,
                                                                     "keypointlabels": ["Dog"]}}
    return {"tasks": [{"id": 1, "data": {"img": url}}], "label_config": CONFIG,
            "params": {"context": {"result": [point]}}}


class SlowEngine(SamEngine):
    """The tiny SAM whose encoder blocks until the test lets it go."""

    def __init__(self, segmenter) -> None:
        super().__init__(segmenter, source="tiny")
        self.release = threading.Event()
        self.encoding = threading.Event()
        self.encodes = 0

    def _encode(self, key, image):
        self.encodes += 1
        self.encoding.set()
        assert self.release.wait(10)
        return super()._encode(key, image)


def test_through_the_app_a_busy_encoder_answers_503_with_retry_after_and_cached_clicks_do_not_wait(
        tmp_path: Path, tiny_segmenter) -> None:
    from PIL import Image

    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "m", image_cache_dir=tmp_path / "c",
                                   local_files_document_root=str(tmp_path), encode_queue_timeout_s=0.3)
    engine = SlowEngine(tiny_segmenter)
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))

    # Image a's encode takes 4 s: the gate's estimate for a click queued behind b is then up to that, past
    # the 0.3 s bound (a click the estimate admits is served, however long it then waits). The margin is for
    # a loaded CI machine: the estimate falls as b's encode runs, and must still exceed the bound when c comes.
    threading.Timer(4.0, engine.release.set).start()
    assert client.post("/predict", json=click_body(paths[0])).status_code == 200  # cached from now on
    assert runtime.encode_gate.mean_encode_s >= 3.9
    engine.release.clear()
    engine.encoding.clear()
    answers: dict[str, int] = {}
    first = threading.Thread(target=lambda: answers.update(
        b=create_app(settings, runtime=runtime).test_client().post("/predict", json=click_body(paths[1])).status_code))
    first.start()
    assert engine.encoding.wait(5)  # image b holds the only slot

    cached = client.post("/predict", json=click_body(paths[0]))  # decoder only: does not queue
    assert cached.status_code == 200 and cached.json["results"][0]["result"]

    busy = client.post("/predict", json=click_body(paths[2]))
    assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit()
    assert "busy" in busy.json["error"] and busy.json["status"] == 503
    engine.release.set()
    first.join(10)
    assert answers == {"b": 200}
    assert client.post("/predict", json=click_body(paths[2])).status_code == 200  # free again
    assert engine.encodes == 3  # a, b, c: the refused click did not encode
    assert runtime.sam_status()["encodes"]["refused"] == 1


def test_a_queued_click_is_served_past_the_bound_while_its_answer_still_fits() -> None:
    """The estimate admitted it; encodes then ran slower (clicks decoding beside them). Refusing it at the bound
    would waste its wait: it is served while one more encode still fits in ``answer_within_s``."""
    clock = FakeClock()
    gate = EncodeGate(slots=1, max_wait_s=45, answer_within_s=85, clock=clock)
    with gate.slot():  # one measured encode of 10 s
        clock.now += 10
    release, entered = threading.Event(), threading.Event()
    order: list[str] = []
    holder = hold(gate, Priority.INTERACTIVE, order, "running", release, entered)
    assert entered.wait(5)
    waiter = hold(gate, Priority.INTERACTIVE, order, "queued", release)  # estimated 10 s: admitted
    wait_until(lambda: gate.status()["waiting"] == 1)
    clock.now += 60  # the running encode is far slower than estimated: past the 45 s bound
    with gate._cond:
        gate._cond.notify_all()  # wake the waiter to look at the clock
    time.sleep(0.2)
    assert gate.status()["waiting"] == 1, "refused although its answer still fits in 85 s"
    release.set()
    holder.join(5)
    waiter.join(5)
    assert order == ["running", "queued"]
    assert gate.status()["refused"] == 0


def test_a_queued_click_is_refused_once_its_answer_could_no_longer_arrive_in_time() -> None:
    clock = FakeClock()
    gate = EncodeGate(slots=1, max_wait_s=45, answer_within_s=85, clock=clock)
    with gate.slot():
        clock.now += 10
    release, entered = threading.Event(), threading.Event()
    holder = hold(gate, Priority.INTERACTIVE, [], "running", release, entered)
    assert entered.wait(5)
    refused: list[EncodeBusyError] = []

    def queued() -> None:
        try:
            with gate.slot():
                pass
        except EncodeBusyError as exc:
            refused.append(exc)

    thread = threading.Thread(target=queued)
    thread.start()
    wait_until(lambda: gate.status()["waiting"] == 1)
    clock.now += 76  # 85 s less one 10 s encode: 75 s is the most it may wait
    with gate._cond:
        gate._cond.notify_all()
    thread.join(5)
    assert refused and refused[0].status_code == 503 and refused[0].retry_after_s >= 1
    assert gate.status()["waiting"] == 0
    release.set()
    holder.join(5)
