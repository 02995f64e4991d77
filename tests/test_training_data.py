"""Pairing by name, bad files, the deterministic split, the synthetic generator, the pipeline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training  # noqa: F401  (selects the torch backend before keras)
from training.data import (
    find_pairs, load_pair, scan_dataset, split_pairs, validation_count, write_synthetic,
)
from training.errors import DatasetError
from training.pipeline import SkipLog, TrimapDataset


def _write_pair(root: Path, stem: str, size: tuple[int, int] = (24, 20), value: int = 1, trimap_size=None) -> None:
    """An image whose left half is red, and a trimap whose left half is ``value`` (right half 2)."""
    width, height = size
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (255, 0, 0)
    tw, th = trimap_size or size
    trimap = np.full((th, tw), 2, dtype=np.uint8)
    trimap[:, : tw // 2] = value
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.jpg", quality=95)
    Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{stem}.png")


def test_pairs_are_matched_by_name_not_position(tmp_path):
    for stem in ("a", "b", "c"):
        _write_pair(tmp_path, stem)
    # Remove a's trimap and add an orphan trimap "z": sorted positions would now pair b↔b... but
    # positions shift (images a,b,c vs trimaps b,c,z): only name matching gets b and c right.
    (tmp_path / "annotations/trimaps/a.png").unlink()
    shutil.copy(tmp_path / "annotations/trimaps/b.png", tmp_path / "annotations/trimaps/z.png")
    found = find_pairs(tmp_path)
    assert [(p.stem, p.image.stem, p.trimap.stem) for p in found.pairs] == [("b", "b", "b"), ("c", "c", "c")]
    reasons = {p.path.name: p.reason for p in found.problems}
    assert reasons == {"a.jpg": "no trimap with the same name", "z.png": "no image with the same name"}


def test_dotfiles_and_other_files_are_ignored(tmp_path):
    _write_pair(tmp_path, "a")
    shutil.copy(tmp_path / "annotations/trimaps/a.png", tmp_path / "annotations/trimaps/._a.png")
    shutil.copy(tmp_path / "images/a.jpg", tmp_path / "images/.hidden.jpg")
    (tmp_path / "images" / "a.mat").write_bytes(b"matlab")
    found = find_pairs(tmp_path)
    assert [p.stem for p in found.pairs] == ["a"] and found.problems == []


def test_ambiguous_names_are_reported(tmp_path):
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    shutil.copy(tmp_path / "images/a.jpg", tmp_path / "images/a.jpeg")
    found = find_pairs(tmp_path)
    assert [p.stem for p in found.pairs] == ["b"]
    assert any("ambiguous" in p.reason for p in found.problems)


def test_missing_layout_and_no_usable_pair_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="images: folder not found"):
        scan_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations" / "trimaps").mkdir(parents=True)
    (tmp_path / "images" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "annotations" / "trimaps" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="no usable image/trimap pair"):
        scan_dataset(tmp_path)


def test_corrupt_and_mismatched_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    _write_pair(tmp_path, "good")
    _write_pair(tmp_path, "garbage")
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"\x00" * 100)
    _write_pair(tmp_path, "wrongsize", trimap_size=(10, 10))
    with caplog.at_level(logging.WARNING):
        dataset = scan_dataset(tmp_path)
    assert [p.stem for p in dataset.pairs] == ["good"]
    problems = {p.path.name: p.reason for p in dataset.problems}
    assert "unreadable image" in problems["garbage.jpg"]
    assert "differs from its image" in problems["wrongsize.png"]
    assert "garbage.jpg" in caplog.text and "wrongsize.png" in caplog.text


def test_pipeline_skips_files_that_fail_to_decode_and_keeps_batch_size(tmp_path, caplog):
    for stem in ("a", "b", "c", "d"):
        _write_pair(tmp_path, stem)
    # b: a noisy JPEG cut short (its header opens, decoding fails); c: trimap values outside 1..3.
    noise = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images/b.jpg", quality=95)
    data = (tmp_path / "images/b.jpg").read_bytes()
    (tmp_path / "images/b.jpg").write_bytes(data[: len(data) * 3 // 4])
    _write_pair(tmp_path, "c", value=7)
    dataset = scan_dataset(tmp_path)
    assert len(dataset.pairs) == 4  # headers are fine: the damage shows only when decoding
    skipped = SkipLog()
    sequence = TrimapDataset(dataset.pairs, 16, batch_size=4, skipped=skipped, workers=1)
    with caplog.at_level(logging.WARNING):
        images, trimaps = sequence[0]
    assert images.shape == (4, 16, 16, 3) and trimaps.shape == (4, 16, 16)
    assert sorted(p.path.name for p in skipped.problems) == ["b.jpg", "c.png"]
    assert "b.jpg" in caplog.text and "c.png" in caplog.text


def test_load_pair_resizes_bilinear_images_and_nearest_trimaps(tmp_path):
    _write_pair(tmp_path, "a", size=(40, 30))
    image, trimap = load_pair(find_pairs(tmp_path).pairs[0], 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert set(np.unique(trimap)) == {0, 1}  # nearest: no blended class ids
    assert image[:, 0, 0].min() > 200 and image[:, -1, 0].max() < 50


def test_flips_flip_image_and_trimap_together(tmp_path):
    for i in range(8):
        _write_pair(tmp_path, f"p{i}")
    pairs = find_pairs(tmp_path).pairs
    images, trimaps = TrimapDataset(pairs, 16, batch_size=8, flip=True, seed=3, workers=1)[0]
    left_red = images[:, :, 0, 0] > 128
    left_foreground = trimaps[:, :, 0] == 0
    np.testing.assert_array_equal(left_red, left_foreground)
    flipped = ~left_red[:, 0]
    assert flipped.any() and not flipped.all()


def test_validation_count_rule():
    assert validation_count(7390) == 1000
    assert validation_count(100) == 20
    assert validation_count(3) == 1
    assert validation_count(4) == 1
    assert validation_count(5) == 2  # a first version is never chosen on one image when five pairs can spare two
    assert validation_count(10) == 2
    assert validation_count(15) == 3
    assert validation_count(1) == 0


def test_split_is_deterministic_and_a_growing_set_keeps_its_validation_images(tmp_path):
    write_synthetic(tmp_path / "small", count=30, size=16, seed=1)
    small = find_pairs(tmp_path / "small").pairs
    first = split_pairs(small, seed=1337)
    again = split_pairs(list(reversed(small)), seed=1337)
    assert {p.stem for p in first.val} == {p.stem for p in again.val}
    assert len(first.val) == validation_count(30)
    assert {p.stem for p in split_pairs(small, seed=1).val} != {p.stem for p in first.val}

    write_synthetic(tmp_path / "grown", count=90, size=16, seed=1)  # same first 30 stems, 60 new
    grown = find_pairs(tmp_path / "grown").pairs
    later = split_pairs(grown, seed=1337, previous_val=[p.stem for p in first.val],
                        previous_train=[p.stem for p in first.train])
    later_val = {p.stem for p in later.val}
    assert {p.stem for p in first.val} <= later_val
    assert not later_val & {p.stem for p in first.train}  # never validate on a parent's training image
    assert len(later_val) == validation_count(90)
    assert not later_val & {p.stem for p in later.train}


def test_synthetic_generator_writes_the_oxford_layout_deterministically(tmp_path):
    stems = write_synthetic(tmp_path / "a", count=3, size=48, seed=5)
    write_synthetic(tmp_path / "b", count=3, size=48, seed=5)
    dataset = scan_dataset(tmp_path / "a")
    assert [p.stem for p in dataset.pairs] == stems and not dataset.problems
    for pair in dataset.pairs:
        trimap = np.asarray(Image.open(pair.trimap))
        assert set(np.unique(trimap)) == {1, 2, 3}
        assert max(trimap.shape) == 48
        assert (tmp_path / "b" / "images" / pair.image.name).read_bytes() == pair.image.read_bytes()
    assert stems != write_synthetic(tmp_path / "c", count=3, size=48, seed=6) or (
        (tmp_path / "c/images" / f"{stems[0]}.jpg").read_bytes() != dataset.pairs[0].image.read_bytes())
