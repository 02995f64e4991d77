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
