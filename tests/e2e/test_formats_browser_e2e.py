"""What Label Studio 1.23.2's own editor, in Debian's headless Chromium, makes of our bitmask and polygon results.

Annotations holding our results are opened in the editor (Selenium through /usr/bin/chromedriver;
nothing is downloaded). Bitmask: the editor decodes our PNG onto its canvas, and its own serialiser
(``getImageDataURL``: what it saves after an edit) must give an RGBA PNG at the image's size, black,
alpha 255 exactly on our mask -- the form it reads and writes, observed rather than read from its
source. Polygon: the editor's region holds our points unchanged, and the browser's canvas fills the
bridged outline (non-zero rule, as Konva draws a closed line) with the hole left empty. A screenshot
of each editor lands in the test's output folder.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from e2e.browser import wait
from e2e.known_mask import HEIGHT, WIDTH, iou, known_mask
from e2e.servers import LabelStudio
from ml_backend.formats import BITMASK, POLYGON, PolygonOptions, mask_values, region_mask
from ml_backend.settings import Settings

TAGS = {BITMASK: "BitmaskLabels", POLYGON: "PolygonLabels"}


def open_annotated_task(label_studio: LabelStudio, driver, result_type: str, tmp_path: Path) -> list[dict]:
    """A project with ``result_type``'s tag, one image, our known mask saved as its annotation, open in the editor."""
    tag = TAGS[result_type]
    config = (f'<View><Image name="image" value="$image"/><{tag} name="mask" toName="image">'
              f'<Label value="Cat"/></{tag}></View>')
    project = label_studio.ok("POST", "/api/projects", json={"title": f"browser-{result_type}",
                                                             "label_config": config})
    pixels = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    [task_id] = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                                files={"image.png": ("image.png", buffer.getvalue())})["task_ids"]
    values = mask_values(known_mask(), result_type, PolygonOptions.from_settings(Settings()))
    result = [{"from_name": "mask", "to_name": "image", "type": result_type, "original_width": WIDTH,
               "original_height": HEIGHT, "image_rotation": 0, "value": {**v, result_type: ["Cat"]}} for v in values]
    label_studio.ok("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "was_cancelled": False})
    driver.get(f"{label_studio.url}/projects/{project['id']}/data?task={task_id}")
    wait(driver, lambda d: d.execute_script(
        "return !!(window.Htx && Htx.annotationStore.selected && "
        f"Htx.annotationStore.selected.regions.length === {len(result)})"), "the editor with our regions")
    return result


def test_the_editor_reads_our_bitmask_and_writes_the_same_form(label_studio, driver, tmp_path) -> None:
    open_annotated_task(label_studio, driver, BITMASK, tmp_path)
    # The region is drawn once the browser has decoded our PNG (its bbox: pixels with alpha > 0).
    seen = wait(driver, lambda d: d.execute_script(
        "const r = Htx.annotationStore.selected.regions[0];"
        "return r.bbox ? {url: r.getImageDataURL(), zoom: r.parent.stageZoom, bbox: r.bbox,"
        " natural: [r.parent.currentImageEntity.naturalWidth, r.parent.currentImageEntity.naturalHeight]} : null"),
        "the bitmask drawn")
    driver.save_screenshot(str(tmp_path / "bitmask-editor.png"))
    truth = known_mask()
    assert seen["natural"] == [WIDTH, HEIGHT]
    ys, xs = np.nonzero(truth)
    bbox = {k: seen["bbox"][k] / seen["zoom"] for k in ("left", "top", "right", "bottom")}
    assert bbox == pytest.approx({"left": xs.min(), "top": ys.min(), "right": xs.max() + 1, "bottom": ys.max() + 1})
    with Image.open(io.BytesIO(base64.b64decode(seen["url"].split(",", 1)[1]))) as written:
        assert (written.format, written.mode, written.size) == ("PNG", "RGBA", (WIDTH, HEIGHT))
        rgba = np.asarray(written)
    assert not rgba[..., :3].any()  # black
    np.testing.assert_array_equal(rgba[..., 3], truth * np.uint8(255))
    # And our reader, on the editor's own PNG, gives the mask back.
    item = {"type": BITMASK, "original_width": WIDTH, "original_height": HEIGHT,
            "value": {"imageDataURL": seen["url"]}}
    np.testing.assert_array_equal(region_mask(item, (WIDTH, HEIGHT), max_pixels=10**6), truth)


def test_the_editor_keeps_our_polygons_and_the_browser_leaves_the_hole_empty(label_studio, driver, tmp_path) -> None:
    result = open_annotated_task(label_studio, driver, POLYGON, tmp_path)
    driver.save_screenshot(str(tmp_path / "polygon-editor.png"))
    held = driver.execute_script("return Htx.annotationStore.selected.regions.map(r => r.points.map(p => [p.x, p.y]))")
    assert sorted(held) == sorted(item["value"]["points"] for item in result)
    # The browser's canvas fills each region as Konva does (closed path, non-zero rule); a pixel is
    # inside when at least half covered, i.e. about when its centre is.
    alpha = driver.execute_script(f"""
        const canvas = new OffscreenCanvas({WIDTH}, {HEIGHT}), ctx = canvas.getContext("2d");
        for (const r of Htx.annotationStore.selected.regions) {{
          ctx.beginPath();
          r.points.forEach((p, i) => ctx[i ? "lineTo" : "moveTo"](p.x * {WIDTH} / 100, p.y * {HEIGHT} / 100));
          ctx.closePath();
          ctx.fill();
        }}
        return Array.from(ctx.getImageData(0, 0, {WIDTH}, {HEIGHT}).data.filter((_, i) => i % 4 === 3));""")
    browser = np.array(alpha, np.uint8).reshape(HEIGHT, WIDTH) >= 128
    ours = np.zeros((HEIGHT, WIDTH), bool)
    for item in result:
        ours |= region_mask(item, (WIDTH, HEIGHT), max_pixels=10**6)
    truth = known_mask()
    hole = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(hole, (60, 60), 13, 1, -1)
    hole = hole.astype(bool)
    assert hole.sum() > 500 and not truth[hole].any()
    assert not browser[hole].any() and not ours[hole].any()  # the bridged hole stays empty in the browser
    assert iou(browser, ours) >= 0.95 and iou(browser, truth) >= 0.95
