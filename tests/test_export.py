"""Data sets from a Label Studio JSON export file: pairs written, broken entries reported, the rest used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.__main__ import main
from ml_backend.brush import encode_rle
from ml_backend.export import ExportError, ExportOptions, export_from_file, local_image_candidates
from ml_backend.trimaps import annotation_to_trimap

SIZE = (40, 32)  # width, height


def object_mask(offset: int) -> np.ndarray:
    mask = np.zeros(SIZE[::-1], bool)
    mask[8:24, 5 + offset:25 + offset] = True
    return mask


def gradient(seed: int) -> np.ndarray:
    """A smooth image (JPEG keeps it close), different per seed."""
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    return np.stack([x * 5 + seed, y * 6, (x + y + seed) % 256], axis=-1).astype(np.uint8)


def brush(mask: np.ndarray) -> dict:
    return {"type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": SIZE[0],
            "original_height": SIZE[1], "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": ["Pet"]}}


def annotation(result: list, **extra) -> dict:
    return {"id": extra.pop("id", 1), "result": result, "was_cancelled": False, "ground_truth": False,
            "updated_at": "2026-11-25T10:00:00Z", **extra}


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """An export with good tasks and broken ones; images as Label Studio stores uploads."""
    images = tmp_path / "ls-data" / "media" / "upload" / "7"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(gradient(60 * "abcd".index(name[0]))).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    bad_rle = brush(object_mask(0))
    bad_rle["value"]["rle"] = bad_rle["value"]["rle"][:12]
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/7/a.png"}, "annotations": [annotation([brush(object_mask(0))])]},
        {"id": 2, "data": {"image": "/data/upload/7/b.png"}, "annotations": [
            annotation([brush(object_mask(10))], id=5, updated_at="2026-11-25T09:00:00Z"),
            annotation([brush(object_mask(3))], id=6, updated_at="2026-11-25T11:00:00Z"),  # newest wins
            annotation([brush(object_mask(15))], id=7, was_cancelled=True, updated_at="2026-11-25T12:00:00Z"),
        ]},
        {"id": 3, "data": {"image": "/data/upload/7/c.png"}, "annotations": [annotation([], was_cancelled=True)]},
        {"id": 4, "data": {"image": "/data/upload/7/missing.png"}, "annotations": [annotation([brush(object_mask(0))])]},
        {"id": 5, "data": {"image": "/data/upload/7/broken.png"}, "annotations": [annotation([brush(object_mask(0))])]},
        {"id": 6, "data": {"image": "/data/upload/7/d.png"}, "annotations": [annotation([bad_rle])]},
        {"id": 8, "data": {"image": "/data/upload/7/d.png"}, "annotations": [annotation([{"type": "keypointlabels"}])]},
        {"id": 9, "annotations": [annotation([brush(object_mask(0))])]},
        "garbage",
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path, tmp_path / "ls-data", tasks


def test_export_file_writes_usable_pairs_and_reports_broken_entries(export, tmp_path):
    path, images, tasks = export
    out = tmp_path / "dataset"
    report = export_from_file(path, images, out, max_pixels=10**8, options=ExportOptions(boundary_width=2))
    assert report.written == ["task-1", "task-2"]
    assert report.not_accepted == 1  # task 3: its only annotation was cancelled
    assert set(report.skipped) == {"task 4", "task 5", "task 6", "task 8", "task 9", "entry 8"}
    assert "not found" in report.skipped["task 4"] and "missing.png" in report.skipped["task 4"]
    assert "RLE" in report.skipped["task 6"]
    assert "brush" in report.skipped["task 8"]
    assert "data" in report.skipped["task 9"]
    assert "not a task" in report.skipped["entry 8"]

    for task_id, offset in ((1, 0), (2, 3)):
        trimap = np.asarray(Image.open(out / "annotations" / "trimaps" / f"task-{task_id}.png"))
        expected = annotation_to_trimap([brush(object_mask(offset))], boundary_width=2)
        np.testing.assert_array_equal(trimap, expected)
        image = np.asarray(Image.open(out / "images" / f"task-{task_id}.jpg"))
        source = gradient(60 * (task_id - 1))
        assert image.shape == source.shape
        assert np.abs(image.astype(int) - source).mean() < 4  # JPEG: close, not equal

    from training.data import scan_dataset

    assert [p.stem for p in scan_dataset(out).pairs] == ["task-1", "task-2"]


def test_ground_truth_only(export, tmp_path):
    path, images, tasks = export
    tasks[1]["annotations"][0]["ground_truth"] = True
    path.write_text(json.dumps(tasks))
    report = export_from_file(path, images, tmp_path / "gt", max_pixels=10**8,
                              options=ExportOptions(ground_truth_only=True, boundary_width=0))
    assert report.written == ["task-2"]
    trimap = np.asarray(Image.open(tmp_path / "gt" / "annotations" / "trimaps" / "task-2.png"))
    np.testing.assert_array_equal(trimap == 1, object_mask(10))  # the ground-truth one, not the newest


def test_image_candidates_stay_inside_the_folder(tmp_path):
    assert local_image_candidates("/data/upload/7/a.png") == ["upload/7/a.png", "media/upload/7/a.png", "7/a.png",
                                                             "a.png"]
    assert local_image_candidates("http://h/data/local-files/?d=pets/x%20y.jpg") == ["pets/x y.jpg", "x y.jpg"]
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    export = tmp_path / "e.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "/data/local-files/?d=../secret.png"},
                                   "annotations": [annotation([brush(object_mask(0))])]}]))
    report = export_from_file(export, tmp_path / "images", tmp_path / "out", max_pixels=10**8)
    assert report.written == [] and "not found" in report.skipped["task 1"]


def test_unreadable_export_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ExportError, match="bad.json: not a JSON file"):
        export_from_file(bad, tmp_path, tmp_path / "out", max_pixels=10**8)
    bad.write_text('{"tasks": []}')
    with pytest.raises(ExportError, match="expected a list of tasks"):
        export_from_file(bad, tmp_path, tmp_path / "out", max_pixels=10**8)
    with pytest.raises(ExportError, match="cannot read"):
        export_from_file(tmp_path / "absent.json", tmp_path, tmp_path / "out", max_pixels=10**8)


def test_cli(export, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOUNDARY_WIDTH", "2")
    path, images, _ = export
    out = tmp_path / "cli"
    assert main(["export-dataset", str(path), "--images", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 image/trimap pair(s)" in printed and "skipped task 4" in printed
    assert sorted(p.name for p in (out / "images").iterdir()) == ["task-1.jpg", "task-2.jpg"]

    # A second run into the same folder must not silently mix data sets.
    assert main(["export-dataset", str(path), "--images", str(images), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-dataset", str(path), "--images", str(images), "--out", str(out), "--overwrite"]) == 0

    bad = tmp_path / "bad.json"
    bad.write_text("[")
    assert main(["export-dataset", str(bad), "--images", str(images), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["export-dataset", str(empty), "--images", str(images), "--out", str(tmp_path / "y")]) == 2
    assert "no task gave" in capsys.readouterr().err


def test_export_from_a_running_label_studio(tmp_path):
    from fake_label_studio import TOKEN, fake_label_studio, pet_image

    from ml_backend.export import export_from_label_studio
    from ml_backend.images import ImageLoader
    from ml_backend.settings import Settings

    loader = ImageLoader(Settings.from_env({"IMAGE_CACHE_DIR": str(tmp_path / "cache")}))
    with fake_label_studio(n_tasks=3) as ls:
        ls.tasks[1]["annotations"][0]["was_cancelled"] = True
        report = export_from_label_studio(tmp_path / "out", url=ls.url, token=TOKEN, project=1, loader=loader,
                                          options=ExportOptions(boundary_width=0))
        assert report.written == ["task-1", "task-3"] and report.not_accepted == 1 and not report.skipped
        trimap = np.asarray(Image.open(tmp_path / "out" / "annotations" / "trimaps" / "task-3.png"))
        np.testing.assert_array_equal(trimap == 1, pet_image(2)[1])
        with pytest.raises(ExportError, match="HTTP 401"):
            export_from_label_studio(tmp_path / "bad", url=ls.url, token="wrong", project=1, loader=loader)
    with pytest.raises(ExportError, match="cannot reach Label Studio"):
        export_from_label_studio(tmp_path / "gone", url=ls.url, token=TOKEN, project=1, loader=loader)
    with pytest.raises(ExportError, match="LABEL_STUDIO_URL"):
        export_from_label_studio(tmp_path / "unset", url="", token="", project=1, loader=loader)
