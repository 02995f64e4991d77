"""The trimap prediction's score (edge confidence) and the benchmark that reports how well it orders tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import training  # noqa: F401  (selects the torch backend before keras)
from training.data import load_image, load_trimap, scan_dataset
from training.model import BOUNDARY, FOREGROUND
from training.predict import edge_confidence, mask_edge, predict_object
from training.store import ModelStore

from conftest_training import base_of_another_domain  # noqa: F401  (fixture)


def test_the_score_is_high_for_a_sure_edge_and_low_for_a_hesitant_one():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:4] = True
    sure = np.where(mask[..., None], [0.96, 0.02, 0.02], [0.02, 0.96, 0.02])
    assert edge_confidence(sure, mask) == pytest.approx((0.96 - 1 / 3) * 1.5)
    hesitant = sure.copy()
    hesitant[mask_edge(mask)] = [0.45, 0.45, 0.10]  # the outline is a coin toss, the rest as sure as before
    assert edge_confidence(hesitant, mask) == pytest.approx((0.45 - 1 / 3) * 1.5)
    assert edge_confidence(np.full((6, 6, 3), 1 / 3), mask) == 0.0  # no idea at all
    assert edge_confidence(sure, np.zeros_like(mask)) == 0.0  # nothing predicted: nothing to be right about
    assert edge_confidence(sure, np.ones_like(mask)) == pytest.approx(
        (sure.max(axis=-1).mean() - 1 / 3) * 1.5)  # no edge: the mean confidence


def test_the_edge_is_both_sides_of_the_outline():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    edge = mask_edge(mask)
    assert edge[2, 2] and edge[1, 2] and edge[3, 2] and edge[2, 1] and edge[2, 3]
    assert edge.sum() == 5  # the pixel and its four neighbours; diagonals do not touch the outline


def _iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    return np.count_nonzero(predicted & truth) / max(1, np.count_nonzero(predicted | truth))


@pytest.mark.slow
def test_a_confidently_right_prediction_outranks_a_clearly_wrong_one(base_of_another_domain):
    """Real predictions of a model fitted on one kind of image, on held-out images of its kind and of another."""
    _, version, root = base_of_another_domain
    model = ModelStore(root / "base").load_model(version)
    pairs = scan_dataset(root / "own").pairs + scan_dataset(root / "held-out").pairs
    scored = []
    for pair in pairs:
        truth = load_trimap(pair.trimap)
        predicted = predict_object(model, load_image(pair.image), include_boundary=True)
        scored.append((_iou(predicted.mask, (truth == FOREGROUND) | (truth == BOUNDARY)), predicted.score))
    best, worst = max(scored), min(scored)
    assert best[0] > 0.6 and worst[0] < 0.3, scored  # one prediction clearly right, one clearly wrong
    assert best[1] > worst[1]
    assert all(0.0 <= score <= 1.0 for _, score in scored)


@pytest.mark.slow
def test_the_score_benchmark_reports_rank_correlations(monkeypatch, capsys):
    from benchmarks import prediction_score as bench
    from training import selection

    monkeypatch.setattr(selection, "MIN_STEPS", 4)  # a smoke test: the code paths, not the figures

    assert bench.main(["--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for part in ("same_kind", "both_kinds"):
        assert set(result[part]["spearman"]) == set(bench.SCORES)
        assert result[part]["spearman"]["constant"] == 0.0  # one score for every mask orders nothing
        assert all(-1.0 <= value <= 1.0 for value in result[part]["spearman"].values())
    assert result["both_kinds"]["images"] == 2 * result["same_kind"]["images"]


def test_spearman_matches_the_textbook_values():
    from benchmarks.prediction_score import spearman

    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # Ties share their mean rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3).
    assert spearman(np.array([1, 1, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(np.corrcoef(
        [0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1])
