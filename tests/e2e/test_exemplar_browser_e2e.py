"""SAM 3 interactive exemplars in Label Studio 1.23.2's own editor (Debian's headless Chromium), against our
backend under gunicorn serving a tiny random SAM 3 (``SAM3_EXEMPLAR_LABELS=Cat``).

An annotator's session: log in, open a task, switch Auto-Annotation on, draw a smart "Cat" rectangle (an
exemplar: SAM 3 answers with every instance it finds, several suggestions at once), a second "Cat" rectangle
(the editor sends both, so the answer is for both exemplars), accept; a smart "Dog" rectangle (not an exemplar
label: SAM's box), accept; submit. What the editor really sent and got is read from a recording proxy between
Label Studio and the backend; the submitted annotation is read back through Label Studio's API, and every
region's mask is compared with what the test computes itself, in its own process, from the same checkpoints
and the boxes of the recorded requests.

Artefacts in the test's output folder (``tmp_path``): a screenshot per step, the recorded ``/predict`` bodies
(``requests.json``) and the browser console.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sam3_fixture import checkpoint, sam3_engine  # noqa: F401  (fixtures)

from e2e.editor import editing
from e2e.recording_proxy import RecordingProxy
from e2e.servers import Backend, LabelStudio
from ml_backend.formats import region_mask
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from ml_backend.sam3.concepts import select_instances
from ml_backend.settings import Settings

WIDTH, HEIGHT = 320, 240
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat" hint="tabby cat" background="#ff0000"/>
    <Label value="Dog" background="#0000ff"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Cat" smart="true" background="#ff0000"/>
    <Label value="Dog" smart="true" background="#0000ff"/>
  </RectangleLabels>
</View>"""
PHRASE = "tabby cat"  # the "Cat" label's hint: its SAM 3 phrase (README, SAM 3 concept pre-annotation)
THRESHOLD, DEDUP = 0.2, 0.5
SAM3_ENV = {"PREANNOTATE": "trimap", "SAM3_EXEMPLAR_LABELS": "Cat", "SAM3_SCORE_THRESHOLD": str(THRESHOLD),
            "SAM3_DEDUP_IOU": str(DEDUP), "SAM3_ON_IMPORT": "false"}
MAX_DIFFERING = 1e-3  # of a mask's pixels: the backend's threads may round a bilinear upsample the other way
Box = tuple[float, float, float, float]


