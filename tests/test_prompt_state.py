"""The prompt-state rules (ml_backend/prompt_state/rules.py), each from the exact bodies the real editor made
Label Studio 1.23.2 send to /predict (tests/fixtures/editor, recorded by the recording proxy of
tests/e2e/test_browser_e2e.py between Label Studio and the backend, in headless Chromium).

The editor session behind the fixtures: a smart "Cat" keypoint (01), an Alt-click (02), a click under
"Background" (03, arrives alone), a third "Cat" click (04); the suggestion accepted; a smart "Dog"
rectangle (05, its task's draft holds the accepted brush region), a "Dog" keypoint inside it (06).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from ml_backend.errors import InvalidPromptError
from ml_backend.labeling import parse_label_config, read_context
from ml_backend.prompt_state import MemoryStorage, Plan, PromptMemory, TaskKey, task_key
from ml_backend.prompt_state.files import FileStorage
from ml_backend.sam.prompts import NEGATIVE, POSITIVE

FIXTURES = Path(__file__).parent / "fixtures" / "editor"


def body(name: str) -> dict:
    [path] = FIXTURES.glob(f"[0-9][0-9]_{name}.json")
    return json.loads(path.read_text())


def items(name: str) -> list[dict]:
    return body(name)["params"]["context"]["result"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "files"], autouse=True)
def backing(request, tmp_path: Path, monkeypatch) -> str:
    """Every test here runs on both storages: this process's memory, and files shared by worker processes."""
    monkeypatch.setattr(Session, "shared_dir", tmp_path / "prompt-state" if request.param == "files" else None)
    return request.param


class Session:
    """Feeds recorded bodies to a PromptMemory as the backend does, answering with distinct fake logits."""

    shared_dir: Path | None = None  # set by the ``backing`` fixture
    sessions = itertools.count()  # each Session its own folder, as each its own memory

    def __init__(self, **limits) -> None:
        self.clock = Clock()
        options = {"max_bytes": 64 << 20, "max_entries": 100, "ttl_s": 900.0, **limits}
        storage = None if self.shared_dir is None else FileStorage(
            self.shared_dir / str(next(Session.sessions)), clock=self.clock, sweep_interval_s=0, **options)
        self.memory = PromptMemory(clock=self.clock, storage=storage, **options)
        self.answers = 0

    def send(self, request: dict, *, result_ids: tuple[str, ...] = ()) -> tuple[Plan, list[np.ndarray]]:
        config = parse_label_config(request["label_config"])
        prompts = read_context(request["params"]["context"], config)
        task = request["tasks"][0]
        key = task_key(request["project"], task, task["data"]["image"])
        with self.memory.hold(key):
            plan = self.memory.plan(key, prompts, task)
            answered = []
            for _ in plan.regions:
                self.answers += 1
                answered.append(np.full((256, 256), float(self.answers), np.float32))
            self.memory.remember(plan, answered, result_ids or (f"result-{self.answers}",))
        return plan, answered


def pixels(request: dict, item: dict) -> tuple[float, float]:
    return item["value"]["x"] * item["original_width"] / 100, item["value"]["y"] * item["original_height"] / 100


def test_the_fixtures_are_what_the_editor_sends() -> None:
    """The facts the rules stand on, checked on the recordings themselves."""
    assert body("open_task")["params"]["context"] is None
    for name in ("keypoint", "alt_click", "background_alone", "keypoint_after_background", "rectangle",
                 "keypoint_after_rectangle"):
        request = body(name)
        assert request["project"].split(".")[0] == str(request["tasks"][0]["project"])
        assert request["params"]["login"] is None and "user" not in request["params"]
        assert len({(i["type"], tuple(i["value"].get(i["type"], []))) for i in items(name)}) == 1  # one group
    [background] = items("background_alone")
    assert background["is_positive"] is True and background["value"]["keypointlabels"] == ["Background"]
    assert [i["is_positive"] for i in items("alt_click")] == [True, False]
    assert all(i["type"] == "keypointlabels" for i in items("keypoint_after_rectangle"))


def test_clicks_accumulate_and_feed_back_the_previous_logits() -> None:
    session = Session()
    first, [first_logits] = session.send(body("keypoint"))
    assert first.reason == "new object: none on this task"
    [region] = first.regions
    assert region.prompts.mask_logits is None and region.label == "Cat"

    second, _ = session.send(body("alt_click"))
    assert second.reason == "same object: its group again"
    [region] = second.regions
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE]
    np.testing.assert_array_equal(region.prompts.mask_logits, first_logits)


