"""Benchmark: our SAM clicks against the official ``SamPredictor`` on the same weights, image and prompt.

``python -m ml_backend.sam bench [--quick] [--json]``. A SAM with seeded random
weights (base-size vit_b shapes by default; ``--quick``: a small model) is saved as
an official checkpoint, loaded through our loader (which converts it), and both
pipelines segment one synthetic image (4000x3000 by default) from one positive click:

* first click: our encode + decode of an image not seen before;
* cached click: the same click again (the embedding comes from the cache);
* reference: the official ``set_image`` + ``predict``, and ``predict`` alone.

Each figure is the median of several runs, interleaved so that load from other
processes hits both sides alike. The ratios are printed against the targets; the
masks of both sides are compared too (IoU and score difference).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)
from ml_backend.sam.convert import SamArchitecture, infer_sam_architecture

logger = logging.getLogger(__name__)

TARGET_CACHED_SPEEDUP = 50.0  # first click / cached click, at least
TARGET_FIRST_VS_REFERENCE = 1.1  # our first click / reference set_image + predict, at most
TARGET_CACHED_VS_REFERENCE = 1.2  # our cached click / reference predict, at most


def base_architecture() -> SamArchitecture:
    """The official vit_b configuration, read from the official builder on the meta device (no weights)."""
    from ml_backend.sam.reference import segment_anything_module

    with torch.device("meta"):
        state_dict = segment_anything_module().sam_model_registry["vit_b"]().state_dict()
    return infer_sam_architecture(state_dict)


def quick_architecture() -> SamArchitecture:
    """A small SAM with every official feature (windows with padding, global blocks, full decoder)."""
    return replace(
        base_architecture(),
        image_size=256,
        encoder_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_mlp_dim=512,
        window_size=7,
        global_attention_indices=(1, 3),
    )


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (cheap to make at 12 megapixels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)).copy()


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def run_bench(quick: bool = False, repeats: int | None = None, device: str | None = None) -> dict:
    """Measure both pipelines side by side; return the figures, ratios and targets."""
    from ml_backend.sam import Prompts, SamEngine, load_segmenter
    from ml_backend.sam.reference import (
        random_official_sam,
        save_official_checkpoint,
        segment_anything_module,
    )

    arch = quick_architecture() if quick else base_architecture()
    height, width = (480, 640) if quick else (3000, 4000)
    repeats = repeats or (5 if quick else 3)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    click = (width * 0.45, height * 0.55)

    with tempfile.TemporaryDirectory(prefix="sam-bench-") as tmp:
        official = random_official_sam(arch, seed=0)
        checkpoint = save_official_checkpoint(official, Path(tmp) / "sam_random.pth")
        convert_s, segmenter = _timed(lambda: load_segmenter(str(checkpoint), converted_root=Path(tmp) / "presets"))
        params = sum(p.numel() for p in official.parameters())
        engine = SamEngine(segmenter, cache_bytes=2 << 30, device=device)
        predictor = segment_anything_module().SamPredictor(official.to(device))

        image = synthetic_image(height, width)
        prompts = Prompts.from_lists(points=[click], labels=[1])
        point_coords, point_labels = np.array([click], np.float32), np.array([1])

        def reference_predict():
            masks, scores, _ = predictor.predict(point_coords=point_coords, point_labels=point_labels)
            best = int(np.argmax(scores))
            return masks[best], float(scores[best])

        def reference_full(img):
            predictor.set_image(img)
            return reference_predict()

        def variant(i: int) -> np.ndarray:  # a new image for each first click (new content hash)
            img = image.copy()
            img[0, 0, 0] ^= np.uint8(i + 1)
            return img

        # Warm-up: lazy initialisation on either side must not count as a click.
        engine.segment(variant(100), prompts)
        reference_full(variant(100))

        first, cached, ref_full, ref_predict = [], [], [], []
        for i in range(repeats):
            img = variant(i)
            seconds, ours = _timed(lambda: engine.segment(img, prompts))
            first.append(seconds)
            seconds, ours = _timed(lambda: engine.segment(img, prompts))
            cached.append(seconds)
            seconds, (ref_mask, ref_score) = _timed(lambda: reference_full(img))
            ref_full.append(seconds)
            seconds, _ = _timed(reference_predict)
            ref_predict.append(seconds)
            logger.info("run %d: first %.3fs cached %.4fs reference %.3fs / %.4fs", i, first[-1], cached[-1],
                        ref_full[-1], ref_predict[-1])

    med = {name: statistics.median(values) for name, values in
           (("first_click_s", first), ("cached_click_s", cached),
            ("reference_set_image_predict_s", ref_full), ("reference_predict_s", ref_predict))}
    iou = float(np.logical_and(ours.mask, ref_mask).sum() / max(1, np.logical_or(ours.mask, ref_mask).sum()))
    ratios = {
        "cached_speedup": med["first_click_s"] / med["cached_click_s"],
        "first_vs_reference": med["first_click_s"] / med["reference_set_image_predict_s"],
        "cached_vs_reference": med["cached_click_s"] / med["reference_predict_s"],
    }
    return {
        "config": {
            "model": "quick" if quick else "base (vit_b shapes)",
            "parameters": params,
            "image": f"{width}x{height}",
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
            "architecture": asdict(arch),
        },
        "convert_and_load_s": convert_s,
        "median": med,
        "runs": {"first_click_s": first, "cached_click_s": cached,
                 "reference_set_image_predict_s": ref_full, "reference_predict_s": ref_predict},
        "ratios": ratios,
        "targets": {
            "cached_speedup": f">= {TARGET_CACHED_SPEEDUP}",
            "first_vs_reference": f"<= {TARGET_FIRST_VS_REFERENCE}",
            "cached_vs_reference": f"<= {TARGET_CACHED_VS_REFERENCE}",
        },
        "met": {
            "cached_speedup": ratios["cached_speedup"] >= TARGET_CACHED_SPEEDUP,
            "first_vs_reference": ratios["first_vs_reference"] <= TARGET_FIRST_VS_REFERENCE,
            "cached_vs_reference": ratios["cached_vs_reference"] <= TARGET_CACHED_VS_REFERENCE,
        },
        "parity": {"mask_iou": iou, "score_difference": abs(ours.score - ref_score)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def format_report(report: dict) -> str:
    """The figures for humans."""
    cfg, med, ratios, met = report["config"], report["median"], report["ratios"], report["met"]
    lines = [
        f"SAM bench: {cfg['model']}, {cfg['parameters'] / 1e6:.1f} M parameters, {cfg['image']} image, "
        f"{cfg['device']} ({cfg['torch_threads']} torch threads), median of {cfg['repeats']}",
        f"  convert + load checkpoint        {report['convert_and_load_s']:8.2f} s",
        f"  first click (encode + decode)    {med['first_click_s']:8.3f} s",
        f"  cached click                     {med['cached_click_s'] * 1000:8.1f} ms",
        f"  official set_image + predict     {med['reference_set_image_predict_s']:8.3f} s",
        f"  official predict                 {med['reference_predict_s'] * 1000:8.1f} ms",
        "ratios (targets apply to the default base-size run):" if cfg["model"] == "quick" else "ratios (target):",
        f"  first / cached click             {ratios['cached_speedup']:8.1f}x  (>= {TARGET_CACHED_SPEEDUP:g}x)"
        f"  {'ok' if met['cached_speedup'] else 'MISSED'}",
        f"  first click / official           {ratios['first_vs_reference']:8.3f}   (<= {TARGET_FIRST_VS_REFERENCE})"
        f"  {'ok' if met['first_vs_reference'] else 'MISSED'}",
        f"  cached click / official predict  {ratios['cached_vs_reference']:8.3f}   (<= {TARGET_CACHED_VS_REFERENCE})"
        f"  {'ok' if met['cached_vs_reference'] else 'MISSED'}",
        f"parity on this click: mask IoU {report['parity']['mask_iou']:.5f}, "
        f"score difference {report['parity']['score_difference']:.2e}",
        f"peak RSS {report['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.sam bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and a 640x480 image (seconds)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3, quick 5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        report = run_bench(quick=args.quick, repeats=args.repeats, device=args.device)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
