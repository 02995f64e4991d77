"""``PREANNOTATE=trimap``, ``sam3`` and ``both`` side by side on a labeled data set: how well each one's regions
cover the ground-truth foreground.

Run on your own data (an Oxford-IIIT Pets layout: ``images/`` and ``annotations/trimaps/``, e.g. a project's
accepted annotations written by ``python -m ml_backend export-dataset``), your project's trimap models and a
SAM 3 model, to choose the mode::

    python -m benchmarks.preannotate_modes --data data/project-3 --model-dir models --project 3 \\
        --sam3 /models/sam3 --label Cat [--limit 100] [--json]

or with no data (``--synthetic``): synthetic shapes, a trimap model fitted on them for a few epochs and a tiny
random SAM 3 (test extra: transformers). That run measures the rule's mechanics only — random SAM 3 weights find
no real concept — not which mode to choose.

Every image goes through the code the backend serves (:class:`ml_backend.sam3.preannotate.ConceptPreannotator`
and the trimap predictor), the prediction's regions are decoded back from their brush RLE, and their union is
compared with the ground truth's foreground pixels (Oxford-Pets trimap value 1): mean foreground IoU, images
with no region, regions per image and seconds per image. SAM 3 runs once per image and serves both ``sam3`` and
``both`` (``both`` only adds the trimap filter), so the seconds are of the filtering, not of SAM 3 twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("trimap", "sam3", "both")


def _label_config(label: str) -> str:
    from xml.sax.saxutils import quoteattr

    return (f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
            f'<Label value={quoteattr(label)}/></BrushLabels></View>')


def _union(prediction: dict, height: int, width: int) -> np.ndarray:
    from ml_backend.brush import decode_rle

    union = np.zeros((height, width), bool)
    for region in prediction["result"]:
        union |= decode_rle(region["value"]["rle"], height, width) > 0
    return union


def _iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(predicted | truth)
    return np.count_nonzero(predicted & truth) / union if union else 1.0


class _OnceEngine:
    """The SAM 3 engine, answering ``sam3`` and ``both`` for one image from one run (``new_image`` between)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._answer: list | None = None
        self.seconds = 0.0

    def new_image(self) -> None:
        self._answer = None

    def segment(self, image: np.ndarray, phrases: list[str], **kwargs):
        if self._answer is None:
            started = time.perf_counter()
            self._answer = self.engine.segment(image, phrases, **kwargs)
            self.seconds += time.perf_counter() - started
        return self._answer


def measure(data: Path, model_dir: Path, project: int | None, sam3_source: str, label: str, limit: int | None,
            *, threshold: float | None = None, device: str = "auto") -> list[dict]:
    """One row per mode over the data set's first ``limit`` images."""
    from ml_backend.labeling import parse_label_config
    from ml_backend.preannotation import TrimapPredictor
    from ml_backend.sam3.loading import load_sam3_engine
    from ml_backend.sam3.preannotate import ConceptPreannotator
    from ml_backend.settings import Settings
    from training.data import find_pairs, load_image, load_trimap
    from training.model import FOREGROUND

    pairs = find_pairs(data).pairs[:limit]
    if not pairs:
        raise SystemExit(f"{data}: no image/trimap pairs (expected images/ and annotations/trimaps/)")
    settings = Settings.from_env({"SAM3_MODEL": sam3_source, "PREANNOTATE": "both"})
    if threshold is not None:
        settings = dataclasses.replace(settings, sam3_score_threshold=threshold)
    trimaps = TrimapPredictor(model_dir, None, min_area=settings.min_mask_area)
    if trimaps.current_version(project) is None:
        raise SystemExit(f"{model_dir}: no trimap model serves project {project}")
    engine = _OnceEngine(load_sam3_engine(sam3_source, device=device))
    label_config = _label_config(label)
    config = parse_label_config(label_config)
    concepts = {mode: ConceptPreannotator(dataclasses.replace(settings, preannotate=mode), lambda: engine)
                for mode in ("sam3", "both")}
    totals = {mode: {"iou": [], "regions": [], "seconds": 0.0} for mode in MODES}
    for pair in pairs:
        image = load_image(pair.image)
        truth = load_trimap(pair.trimap) == FOREGROUND
        engine.new_image()
        height, width = truth.shape
        started = time.perf_counter()
        predicted = trimaps.predict_mask(image, include_boundary=settings.trimap_include_boundary, project=project)
        trimap_seconds = time.perf_counter() - started
        version, mask, trimap_score = predicted
        foreground = mask if mask is not None else np.zeros((height, width), bool)
        totals["trimap"]["iou"].append(_iou(foreground, truth))
        totals["trimap"]["regions"].append(int(foreground.any()))
        totals["trimap"]["seconds"] += trimap_seconds
        sam3_seconds = 0.0
        for mode, preannotator in concepts.items():  # "sam3" first: it pays for SAM 3, "both" reuses its answer
            before = engine.seconds
            started = time.perf_counter()
            prediction = preannotator.predict(image, label_config, config,
                                              (version, foreground, trimap_score) if mode == "both" else None, trimap_label=label)
            elapsed = time.perf_counter() - started
            sam3_seconds += engine.seconds - before
            extra = trimap_seconds + sam3_seconds if mode == "both" else 0.0  # what serving "both" would run
            totals[mode]["seconds"] += elapsed + extra
            totals[mode]["iou"].append(_iou(_union(prediction, height, width), truth))
            totals[mode]["regions"].append(len(prediction["result"]))
    return [{"mode": mode, "images": len(pairs), "mean_foreground_iou": float(np.mean(t["iou"])),
             "images_without_region": int(sum(r == 0 for r in t["regions"])),
             "regions_per_image": float(np.mean(t["regions"])), "seconds_per_image": t["seconds"] / len(pairs)}
            for mode, t in totals.items()]


