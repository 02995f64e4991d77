"""``python -m benchmarks.prediction_score``: does the trimap prediction's score order tasks by how right they are?

A trimap model is fitted on a few synthetic ``shapes`` images (as a project's first version is),
then predicts held-out images with ground truth: images of the same kind, and the same number of
the ``muted`` kind it never saw (a project whose images drift). For each image: the mask the
backend would send (foreground plus boundary), its IoU with the truth, and three scores:

* ``expected_iou``: what the backend sends (:func:`training.predict.expected_iou`);
* ``mean_confidence``: the mean max-probability over the mask's pixels, for comparison;
* ``constant``: 1.0 for every mask, what the backend sent before (no order at all).

It reports Spearman's rank correlation between each score and the IoU (target for the backend's
score: at least 0.5), on the same-kind images and on both kinds together.
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

SCORES = ("expected_iou", "mean_confidence", "constant")


@dataclass(frozen=True)
class ScoreConfig:
    image_size: int = 16  # small: the model costs ~0.05 s per image and step at 16 px on a shared 2-core CPU
    train_images: int = 48
    test_images: int = 40  # per kind
    epochs: int = 10
    seed: int = 0

    @classmethod
    def quick(cls) -> "ScoreConfig":
        return cls(image_size=16, train_images=10, test_images=6, epochs=1)


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


def score_rows(model, pairs) -> list[dict[str, float]]:
    """IoU and every score of each pair's predicted object mask (foreground plus boundary)."""
    from training.data import load_image, load_trimap
    from training.model import BOUNDARY, FOREGROUND
    from training.predict import predict_object

    rows = []
    for pair in pairs:
        image, truth = load_image(pair.image), load_trimap(pair.trimap)
        predicted = predict_object(model, image, include_boundary=True)
        probabilities = predicted.probabilities
        confidence = probabilities.max(axis=-1)[predicted.mask].mean() if predicted.mask.any() else 0.0
        rows.append({"iou": _mask_iou(predicted.mask, (truth == FOREGROUND) | (truth == BOUNDARY)),
                     "expected_iou": predicted.score, "mean_confidence": float(confidence), "constant": 1.0})
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
    # A project's first version, fitted as a training job fits it (the small-data budget: 60 steps).
    report = fit(workdir / "train", workdir / "store", epochs=config.epochs, image_size=config.image_size,
                 seed=config.seed, verbose=0, workers=1)
    model = ModelStore(workdir / "store").load_model(report.version_id)
    same = score_rows(model, scan_dataset(workdir / "same").pairs)
    other = score_rows(model, scan_dataset(workdir / "other").pairs)
    return {
        "config": asdict(config),
        "model_val_foreground_iou": report.val_foreground_iou,
        "same_kind": {"images": len(same), "mean_iou": float(np.mean([r["iou"] for r in same])),
                      "spearman": correlations(same)},
        "both_kinds": {"images": len(same + other), "mean_iou": float(np.mean([r["iou"] for r in same + other])),
                       "spearman": correlations(same + other)},
    }


def format_report(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [f"trimap model fitted on {config['train_images']} 'shapes' images at {config['image_size']} px, "
             f"{config['epochs']} epochs (validation IoU {result['model_val_foreground_iou']:.3f})",
             "Spearman rank correlation between score and mask IoU (target for expected_iou: >= 0.5)",
             f"{'held-out set':<28} | " + " | ".join(f"{name:>15}" for name in SCORES)]
    for key, title in (("same_kind", "same kind"), ("both_kinds", "same + unseen 'muted' kind")):
        part = result[key]
        label = f"{title} ({part['images']}, IoU {part['mean_iou']:.2f})"
        lines.append(f"{label:<28} | " + " | ".join(f"{part['spearman'][name]:>15.3f}" for name in SCORES))
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
