"""Fitting: the model learns, fine-tuning starts from the parent, the promotion rule, Ctrl-C, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest_training import TINY_IMAGE, _fitted_store, fitted_store, tiny_data  # noqa: F401  (fixtures)

import keras
from training.data import find_pairs, load_trimap, write_synthetic
from training.errors import FitInterrupted
from training.fit import evaluate, evaluate_model, fit, promotion_decision
from training.store import SPLIT_FILE, ModelStore


def _val_pairs(data_dir: Path, version_path: Path):
    stems = set(json.loads((version_path / SPLIT_FILE).read_text())["val"])
    return [p for p in find_pairs(data_dir).pairs if p.stem in stems]


@pytest.mark.slow
def test_the_model_learns_beyond_constant_predictions(tmp_path):
    keras.utils.set_random_seed(0)
    write_synthetic(tmp_path / "data", count=100, size=64, seed=21)
    report = fit(tmp_path / "data", tmp_path / "models", epochs=5, image_size=64, batch_size=4, patience=10,
                 verbose=0)
    val = _val_pairs(tmp_path / "data", report.path)
    assert len(val) == report.val_count == 20
    truths = [load_trimap(p.trimap) for p in val]
    # Predicting "all foreground": intersection = foreground pixels, union = every pixel.
    all_foreground = sum((t == 0).sum() for t in truths) / sum(t.size for t in truths)
    all_background = 0.0  # no predicted foreground: intersection 0
    assert report.val_foreground_iou > max(all_foreground, all_background) + 0.3, (
        report.val_foreground_iou, all_foreground)
    metrics = ModelStore(tmp_path / "models").current().metrics
    assert metrics["val_foreground_iou"] == report.val_foreground_iou
    assert metrics["history"]["val_loss"][-1] < metrics["history"]["val_loss"][0]
    for plot in ("curves.png", "predictions.png"):
        assert Image.open(report.path / plot).size[0] > 100


def test_first_version_is_promoted_and_fully_described(fitted_store, tiny_data):
    store = ModelStore(fitted_store)
    info = store.current()
    assert info is not None and info.promoted
    metrics = info.metrics
    assert metrics["parent"] is None
    assert metrics["data"]["size"] == 20 and metrics["data"]["val_count"] == 4
    assert len(metrics["data"]["fingerprint"]) == 16 and len(metrics["data"]["val_fingerprint"]) == 16
    assert metrics["params"]["image_size"] == TINY_IMAGE
    assert {"fit_s", "eval_s", "total_s"} <= metrics["timings"].keys()
    assert {"keras", "torch", "numpy", "pillow"} <= metrics["libraries"].keys()
    assert 0.0 <= metrics["val_foreground_iou"] <= 1.0
    assert store.load_model().input_shape == (None, TINY_IMAGE, TINY_IMAGE, 3)


def test_fine_tuning_starts_from_the_parents_weights(fitted_store, tiny_data):
    store = ModelStore(fitted_store)
    parent = store.current_version_id()
    parent_weights = store.load_model(parent).get_weights()
    # With a learning rate of 0 the weights stay where fitting started.
    tuned = fit(tiny_data, fitted_store, from_version="current", epochs=1, batch_size=8, learning_rate=0.0,
                verbose=0, start="finetune")  # not left to the small-data rule, which may pick from scratch
    assert tuned.parent == parent and tuned.start == "finetune"
    for before, after in zip(parent_weights, store.load_model(tuned.version_id).get_weights()):
        np.testing.assert_array_equal(before, after)
    # Equal weights give an equal score, which is not better: no promotion.
    assert tuned.val_foreground_iou == pytest.approx(tuned.baseline_val_foreground_iou)
    assert not tuned.promoted and store.current_version_id() == parent

    scratch = fit(tiny_data, fitted_store, epochs=1, image_size=TINY_IMAGE, batch_size=8, learning_rate=0.0,
                  verbose=0)
    assert scratch.parent is None
    first = store.load_model(scratch.version_id).get_weights()[0]
    assert not np.array_equal(first, parent_weights[0])


def test_fine_tuning_at_another_image_size_reuses_the_weights(fitted_store, tiny_data):
    store = ModelStore(fitted_store)
    parent_weights = store.load_model().get_weights()
    tuned = fit(tiny_data, fitted_store, from_version=store.current_version_id(), image_size=24, epochs=1,
                batch_size=8, learning_rate=0.0, verbose=0, start="finetune")
    model = store.load_model(tuned.version_id)
    assert model.input_shape == (None, 24, 24, 3)
    np.testing.assert_array_equal(model.get_weights()[-2], parent_weights[-2])


def test_the_promotion_rule_needs_the_trivial_baselines_and_the_current_version_beaten():
    assert promotion_decision(0.0, 0.0, None, 0.0) == (
        False, "validation foreground IoU 0.0000 does not beat predicting all background (0)")
    promoted, why = promotion_decision(0.30, 0.35, None, 0.0)  # an all-foreground guess scores 0.35
    assert not promoted and "all foreground (0.3500)" in why
    assert promotion_decision(0.50, 0.35, None, 0.0)[0]  # no current version: the baselines suffice
    assert not promotion_decision(0.50, 0.35, 0.45, 0.1)[0] and promotion_decision(0.56, 0.35, 0.45, 0.1)[0]
    assert not promotion_decision(0.50, 0.35, 0.50, 0.0)[0]  # equal is not better


@pytest.mark.parametrize("margin", [-1.0, 1.0])
def test_promotion_rule_compares_on_the_same_validation_set(fitted_store, tiny_data, margin):
    store = ModelStore(fitted_store)
    old = store.current_version_id()
    report = fit(tiny_data, fitted_store, from_version="current", epochs=1, batch_size=8,
                 promotion_margin=margin, verbose=0)
    info = store.get(report.version_id)
    trivial = info.metrics["promotion"]["all_foreground_val_foreground_iou"]
    truths = [load_trimap(p.trimap) for p in _val_pairs(tiny_data, report.path)]
    assert trivial == pytest.approx(sum((t == 0).sum() for t in truths) / sum(t.size for t in truths))
    # Margin -1 beats any current version, so the trivial baselines decide; margin 1 can never be beaten.
    promoted = margin < 0 and report.val_foreground_iou > max(0.0, trivial)
    assert report.promoted is promoted and info.metrics["promotion"]["reason"] == report.promotion_reason
    assert store.current_version_id() == (report.version_id if promoted else old)
    info = store.get(report.version_id)
    assert info.promoted is promoted and info.metrics["promotion"]["baseline_version"] == old
    # The baseline is the old version measured now on the new version's validation images.
    baseline = evaluate_model(store.load_model(old), _val_pairs(tiny_data, report.path))
    assert report.baseline_val_foreground_iou == pytest.approx(baseline.foreground_iou)
    assert len(store.list_versions()) == 2


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch: int | None = None) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch is None:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_the_best_checkpoint_so_far(tmp_path, tiny_data):
    report = fit(tiny_data, tmp_path / "models", epochs=5, image_size=TINY_IMAGE, batch_size=8, verbose=0,
                 callbacks=[_InterruptAt(epoch=1)])
    assert report.interrupted and report.epochs_run == 2
    info = ModelStore(tmp_path / "models").get(report.version_id)
    assert info.metrics["interrupted"] is True
    assert info.metrics["best_epoch"] in (1, 2)


def test_ctrl_c_before_any_checkpoint_writes_nothing(tmp_path, tiny_data):
    with pytest.raises(FitInterrupted):
        fit(tiny_data, tmp_path / "models", epochs=2, image_size=TINY_IMAGE, batch_size=8, verbose=0,
            callbacks=[_InterruptAt(epoch=None)])
    store = ModelStore(tmp_path / "models")
    assert store.list_versions() == [] and store.current_version_id() is None
    assert list((store.root / ".staging").iterdir()) == []


def test_bad_files_are_skipped_and_counted(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    images = sorted((data / "images").glob("*.jpg"))
    images[0].write_bytes(b"this is no jpeg")  # caught when the headers are scanned
    width, height = Image.open(images[1]).size
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images[1], quality=95)
    images[1].write_bytes(images[1].read_bytes()[:-400])  # caught when decoded by the pipeline
    (data / "annotations" / "trimaps" / images[2].with_suffix(".png").name).unlink()  # unpaired
    report = fit(data, tmp_path / "models", epochs=1, image_size=TINY_IMAGE, batch_size=8, verbose=0)
    text = "\n".join(report.skipped)
    assert report.skipped_count == 3
    for image in images[:3]:
        assert image.name in text
    assert ModelStore(tmp_path / "models").get(report.version_id).metrics["data"]["skipped"] == report.skipped


def test_evaluate_reports_consistent_metrics(fitted_store, tiny_data):
    report = evaluate(tiny_data, fitted_store)
    assert report.images == 20 and report.version == ModelStore(fitted_store).current_version_id()
    assert report.foreground_iou == report.per_class_iou["foreground"]
    assert set(report.per_class_iou) == {"foreground", "background", "boundary"}
    assert 0.0 <= report.pixel_accuracy <= 1.0
    val = evaluate(tiny_data, fitted_store, subset="val")
    assert val.images == 4
    assert val.foreground_iou == pytest.approx(ModelStore(fitted_store).current().val_foreground_iou)


def test_from_current_on_an_empty_store_trains_from_scratch(tmp_path, tiny_data):
    report = fit(tiny_data, tmp_path / "models", from_version="current", epochs=1, image_size=TINY_IMAGE,
                 batch_size=8, verbose=0)
    assert report.parent is None and report.base_model is None
    assert report.promoted == (report.val_foreground_iou > max(0.0, ModelStore(tmp_path / "models").get(
        report.version_id).metrics["promotion"]["all_foreground_val_foreground_iou"]))


def test_a_grown_data_set_keeps_the_old_validation_images(fitted_store, tiny_data, tmp_path):
    old = ModelStore(fitted_store).current()
    old_split = json.loads((old.path / SPLIT_FILE).read_text())
    write_synthetic(tmp_path / "grown", count=30, size=40, seed=11)  # the same 20 pairs plus 10 new ones
    report = fit(tmp_path / "grown", fitted_store, from_version="current", epochs=1, batch_size=8, verbose=0)
    new_split = json.loads((report.path / SPLIT_FILE).read_text())
    assert set(old_split["val"]) <= set(new_split["val"])
    assert not set(new_split["val"]) & set(old_split["train"])
    assert report.val_count == 6 and report.train_count == 24


class _Weights(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])


def test_early_stopping_keeps_the_best_epochs_weights(tmp_path, tiny_data):
    recorder = _Weights()
    report = fit(tiny_data, tmp_path / "models", epochs=6, patience=1, image_size=TINY_IMAGE, batch_size=8,
                 learning_rate=0.01, verbose=0, callbacks=[recorder])
    metrics = ModelStore(tmp_path / "models").get(report.version_id).metrics
    val_loss = metrics["history"]["val_loss"]
    assert report.best_epoch == int(np.argmin(val_loss)) + 1 and metrics["val_loss"] == min(val_loss)
    # Patience 1: it stops one epoch after the best unless the epochs ran out first.
    assert report.epochs_run == (report.best_epoch + 1 if report.early_stopped else 6) == len(recorder.weights)
    saved = ModelStore(tmp_path / "models").load_model(report.version_id).get_weights()
    for kept, best in zip(saved, recorder.weights[report.best_epoch - 1]):
        np.testing.assert_array_equal(kept, best)
    if report.best_epoch != report.epochs_run:  # and not the last epoch's
        assert any(not np.array_equal(k, last) for k, last in zip(saved, recorder.weights[-1]))


def test_the_optimizer_loss_and_metric_are_the_chapters():
    from training.model import build_model, compile_model

    model = compile_model(build_model(TINY_IMAGE), learning_rate=0.02)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.02)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy) and model.loss.from_logits
    (iou,) = model._compile_metrics._user_metrics  # keras keeps compile()'s metrics here until the first batch
    assert isinstance(iou, keras.metrics.IoU) and iou.name == "foreground_iou" and list(iou.target_class_ids) == [0]
    # Logits in, argmax taken: three of the four pixels are predicted foreground, two of them truly are.
    truth = np.array([[[0], [0]], [[1], [2]]])[None]
    logits = np.array([[[5.0, -1, -1], [5.0, -1, -1]], [[-3, 4.0, 0], [5, 0, 0]]])[None]
    iou.update_state(truth, logits)
    assert float(iou.result()) == pytest.approx(2 / 3)