def synthetic_setup(workdir: Path, *, count: int, size: int, epochs: int) -> tuple[Path, Path, int, str]:
    """Synthetic shapes, a trimap model fitted on them (project 1) and a tiny random SAM 3 checkpoint."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sam3_factory import save_tiny_checkpoint

    from training.fit import fit
    from training.layout import project_store_dir
    from training.store import ModelStore
    from training.synthetic import write_synthetic

    data, model_dir = workdir / "data", workdir / "models"
    write_synthetic(data, count, size=size, seed=0)
    store_dir = project_store_dir(model_dir, 1)
    report = fit(data, store_dir, epochs=epochs, image_size=size, batch_size=8, verbose=0)
    if not report.promoted:  # a few epochs may not beat the promotion baselines: serve it anyway
        ModelStore(store_dir).promote(report.version_id)
    checkpoint = save_tiny_checkpoint(workdir / "sam3-tiny", weight_scale=3.0, image_size=112)
    return data, model_dir, 1, str(checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preannotate_modes",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="data set in the Oxford-IIIT Pets layout")
    parser.add_argument("--model-dir", type=Path, help="the backend's MODEL_DIR (trimap versions)")
    parser.add_argument("--project", type=int, help="the project whose trimap model serves (default: BASE_MODEL)")
    parser.add_argument("--sam3", help="SAM3_MODEL: sam3_pcs or a local directory")
    parser.add_argument("--label", default="Pet", help="the mask label (its name is SAM 3's phrase)")
    parser.add_argument("--threshold", type=float, help="SAM3_SCORE_THRESHOLD (default: the setting's)")
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data, a quickly fitted trimap model "
                        "and a random SAM 3: the rule's mechanics, not a choice of mode")
    parser.add_argument("--quick", action="store_true", help="with --synthetic: fewer, smaller images")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import ml_backend  # noqa: F401  (torch backend before keras)

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            count, size, epochs = (12, 64, 2) if args.quick else (48, 64, 25)
            data, model_dir, project, sam3 = synthetic_setup(Path(tmp), count=count, size=size, epochs=epochs)
            threshold = 0.2 if args.threshold is None else args.threshold
        elif args.data and args.model_dir and args.sam3:
            data, model_dir, project, sam3, threshold = args.data, args.model_dir, args.project, args.sam3, \
                args.threshold
        else:
            parser.error("give --data, --model-dir and --sam3 (or --synthetic)")
        rows = measure(data, model_dir, project, sam3, args.label, args.limit, threshold=threshold,
                       device=args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'mode':7} {'images':>6} {'mean fg IoU':>11} {'no region':>9} {'regions/img':>11} {'s/img':>7}")
        for r in rows:
            print(f"{r['mode']:7} {r['images']:>6} {r['mean_foreground_iou']:>11.3f} {r['images_without_region']:>9}"
                  f" {r['regions_per_image']:>11.2f} {r['seconds_per_image']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
