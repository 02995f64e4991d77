"""/dashboard through Flask's test client: a project's versions after real (tiny) trainings, their plots sent
only through the path-safe route, click latencies, and authentication on the page and its images."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image

import training  # noqa: F401  (selects the torch backend before keras)
from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.settings import Settings
from training.data import write_synthetic
from training.layout import project_store_dir

PROJECT = 3
CONFIG = """<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Dog"/></KeyPointLabels></View>"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """MODEL_DIR with two versions of project 3, trained for real on synthetic pairs (tiny model, 1-2 epochs)."""
    from training.fit import fit

    root = tmp_path_factory.mktemp("dashboard")
    write_synthetic(root / "data", count=12, size=40, seed=3)
    store = project_store_dir(root / "models", PROJECT)
    reports = [fit(root / "data", store, epochs=epochs, image_size=16, batch_size=4, verbose=0) for epochs in (1, 2)]
    return root / "models", reports


def client_for(model_dir: Path, engine: SamEngine | None = None, **changes):
    settings = dataclasses.replace(Settings(), model_dir=model_dir, image_cache_dir=model_dir.parent / "cache",
                                   preencode=False, **changes)
    return create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()


def test_page_shows_each_version_against_its_baselines_and_serves_its_plots(trained) -> None:
    model_dir, reports = trained
    client = client_for(model_dir)
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    # Offline: no script, no style sheet or font to fetch, every image from this backend.
    assert not re.search(r"<script|<link|@import|url\((?!#)|(src|href)=\"(https?:)?//", html), "fetches from elsewhere"
    assert 'id="project-3"' in html and "<svg" in html  # the IoU history, inline
    for report in reports:
        assert f'id="version-{PROJECT}-{report.version_id}"' in html
        assert f"{report.val_foreground_iou:.4f}" in html
        assert str(escape(report.promotion_reason)) in html
        for name in ("curves.png", "predictions.png"):
            url = f"/dashboard/projects/{PROJECT}/versions/{report.version_id}/{name}"
            assert f'src="{url}"' in html
            image = client.get(url)
            assert image.status_code == 200 and image.content_type == "image/png"
            assert image.data == (project_store_dir(model_dir, PROJECT) / "versions" / report.version_id / name
                                  ).read_bytes()
    serving = next((r.version_id for r in reversed(reports) if r.promoted), None)
    assert f'class="serving">{serving or "nothing"}<' in html


@pytest.mark.parametrize("path", [
    "/dashboard/projects/3/versions/{v}/model.keras",  # not a plot
    "/dashboard/projects/3/versions/{v}/metrics.json",
    "/dashboard/projects/3/versions/..%2F..%2F..%2Fcurrent/curves.png",
    "/dashboard/projects/3/versions/../../current/curves.png",
    "/dashboard/projects/3/versions/.staging/curves.png",
    "/dashboard/projects/3/versions/{v}%2F..%2F{v}/curves.png",
    "/dashboard/projects/4/versions/{v}/curves.png",  # another project has no such version
    "/dashboard/projects/3/versions/{v}/..%2Fcurves.png",
    "/dashboard/projects/3/versions/escape/curves.png",  # a link out of the store
])
def test_only_a_versions_own_plots_are_sent(trained, path: str) -> None:
    model_dir, reports = trained
    version = reports[0].version_id
    escape = project_store_dir(model_dir, PROJECT) / "versions" / "escape"
    outside = model_dir.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "curves.png").write_bytes(b"\x89PNG secret")
    if not escape.exists():
        os.symlink(outside, escape)
    try:
        response = client_for(model_dir).get(path.format(v=version))
        assert response.status_code == 404, (path, response.status_code)
        assert b"secret" not in response.data
    finally:
        escape.unlink()


def test_page_and_images_need_the_credentials(trained) -> None:
    model_dir, reports = trained
    client = client_for(model_dir, basic_auth_user="ops", basic_auth_pass="s3cret")
    image = f"/dashboard/projects/{PROJECT}/versions/{reports[0].version_id}/curves.png"
    for path in ("/dashboard", image):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}
                          ).status_code == 401
        good = client.get(path, headers={"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()})
        assert good.status_code == 200


def data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def keypoint(x: float, y: float) -> dict:
    return {"original_width": 100, "original_height": 60, "image_rotation": 0, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "is_positive": True, "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["Dog"]}}


def test_click_latency_by_kind_per_project(tmp_path: Path, tiny_segmenter) -> None:
    from ml_backend import metrics

    metrics._recent.clear()
    client = client_for(tmp_path / "models", SamEngine(tiny_segmenter, source="tiny"))
    image = np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    task = {"id": 5, "data": {"img": data_uri(image)}}
    clicks = [[keypoint(30, 40)], [keypoint(30, 40), keypoint(35, 42)], [keypoint(30, 40), keypoint(35, 42),
                                                                          keypoint(32, 45)]]
    for result in clicks:
        answer = client.post("/predict", json={"tasks": [task], "label_config": CONFIG, "project": "8.1700000000",
                                               "params": {"context": {"result": result}}})
        assert answer.status_code == 200, answer.json
    assert metrics.recent_click_latency(8)["first_click"]["count"] == 1
    assert metrics.recent_click_latency(8)["further_click"]["count"] == 2
    assert metrics.recent_click_latency(9)["further_click"]["count"] == 0
    html = client.get("/dashboard").get_data(as_text=True)
    section = html[html.index('id="project-8"'):]
    rows = section[section.index('class="latency"'):section.index("</table>", section.index('class="latency"'))]
    assert "<td>first click on an object</td><td>1</td>" in rows and "<td>further clicks</td><td>2</td>" in rows


def test_percentile_is_nearest_rank() -> None:
    from ml_backend.metrics import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.95) == 95.0
    assert percentile([], 0.5) is None and percentile([3.0], 0.95) == 3.0
