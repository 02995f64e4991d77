"""The on-disk embedding store: atomic writes, LRU by bytes, model identity, corrupt files, float16, processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ml_backend.sam.identity import model_identity
from ml_backend.sam.store import EmbeddingStore
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from ml_backend.sam.engine import image_key

REPO = Path(__file__).resolve().parents[1]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def store_for(engine_or_segmenter, root: Path, *, max_bytes: int = 1 << 30, dtype: str = "float32") -> EmbeddingStore:
    segmenter = getattr(engine_or_segmenter, "segmenter", engine_or_segmenter)
    return EmbeddingStore(root, model_identity(segmenter.backbone.image_encoder), max_bytes=max_bytes, dtype=dtype)


def features(fill: float, size: int = 8) -> np.ndarray:
    return np.full((1, size, size, 4), fill, np.float32)


# --- the store on its own --------------------------------------------------------
def test_put_get_round_trip_and_missing_keys(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "m1", max_bytes=1 << 20)
    assert store.get("ab" * 32) is None
    store.put("ab" * 32, features(0.5), (30, 40))
    stored = store.get("ab" * 32)
    np.testing.assert_array_equal(stored.features, features(0.5))
    assert stored.original_size == (30, 40) and store.usage().files == 1


def test_keys_that_could_name_other_paths_are_refused(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "m1", max_bytes=1 << 20)
    for bad in ("../../etc/passwd", "", "AB" * 32, "a/b"):
        with pytest.raises(ValueError):
            store.get(bad)


def test_eviction_keeps_the_store_within_its_bytes_and_drops_the_least_recently_used(tmp_path: Path) -> None:
    probe = EmbeddingStore(tmp_path / "probe", "m", max_bytes=1 << 20)
    probe.put("00", features(0.0), (8, 8))
    entry_bytes = probe.usage().bytes
    store = EmbeddingStore(tmp_path / "store", "m", max_bytes=int(entry_bytes * 2.5))
    store.put("01", features(1.0), (8, 8))
    time.sleep(0.01)
    store.put("02", features(2.0), (8, 8))
    time.sleep(0.01)
    assert store.get("01") is not None  # reading makes 01 the most recently used
    time.sleep(0.01)
    store.put("03", features(3.0), (8, 8))
    assert store.get("02") is None, "the least recently used entry is evicted"
    assert store.get("01") is not None and store.get("03") is not None
    assert store.usage().bytes <= store.max_bytes


def test_eviction_counts_every_models_embeddings_in_the_directory(tmp_path: Path) -> None:
    probe = EmbeddingStore(tmp_path / "probe", "m", max_bytes=1 << 20)
    probe.put("00", features(0.0), (8, 8))
    entry_bytes = probe.usage().bytes
    first = EmbeddingStore(tmp_path / "store", "model-a", max_bytes=int(entry_bytes * 1.5))
    second = EmbeddingStore(tmp_path / "store", "model-b", max_bytes=int(entry_bytes * 1.5))
    first.put("01", features(1.0), (8, 8))
    time.sleep(0.01)
    second.put("02", features(2.0), (8, 8))
    assert first.get("01") is None and second.get("02") is not None


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ml_backend.sam.store import EmbeddingStore
    root, value = sys.argv[1], float(sys.argv[2])
    store = EmbeddingStore(root, "m", max_bytes=1 << 30)
    for _ in range(150):
        store.put("ab" * 32, np.full((1, 64, 64, 32), value, np.float32), (64, 64))
""")


def test_two_writer_processes_never_leave_a_torn_file(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), value], env=env)
               for value in ("1", "2")]
    store = EmbeddingStore(tmp_path, "m", max_bytes=1 << 30)
    seen: set[float] = set()
    while any(w.poll() is None for w in writers):
        stored = store.get("ab" * 32)
        if stored is not None:
            values = np.unique(stored.features)
            assert len(values) == 1 and values[0] in (1.0, 2.0), f"torn file: {values[:5]}"
            seen.add(float(values[0]))
    assert [w.returncode for w in writers] == [0, 0]
    assert seen, "the reader never saw a complete file"
    assert not [p for p in (tmp_path / "m" / "emb").iterdir() if p.name.startswith(".tmp-")]


