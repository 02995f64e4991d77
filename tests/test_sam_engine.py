"""The SAM engine on a tiny random SAM: geometry, caching, prompts, bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ml_backend.errors import InvalidImageError, InvalidPromptError, ModelSourceError
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from ml_backend.sam.engine import image_key
from ml_backend.sam.transforms import IMAGENET_MEAN, InputGeometry, logits_to_mask, logits_to_original, prepare_image
from sam_factory import TINY_IMAGE_SIZE


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- geometry ------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(300, 500), (500, 300), (128, 128), (3000, 4000), (7, 1000)])
def test_geometry_resizes_longest_side_like_the_official_predictor(height: int, width: int) -> None:
    geometry = InputGeometry.for_image(height, width, 1024)
    scale = 1024 / max(height, width)
    assert geometry.resized_size == (int(height * scale + 0.5), int(width * scale + 0.5))
    assert max(geometry.resized_size) == 1024
    corner = geometry.scale_coords(np.array([[width, height]], np.float32))[0]
    np.testing.assert_allclose(corner, [geometry.resized_size[1], geometry.resized_size[0]], rtol=1e-6)


@pytest.mark.parametrize("height,width", [(60, 100), (100, 60)])
def test_prepare_image_puts_pixels_top_left_and_pads_with_the_mean(height: int, width: int) -> None:
    image = np.full((height, width, 3), 255, np.uint8)
    geometry = InputGeometry.for_image(height, width, TINY_IMAGE_SIZE)
    square = prepare_image(image, geometry)
    new_h, new_w = geometry.resized_size
    assert square.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    np.testing.assert_allclose(square[:new_h, :new_w], 1.0)
    padding = square[new_h:, :] if new_h < TINY_IMAGE_SIZE else square[:, new_w:]
    np.testing.assert_allclose(padding, np.broadcast_to(IMAGENET_MEAN, padding.shape))


@pytest.mark.parametrize("height,width", [(300, 500), (500, 300)])
def test_logits_map_back_onto_the_same_original_region(height: int, width: int) -> None:
    """A region drawn in model-input space comes back at the same place in the original image."""
    geometry = InputGeometry.for_image(height, width, 1024)
    x0, y0, x1, y1 = int(width * 0.2), int(height * 0.5), int(width * 0.6), int(height * 0.9)
    corners = geometry.scale_coords(np.array([[x0, y0], [x1, y1]], np.float32)) / 4  # 256 low-res grid
    low_res = torch.full((1, 256, 256), -10.0)
    (lx0, ly0), (lx1, ly1) = np.round(corners).astype(int)
    low_res[0, ly0:ly1, lx0:lx1] = 10.0
    mask = (logits_to_original(low_res, geometry)[0] > 0).numpy()
    expected = np.zeros((height, width), bool)
    expected[y0:y1, x0:x1] = True
    assert mask.shape == (height, width)
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou > 0.97


@pytest.mark.parametrize("threshold", [0.0, 0.7, -1.5])
def test_the_cpu_threshold_is_torchs_comparison_of_the_upsampled_logits(threshold: float) -> None:
    """The mask (compared by numpy on the CPU) is exactly torch's ``logits > threshold``, NaN and ties included."""
    geometry = InputGeometry.for_image(301, 457, 1024)
    low_res = torch.randn((2, 256, 256), generator=torch.Generator().manual_seed(3))
    low_res[0, 10:20, 10:20] = threshold  # logits exactly at the threshold stay out
    low_res[1, 30:40, 30:40] = float("nan")
    mask = logits_to_mask(low_res, geometry, threshold)
    expected = logits_to_original(low_res, geometry) > threshold
    assert mask.dtype == torch.bool and mask.shape == (2, 301, 457)
    assert torch.equal(mask, expected) and 0 < int(mask.sum()) < mask.numel()