def test_a_background_click_alone_refines_the_current_object() -> None:
    session = Session()
    session.send(body("keypoint"))
    _, [alt_logits] = session.send(body("alt_click"))
    plan, [background_logits] = session.send(body("background_alone"))
    assert plan.reason == "same object: negative-label keypoints"
    [region] = plan.regions
    expected = [pixels(body("alt_click"), i) for i in items("alt_click")] + \
        [pixels(body("background_alone"), i) for i in items("background_alone")]
    np.testing.assert_allclose(region.prompts.points, expected, atol=1e-3)
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE, NEGATIVE]
    assert region.label == "Cat"
    np.testing.assert_array_equal(region.prompts.mask_logits, alt_logits)

    # The next "Cat" click does not carry the Background point: the object still does.
    plan, _ = session.send(body("keypoint_after_background"))
    [region] = plan.regions
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE]
    np.testing.assert_array_equal(region.prompts.mask_logits, background_logits)


def test_a_background_click_with_no_object_is_an_actionable_error() -> None:
    with pytest.raises(InvalidPromptError, match="no object is being segmented.*click the object"):
        Session().send(body("background_alone"))


def test_keypoints_after_a_rectangle_refine_its_object() -> None:
    session = Session()
    plan, [box_logits] = session.send(body("rectangle"))
    [boxed] = plan.regions
    assert boxed.prompts.box is not None and len(boxed.prompts.points) == 0 and boxed.label == "Dog"

    plan, _ = session.send(body("keypoint_after_rectangle"))
    assert plan.reason == "same object: same label, within reach"
    [region] = plan.regions
    assert region.prompts.box == boxed.prompts.box
    np.testing.assert_allclose(region.prompts.points, [pixels(body("keypoint_after_rectangle"), i)
                                                      for i in items("keypoint_after_rectangle")], atol=1e-3)
    np.testing.assert_array_equal(region.prompts.mask_logits, box_logits)


def moved(request: dict, x: float, y: float) -> dict:
    request = copy.deepcopy(request)
    for item in request["params"]["context"]["result"]:
        item["value"].update(x=x, y=y)
    return request


def test_a_positive_keypoint_out_of_the_rectangles_reach_starts_a_new_object() -> None:
    [rect] = items("rectangle")
    right_edge = rect["value"]["x"] + rect["value"]["width"]
    reach = 0.25 * rect["value"]["width"]
    inside_y = rect["value"]["y"] + rect["value"]["height"] / 2
    for x, expected in ((right_edge + reach * 0.9, "same object: same label, within reach"),
                        (right_edge + reach * 1.1, "new object: same label, out of reach")):
        session = Session()
        session.send(body("rectangle"))
        plan, _ = session.send(moved(body("keypoint_after_rectangle"), x, inside_y))
        assert plan.reason == expected
        assert (plan.regions[0].prompts.box is not None) == expected.startswith("same")


def test_an_alt_click_after_a_rectangle_refines_it() -> None:
    session = Session()
    _, [box_logits] = session.send(body("rectangle"))
    alt = body("keypoint_after_rectangle")
    alt["params"]["context"]["result"][0]["is_positive"] = False
    plan, _ = session.send(alt)
    assert plan.reason == "same object: same label, within reach"
    [region] = plan.regions
    assert region.prompts.box is not None and region.prompts.labels.tolist() == [NEGATIVE]
    np.testing.assert_array_equal(region.prompts.mask_logits, box_logits)


def test_a_keypoint_under_another_label_starts_a_new_object() -> None:
    session = Session()
    session.send(body("rectangle"))
    plan, _ = session.send(body("keypoint"))  # "Cat" after a "Dog" rectangle
    assert plan.reason == "new object: another label"
    [region] = plan.regions
    assert region.prompts.box is None and region.prompts.mask_logits is None


def test_the_rectangle_after_accepting_cat_starts_a_new_object() -> None:
    session = Session()
    for name in ("keypoint", "alt_click", "background_alone", "keypoint_after_background"):
        session.send(body(name))
    plan, _ = session.send(body("rectangle"))
    assert plan.reason.startswith("new object")
    [region] = plan.regions
    assert len(region.prompts.points) == 0 and region.prompts.mask_logits is None


