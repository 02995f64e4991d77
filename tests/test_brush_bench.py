"""``python -m benchmarks.brush`` on small masks: its success path (figures for both masks, the SDK's
output matched) and its refusal to time an encoder that disagrees with the SDK."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import brush
from ml_backend.brush import encode_rle

SMALL = ["--object-size", "120x90", "--noise-size", "40x30", "--repeat", "1"]


def test_brush_bench_reports_both_masks_against_the_sdk(capsys: pytest.CaptureFixture[str]) -> None:
    assert brush.main([*SMALL, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target_speedup"] == brush.TARGET_RATIO
    rows = {row["mask"]: row for row in report["results"]}
    assert set(rows) == {"object", "noise"}
    assert rows["object"]["size"] == "120x90" and rows["noise"]["size"] == "40x30"
    assert rows["object"]["rle_bytes"] == len(encode_rle(brush._object_mask(90, 120)))
    for row in rows.values():
        assert row["ours_encode_ms"] > 0 and row["sdk_mask2rle_ms"] > 0 and row["ours_decode_ms"] > 0
        assert row["speedup"] == pytest.approx(row["sdk_mask2rle_ms"] / row["ours_encode_ms"], rel=0.1, abs=0.1)
        assert isinstance(row["meets_target"], bool)  # a verdict, whatever this loaded machine measures


def test_brush_bench_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert brush.main(SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mask") and "target 20x" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["object", "noise"]


def test_brush_bench_refuses_an_encoder_that_disagrees_with_the_sdk(monkeypatch, capsys) -> None:
    monkeypatch.setattr(brush, "encode_rle", lambda mask: encode_rle(np.zeros_like(mask)))
    assert brush.main(SMALL) == 1
    assert "differs from the SDK" in capsys.readouterr().err
