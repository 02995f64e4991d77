"""The load benchmark's smoke test: ``python -m benchmarks.load --quick`` against a real gunicorn backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import load


def test_quick_load_bench_runs_annotators_against_gunicorn_and_reports_every_phase(
        tiny_sam_preset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load.main(["--quick", "--workers", "1", "--annotators", "2", "--images", "2", "--refinements", "2",
                      "--think", "0", "--preset-dir", str(tiny_sam_preset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [config] = report["configs"]
    assert config["workers"] == 1 and report["annotators"] == 2
    assert config["errors"] == 0, config["error_examples"]
    # Every click got a mask: 1 + 2 refinements per image, for the single user (1 image) and the team (2 x 2).
    assert config["single"]["first"]["n"] == 1 and config["single"]["cached"]["n"] == 2
    assert config["team"]["first"]["n"] == 4 and config["team"]["cached"]["n"] == 8
    # One encode per distinct image, counted from the backend's own log.
    assert config["encodes"] == config["distinct_images"] == config["distinct_images_encoded"] == 5
    assert config["rss_peak_worker_mb"] >= config["rss_ready_worker_mb"] > 50
    assert set(config["checks"]) >= {"errors == 0", "encodes == distinct images"}


def test_load_bench_refuses_meaningless_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load.main(["--quick", "--workers", "one"])
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load.main(["--quick", "--annotators", "0"])
