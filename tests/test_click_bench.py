"""Smoke runs of the HTTP click bench (small sizes): every form and shape answered over HTTP by the
backend under gunicorn, read back as the shape it was given, and the per-stage table filled; and the
same shape behind SAM's own decoder, beside the engine's cached click."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_click_bench_over_http_answers_every_form_and_shape(capsys) -> None:
    from benchmarks.click import main

    assert main(["--quick", "--clicks", "1", "--repeat", "1", "--size", "160x120", "--no-real", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(row["shape"], row["form"]): row for row in report["shaped"]}
    assert set(rows) == {(s, f) for s in ("blob", "thin", "holes") for f in ("brush", "bitmask", "polygon")}
    for (shape, form), row in rows.items():
        assert row["further_click_ms"] > 0 and row["size"] == "160x120"
        # brush and bitmask come back exactly; polygons as their simplification allows
        assert row["answer_iou"] == 1.0 if form != "polygon" else row["answer_iou"] > 0.6, (shape, form, row)
    stages = report["answer_stages"]["holes brush 160x120"]
    assert stages["JSON (orjson)"]["before_wall_ms"] > 0 and stages["answer path (all but the threshold)"]["cpu_ms"] > 0


@pytest.mark.slow
def test_click_bench_runs_shapes_behind_sams_decoder_beside_the_engine(capsys) -> None:
    from benchmarks.click import main

    assert main(["--quick", "--clicks", "2", "--repeat", "1", "--size", "160x120", "--shape", "holes",
                 "--torch-threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stub = {row["form"]: row for row in report["shaped"]}
    behind = {row["form"]: row for row in report["shaped_sam"]}
    assert set(behind) == {"brush", "bitmask", "polygon"}
    for form, row in behind.items():
        # The answer is the shape, not the random SAM's own mask: read back exactly as the stub server's answer...
        assert row["answer_iou"] == stub[form]["answer_iou"], (form, row, stub[form])
        # ...but the decoder ran: the score is SAM's predicted IoU, not the stub's fixed 0.9.
        assert stub[form]["answer_score"] == 0.9 and row["answer_score"] != 0.9, (form, row)
        assert row["engine_cached_click_ms"] > 0 and row["further_click_ms"] > 0
        assert row["http_over_engine"] == row["further_click_ms"] / row["engine_cached_click_ms"]
    assert behind["brush"]["answer_iou"] == 1.0 and behind["bitmask"]["answer_iou"] == 1.0
    assert 0.6 < behind["polygon"]["answer_iou"] < 1.0  # the holes' polygons, simplified
    assert {row["form"] for row in report["real"]} == {"brush", "bitmask", "polygon"}
    # every server's worker was found and read: its peak memory holds at least the model it serves
    assert set(report["worker_peak_rss_mb"]) == {"shaped", "shaped_sam", "real"}
    assert all(mb > 100 for mb in report["worker_peak_rss_mb"].values()), report["worker_peak_rss_mb"]
