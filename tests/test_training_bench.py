"""The success path of ``python -m benchmarks.training --quick`` (streaming pipeline vs in-memory arrays)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_bench_succeeds_and_reports_both_pipelines(monkeypatch, capsys):
    """The quick preset shrunk further (the real one takes minutes); the workers run as real subprocesses."""
    from benchmarks import training as bench

    tiny = bench.BenchConfig(image_size=16, source_size=24, batch_size=4, throughput_images=8, rounds=2,
                             memory_images=4)
    monkeypatch.setattr(bench.BenchConfig, "preset", classmethod(lambda cls, quick: tiny))
    assert bench.main(["--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["image_size"] == 16
    assert result["throughput"]["streaming_images_per_s"] > 0 and result["throughput"]["in_memory_images_per_s"] > 0
    memory = result["memory"]
    assert [memory[f"streaming_{n}"]["images"] for n in ("n", "10n")] == [4, 40]
    assert all(memory[key]["peak_rss_mb"] > 50 for key in memory)  # a process holding torch and Keras
    assert result["memory_ratio_streaming_10n_over_n"] == pytest.approx(
        memory["streaming_10n"]["peak_rss_mb"] / memory["streaming_n"]["peak_rss_mb"], abs=1e-3)
    assert bench.main(["--quick"]) == 0
    assert "throughput on 8 images: streaming" in capsys.readouterr().out
