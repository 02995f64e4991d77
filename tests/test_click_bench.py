"""A smoke run of the HTTP click bench (small sizes): every form and shape answered over HTTP by the
backend under gunicorn, read back as the shape it was given, and the per-stage table filled."""

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
