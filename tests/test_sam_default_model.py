"""Which SAM the backend loads when SAM_MODEL is empty: huge where a GPU computes, base on the CPU."""

from __future__ import annotations

import dataclasses

import pytest

import ml_backend.sam.loading as loading
from ml_backend.settings import Settings


@pytest.mark.parametrize("gpu, device, expected", [
    (False, "auto", "sam_base_sa1b"),
    (True, "auto", "sam_huge_sa1b"),
    (True, "cpu", "sam_base_sa1b"),  # a GPU is there but SAM is pinned to the CPU
    (False, "cpu", "sam_base_sa1b"),
])
def test_the_default_model_follows_the_device_sam_computes_on(monkeypatch, tmp_path, tiny_segmenter,
                                                              gpu, device, expected) -> None:
    import torch

    asked = []

    def fake_load_segmenter(source, *, converted_root, dtype=None):
        asked.append((source, dtype))
        return tiny_segmenter

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(loading, "load_segmenter", fake_load_segmenter)
    settings = dataclasses.replace(Settings(), sam_device=device, model_dir=tmp_path, sam_half=True)
    engine = loading.load_engine(settings)
    assert asked == [(expected, "float16" if expected == "sam_huge_sa1b" else None)]  # half only on the GPU
    assert engine.source == expected


def test_an_explicit_model_wins_over_the_device_default(monkeypatch, tmp_path, tiny_segmenter) -> None:
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "load_segmenter", lambda source, **kw: asked.append(source) or tiny_segmenter)
    loading.load_engine(dataclasses.replace(Settings(), sam_model="sam_large_sa1b", model_dir=tmp_path))
    assert asked == ["sam_large_sa1b"]
