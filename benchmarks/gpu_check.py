"""``python -m benchmarks.gpu_check``: the checks a GPU machine must pass, as one table.

Run by ``scripts/gpu_check.sh``. On a CUDA machine it runs, on the GPU:

* parity with the official ``SamPredictor`` (seeded random weights, same checkpoint) in
  float32 and in float16 (``SAM_HALF``): mask IoU and score difference over several
  prompts (one click, positive + negative clicks, a box, box + click) on a landscape
  and a portrait image;
* the SAM bench (``benchmarks.sam``) for base (vit_b) and huge (vit_h) shapes;
* the click bench (``benchmarks.click``): clicks over HTTP against the backend under gunicorn for
  the three result forms, beside the engine's cached click (on a photo, and on shaped masks behind
  SAM's decoder), and the answer path per stage;
* the session bench (``benchmarks.session``): annotators going through a project, pre-encoding on
  and off, so the first GPU machine records the whole click, not only the engine.

Without CUDA it runs the same parity rows and benches on the CPU with a small model
and says which rows were skipped for want of a GPU, so the script itself is tested
everywhere. The figures are printed, not asserted: a parity row below its threshold
is marked FAILED and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

MIN_IOU = {"float32": 0.99, "float16": 0.95}
PARITY_SIZES = ((300, 460), (520, 340))  # (height, width): landscape and portrait


def _prompt_cases(height: int, width: int) -> dict[str, dict]:
    box = (width * 0.2, height * 0.25, width * 0.75, height * 0.8)
    return {
        "one click": {"points": [(width * 0.45, height * 0.55)], "labels": [1]},
        "pos + neg clicks": {"points": [(width * 0.45, height * 0.55), (width * 0.7, height * 0.3)], "labels": [1, 0]},
        "box": {"box": box},
        "box + click": {"points": [(width * 0.5, height * 0.5)], "labels": [1], "box": box},
    }


def parity(device: str, half: bool, *, quick: bool) -> dict:
    """Our engine against the official predictor on ``device``: worst IoU and score difference."""
    import keras

    from benchmarks.official_sam import random_official_sam, save_official_checkpoint, segment_anything_module
    from benchmarks.sam import base_architecture, quick_architecture, synthetic_image
    from ml_backend.sam import Prompts, SamEngine, load_segmenter

    arch = quick_architecture() if quick else base_architecture()
    dtype = "float16" if half else "float32"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        official = random_official_sam(arch, seed=0)
        checkpoint = save_official_checkpoint(official, Path(tmp) / "sam.pth")
        with keras.device(device):
            segmenter = load_segmenter(str(checkpoint), converted_root=Path(tmp) / "presets",
                                       dtype=dtype if half else None)
        engine = SamEngine(segmenter, device=device)
        official = official.to(device)
        if half:
            official = official.half()
        predictor = segment_anything_module().SamPredictor(official)
        worst_iou, worst_score = 1.0, 0.0
        for height, width in PARITY_SIZES:
            image = synthetic_image(height, width, seed=height)
            predictor.set_image(image)
            for case in _prompt_cases(height, width).values():
                ours = engine.segment(image, Prompts.from_lists(**case))
                points = np.array(case["points"], np.float32) if "points" in case else None
                labels = np.array(case["labels"]) if "labels" in case else None
                box = np.array(case["box"], np.float32) if "box" in case else None
                single_click = points is not None and box is None and len(points) == 1
                masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                                     multimask_output=single_click)
                best = int(np.argmax(scores)) if single_click else 0
                inter = np.logical_and(ours.mask, masks[best]).sum()
                union = max(1, np.logical_or(ours.mask, masks[best]).sum())
                worst_iou = min(worst_iou, float(inter / union))
                worst_score = max(worst_score, abs(ours.score - float(scores[best])))
    return {"device": device, "dtype": dtype, "model": "quick" if quick else "base (vit_b shapes)",
            "worst_mask_iou": worst_iou, "worst_score_difference": worst_score,
            "passed": worst_iou >= MIN_IOU[dtype]}


def huge_architecture():
    """vit_h shapes: 32 blocks of width 1280, 16 heads, global attention at 7, 15, 23, 31."""
    from benchmarks.sam import base_architecture

    return replace(base_architecture(), encoder_dim=1280, encoder_depth=32, encoder_num_heads=16,
                   encoder_mlp_dim=5120, global_attention_indices=(7, 15, 23, 31))


def run(quick: bool) -> dict:
    from benchmarks import click, sam, session
    from ml_backend.gunicorn_hooks import huge_page_tensors

    huge_page_tensors()  # as benchmarks.click's main does: its engine click allocates as the servers' workers do

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows: dict[str, dict] = {}
    skipped: list[str] = []
    rows["parity float32"] = parity(device, False, quick=quick or not cuda)
    if cuda:
        rows["parity float16 (SAM_HALF)"] = parity(device, True, quick=quick)
        rows["sam bench base"] = sam.run_bench(quick=quick, device=device)
        rows["sam bench huge"] = sam.run_bench(quick=quick, device=device,
                                               arch=None if quick else huge_architecture())
    else:
        skipped += ["parity float16 (SAM_HALF): needs CUDA", "sam bench huge: needs CUDA"]
        rows["sam bench (cpu)"] = sam.run_bench(quick=True, device="cpu", repeats=1)
    small = quick or not cuda
    rows["click bench"] = click.run_http(
        quick=small, clicks=2 if small else 5, sizes=click.QUICK_SIZES if small else click.SIZES,
        shapes=("blob",) if small else ("blob", "thin", "holes"), forms=tuple(click.FORMS), repeat=2 if small else 7,
        device=device)
    rows["session bench"] = session.run(argparse.Namespace(
        images=2 if small else 6, annotators=1, pause=0.5 if small else 3.0, clicks=1 if small else 3,
        click_gap=0.2 if small else 1.0, think=0.5 if small else 5.0, lookahead=3, two_workers_images=0,
        quick=small, device=device))
    return {"cuda": cuda, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "rows": rows, "skipped": skipped}


def format_table(report: dict) -> str:
    lines = [f"GPU check on {report['device_name']}" + ("" if report["cuda"] else " (no CUDA: CPU rows only)"),
             f"{'check':32s} {'result':70s}"]
    for name, row in report["rows"].items():
        if name.startswith("parity"):
            text = (f"{row['model']}, {row['dtype']}: worst mask IoU {row['worst_mask_iou']:.5f}, "
                    f"worst score diff {row['worst_score_difference']:.2e} "
                    f"{'ok' if row['passed'] else 'FAILED'}")
        elif name.startswith("sam bench"):
            med = row["median"]
            text = (f"{row['config']['model']} {row['config']['dtype']}: first {med['first_click_s']:.3f} s "
                    f"(official {med['reference_first_click_s']:.3f}), cached {med['cached_click_s'] * 1000:.1f} ms "
                    f"(official 3 masks {med['reference_predict_multimask_s'] * 1000:.1f}, 1 mask "
                    f"{med['reference_predict_single_s'] * 1000:.1f}), decoder {med['decoder_s'] * 1000:.1f} ms "
                    f"(official {med['reference_decoder_s'] * 1000:.1f})")
        elif name == "click bench":
            text = "; ".join(f"{r['model']} {r['size']} {r['form']}: HTTP {r['further_click_ms']:.1f} ms, engine "
                             f"{r['engine_cached_click_ms']:.1f} ms (x{r['http_over_engine']:.2f})" for r in row["real"])
            worst = max(row["shaped"], key=lambda r: r["further_click_ms"])
            text += (f"; slowest shaped answer (stub engine): {worst['size']} {worst['shape']} {worst['form']} "
                     f"{worst['further_click_ms']:.1f} ms")
            if row["shaped_sam"]:
                behind = max(row["shaped_sam"], key=lambda r: r["http_over_engine"])
                text += (f"; shapes behind SAM's decoder, farthest from the engine: {behind['size']} {behind['shape']} "
                         f"{behind['form']} HTTP {behind['further_click_ms']:.1f} ms, engine "
                         f"{behind['engine_cached_click_ms']:.1f} ms (x{behind['http_over_engine']:.2f})")
        else:
            on, off = row["preencode_on"], row["preencode_off"]
            text = (f"{row['model']}, {row['images']} images of {row['size']}: first click p50 "
                    f"{on['first_click_p50_s']:.3f} s pre-encoded ({off['first_click_p50_s']:.3f} s without), "
                    f"further click p50 {on['further_click_p50_s'] * 1000:.1f} ms, "
                    f"{on['first_clicks_ready']:.0%} of first clicks ready")
        lines.append(f"{name:32s} {text}")
    lines += [f"{'skipped':32s} {reason}" for reason in report["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and images everywhere (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the whole report to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    report = run(args.quick)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(row["passed"] for name, row in report["rows"].items() if name.startswith("parity")) else 1


if __name__ == "__main__":
    sys.exit(main())
