"""The command line and the prediction API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest_training import _fitted_store, fitted_store, tiny_data  # noqa: F401  (fixtures)

from training.__main__ import main
from training.predict import predict_trimap, predict_trimaps, to_trimap_values
from training.store import METRICS_FILE, ModelStore

COMMANDS = ["synth", "fit", "evaluate", "predict", "versions", "promote", "rollback", "prune", "export-base", "adopt"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m training {command}" in capsys.readouterr().out


def test_synth_writes_the_layout(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--count", "3", "--size", "32"]) == 0
    assert len(list((tmp_path / "d/images").glob("*.jpg"))) == 3
    assert len(list((tmp_path / "d/annotations/trimaps").glob("*.png"))) == 3


def test_input_errors_name_the_problem_and_exit_2(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing"), "--model-dir", str(tmp_path / "m")]) == 2
    assert f"{tmp_path / 'missing' / 'images'}: folder not found" in capsys.readouterr().err
    assert main(["rollback", "--model-dir", str(tmp_path / "m")]) == 2
    assert "no earlier current version" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--image-size", "100"])
    assert exit_info.value.code == 2 and "multiple of 8" in capsys.readouterr().err


def test_versions_promote_and_rollback(fitted_store, capsys):
    store = ModelStore(fitted_store)
    first = store.current_version_id()
    # A second, non-promoted version: a copy of the first with its promotion flag cleared.
    second = first[:-1] + ("0" if first[-1] != "0" else "1")
    shutil.copytree(store.versions_dir / first, store.versions_dir / second)
    metrics = json.loads((store.versions_dir / second / METRICS_FILE).read_text())
    metrics["promotion"]["promoted"] = False
    (store.versions_dir / second / METRICS_FILE).write_text(json.dumps(metrics))

    assert main(["versions", "--model-dir", str(fitted_store), "--json"]) == 0
    listed = {v["id"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed[first]["current"] and not listed[second]["current"] and not listed[second]["promoted"]
    assert main(["promote", second, "--model-dir", str(fitted_store)]) == 0
    assert store.current_version_id() == second
    assert main(["rollback", "--model-dir", str(fitted_store)]) == 0
    assert store.current_version_id() == first


def test_evaluate_json(fitted_store, tiny_data, capsys):
    assert main(["evaluate", str(tiny_data), "--model-dir", str(fitted_store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"foreground_iou", "per_class_iou", "pixel_accuracy", "images", "version"} <= report.keys()
    assert report["images"] == 20


def test_predict_folder_writes_trimaps_at_original_size(fitted_store, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    sizes = {"wide": (50, 30), "tall": (20, 44)}
    for name, (width, height) in sizes.items():
        Image.fromarray(np.full((height, width, 3), 120, dtype=np.uint8)).save(images / f"{name}.jpg")
    (images / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    assert main(["predict", str(images), "--model-dir", str(fitted_store), "--out", str(out)]) == 0
    assert "broken.jpg" in capsys.readouterr().out
    for name, size in sizes.items():
        trimap = Image.open(out / "trimaps" / f"{name}.png")
        assert trimap.size == size and set(np.unique(np.asarray(trimap))) <= {1, 2, 3}
        assert Image.open(out / "overlays" / f"{name}.png").size == size
    assert not (out / "trimaps" / "broken.png").exists()


def test_predict_trimap_api_returns_class_ids_at_the_original_size(fitted_store):
    model = ModelStore(fitted_store).load_model()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((30, 45), (17, 9), (64, 64))]
    single = predict_trimap(model, images[0])
    assert single.shape == (30, 45) and single.dtype == np.uint8 and set(np.unique(single)) <= {0, 1, 2}
    batch = predict_trimaps(model, images, batch_size=2)
    assert [b.shape for b in batch] == [(30, 45), (17, 9), (64, 64)]
    np.testing.assert_array_equal(batch[0], single)
    assert set(np.unique(to_trimap_values(single))) <= {1, 2, 3}
    with pytest.raises(ValueError, match="RGB uint8"):
        predict_trimap(model, np.zeros((10, 10), dtype=np.uint8))


def test_fit_succeeds_and_reports_the_version(tiny_data, tmp_path, capsys):
    assert main(["--quiet", "fit", str(tiny_data), "--model-dir", str(tmp_path / "m"), "--epochs", "1",
                 "--image-size", "16", "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stored = ModelStore(tmp_path / "m").get(report["version_id"])
    assert report["train_count"] + report["val_count"] == 20 and report["epochs_run"] == 1
    assert stored.metrics["val_foreground_iou"] == report["val_foreground_iou"]
    assert stored.promoted == report["promoted"] and report["promotion_reason"] == stored.metrics["promotion"]["reason"]
    assert main(["--quiet", "fit", str(tiny_data), "--model-dir", str(tmp_path / "m"), "--epochs", "1",
                 "--from", report["version_id"], "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("version ") and "validation foreground IoU" in text
    assert ("promoted to current: " in text) != ("kept, not promoted: " in text)
