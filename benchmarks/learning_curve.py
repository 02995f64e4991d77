"""``python -m benchmarks.learning_curve``: the first fits of a project whose images the base model never saw.

A base model is fitted on synthetic ``shapes`` images (a saturated subject on a greyish
background). The project's images are the ``muted`` kind (the reverse), so the base model
fails on them. After 5, 10, 20 and 50 accepted annotations of that kind, each start is fitted
into its own fresh store, in one run on the same data and seed, and its version (promoted or
not) is evaluated on held-out ``muted`` images:

* ``before``: fine-tuning the base model as releases before the small-data rule did (epochs of
  one batch, early stopping on the validation split);
* ``finetune`` and ``scratch``: fine-tuning the base model, or fitting from scratch, each with
  the small-data budget (:mod:`training.selection`);
* ``rule``: what a training job does now (the budget, and the start chosen by cross-validation);
* ``all_fg``: predicting all foreground, for reference.

Targets: ``rule`` at least the better of ``finetune`` and ``scratch`` at every point, and above
``all_fg`` from 10 annotations.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARMS = ("before", "finetune", "scratch", "rule")


@dataclass(frozen=True)
class CurveConfig:
    image_size: int = 16  # small: the model costs ~0.05 s per image and step at 16 px on a shared 2-core CPU
    points: tuple[int, ...] = (5, 10, 20, 50)
    test_images: int = 20
    base_images: int = 60
    base_epochs: int = 6
    epochs: int = 10
    seed: int = 0

    @classmethod
    def quick(cls) -> "CurveConfig":
        return cls(image_size=16, points=(4,), test_images=4, base_images=8, base_epochs=1, epochs=2)


def _fit_arm(arm: str, data: Path, store: Path, base: Path, config: CurveConfig) -> Any:
    from training.fit import fit  # first: selects Keras's torch backend

    import keras

    keras.utils.set_random_seed(config.seed)  # every arm starts from the same random state
    options: dict[str, Any] = {"start": "finetune", "compare_max_train": 0} if arm == "before" else {
        "start": {"finetune": "finetune", "scratch": "scratch", "rule": "auto"}[arm]}
    return fit(data, store, from_version="current", base_model=base, epochs=config.epochs,
               image_size=config.image_size, seed=config.seed, verbose=0, workers=1, **options)


def run(config: CurveConfig, workdir: Path) -> dict[str, Any]:
    """Fit the base model, then every arm at every point; IoU on the held-out project images."""
    from training.fit import evaluate, fit  # first: selects Keras's torch backend
    from training.synthetic import write_synthetic

    import keras

    write_synthetic(workdir / "base-data", config.base_images, config.image_size, seed=config.seed + 1,
                    kind="shapes")
    write_synthetic(workdir / "base-test", config.test_images, config.image_size, seed=config.seed + 2,
                    kind="shapes")
    write_synthetic(workdir / "test", config.test_images, config.image_size, seed=config.seed + 3, kind="muted")
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    base = fit(workdir / "base-data", workdir / "base-store", epochs=config.base_epochs,
               image_size=config.image_size, seed=config.seed, verbose=0, workers=1, compare_max_train=0)
    base_seconds = time.perf_counter() - started
    base_on_own = evaluate(workdir / "base-test", workdir / "base-store", version=base.version_id)
    base_on_project = evaluate(workdir / "test", workdir / "base-store", version=base.version_id)
    rows = []
    for count in config.points:
        # The same seed gives the same first pairs: each point's set holds the previous one's.
        data = workdir / f"project-{count}"
        write_synthetic(data, count, config.image_size, seed=config.seed + 4, kind="muted")
        row: dict[str, Any] = {"annotations": count, "all_fg": base_on_project.all_foreground_iou}
        for arm in ARMS:
            store = workdir / f"store-{count}-{arm}"
            started = time.perf_counter()
            report = _fit_arm(arm, data, store, base.path, config)
            seconds = time.perf_counter() - started
            held_out = evaluate(workdir / "test", store, version=report.version_id)
            row[arm] = held_out.foreground_iou
            row[f"{arm}_detail"] = {"val_foreground_iou": report.val_foreground_iou, "promoted": report.promoted,
                                    "start": report.start, "seconds": round(seconds, 1),
                                    "start_choice": report.start_choice}
        rows.append(row)
        print(_row_text(row), file=sys.stderr, flush=True)
    return {"config": asdict(config), "base": {"iou_on_its_kind": base_on_own.foreground_iou,
                                               "iou_on_project_kind": base_on_project.foreground_iou,
                                               "seconds": round(base_seconds, 1)},
            "rows": rows, "targets": targets(rows)}


def targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether the rule meets the issue's two targets."""
    return {
        "rule_at_least_the_better_start_everywhere": all(
            r["rule"] >= max(r["finetune"], r["scratch"]) - 1e-9 for r in rows),
        "rule_beats_all_foreground_from_10": all(r["rule"] > r["all_fg"] for r in rows if r["annotations"] >= 10),
    }


def _row_text(row: dict[str, Any]) -> str:
    chosen = row["rule_detail"]["start"]
    promoted = "".join("P" if row[f"{arm}_detail"]["promoted"] else "-" for arm in ARMS)
    return (f"{row['annotations']:>4} | " + " | ".join(f"{row[arm]:.3f}" for arm in ARMS)
            + f" | {row['all_fg']:.3f} | {chosen:<8} | {promoted}")


def format_report(result: dict[str, Any]) -> str:
    config, base = result["config"], result["base"]
    lines = [
        f"learning curve at {config['image_size']}x{config['image_size']}, {config['epochs']} epochs, "
        f"held-out project images: {config['test_images']}",
        f"base model: {config['base_images']} 'shapes' images, IoU {base['iou_on_its_kind']:.3f} on its kind, "
        f"{base['iou_on_project_kind']:.3f} on the project's 'muted' kind",
        "foreground IoU on held-out project images",
        "   N | before | finetune | scratch | rule | all_fg | rule chose | promoted (before/ft/scratch/rule)",
        *(_row_text(row) for row in result["rows"]),
        "targets: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in result["targets"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds to minutes): a smoke test")
    parser.add_argument("--image-size", type=int, help="model input size (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the data and stores here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = CurveConfig.quick() if args.quick else CurveConfig()
    overrides = {k: v for k, v in {"image_size": args.image_size, "seed": args.seed}.items() if v is not None}
    config = CurveConfig(**{**asdict(config), **overrides})
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp:
        result = run(config, args.workdir or Path(tmp))
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
