"""Label Studio 1.23.2's own editor, in Debian's headless Chromium, against our backend under gunicorn.

An annotator's session per mask format (brush, bitmask, polygon config): log in, open a task,
switch Auto-Annotation on, a smart "Dog" rectangle, then a "Dog" keypoint inside it, accept; a
smart "Cat" keypoint, an Alt-click, a click under "Background", a third click, accept; submit. The submitted
annotation is read back through the API and each region's mask is compared with what the engine
computes for the prompts the editor really sent (recorded by a proxy between Label Studio and
the backend), combined as the prompt-state rules say.

Artefacts in the test's output folder (``tmp_path``): a screenshot per step, the recorded
``/predict`` bodies (``requests.json``, the same form as tests/fixtures/editor) and the browser
console.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e.editor import editing
from e2e.recording_proxy import RecordingProxy
from e2e.servers import Backend, LabelStudio
from ml_backend.formats import (
    PolygonOptions,
    mask_to_polygons,
    polygon_to_mask,
    polygon_to_percent,
    region_mask,
)
from ml_backend.sam import Prompts, SamEngine, load_segmenter

README = Path(__file__).resolve().parents[2] / "README.md"
WIDTH, HEIGHT = 400, 300

MASK_TAGS = {"brush": "BrushLabels", "bitmask": "BitmaskLabels", "polygon": "PolygonLabels"}
POLYGON_SETTINGS = {"POLYGON_MIN_AREA": "400", "POLYGON_TOLERANCE": "2"}


def readme_config() -> str:
    """The labeling config the README tells users to paste."""
    return re.search(r"```xml\n(.*?)```", README.read_text(), re.S).group(1)


def config_for(mask_format: str) -> str:
    return readme_config().replace("BrushLabels", MASK_TAGS[mask_format])


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[60:200, 80:260] = (230, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_sam_preset: Path) -> SamEngine:
    return SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "browser"))


@pytest.fixture(scope="module")
def proxy(browser_ready, backend_factory: Callable[..., Backend]) -> Iterator[RecordingProxy]:
    """Label Studio talks to the backend through this recorder. A random-weight SAM's masks are dozens of
    blobs: only the larger ones become polygons, so that the editor is not drowned in suggestions."""
    backend = backend_factory(**POLYGON_SETTINGS)
    recording = RecordingProxy(backend.url).start()
    yield recording
    recording.stop()


def pixels(item: dict) -> tuple[float, float]:
    return item["value"]["x"] * item["original_width"] / 100, item["value"]["y"] * item["original_height"] / 100


def expected_masks(engine: SamEngine, image: np.ndarray, steps: dict[str, dict]) -> dict[str, np.ndarray]:
    """The engine's masks for the recorded prompts, combined as the prompt-state rules say.

    Cat: keypoint, then + the Alt-click (previous logits), then + the Background click (previous
    logits), then + the third click (previous logits). Dog: the rectangle's box, then box + the
    keypoint inside it (previous logits).
    """
    def items(step: str) -> list[dict]:
        return steps[step]["params"]["context"]["result"]

    def labels(step: str) -> list[int]:
        return [int(i["is_positive"]) for i in items(step)]

    background = [pixels(i) for i in items("background_alone")]
    first = engine.segment(image, Prompts.from_lists([pixels(i) for i in items("keypoint")]))
    second = engine.segment(image, Prompts.from_lists([pixels(i) for i in items("alt_click")], labels("alt_click"),
                                                      mask_logits=first.low_res_logits))
    third = engine.segment(image, Prompts.from_lists([pixels(i) for i in items("alt_click")] + background,
                                                     labels("alt_click") + [0], mask_logits=second.low_res_logits))
    cat = engine.segment(image, Prompts.from_lists([pixels(i) for i in items("keypoint_after_background")] + background,
                                                   labels("keypoint_after_background") + [0],
                                                   mask_logits=third.low_res_logits))
    [rect] = items("rectangle")
    x, y = pixels(rect)
    box = (x, y, x + rect["value"]["width"] * WIDTH / 100, y + rect["value"]["height"] * HEIGHT / 100)
    boxed = engine.segment(image, Prompts.from_lists(box=box))
    dog = engine.segment(image, Prompts.from_lists([pixels(i) for i in items("keypoint_after_rectangle")], box=box,
                                                   mask_logits=boxed.low_res_logits))
    return {"Cat": cat.mask, "Dog": dog.mask}


def as_polygons(mask: np.ndarray) -> np.ndarray:
    """What the backend makes of a mask in a polygon config: its larger parts' simplified outlines."""
    options = PolygonOptions(min_area=int(POLYGON_SETTINGS["POLYGON_MIN_AREA"]),
                             tolerance=float(POLYGON_SETTINGS["POLYGON_TOLERANCE"]))
    outlines = np.zeros_like(mask)
    for polygon in mask_to_polygons(mask, options):
        outlines |= polygon_to_mask(polygon_to_percent(polygon, WIDTH, HEIGHT), WIDTH, HEIGHT)
    return outlines


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