# --- decoding ------------------------------------------------------------------
def full_model_outputs(engine: SamEngine, image: np.ndarray, prompts: Prompts) -> dict:
    geometry = InputGeometry.for_image(image.shape[0], image.shape[1], engine.input_size)
    inputs = engine._prompt_inputs(geometry, prompts)
    with torch.no_grad():
        return engine.segmenter({"images": prepare_image(image, geometry)[None], **inputs})


def test_cached_decode_matches_the_full_model(tiny_engine: SamEngine) -> None:
    image = random_image(90, 150)
    prompts = Prompts.from_lists([(40, 30), (100, 60)], [1, 0])
    result = tiny_engine.segment(image, prompts)
    outputs = full_model_outputs(tiny_engine, image, prompts)
    np.testing.assert_allclose(result.low_res_logits, outputs["masks"][0, 0].numpy(), atol=1e-4)
    assert result.score == pytest.approx(float(outputs["iou_pred"][0, 0]), abs=1e-5)
    assert result.mask.shape == (90, 150) and result.mask.dtype == bool


def test_single_point_keeps_the_best_of_the_multimask_outputs(tiny_engine: SamEngine) -> None:
    image = random_image(120, 80, seed=3)
    prompts = Prompts.from_lists([(40, 60)])
    result = tiny_engine.segment(image, prompts)
    scores = full_model_outputs(tiny_engine, image, prompts)["iou_pred"][0].numpy()
    assert result.score == pytest.approx(float(scores[1:].max()), abs=1e-5)


def test_box_and_previous_logits_change_the_answer(tiny_engine: SamEngine) -> None:
    image = random_image(100, 160, seed=4)
    first = tiny_engine.segment(image, Prompts.from_lists([(50, 50)], box=(10, 10, 120, 90)))
    refined = tiny_engine.segment(
        image, Prompts.from_lists([(50, 50)], box=(10, 10, 120, 90), mask_logits=first.low_res_logits)
    )
    outputs = full_model_outputs(
        tiny_engine, image, Prompts.from_lists([(50, 50)], box=(10, 10, 120, 90), mask_logits=first.low_res_logits)
    )
    assert not np.allclose(first.low_res_logits, refined.low_res_logits)
    np.testing.assert_allclose(refined.low_res_logits, outputs["masks"][0, 0].numpy(), atol=1e-4)


# --- cache ---------------------------------------------------------------------
def test_same_pixels_hit_the_cache_and_new_pixels_miss(tiny_engine: SamEngine) -> None:
    image = random_image(64, 96)
    tiny_engine.segment(image, Prompts.from_lists([(10, 10)]))
    tiny_engine.segment(image.copy(), Prompts.from_lists([(20, 20)]))
    assert tiny_engine.cache.stats.computations == 1
    assert tiny_engine.cache.stats.hits == 1
    tiny_engine.segment(random_image(64, 96, seed=9), Prompts.from_lists([(10, 10)]))
    assert tiny_engine.cache.stats.computations == 2
    assert image_key(image) != image_key(image[:, :95].copy())


def test_cache_evicts_by_bytes(tiny_segmenter) -> None:
    one = SamEngine(tiny_segmenter).embed(random_image(40, 40)).nbytes
    engine = SamEngine(tiny_segmenter, cache_bytes=int(2.5 * one))
    images = [random_image(40, 40, seed=s) for s in range(3)]
    for image in images:
        engine.embed(image)
    assert len(engine.cache) == 2 and engine.cache.current_bytes <= 2.5 * one
    assert engine.cache.stats.evictions == 1
    assert image_key(images[0]) not in engine.cache and image_key(images[2]) in engine.cache


def test_concurrent_requests_for_a_new_image_encode_it_once(tiny_engine: SamEngine, monkeypatch) -> None:
    calls = []
    real_encode = tiny_engine._encode

    def slow_encode(key, image):
        calls.append(key)
        time.sleep(0.3)
        return real_encode(key, image)

    monkeypatch.setattr(tiny_engine, "_encode", slow_encode)
    image = random_image(70, 50)
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny_engine.segment(image, Prompts.from_lists([(20, 20)]))))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 6
    assert all(np.array_equal(r.mask, results[0].mask) for r in results)


