"""The success paths of the SAM 3 benchmarks: ``benchmarks.sam3 --quick`` and ``benchmarks.preannotate_modes``."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_sam3_bench_compares_the_same_computation(capsys) -> None:
    from benchmarks import sam3 as bench

    assert bench.main(["--quick", "--repeat", "1", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["config"] == "tiny" and row["images"] == 2 and row["phrases"] == len(bench.PHRASES)
    assert row["ours_images_per_s"] > 0 and row["transformers_images_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["ours_images_per_s"] / row["transformers_images_per_s"], rel=1e-6)
    assert row["max_score_difference"] < 1e-4  # both sides computed the same scores


def test_modes_bench_scores_regions_against_the_ground_truth() -> None:
    from benchmarks.preannotate_modes import _iou, _union
    from ml_backend import labeling
    from ml_backend.labeling import parse_label_config
    from benchmarks.preannotate_modes import _label_config

    config = parse_label_config(_label_config('Pet "x"'))
    a, b = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    a[2:8, 3:9], b[5:15, 5:25] = True, True
    results = [r for mask in (a, b) for r in labeling.build_mask_results(mask, config=config, label='Pet "x"',
                                                                          score=0.9)]
    union = _union({"result": results}, 20, 30)
    assert np.array_equal(union, a | b)
    truth = np.zeros((20, 30), bool)
    truth[5:15, 5:25] = True
    assert _iou(b, truth) == 1.0 and _iou(a, truth) == pytest.approx(np.count_nonzero(a & truth) /
                                                                      np.count_nonzero(a | truth))
    assert _iou(np.zeros_like(a), np.zeros_like(a)) == 1.0  # nothing to find, nothing found


@pytest.mark.slow
def test_modes_bench_runs_the_three_modes_on_synthetic_data(capsys) -> None:
    from benchmarks import preannotate_modes as bench

    assert bench.main(["--synthetic", "--quick", "--json"]) == 0
    rows = {row["mode"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"trimap", "sam3", "both"}
    for row in rows.values():
        assert row["images"] == 12 and 0.0 <= row["mean_foreground_iou"] <= 1.0 and row["seconds_per_image"] > 0
    assert rows["sam3"]["regions_per_image"] > 0  # the low threshold lets random SAM 3's instances through
    # "both" only removes SAM 3's instances (or falls back to the one trimap region when none is left).
    assert rows["both"]["regions_per_image"] <= max(rows["sam3"]["regions_per_image"], 1.0)


@pytest.mark.slow
def test_coexistence_bench_runs_every_scenario(capsys) -> None:
    """The success path of ``benchmarks.coexistence``: its figures are printed, never asserted."""
    from benchmarks import coexistence

    assert coexistence.main(["--quick", "--images", "1", "--further", "1", "--pause", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["scenarios"]) == list(coexistence.SCENARIOS)
    for scenario, row in report["scenarios"].items():
        assert row["first_click"]["n"] == 1 and row["further_click"]["n"] == 1
        assert (row["job_images_done"] > 0) == scenario.startswith("job")
    assert all(seconds > 0 for seconds in report["sam3_pieces_s"].values())  # the job's pieces were timed