@pytest.mark.parametrize("mask_format", ["brush", "bitmask", "polygon"])
def test_an_annotator_segments_two_objects_in_the_editor(
    mask_format: str, driver, proxy: RecordingProxy, label_studio: LabelStudio, engine: SamEngine, tmp_path: Path,
) -> None:
    data = png(seed=len(mask_format))
    with editing(driver, proxy, label_studio, tmp_path, title=f"browser {mask_format}",
                 config=config_for(mask_format), image=("objects.png", data), size=(WIDTH, HEIGHT)) as editor:
        mask_tag = "mask"

        # The rectangle first: in 1.23.2 the rectangle tool draws nothing once a bitmask region exists.
        editor.smart_tool("rectangle-tool")
        editor.label("Dog", "box")
        editor.drag("rectangle", (90, 70), (250, 190))
        editor.hide_pending_rectangles()
        editor.smart_tool("key-point-tool")
        editor.label("Dog", "click")
        editor.click("keypoint_after_rectangle", 170, 130)
        editor.accept("dog")

        editor.label("Cat", "click")
        editor.click("keypoint", 170, 130)
        editor.label("Cat", "click")
        editor.click("alt_click", 300, 250, alt=True)
        editor.label("Background", "click")
        editor.click("background_alone", 100, 50)
        editor.label("Cat", "click")
        editor.click("keypoint_after_background", 200, 150)
        editor.accept("cat")
        result = editor.submit()

    steps = {name: request for name, request, _, _ in editor.steps}
    assert [request["project"].split(".")[0] for request in steps.values()] == [str(editor.project_id)] * len(steps)
    mask_type = MASK_TAGS[mask_format].lower()
    regions = [item for item in result if item["type"] == mask_type and item["from_name"] == mask_tag]
    assert {label for item in regions for label in item["value"][mask_type]} == {"Cat", "Dog"}, result
    assert not [item for item in result if item["type"] in ("keypointlabels", "rectanglelabels")], \
        "smart prompts must not be submitted"

    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = expected_masks(engine, image, steps)
    if mask_format == "polygon":
        expected = {label: as_polygons(mask) for label, mask in expected.items()}
    threshold = 0.9 if mask_format == "polygon" else 0.99  # polygon outlines are rasterised again
    for label, wanted in expected.items():
        parts = [region_mask(item, (WIDTH, HEIGHT), max_pixels=10**7) for item in regions
                 if item["value"][mask_type] == [label]]
        got = np.logical_or.reduce(parts)
        assert wanted.any(), f"{label}: the engine's mask is empty; the test image proves nothing"
        assert iou(got, wanted) >= threshold, f"{label}: IoU {iou(got, wanted):.3f}; screenshots in {tmp_path}"