def test_an_accepted_suggestion_found_in_the_tasks_draft_starts_a_new_object() -> None:
    accepted = [r["id"] for draft in body("rectangle")["tasks"][0]["drafts"] for r in draft["result"]
                if r["type"] == "brushlabels"]
    assert accepted, "the recorded draft holds the accepted brush region"
    session = Session()
    for name in ("keypoint", "alt_click", "background_alone"):
        session.send(body(name))
    session.send(body("keypoint_after_background"), result_ids=tuple(accepted))
    again = body("keypoint_after_background")
    plan, _ = session.send(again, result_ids=tuple(accepted))  # no draft yet: the same object
    assert plan.reason == "same object: its group again"
    again["tasks"] = body("rectangle")["tasks"]  # the task as sent after the acceptance
    plan, _ = session.send(again)
    assert plan.reason == "new object: the last suggestion was accepted"
    assert plan.regions[0].prompts.mask_logits is None and len(plan.regions[0].prompts.points) == 3


def test_the_same_group_with_none_of_its_regions_starts_a_new_object() -> None:
    """After accepting or rejecting, the editor deletes its smart regions: the next click has a new id."""
    session = Session()
    session.send(body("alt_click"))
    fresh = body("keypoint")
    fresh["params"]["context"]["result"][0]["id"] = "new-click"
    plan, _ = session.send(fresh)
    assert plan.reason == "new object: the earlier regions of this group are gone"
    assert plan.regions[0].prompts.mask_logits is None


def test_the_same_prompts_again_get_the_same_logits_as_the_first_time() -> None:
    session = Session()
    _, [first] = session.send(body("keypoint"))
    plan, _ = session.send(body("alt_click"))
    again, _ = session.send(body("alt_click"))
    np.testing.assert_array_equal(plan.regions[0].prompts.mask_logits, first)
    np.testing.assert_array_equal(again.regions[0].prompts.mask_logits, first)


def test_a_request_with_several_groups_is_complete_and_replaces_the_object() -> None:
    session = Session()
    session.send(body("rectangle"))
    complete = body("alt_click")
    complete["params"]["context"]["result"] += items("background_alone")
    plan, _ = session.send(complete)
    assert plan.reason == "complete request: it carries several groups"
    [region] = plan.regions
    assert region.prompts.box is None and region.prompts.labels.tolist() == [POSITIVE, NEGATIVE, NEGATIVE]
    assert session.memory.get(plan.key).label == "cat"


def test_objects_are_kept_per_project_task_and_image() -> None:
    request = body("keypoint")
    task = request["tasks"][0]
    key = task_key(request["project"], task, "url")
    assert key == TaskKey(project=request["project"].split(".")[0], task=str(task["id"]), image="url")
    assert task_key(request["project"].split(".")[0] + ".999", task, "url") == key  # another /setup time stamp
    assert task_key(7, task, "url").project == "7"
    assert task_key(request["project"], {**task, "id": None}, "url") is None
    assert task_key(request["project"], {**task, "id": True}, "url") is None

    session = Session()
    session.send(body("keypoint"))
    other_task = body("background_alone")
    other_task["tasks"][0]["id"] += 1000
    with pytest.raises(InvalidPromptError):
        session.send(other_task)
    other_image = body("background_alone")
    other_image["tasks"][0]["data"]["image"] += "?other"
    with pytest.raises(InvalidPromptError):
        session.send(other_image)
    assert session.send(body("background_alone"))[0].reason == "same object: negative-label keypoints"


def test_objects_expire_after_the_ttl() -> None:
    session = Session(ttl_s=60)
    session.send(body("keypoint"))
    session.clock.now = 59
    session.send(body("alt_click"))  # refreshes the object's life
    session.clock.now = 59 + 61
    with pytest.raises(InvalidPromptError, match="forgotten"):
        session.send(body("background_alone"))
    assert len(session.memory) == 0 and session.memory.current_bytes == 0