def test_an_unreadable_file_is_dropped(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "m", max_bytes=1 << 20)
    store.put("ab", features(1.0), (8, 8))
    path = store.path_for("ab")
    path.write_bytes(path.read_bytes()[:50])
    assert store.get("ab") is None and not path.exists()
    path.write_bytes(b"\x00" * 10)
    assert store.get("ab") is None


def test_the_store_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32, float16"):
        EmbeddingStore(tmp_path, "m", max_bytes=1, dtype="int8")


# --- model identity --------------------------------------------------------------
def test_model_identity_follows_weights_size_and_dtype_not_the_path(tmp_path: Path, tiny_sam_preset: Path) -> None:
    import shutil

    from official_sam import TINY
    from sam_factory import build_tiny_segmenter

    from ml_backend.sam.convert import build_segmenter

    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_sam_preset, copy)
    load = lambda path, dtype=None: load_segmenter(str(path), converted_root=tmp_path / "c", dtype=dtype)  # noqa: E731
    identity = lambda segmenter: model_identity(segmenter.backbone.image_encoder)  # noqa: E731
    same = identity(load(tiny_sam_preset))
    assert identity(load(copy)) == same, "the same weights from another path are the same model"
    assert identity(build_tiny_segmenter(seed=0)) == same
    assert identity(build_tiny_segmenter(seed=1)) != same, "other weights"
    import keras

    keras.config.set_dtype_policy("bfloat16")
    try:
        half = build_tiny_segmenter(seed=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert half.backbone.image_encoder.compute_dtype == "bfloat16"
    assert identity(half) != same, "other dtype"
    keras.utils.set_random_seed(0)
    assert identity(build_segmenter(dataclasses.replace(TINY, image_size=96))) != same, "other input size"


def test_another_sam_sharing_the_directory_never_reads_these_embeddings(tmp_path: Path, tiny_segmenter) -> None:
    from sam_factory import build_tiny_segmenter

    other_segmenter = build_tiny_segmenter(seed=1)
    image = random_image(40, 60)
    first = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path))
    other = SamEngine(other_segmenter, store=store_for(other_segmenter, tmp_path))
    first.embed(image)
    other.embed(image)
    assert (first.images_encoded, other.images_encoded) == (1, 1)
    assert first.store.directory != other.store.directory


# --- the engine with a store ----------------------------------------------------
def test_a_new_process_serves_stored_images_without_encoding(tmp_path: Path, tiny_segmenter) -> None:
    image = random_image(40, 60)
    prompts = Prompts.from_lists([(20, 10)])
    first = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path))
    expected = first.segment(image, prompts)
    restarted = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path))  # empty memory
    assert restarted.cached(image_key(image)) is not None
    again = restarted.segment(image, prompts)
    assert (first.images_encoded, restarted.images_encoded) == (1, 0)
    np.testing.assert_array_equal(again.mask, expected.mask)
    assert again.score == pytest.approx(expected.score, abs=1e-6)


def test_a_corrupt_stored_embedding_is_encoded_again(tmp_path: Path, tiny_segmenter) -> None:
    image = random_image(40, 60, seed=3)
    prompts = Prompts.from_lists([(30, 20)])
    first = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path))
    expected = first.segment(image, prompts)
    path = first.store.path_for(image_key(image))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    restarted = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path))
    result = restarted.segment(image, prompts)
    assert restarted.images_encoded == 1
    np.testing.assert_array_equal(result.mask, expected.mask)
    assert restarted.store.get(image_key(image)) is not None, "the re-encoded embedding is stored again"