def png() -> bytes:
    """Noise with three alike red blocks: something for "every similar instance" to mean."""
    pixels = np.random.default_rng(11).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    for centre in (60, 160, 260):
        pixels[80:160, centre - 35:centre + 35] = (230, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def proxy(browser_ready, backend_factory: Callable[..., Backend], checkpoint: Path,
          e2e_dir: Path) -> Iterator[RecordingProxy]:
    backend = backend_factory(**SAM3_ENV, SAM3_MODEL=str(checkpoint), MODEL_DIR=str(e2e_dir / "models-exemplar"))
    recording = RecordingProxy(backend.url).start()
    yield recording
    recording.stop()


def box_of(item: dict) -> Box:
    """A recorded rectangle in pixels of the image (the editor sends percentages of its natural size)."""
    v, width, height = item["value"], item["original_width"], item["original_height"]
    x, y = v["x"] * width / 100, v["y"] * height / 100
    return x, y, x + v["width"] * width / 100, y + v["height"] * height / 100


def exemplar_instances(engine, image: np.ndarray, boxes: list[Box],
                       phrase: str = PHRASE) -> list[tuple[float, np.ndarray]]:
    """SAM 3's instances of ``phrase`` like the positive exemplar ``boxes``, kept by the pre-annotation rules."""
    found = engine.segment(image, [phrase], threshold=THRESHOLD, boxes=boxes, box_labels=[1] * len(boxes))[0]
    kept = select_instances([("Cat", found)], iou_threshold=DEDUP, max_instances=Settings().sam3_max_instances)
    return [(item.instance.score, item.instance.mask) for item in kept]


def scores(instances: list[tuple[float, np.ndarray]]) -> list[float]:
    return [score for score, _ in instances]


def masks_of(items: list[dict], label: str) -> list[np.ndarray]:
    assert all(i["type"] == "brushlabels" and i["from_name"] == "mask" for i in items), items
    return [region_mask(i, (WIDTH, HEIGHT), max_pixels=10**7) for i in items if i["value"]["brushlabels"] == [label]]


def assert_same_masks(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    """One region per expected mask, each equal to its own up to MAX_DIFFERING of the pixels (in any order)."""
    assert len(got) == len(expected), f"{what}: {len(got)} regions, expected {len(expected)}"
    unmatched = list(range(len(got)))
    for n, want in enumerate(expected):
        assert want.any(), f"{what}: expected mask {n} is empty; the comparison would prove nothing"
        differing = {g: float((got[g] != want).mean()) for g in unmatched}
        best = min(differing, key=differing.get)
        assert differing[best] <= MAX_DIFFERING, f"{what}: no region matches instance {n} ({differing})"
        unmatched.remove(best)


def assert_answer_is(answer: dict, checkpoint: Path, expected: list[tuple[float, np.ndarray]], what: str) -> None:
    [prediction] = answer["results"]
    assert prediction["model_version"] == f"sam3-{checkpoint.name}", prediction["model_version"]
    result = prediction["result"]
    assert [r["value"]["brushlabels"] for r in result] == [["Cat"]] * len(result), result
    assert [r["score"] for r in result] == pytest.approx(scores(expected), abs=1e-4)
    assert_same_masks(masks_of(result, "Cat"), [mask for _, mask in expected], what)


def test_an_exemplar_rectangle_in_the_editor_gives_every_similar_instance(
    driver, proxy: RecordingProxy, label_studio: LabelStudio, checkpoint: Path, sam3_engine, tiny_sam_preset: Path,
    tmp_path: Path,
) -> None:
    data = png()
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with editing(driver, proxy, label_studio, tmp_path, title="browser exemplar", config=CONFIG,
                 image=("cats.png", data), size=(WIDTH, HEIGHT), backend_title="sam3") as editor:
        editor.smart_tool("rectangle-tool")
        editor.label("Cat", "box")
        editor.drag("exemplar", (22, 72), (98, 168))

        # What the editor really sent: this one rectangle, under "Cat"; what came back: SAM 3's instances.
        _, first, _, first_answer = editor.steps[-1]
        [first_box] = first["params"]["context"]["result"]
        assert (first_box["type"], first_box["from_name"], first_box["value"]["rectanglelabels"]) == \
            ("rectanglelabels", "box", ["Cat"]), first_box
        expected_first = exemplar_instances(sam3_engine, image, [box_of(first_box)])
        assert len(expected_first) >= 2, "the image should give several instances; the test proves less"
        assert_answer_is(first_answer, checkpoint, expected_first, "first answer")
        plain = exemplar_instances(sam3_engine, image, [box_of(first_box)], phrase="cat")
        assert scores(plain) != pytest.approx(scores(expected_first), abs=1e-4), \
            "the label's hint changes nothing here: the test would not see the label itself sent as the phrase"
        editor.suggestions_shown(len(expected_first), "every instance shown as a suggestion")
        editor.shot("suggestions")

        # A second rectangle of the label: the editor sends both, the answer is for both exemplars. (The editor
        # drops the label once a region is drawn: pick it again.)
        editor.label("Cat", "box")
        editor.drag("second_exemplar", (222, 72), (298, 168))
        _, second, _, second_answer = editor.steps[-1]
        items = second["params"]["context"]["result"]
        assert [(i["type"], i["value"]["rectanglelabels"]) for i in items] == [("rectanglelabels", ["Cat"])] * 2, items
        assert items[0]["id"] == first_box["id"] and box_of(items[0]) == pytest.approx(box_of(first_box))
        expected_both = exemplar_instances(sam3_engine, image, [box_of(i) for i in items])
        assert_answer_is(second_answer, checkpoint, expected_both, "second answer")
        assert scores(expected_both) != pytest.approx(scores(expected_first), abs=1e-4), \
            "the second exemplar changes nothing here: the test would not see it ignored"
        editor.suggestions_shown(len(expected_both), "the second answer's instances shown")
        editor.accept("cats")

        # "Dog" is not an exemplar label: its rectangle is SAM's box, as before.
        editor.label("Dog", "box")
        editor.drag("sam_box", (130, 10), (190, 60))
        _, dog, _, dog_answer = editor.steps[-1]
        [dog_box] = dog["params"]["context"]["result"]
        assert (dog_box["type"], dog_box["value"]["rectanglelabels"]) == ("rectanglelabels", ["Dog"]), dog_box
        assert dog_answer["results"][0]["model_version"] == f"sam-{tiny_sam_preset.name}"
        assert [r["value"]["brushlabels"] for r in dog_answer["results"][0]["result"]] == [["Dog"]]
        editor.accept("dog")
        result = editor.submit()

    assert not [item for item in result if item["type"] == "rectanglelabels"], "smart prompts must not be submitted"
    assert {item["value"]["brushlabels"][0] for item in result} == {"Cat", "Dog"}, result
    cats = [item for item in result if item["value"]["brushlabels"] == ["Cat"]]
    assert sorted(item["score"] for item in cats) == pytest.approx(sorted(scores(expected_both)), abs=1e-4)
    assert_same_masks(masks_of(result, "Cat"), [mask for _, mask in expected_both], "submitted cats")
    sam = SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "exemplar-browser"))
    dog_mask = sam.segment(image, Prompts.from_lists(box=box_of(dog_box))).mask
    dogs = masks_of(result, "Dog")
    assert dogs, result
    assert_same_masks([np.logical_or.reduce(dogs)], [dog_mask], "submitted dog")
