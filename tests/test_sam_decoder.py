"""The traced prompt decoder gives the eager Keras layers' outputs for every prompt shape."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.sam import Prompts, SamEngine


def _prompt_cases(rng: np.random.Generator, mask_shape: tuple[int, int]) -> list[Prompts]:
    points = [tuple(map(float, p)) for p in rng.uniform(5, 105, (6, 2))]
    logits = rng.normal(size=mask_shape).astype(np.float32)
    box = (12.0, 8.0, 130.0, 100.0)
    return [
        Prompts.from_lists(points[:1]),
        Prompts.from_lists(points[:3], [1, 0, 1]),
        Prompts.from_lists(points[:6], [1, 1, 0, 1, 0, 0]),
        Prompts.from_lists(box=box),
        Prompts.from_lists(points[:2], [1, 0], box=box),
        Prompts.from_lists(points[:1], mask_logits=logits),
        Prompts.from_lists(points[:4], [1, 0, 0, 1], mask_logits=logits),
        Prompts.from_lists(points[:2], [0, 1], box=box, mask_logits=logits),
        Prompts.from_lists(box=box, mask_logits=logits),
    ]


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_traced_decoder_matches_the_eager_layers(tiny_segmenter, order: str) -> None:
    """Traces are built on first use of each kind of prompt; whichever comes first, later ones
    with other point counts (and boxes or previous masks) still get the eager layers' numbers."""
    traced = SamEngine(tiny_segmenter, traced_decoder=True)
    eager = SamEngine(tiny_segmenter, traced_decoder=False)
    image = np.random.default_rng(7).integers(0, 256, (110, 150, 3), dtype=np.uint8)
    embedding = traced.embed(image)
    cases = _prompt_cases(np.random.default_rng(8), traced.mask_input_shape)
    if order == "reversed":
        cases = cases[::-1]
    for prompts in cases:
        fast, slow = traced.decode(embedding, prompts), eager.decode(embedding, prompts)
        np.testing.assert_allclose(fast.low_res_logits, slow.low_res_logits, atol=1e-5)
        assert fast.score == pytest.approx(slow.score, abs=1e-6)
        assert np.array_equal(fast.mask, slow.mask)
    assert traced._decoder._traced, "tracing fell back to the eager layers"
    assert len(traced._decoder._traces) <= 4


def test_a_model_that_cannot_be_traced_falls_back_to_the_eager_layers(tiny_segmenter, monkeypatch, caplog) -> None:
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    engine = SamEngine(tiny_segmenter, traced_decoder=True)
    eager = SamEngine(tiny_segmenter, traced_decoder=False)
    image = np.random.default_rng(9).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    prompts = Prompts.from_lists([(30.0, 20.0)])
    with caplog.at_level("WARNING"):
        result = engine.segment(image, prompts)
    assert "tracing SAM's decoder failed" in caplog.text
    np.testing.assert_array_equal(result.low_res_logits, eager.segment(image, prompts).low_res_logits)
