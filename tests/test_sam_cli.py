"""``python -m ml_backend.sam segment`` and the settings-driven engine loader."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import ModelSourceError
from ml_backend.images import decode_image
from ml_backend.sam import Prompts
from ml_backend.sam.__main__ import main
from ml_backend.sam.loading import load_engine
from ml_backend.settings import Settings


def write_exif_rotated_jpeg(path: Path, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # display rotated 90° counter-clockwise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_segment_writes_the_engines_mask_at_displayed_size(tiny_sam_preset, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    data = write_exif_rotated_jpeg(tmp_path / "photo.jpg", width=120, height=70)
    out = tmp_path / "out" / "mask.png"
    code = main(["segment", "--model", str(tiny_sam_preset), "--image", str(tmp_path / "photo.jpg"),
                 "--point", "30,60", "--point", "50,100,0", "--box", "5,10,65,115", "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mask = np.asarray(Image.open(out))
    assert mask.shape == (120, 70)  # EXIF applied: the displayed orientation
    assert set(np.unique(mask)) <= {0, 255}
    engine = load_engine(dataclasses.replace(Settings(), sam_model=str(tiny_sam_preset), model_dir=tmp_path / "m"))
    expected = engine.segment(decode_image(data, max_pixels=10**8),
                              Prompts.from_lists([(30, 60), (50, 100)], [1, 0], box=(5, 10, 65, 115)))
    np.testing.assert_array_equal(mask == 255, expected.mask)
    assert report["score"] == pytest.approx(expected.score, abs=1e-5)


@pytest.mark.parametrize("args,words", [
    (["--point", "500,5"], "outside"),
    (["--point", "nan,5"], "finite"),
    ([], "Empty prompt"),
])
def test_segment_bad_prompts_exit_2_with_a_message(tiny_sam_preset, tmp_path, capsys, args, words) -> None:
    write_exif_rotated_jpeg(tmp_path / "photo.jpg", 40, 30)
    code = main(["segment", "--model", str(tiny_sam_preset), "--image", str(tmp_path / "photo.jpg"),
                 "--out", str(tmp_path / "m.png"), *args])
    assert code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_segment_names_an_unreadable_image(tiny_sam_preset, tmp_path, capsys) -> None:
    (tmp_path / "notes.jpg").write_text("not an image")
    code = main(["segment", "--model", str(tiny_sam_preset), "--image", str(tmp_path / "notes.jpg"),
                 "--point", "1,1", "--out", str(tmp_path / "m.png")])
    assert code == 2 and "notes.jpg" in capsys.readouterr().err


def test_engine_settings_pin_the_cpu_and_refuse_a_missing_gpu(tiny_sam_preset, tmp_path) -> None:
    base = dataclasses.replace(Settings(), sam_model=str(tiny_sam_preset), model_dir=tmp_path, sam_half=True)
    engine = load_engine(dataclasses.replace(base, sam_device="cpu"))
    result = engine.segment(np.zeros((20, 30, 3), np.uint8), Prompts.from_lists([(3, 3)]))
    assert result.mask.shape == (20, 30) and engine.device == "cpu"
    assert engine.cache.max_bytes == base.embedding_cache_bytes
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelSourceError, match="no GPU"):
            load_engine(dataclasses.replace(base, sam_device="cuda"))
