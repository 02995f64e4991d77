"""Benchmark: our SAM clicks against the official ``SamPredictor`` on the same weights, image and prompt.

``python -m benchmarks.sam [--quick] [--json]``. A SAM with seeded random
weights (base-size vit_b shapes by default; ``--quick``: a small model) is saved as
an official checkpoint, loaded through our loader (which converts it), and both
pipelines segment one synthetic image (4000x3000 by default) from one positive click.
Like is compared with like:

* first click: our hash + encode + decode of an image not seen before, against the
  official ``set_image`` + ``predict`` (multimask, as SAM answers one click);
* cached click: our ``decode`` against an embedding already computed, against the
  official ``predict`` on its already set image, both with ``multimask_output=True``
  (three masks upsampled; the best kept, as we keep it) and ``False`` (one mask);
* decoder: the prompt encoder + mask decoder alone on both sides (no upsampling);
* hashing: our pixel-content cache key, reported on its own (the backend skips it on
  further clicks by remembering the URL's key).

Each figure is the median of several runs, interleaved so that load from other
processes hits both sides alike, with process CPU time beside wall time. The masks of
both sides are compared too (IoU and score difference).
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

# (ratio name, numerator phase, denominator phase, comparison, target)
TARGETS = (
    ("first_vs_reference", "first_click_s", "reference_first_click_s", "<=", 1.1),
    ("cached_vs_reference_multimask", "cached_click_s", "reference_predict_multimask_s", "<=", 0.6),
    ("cached_vs_reference_single", "cached_click_s", "reference_predict_single_s", "<=", 1.0),
    ("decoder_vs_reference", "decoder_s", "reference_decoder_s", "<=", 1.2),
    ("cached_speedup", "first_click_s", "cached_click_s", ">=", 50.0),
)


def base_architecture() -> SamArchitecture:
    """The official vit_b configuration, read from the official builder on the meta device (no weights)."""
    from benchmarks.official_sam import segment_anything_module

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


PHASES = (
    "first_click_s",
    "reference_first_click_s",
    "cached_click_s",
    "reference_predict_multimask_s",
    "reference_predict_single_s",
    "decoder_s",
    "reference_decoder_s",
    "hash_s",
)
LABELS = {
    "first_click_s": "first click (hash + encode + decode)",
    "reference_first_click_s": "official set_image + predict",
    "cached_click_s": "cached click (decode + upsample)",
    "reference_predict_multimask_s": "official predict, 3 masks",
    "reference_predict_single_s": "official predict, 1 mask",
    "decoder_s": "decoder only",
    "reference_decoder_s": "official decoder only",
    "hash_s": "pixel hash (first click only)",
}


def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall-clock and process CPU seconds of ``fn()``, and its result.

    CPU time is reported beside wall time because a shared machine inflates wall time
    unevenly; on an idle CPU-only machine the two give the same ratios.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_bench(
    quick: bool = False, repeats: int | None = None, device: str | None = None, threads: int | None = None,
    arch: SamArchitecture | None = None, half: bool = False,
) -> dict:
    """Measure both pipelines side by side; return the figures, ratios and targets.

    ``threads`` sets torch's intra-op threads for both sides; ``arch`` overrides the
    architecture (e.g. vit_h shapes); ``half`` runs both sides in float16 (GPU only).
    """
    from keras import ops

    from benchmarks.official_sam import random_official_sam, save_official_checkpoint, segment_anything_module
    from ml_backend.sam import Prompts, SamEngine, load_segmenter
    from ml_backend.sam.decoder import PROMPT_KEYS
    from ml_backend.sam.engine import image_key

    model = "quick" if quick else ("custom" if arch else "base (vit_b shapes)")
    arch = arch or (quick_architecture() if quick else base_architecture())
    height, width = (480, 640) if quick else (3000, 4000)
    repeats = repeats or (5 if quick else 3)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    click = (width * 0.45, height * 0.55)

    with tempfile.TemporaryDirectory(prefix="sam-bench-") as tmp:
        official = random_official_sam(arch, seed=0)
        checkpoint = save_official_checkpoint(official, Path(tmp) / "sam_random.pth")
        import keras

        with keras.device(device):
            convert_s, _, segmenter = _timed(lambda: load_segmenter(
                str(checkpoint), converted_root=Path(tmp) / "presets", dtype="float16" if half else None))
        params = sum(p.numel() for p in official.parameters())
        engine = SamEngine(segmenter, cache_bytes=2 << 30, device=device)
        official = official.to(device).half() if half else official.to(device)
        predictor = segment_anything_module().SamPredictor(official)

        image = synthetic_image(height, width)
        prompts = Prompts.from_lists(points=[click], labels=[1])
        point_coords, point_labels = np.array([click], np.float32), np.array([1])

        def reference_predict(multimask: bool = True):
            masks, scores, _ = predictor.predict(
                point_coords=point_coords, point_labels=point_labels, multimask_output=multimask)
            best = int(np.argmax(scores))
            return masks[best], float(scores[best])

        def reference_first(img):
            predictor.set_image(img)
            return reference_predict()

        def variant(i: int) -> np.ndarray:  # a new image for each first click (new content hash)
            img = image.copy()
            img[0, 0, 0] ^= np.uint8(i + 1)
            return img

        # The decoder alone, on both sides, from the same prompt.
        def our_decoder(embedding):
            inputs = engine._prompt_inputs(embedding.geometry, prompts)
            with torch.no_grad(), engine._device_scope():
                tensors = {key: ops.convert_to_tensor(inputs[key]) for key in PROMPT_KEYS}
                return engine._decoder(embedding.features, tensors)

        def reference_decoder():
            coords = predictor.transform.apply_coords(point_coords, predictor.original_size)
            points = (torch.as_tensor(coords, device=predictor.device)[None],
                      torch.as_tensor(point_labels, device=predictor.device)[None])
            with torch.no_grad():
                sparse, dense = official.prompt_encoder(points=points, boxes=None, masks=None)
                return official.mask_decoder(
                    image_embeddings=predictor.features, image_pe=official.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)

        # Warm-up: lazy initialisation (and our decoder's trace) must not count as a click.
        engine.segment(variant(100), prompts)
        reference_first(variant(100))

        wall: dict[str, list[float]] = {phase: [] for phase in PHASES}
        cpu: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for i in range(repeats):
            img = variant(i)
            state: dict = {}

            runs = (
                ("first_click_s", lambda: engine.segment(img, prompts)),
                ("reference_first_click_s", lambda: reference_first(img)),
                ("cached_click_s", lambda: engine.decode(state["embedding"], prompts)),
                ("reference_predict_multimask_s", lambda: reference_predict(True)),
                ("reference_predict_single_s", lambda: reference_predict(False)),
                ("decoder_s", lambda: our_decoder(state["embedding"])),
                ("reference_decoder_s", reference_decoder),
                ("hash_s", lambda: image_key(img)),
            )
            for phase, fn in runs:
                wall_s, cpu_s, result = _timed(fn)
                wall[phase].append(wall_s)
                cpu[phase].append(cpu_s)
                if phase == "first_click_s":
                    state["embedding"] = engine.embed(img)  # a cache hit, outside the timing
                elif phase == "cached_click_s":
                    ours = result
                elif phase == "reference_first_click_s":
                    ref_mask, ref_score = result
            logger.info("run %d: %s", i, {phase: round(wall[phase][-1], 4) for phase in PHASES})

    med = {phase: statistics.median(wall[phase]) for phase in PHASES}
    med_cpu = {phase: statistics.median(cpu[phase]) for phase in PHASES}
    iou = float(np.logical_and(ours.mask, ref_mask).sum() / max(1, np.logical_or(ours.mask, ref_mask).sum()))
    ratios, cpu_ratios = _ratios(med), _ratios(med_cpu)
    return {
        "config": {
            "model": model,
            "parameters": params,
            "image": f"{width}x{height}",
            "device": device,
            "dtype": "float16" if half else "float32",
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
            "architecture": asdict(arch),
        },
        "convert_and_load_s": convert_s,
        "median": med,
        "median_cpu": med_cpu,
        "runs": wall,
        "runs_cpu": cpu,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "targets": {name: f"{op} {target}" for name, _, _, op, target in TARGETS},
        "met": {name: (ratios[name] <= target if op == "<=" else ratios[name] >= target)
                for name, _, _, op, target in TARGETS},
        "parity": {"mask_iou": iou, "score_difference": abs(ours.score - ref_score)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _ratios(med: dict[str, float]) -> dict[str, float]:
    return {name: med[num] / med[den] for name, num, den, _, _ in TARGETS}


def format_report(report: dict) -> str:
    """The figures for humans: wall-clock seconds, with process CPU seconds beside them."""
    cfg, med, cpu, ratios, cpu_ratios, met = (
        report[k] for k in ("config", "median", "median_cpu", "ratios", "cpu_ratios", "met")
    )
    quick = cfg["model"] == "quick"
    lines = [
        f"SAM bench: {cfg['model']}, {cfg['parameters'] / 1e6:.1f} M parameters, {cfg['image']} image, "
        f"{cfg['device']} {cfg['dtype']} ({cfg['torch_threads']} torch threads), median of {cfg['repeats']}",
        f"  {'convert + load checkpoint':40s}{report['convert_and_load_s']:9.3f} s wall",
        f"  {'':40s}{'wall s':>9s} {'cpu s':>9s}",
        *(f"  {LABELS[key]:40s}{med[key]:9.4f} {cpu[key]:9.4f}" for key in PHASES),
        "ratios (targets apply to the default base-size run)" if quick else "ratios",
        f"  {'':40s}{'wall':>9s} {'cpu':>9s}  target",
        *(
            f"  {name:40s}{ratios[name]:9.3f} {cpu_ratios[name]:9.3f}  {op} {target:g}  "
            f"{'ok' if met[name] else 'MISSED'}"
            for name, _, _, op, target in TARGETS
        ),
        f"parity on this click: mask IoU {report['parity']['mask_iou']:.5f}, "
        f"score difference {report['parity']['score_difference']:.2e}",
        f"peak RSS {report['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and a 640x480 image (seconds)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3, quick 5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        report = run_bench(quick=args.quick, repeats=args.repeats, device=args.device, threads=args.threads)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