def test_memory_is_bounded_in_entries_and_bytes() -> None:
    one_region = 2 * 256 * 256 * 4  # given and answered logits, at most
    session = Session(max_entries=3, max_bytes=10 * one_region)
    requests = []
    for task_id in range(5):
        request = body("keypoint")
        request["tasks"][0]["id"] = task_id
        session.send(request)
        session.send(body("alt_click") | {"tasks": request["tasks"]})
        requests.append(request)
    assert len(session.memory) == 3
    assert session.memory.current_bytes <= 3 * (one_region + 4096)  # a file adds its header
    assert [session.memory.get(task_key(r["project"], r["tasks"][0], r["tasks"][0]["data"]["image"])) is not None
            for r in requests] == [False, False, True, True, True]

    tight = Session(max_bytes=one_region // 4)  # one object's logits exceed the budget: nothing is kept
    tight.send(body("keypoint"))
    assert len(tight.memory) == 0 and tight.memory.current_bytes == 0


def test_an_image_of_another_size_under_the_same_url_starts_over() -> None:
    session = Session()
    session.send(body("keypoint"))
    resized = body("background_alone")
    for item in resized["params"]["context"]["result"]:
        item["original_width"] *= 2
    with pytest.raises(InvalidPromptError):
        session.send(resized)


@pytest.mark.parametrize("drafts", [None, "x", [None, {"result": "x"}, {"result": [None, {"id": ["list"]}]}]])
def test_odd_drafts_are_ignored(drafts) -> None:
    session = Session()
    session.send(body("keypoint"))
    request = body("alt_click")
    request["tasks"][0]["drafts"] = drafts
    assert session.send(request)[0].reason == "same object: its group again"


def test_the_settings_size_the_memory(backing: str, tmp_path: Path) -> None:
    from ml_backend.settings import Settings

    settings = dataclasses.replace(Settings(), prompt_state_mb=3, prompt_state_entries=7, prompt_state_ttl_s=5,
                                   prompt_state_shared="on" if backing == "files" else "off",
                                   prompt_state_dir=str(tmp_path / "state"))
    memory = PromptMemory.from_settings(settings)
    assert (memory.max_bytes, memory.max_entries, memory.ttl_s) == (3 << 20, 7, 5)
    assert isinstance(memory.storage, FileStorage if backing == "files" else MemoryStorage)
    if backing == "files":
        assert memory.storage.directory == tmp_path / "state"


# --- through the app, with a tiny random SAM -----------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, tiny_segmenter, backing: str):
    """(Flask test client, engine, image): the recorded bodies are posted with a 400x300 image inlined."""
    import base64
    import io

    from PIL import Image

    from ml_backend.app import create_app
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from ml_backend.settings import Settings

    image = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   prompt_state_shared="on" if backing == "files" else "off",
                                   prompt_state_dir=str(tmp_path / "state"))
    engine = SamEngine(tiny_segmenter, source="tiny")
    client = create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()

    def post(name: str) -> dict:
        request = body(name)
        request["tasks"][0]["data"]["image"] = uri
        response = client.post("/predict", json=request)
        assert response.status_code == 200, response.json
        return response.json["results"][0]

    return post, engine, image


def brush_mask(prediction: dict) -> np.ndarray:
    from ml_backend.brush import decode_rle

    [item] = prediction["result"]
    return decode_rle(item["value"]["rle"], item["original_height"], item["original_width"])


def test_the_recorded_session_through_the_app_gives_the_engines_masks(served) -> None:
    from ml_backend.sam import Prompts

    post, engine, image = served
    points = [pixels(body("alt_click"), i) for i in items("alt_click")]
    background = [pixels(body("background_alone"), i) for i in items("background_alone")]
    post("keypoint")
    alt = engine.segment(image, Prompts.from_lists(points[:1]))
    alt = engine.segment(image, Prompts.from_lists(points, [1, 0], mask_logits=alt.low_res_logits))
    post("alt_click")
    answer = post("background_alone")  # answered 422 before prompt state
    expected = engine.segment(image, Prompts.from_lists(points + background, [1, 0, 0],
                                                        mask_logits=alt.low_res_logits))
    np.testing.assert_array_equal(brush_mask(answer), expected.mask)
    assert answer["result"][0]["value"]["brushlabels"] == ["Cat"]

    [rect] = items("rectangle")
    x, y = rect["value"]["x"] * 4, rect["value"]["y"] * 3
    box = (x, y, x + rect["value"]["width"] * 4, y + rect["value"]["height"] * 3)
    post("rectangle")
    answer = post("keypoint_after_rectangle")
    first = engine.segment(image, Prompts.from_lists(box=box))
    expected = engine.segment(image, Prompts.from_lists(
        [pixels(body("keypoint_after_rectangle"), i) for i in items("keypoint_after_rectangle")], box=box,
        mask_logits=first.low_res_logits))
    np.testing.assert_array_equal(brush_mask(answer), expected.mask)
    assert answer["result"][0]["value"]["brushlabels"] == ["Dog"]
