"""The trimap prediction's score (expected IoU) and the benchmarks that report how well it orders tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import training  # noqa: F401  (selects the torch backend before keras)
from training.data import load_image, load_trimap, scan_dataset
from training.model import BOUNDARY, FOREGROUND
from training.predict import expected_iou, predict_object
from training.store import ModelStore

from conftest_training import base_of_another_domain  # noqa: F401  (fixture)


def test_expected_iou_is_one_for_a_certain_exact_mask_and_falls_with_doubt_inside_and_mass_outside():
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    certain = mask.astype(float)
    assert expected_iou(certain, mask) == pytest.approx(1.0)
    doubtful_inside = np.where(mask, 0.5, 0.0)
    assert expected_iou(doubtful_inside, mask) == pytest.approx(0.5)  # 8·0.5 / 8
    mass_outside = np.where(mask, 1.0, 0.5)
    assert expected_iou(mass_outside, mask) == pytest.approx(8 / (8 + 4))  # a likely miss: 8 / (8 + 8·0.5)
    assert expected_iou(certain, np.zeros_like(mask)) == 0.0  # nothing predicted: nothing to be right about


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
        assert set(result[part]["spearman"]) == {"expected_iou", "mean_confidence", "constant"}
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
