"""``python -m benchmarks.prediction_score``: does the trimap prediction's score order tasks by how right they are?

A trimap model is fitted on a few synthetic ``shapes`` images (as a project's first version is),
then predicts held-out images with ground truth: images of the same kind, and the same number of
the ``muted`` kind it never saw (a project whose images drift). For each image: the mask the
backend would send (foreground plus boundary), its IoU with the truth, and candidate scores:

* ``edge_confidence``: what the backend sends (:func:`training.predict.edge_confidence`): the mean
  max-probability over the pixels along the mask's edge (both sides), where a model hesitates first;
* ``expected_iou``: ``sum(p in mask) / (|mask| + sum(p outside))`` from the per-pixel object
  probability p: the IoU expected if each pixel were the object with probability p, independently;
* ``mean_confidence``: the mean max-probability over the mask's pixels;
* ``confident_share``: the share of all pixels whose max-probability is at least 0.9;
* ``flip_agreement``: the IoU between the mask and the mask predicted on the mirrored image
  (mirrored back): a second opinion from the same model;
* ``agreement_x_expected``: ``flip_agreement × expected_iou``;
* ``constant``: 1.0 for every mask, what the backend sent before (no order at all).

It reports Spearman's rank correlation between each score and the IoU (target for the backend's
score, :func:`training.predict.prediction_score`: at least 0.5), on the same-kind images and on
both kinds together. Small by design (32 px images and model input) so that it runs in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCORES = ("edge_confidence", "expected_iou", "mean_confidence", "confident_share", "flip_agreement",
          "agreement_x_expected", "constant")
CONFIDENT = 0.9


@dataclass(frozen=True)
class ScoreConfig:
    image_size: int = 32
    width: int = 64  # the served model's filters; narrower runs faster but learns too little
    batch_size: int = 4
    train_images: int = 48
    test_images: int = 40  # per kind
    epochs: int = 10
    seed: int = 0

    @classmethod
    def quick(cls) -> "ScoreConfig":
        return cls(image_size=16, width=8, batch_size=2, train_images=10, test_images=6, epochs=1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as ``scipy.stats.rankdata``; scipy is not a dependency)."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="mergesort")] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; 0 when either side is constant (no order to agree with)."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(predicted | truth)
    return np.count_nonzero(predicted & truth) / union if union else 1.0


def expected_iou(object_probability: np.ndarray, mask: np.ndarray) -> float:
    """``sum(p over the mask) / (|mask| + sum(p outside))``; 0 for an empty mask."""
    inside = mask.astype(bool)
    area = int(np.count_nonzero(inside))
    if area == 0:
        return 0.0
    p = np.asarray(object_probability, dtype=np.float64)
    return float(np.clip(p[inside].sum() / (area + float(p[~inside].sum())), 0.0, 1.0))


def score_rows(model, pairs) -> list[dict[str, float]]:
    """IoU and every score of each pair's predicted object mask (foreground plus boundary)."""
    from training.data import load_image, load_trimap
    from training.model import BOUNDARY, FOREGROUND
    from training.predict import predict_object

    rows = []
    for pair in pairs:
        image, truth = load_image(pair.image), load_trimap(pair.trimap)
        predicted = predict_object(model, image, include_boundary=True)
        mirrored = predict_object(model, np.ascontiguousarray(image[:, ::-1]), include_boundary=True).mask[:, ::-1]
        probs = predicted.probabilities
        confidence = probs.max(axis=-1)
        mask = predicted.mask
        agreement = _mask_iou(mask, mirrored) if mask.any() else 0.0
        expected = expected_iou(probs[..., FOREGROUND] + probs[..., BOUNDARY], mask)
        rows.append({
            "iou": _mask_iou(mask, (truth == FOREGROUND) | (truth == BOUNDARY)),
            "edge_confidence": predicted.score,
            "expected_iou": expected,
            "mean_confidence": float(confidence[mask].mean()) if mask.any() else 0.0,
            "confident_share": float((confidence >= CONFIDENT).mean()),
            "flip_agreement": agreement,
            "agreement_x_expected": agreement * expected,
            "constant": 1.0,
        })
    return rows


def correlations(rows: list[dict[str, float]]) -> dict[str, float]:
    iou = np.array([r["iou"] for r in rows])
    return {name: spearman(np.array([r[name] for r in rows]), iou) for name in SCORES}


def run(config: ScoreConfig, workdir: Path) -> dict[str, Any]:
    from training.data import scan_dataset
    from training.fit import fit
    from training.store import ModelStore
    from training.synthetic import write_synthetic

    import keras

    write_synthetic(workdir / "train", config.train_images, config.image_size, seed=config.seed + 1)
    write_synthetic(workdir / "same", config.test_images, config.image_size, seed=config.seed + 2)
    write_synthetic(workdir / "other", config.test_images, config.image_size, seed=config.seed + 3, kind="muted")
    keras.utils.set_random_seed(config.seed)
    # A project's first version, fitted as a training job fits it (the small-data step budget).
    report = fit(workdir / "train", workdir / "store", epochs=config.epochs, image_size=config.image_size,
                 batch_size=config.batch_size, width=config.width, seed=config.seed, verbose=0, workers=1)
    model = ModelStore(workdir / "store").load_model(report.version_id)
    same = score_rows(model, scan_dataset(workdir / "same").pairs)
    other = score_rows(model, scan_dataset(workdir / "other").pairs)
    return {
        "config": asdict(config),
        "model_val_foreground_iou": report.val_foreground_iou,
        "same_kind": {"images": len(same), "mean_iou": float(np.mean([r["iou"] for r in same])),
                      "spearman": correlations(same), "rows": same},
        "both_kinds": {"images": len(same + other), "mean_iou": float(np.mean([r["iou"] for r in same + other])),
                       "spearman": correlations(same + other), "muted_rows": other},
    }


def format_report(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [f"trimap model (width {config['width']}) fitted on {config['train_images']} 'shapes' images at "
             f"{config['image_size']} px, "
             f"{config['epochs']} epochs (validation IoU {result['model_val_foreground_iou']:.3f})",
             "Spearman rank correlation between score and mask IoU (target: >= 0.5)",
             f"{'held-out set':<28} | " + " | ".join(f"{name:>20}" for name in SCORES)]
    for key, title in (("same_kind", "same kind"), ("both_kinds", "same + unseen 'muted' kind")):
        part = result[key]
        label = f"{title} ({part['images']}, IoU {part['mean_iou']:.2f})"
        lines.append(f"{label:<28} | " + " | ".join(f"{part['spearman'][name]:>20.3f}" for name in SCORES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prediction_score",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = ScoreConfig.quick() if args.quick else ScoreConfig()
    config = ScoreConfig(**{**asdict(config), "seed": args.seed})
    with tempfile.TemporaryDirectory(prefix="prediction-score-") as tmp:
        result = run(config, Path(tmp))
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
