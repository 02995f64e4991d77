"""SAM 3 model sources: clear errors before anything heavy loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_backend.errors import ModelSourceError
from ml_backend.sam3.loading import load_sam3_engine, resolve_source


def test_sources_are_checked_with_messages_that_name_the_problem(tmp_path: Path) -> None:
    assert resolve_source("sam3_pcs") == "sam3_pcs"
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(ModelSourceError, match="sam3_video"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="not readable JSON"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="Unknown SAM 3 model"):
        resolve_source("sam3_huge")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3_video"}))
    assert resolve_source(str(tmp_path)) == str(tmp_path)


def test_a_checkpoint_without_weights_or_a_missing_gpu_is_a_model_source_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3_video"}))
    with pytest.raises(ModelSourceError, match="Could not load SAM 3"):
        load_sam3_engine(str(tmp_path), device="cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelSourceError, match="no GPU"):
            load_sam3_engine(str(tmp_path), device="cuda")


def test_a_keras_hub_preset_directory_loads_the_same_model_as_the_checkpoint(tmp_path: Path) -> None:
    """SAM3_MODEL=<local keras-hub preset directory>: the backbone as ``save_to_preset`` writes it (config.json,
    metadata.json, model.weights.h5) with the tokenizer's assets (assets/tokenizer/vocabulary.json, merges.txt)
    gives the same scores and masks as the Hugging Face directory it came from; converting that directory
    raises none of the converter's expected "Skipping ... pixel_decoder ..." warnings."""
    import shutil
    import warnings

    import numpy as np
    from sam3_factory import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "hf", weight_scale=3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        original = load_sam3_engine(str(checkpoint), device="cpu")
    assert not [w for w in caught if "Skipping" in str(w.message)]
    preset = tmp_path / "preset"
    original.backbone.save_to_preset(str(preset))
    assert {"config.json", "metadata.json", "model.weights.h5"} <= {p.name for p in preset.iterdir()}
    assets = preset / "assets" / "tokenizer"
    assets.mkdir(parents=True)
    shutil.copy(checkpoint / "bpe" / "vocab.json", assets / "vocabulary.json")
    shutil.copy(checkpoint / "bpe" / "merges.txt", assets / "merges.txt")
    assert resolve_source(str(preset)) == str(preset)

    loaded = load_sam3_engine(str(preset), device="cpu")
    image = np.random.default_rng(2).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    expected = original.predict_raw(image, ["cat", "yellow school bus"], [(5.0, 5.0, 60.0, 50.0)], [1])
    got = loaded.predict_raw(image, ["cat", "yellow school bus"], [(5.0, 5.0, 60.0, 50.0)], [1])
    assert expected.scores.std() > 1e-3
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
    np.testing.assert_array_equal(got.mask_probabilities > 0.5, expected.mask_probabilities > 0.5)