def test_a_failed_encoding_is_not_cached_and_is_retried(tiny_engine: SamEngine, monkeypatch) -> None:
    real_encode = tiny_engine._encode
    attempts = []

    def flaky(key, image):
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("out of memory")
        return real_encode(key, image)

    monkeypatch.setattr(tiny_engine, "_encode", flaky)
    image = random_image(30, 30)
    with pytest.raises(RuntimeError):
        tiny_engine.embed(image)
    tiny_engine.embed(image)
    assert len(attempts) == 2 and image_key(image) in tiny_engine.cache


# --- bad input -----------------------------------------------------------------
@pytest.mark.parametrize(
    "prompts,message",
    [
        (Prompts.from_lists(), "Empty prompt"),
        (Prompts.from_lists([(float("nan"), 3)]), "finite"),
        (Prompts.from_lists([(float("inf"), 3)]), "finite"),
        (Prompts.from_lists([(500, 3)]), "outside"),
        (Prompts.from_lists([(-1, 3)]), "outside"),
        (Prompts.from_lists([(5, 5)], [2]), "positive"),
        (Prompts.from_lists(box=(30, 30, 10, 40)), "no area"),
        (Prompts.from_lists(box=(200, 200, 300, 300)), "outside"),
        (Prompts.from_lists(box=(0, float("nan"), 10, 10)), "finite"),
        (Prompts.from_lists([(5, 5)], mask_logits=np.zeros((10, 10), np.float32)), "shape"),
    ],
)
def test_bad_prompts_get_a_clear_error(tiny_engine: SamEngine, prompts: Prompts, message: str) -> None:
    with pytest.raises(InvalidPromptError, match=message):
        tiny_engine.segment(random_image(100, 120), prompts)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 4), np.uint8),
    ],
)
def test_bad_images_get_a_clear_error(tiny_engine: SamEngine, image: np.ndarray) -> None:
    with pytest.raises(InvalidImageError):
        tiny_engine.segment(image, Prompts.from_lists([(0, 0)]))


# --- loading -------------------------------------------------------------------
def test_loading_from_a_preset_directory(tiny_sam_preset, tmp_path) -> None:
    segmenter = load_segmenter(str(tiny_sam_preset), converted_root=tmp_path)
    assert SamEngine(segmenter).input_size == TINY_IMAGE_SIZE


@pytest.mark.parametrize("source,message", [
    ("sam_tiny_nonexistent", "Unknown SAM model"),
    ("/no/such/sam_vit_b.pth", "does not exist"),
    ("missing_checkpoint.pth", "does not exist"),
])
def test_unusable_sources_are_refused_with_alternatives(source: str, message: str, tmp_path) -> None:
    with pytest.raises(ModelSourceError, match=message):
        load_segmenter(source, converted_root=tmp_path)


def test_a_directory_that_is_not_a_preset_is_refused(tmp_path) -> None:
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a keras-hub preset"):
        load_segmenter(str(tmp_path), converted_root=tmp_path / "c")


def test_a_preset_name_without_network_names_the_alternatives(monkeypatch, tmp_path) -> None:
    import keras_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(keras_hub.models.SAMImageSegmenter, "from_preset", offline)
    with pytest.raises(ModelSourceError, match="sam_vit_b_01ec64.pth") as info:
        load_segmenter("sam_base_sa1b", converted_root=tmp_path)
    assert "sam_huge_sa1b" in info.value.message


def test_cache_get_and_put_keep_lru_order_and_byte_bound() -> None:
    from ml_backend.sam.cache import ByteBoundedLRU

    cache: ByteBoundedLRU[bytes] = ByteBoundedLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # "a" is now the most recently used
    cache.put("c", b"1234")
    assert "b" not in cache and cache.get("a") and cache.get("c")
    cache.put("a", b"12")  # replacing counts the new size only
    assert cache.current_bytes == 6 and cache.get("missing") is None
