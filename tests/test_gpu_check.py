"""scripts/gpu_check.sh runs on a machine without CUDA: CPU rows measured (the click bench over HTTP and the
session bench among them), CUDA rows named as skipped."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this test checks the CPU fallback; run the script on a GPU")
@pytest.mark.ci_may_skip("hardware: on a GPU machine the CPU fallback is not what runs")
def test_gpu_check_script_runs_on_cpu_and_names_what_it_skipped(tmp_path) -> None:
    report_file = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick", "--json", str(report_file)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = done.stdout
    assert "no CUDA: CPU rows only" in table
    assert "parity float32" in table and "ok" in table.split("parity float32", 1)[1].splitlines()[0]
    assert "parity float16 (SAM_HALF): needs CUDA" in table and "sam bench huge: needs CUDA" in table
    report = json.loads(report_file.read_text())
    parity = report["rows"]["parity float32"]
    assert parity["worst_mask_iou"] >= 0.99 and parity["worst_score_difference"] <= 1e-3
    bench = report["rows"]["sam bench (cpu)"]
    assert bench["parity"]["mask_iou"] >= 0.99 and all(v > 0 for v in bench["median"].values())
    click = report["rows"]["click bench"]
    assert {row["form"] for row in click["real"]} == {"brush", "bitmask", "polygon"}
    assert all(row["further_click_ms"] > 0 and row["engine_cached_click_ms"] > 0 for row in click["real"])
    assert {(row["shape"], row["form"]) for row in click["shaped"]} == {("blob", f) for f in ("brush", "bitmask", "polygon")}
    assert "click bench" in table and "slowest shaped answer" in table
    session = report["rows"]["session bench"]
    assert session["preencode_on"]["further_click_p50_s"] > 0 and session["preencode_off"]["first_click_p50_s"] > 0
    assert "session bench" in table
