"""Typed phrases in Label Studio 1.23.2's own editor (Debian's headless Chromium), against our backend under
gunicorn serving a tiny random SAM 3.

An annotator's session: log in, open a task, switch Auto-Annotation on, type "yellow school bus" in the
config's one-row ``<TextArea>`` and press Enter (SAM 3 answers with every instance, under "Bus", whose hint is
that phrase), accept; type "red apple" (no label is named so: ``SAM3_TEXT_DEFAULT_LABEL=Object``), accept;
submit. What the editor really sent and got is read from a recording proxy between Label Studio and the
backend; the submitted annotation is read back through Label Studio's API, and every region's mask is compared
with what the test computes itself, in its own process, from the same checkpoint and phrase.

Artefacts in the test's output folder (``tmp_path``): a screenshot per step, the recorded ``/predict`` bodies
(``requests.json``, where fixtures/editor/07_typed_phrase.json comes from) and the browser console.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e.editor import editing
from e2e.recording_proxy import RecordingProxy
from e2e.servers import Backend, LabelStudio
from e2e.test_exemplar_browser_e2e import HEIGHT, WIDTH, assert_same_masks, masks_of, png, scores
from ml_backend.sam3.concepts import select_instances

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="phrase" toName="image" editable="true" rows="1" placeholder="what to find"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Bus" hint="yellow school bus" background="#ffcc00"/>
    <Label value="Object" background="#0000ff"/>
  </BrushLabels>
</View>"""
THRESHOLD, DEDUP, MAX_INSTANCES = 0.2, 0.5, 4
SAM3_ENV = {"PREANNOTATE": "trimap", "SAM3_TEXT_DEFAULT_LABEL": "Object", "SAM3_SCORE_THRESHOLD": str(THRESHOLD),
            "SAM3_DEDUP_IOU": str(DEDUP), "SAM3_MAX_INSTANCES": str(MAX_INSTANCES), "SAM3_ON_IMPORT": "false"}


@pytest.fixture(scope="module")
def checkpoint(e2e_dir: Path) -> Path:
    from sam3_factory import save_tiny_checkpoint

    return save_tiny_checkpoint(e2e_dir / "sam3-phrase", weight_scale=3.0)


@pytest.fixture(scope="module")
def sam3_engine(checkpoint: Path):
    """The backend's SAM 3, loaded here to compute what its answers must hold."""
    from ml_backend.sam3.loading import load_sam3_engine

    return load_sam3_engine(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def proxy(browser_ready, backend_factory: Callable[..., Backend], checkpoint: Path,
          e2e_dir: Path) -> Iterator[RecordingProxy]:
    backend = backend_factory(**SAM3_ENV, SAM3_MODEL=str(checkpoint), MODEL_DIR=str(e2e_dir / "models-phrase"))
    recording = RecordingProxy(backend.url).start()
    yield recording
    recording.stop()


def phrase_instances(engine, image: np.ndarray, phrase: str) -> list[tuple[float, np.ndarray]]:
    """SAM 3's instances of ``phrase``, kept by the pre-annotation rules."""
    found = engine.segment(image, [phrase], threshold=THRESHOLD)[0]
    kept = select_instances([("any", found)], iou_threshold=DEDUP, max_instances=MAX_INSTANCES)
    return [(item.instance.score, item.instance.mask) for item in kept]


def assert_answer_is(answer: dict, checkpoint: Path, label: str, expected: list[tuple[float, np.ndarray]],
                     what: str) -> None:
    [prediction] = answer["results"]
    assert prediction["model_version"] == f"sam3-{checkpoint.name}", prediction["model_version"]
    result = prediction["result"]
    assert [r["value"]["brushlabels"] for r in result] == [[label]] * len(result), result
    assert [r["score"] for r in result] == pytest.approx(scores(expected), abs=1e-4)
    assert_same_masks(masks_of(result, label), [mask for _, mask in expected], what)


def test_a_typed_phrase_in_the_editor_gives_every_instance(
    driver, proxy: RecordingProxy, label_studio: LabelStudio, checkpoint: Path, sam3_engine, tmp_path: Path,
) -> None:
    data = png()
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with editing(driver, proxy, label_studio, tmp_path, title="browser phrase", config=CONFIG,
                 image=("bus.png", data), size=(WIDTH, HEIGHT), backend_title="sam3") as editor:
        # What the editor really sends for a typed phrase: the TextArea's result alone.
        editor.type_phrase("bus", "phrase", "yellow school bus")
        _, first, _, first_answer = editor.steps[-1]
        [item] = first["params"]["context"]["result"]
        assert {k: item[k] for k in ("from_name", "to_name", "type", "value")} == \
            {"from_name": "phrase", "to_name": "image", "type": "textarea", "value": {"text": ["yellow school bus"]}}
        buses = phrase_instances(sam3_engine, image, "yellow school bus")
        assert len(buses) >= 2, "the image should give several instances; the test proves less"
        assert_answer_is(first_answer, checkpoint, "Bus", buses, "first answer")
        editor.suggestions_shown(len(buses), "every instance shown as a suggestion")
        editor.accept("buses")

        # A second phrase: the editor sends the TextArea's submissions so far, the newest last.
        editor.type_phrase("apple", "phrase", "red apple")
        _, second, _, second_answer = editor.steps[-1]
        [item] = second["params"]["context"]["result"]
        assert item["type"] == "textarea" and item["value"]["text"] == ["yellow school bus", "red apple"], item
        apples = phrase_instances(sam3_engine, image, "red apple")
        assert scores(apples) != pytest.approx(scores(buses), abs=1e-4), \
            "the phrases give the same answer here: the test would not see the wrong one answered"
        assert_answer_is(second_answer, checkpoint, "Object", apples, "second answer")
        editor.suggestions_shown(len(apples), "the second phrase's instances shown")
        editor.accept("apples")
        result = editor.submit()

    masks = [item for item in result if item["type"] == "brushlabels"]
    assert {item["value"]["brushlabels"][0] for item in masks} == {"Bus", "Object"}, result
    for label, expected in (("Bus", buses), ("Object", apples)):
        regions = [item for item in masks if item["value"]["brushlabels"] == [label]]
        assert sorted(item["score"] for item in regions) == pytest.approx(sorted(scores(expected)), abs=1e-4)
        assert_same_masks(masks_of(masks, label), [mask for _, mask in expected], f"submitted {label}")