def test_float16_storage_changes_masks_and_scores_only_slightly(tmp_path: Path, tiny_segmenter) -> None:
    """float16 halves the store; measured here: mask IoU and score against float32 storage."""
    full = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path / "f32"))
    half = SamEngine(tiny_segmenter, store=store_for(tiny_segmenter, tmp_path / "f16", dtype="float16"))
    ious, score_diffs = [], []
    rng = np.random.default_rng(0)
    for seed in range(4):
        image = random_image(96, 128, seed=seed)
        key = image_key(image)
        full.embed(image)
        half.embed(image)
        from_full = SamEngine(tiny_segmenter, store=full.store).cached(key)
        from_half = SamEngine(tiny_segmenter, store=half.store).cached(key)
        for _ in range(5):
            points = [(float(rng.uniform(0, 127)), float(rng.uniform(0, 95))) for _ in range(2)]
            prompts = Prompts.from_lists(points, [1, 0])
            a, b = full.decode(from_full, prompts), half.decode(from_half, prompts)
            union = np.logical_or(a.mask, b.mask).sum()
            ious.append(1.0 if union == 0 else np.logical_and(a.mask, b.mask).sum() / union)
            score_diffs.append(abs(a.score - b.score))
    assert half.store.usage().bytes < 0.6 * full.store.usage().bytes
    print(f"float16 vs float32 storage: mask IoU min {min(ious):.4f} mean {np.mean(ious):.4f}, "
          f"score |diff| max {max(score_diffs):.5f}")
    assert min(ious) >= 0.98 and np.mean(ious) >= 0.995
    assert max(score_diffs) <= 0.01


ENCODER_PROCESS = textwrap.dedent("""
    import sys, time, numpy as np
    from pathlib import Path
    import ml_backend
    from ml_backend.sam.identity import model_identity
    from ml_backend.sam.store import EmbeddingStore
    from ml_backend.sam import SamEngine, load_segmenter
    preset, root, image_file, go = sys.argv[1:5]
    segmenter = load_segmenter(preset, converted_root=Path(root) / "c")
    store = EmbeddingStore(root, model_identity(segmenter.backbone.image_encoder), max_bytes=1 << 30)
    engine = SamEngine(segmenter, store=store)
    real = engine._encode
    def slow(*args):
        time.sleep(1.0)  # keep the race window wide open
        return real(*args)
    engine._encode = slow
    image = np.load(image_file)
    while not Path(go).exists():
        time.sleep(0.01)
    engine.embed(image)
    print("encodes", engine.images_encoded)
""")


def test_two_processes_asked_for_the_same_image_encode_it_once(tmp_path: Path, tiny_sam_preset: Path) -> None:
    image_file, go = tmp_path / "image.npy", tmp_path / "go"
    np.save(image_file, random_image(50, 70, seed=9))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", ENCODER_PROCESS, str(tiny_sam_preset), str(tmp_path / "store"),
                                   str(image_file), str(go)], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=900)[0] for p in processes]  # keras imports crawl on a loaded machine
    assert [p.returncode for p in processes] == [0, 0], outputs
    counts = sorted(int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("encodes"))
    assert counts == [0, 1], outputs


def test_eviction_takes_lock_files_and_stale_url_records_with_it(tmp_path: Path) -> None:
    """Issue 21 item 8: lock files and URL records of evicted embeddings do not pile up."""
    probe = EmbeddingStore(tmp_path / "probe", "m", max_bytes=1 << 20)
    probe.put("00", features(0.0), (8, 8))
    store = EmbeddingStore(tmp_path / "store", "m", max_bytes=int(probe.usage().bytes * 2.5))
    for i in range(200):
        key = f"{i:04x}"
        with store.lock(key):
            store.put(key, features(float(i)), (8, 8))
        store.put_url(f"http://ls/data/upload/1/{i}.png", key, "v", 1.0)
        time.sleep(0.002)
    locks = list((store.directory / "locks").iterdir())
    urls = list((store.directory / "urls").iterdir())
    assert store.usage().files == 2
    assert len(locks) <= 3, len(locks)  # the kept ones (and the last one's, taken after its put)
    assert len(urls) <= 2 * 2 + 64 + 1, len(urls)
    assert store.get_url("http://ls/data/upload/1/199.png") == ("00c7", "v", 1.0)
