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


def test_load_bench_runs_two_replicas_behind_the_proxy_and_reports_their_ratio(
        tiny_sam_preset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--replicas: two backends sharing a Redis started for the run, the embeddings and the models, behind the
    round-robin proxy; the ratio against one replica comes from the same run (here: one replica is left out, so
    none is printed, which keeps this smoke test to one pair of backends)."""
    assert load.main(["--quick", "--workers", "1", "--replicas", "2", "--annotators", "2", "--images", "1",
                      "--refinements", "2", "--think", "0", "--preset-dir", str(tiny_sam_preset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [config] = report["configs"]
    assert config["replicas"] == 2 and config["errors"] == 0, config["error_examples"]
    assert config["team"]["first"]["n"] == 2 and config["team"]["cached"]["n"] == 4
    # Clicks alternate between the replicas, yet each image is encoded once in all (the logs of both counted):
    assert config["encodes"] == config["distinct_images"] == config["distinct_images_encoded"] == 3
    assert config["rss_peak_total_mb"] > 2 * config["rss_ready_worker_mb"] * 0.9  # two backends' processes
    assert report["replica_ratios"] == {}


def test_replica_ratios_compare_the_same_workers_setting() -> None:
    def config(replicas: int, first: float, cached: float, wall: float) -> dict:
        team = {"first": {"n": 1, "p50_s": first, "p95_s": first}, "cached": {"n": 1, "p50_s": cached,
                                                                            "p95_s": cached}}
        return {"replicas": replicas, "workers": 1, "team": team, "team_wall_s": wall}

    ratios = load.replica_ratios([config(1, 10.0, 0.2, 60.0), config(2, 5.0, 0.3, 30.0)])
    assert ratios == {"2 replicas / 1, WORKERS=1": {"first p50_s": 0.5, "first p95_s": 0.5, "cached p50_s": 1.5,
                                                    "cached p95_s": 1.5, "team wall": 0.5}}


def test_load_bench_refuses_meaningless_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load.main(["--quick", "--workers", "one"])
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load.main(["--quick", "--annotators", "0"])
    with pytest.raises(SystemExit):
        load.main(["--quick", "--replicas", "0"])
    assert "--replicas" in capsys.readouterr().err
