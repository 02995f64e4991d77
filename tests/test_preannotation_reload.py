"""The pixels served after a hot reload: a promoted (or rolled back) trimap version changes the masks
Label Studio receives, not only the version label on them."""

from __future__ import annotations

import numpy as np
from test_preannotation import CONFIG, batch, client_for, image, settings, store_random_model, task  # noqa: F401

from ml_backend.brush import decode_rle
from ml_backend.sam import SamEngine
from training.predict import predict_trimap
from training.layout import project_store_dir  # the store of project 1, which the requests name
from training.store import ModelStore


def expected_mask(model_dir, version: str, pixels: np.ndarray) -> np.ndarray:
    classes = predict_trimap(ModelStore(project_store_dir(model_dir, 1)).load_model(version), pixels)
    return (classes == 0) | (classes == 2)  # foreground + boundary, the default


def served_mask(client, pixels: np.ndarray) -> tuple[str, np.ndarray]:
    [prediction] = batch(client, [task(pixels)])["results"]
    [item] = prediction["result"]
    return prediction["model_version"], decode_rle(item["value"]["rle"], *pixels.shape[:2])


def test_after_promotion_and_rollback_the_served_pixels_are_the_current_models(settings, tiny_segmenter, image):
    client = client_for(settings, SamEngine(tiny_segmenter))
    first = store_random_model(settings.model_dir, seed=1)
    version, mask = served_mask(client, image)
    first_expected = expected_mask(settings.model_dir, first, image)
    assert version == f"trimap-{first}"
    np.testing.assert_array_equal(mask, first_expected)

    second = store_random_model(settings.model_dir, seed=4)  # promoted while the backend runs
    second_expected = expected_mask(settings.model_dir, second, image)
    assert not np.array_equal(first_expected, second_expected)  # else this test could not tell them apart
    version, mask = served_mask(client, image)
    assert version == f"trimap-{second}"
    np.testing.assert_array_equal(mask, second_expected)

    ModelStore(project_store_dir(settings.model_dir, 1)).rollback()
    version, mask = served_mask(client, image)
    assert version == f"trimap-{first}"
    np.testing.assert_array_equal(mask, first_expected)
