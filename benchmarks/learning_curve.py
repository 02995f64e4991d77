"""``python -m benchmarks.learning_curve``: the first fits of a project whose images the base model never saw.

A base model is fitted on synthetic ``shapes`` images (a saturated subject on a greyish
background). The project's images are the ``muted`` kind (the reverse). After 5, 10, 20 and 50
accepted annotations of that kind, in one run on the same data and seed, each start is fitted and
measured by its foreground IoU on held-out ``muted`` images:

* ``before``: fine-tuning the base model as releases before the small-data rule did (epochs as
  given, early stopping on the validation split);
* ``finetune``, ``decoder``, ``scratch``: fine-tuning the base model, its encoder with a fresh
  decoder, and from scratch, each with the small-data step budget. These are the candidates the
  rule itself fits (:mod:`training.selection`), measured as it fits them (``fit(on_candidate=...)``),
  so the figures compare the rule's choice with each start on the very same models;
* ``rule``: the version the rule kept (by the validation split: the average of the two best
  candidates, or the best alone), loaded from its store as a training job serves it;
* ``all_fg``: predicting all foreground, for reference.

A run repeats all of this for several **draws** (``--draws``, default 6): each draw has its own base
model, project images, held-out images and initial weights (seeds ``--seed``, ``--seed + 5``, ...;
each draw's data uses its seed to seed + 4, so no two draws share images). The learning curve is the
mean over the draws at each point, as learning curves are usually reported: within one draw the
starts' own figures swing by up to 0.6 between fits (a start that learns nothing on one draw is the
best on the next), so one draw's curve ranks fits, not starts.

Targets, on the mean curve: ``rule`` at least the better of ``finetune`` and ``scratch`` at every
point, and above ``all_fg`` from 10 annotations. The report also counts, draw by draw, the points
where each holds. Small by design (32 px images and model input, batch 4) so that a draw runs in
minutes on a CPU; the model is the served one (width 64). ``--jobs`` runs draws side by side in
separate processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ARMS = ("before", "finetune", "decoder", "scratch", "rule")
DRAW_SPACING = 5  # a draw's data is seeded from its seed to seed + 4; the next draw starts after them


@dataclass(frozen=True)
class CurveConfig:
    image_size: int = 32
    width: int = 64  # the served model's filters; narrower runs faster but learns too little in the step budget
    batch_size: int = 4
    points: tuple[int, ...] = (5, 10, 20, 50)
    test_images: int = 20
    base_images: int = 60
    base_epochs: int = 8
    epochs: int = 10
    seed: int = 0

    @classmethod
    def quick(cls) -> "CurveConfig":
        return cls(image_size=16, width=8, batch_size=2, points=(4,), test_images=4, base_images=8, base_epochs=1, epochs=2)


def _point(data: Path, workdir: Path, base: Path, test_pairs: list, config: CurveConfig) -> dict[str, Any]:
    """Every arm at one point: ``before`` as its own fit, the rule's candidates as the rule fits them."""
    from training.evaluation import evaluate_model  # first: selects Keras's torch backend
    from training.fit import fit
    from training.store import ModelStore

    import keras

    common = {"from_version": "current", "base_model": base, "epochs": config.epochs,
              "image_size": config.image_size, "batch_size": config.batch_size, "seed": config.seed,
              "verbose": 0, "workers": 1}
    row: dict[str, Any] = {}
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    before = fit(data, workdir / f"{data.name}-before", start="finetune", compare_max_train=0, **common)
    model = ModelStore(workdir / f"{data.name}-before").load_model(before.version_id)
    row["before"] = evaluate_model(model, test_pairs).foreground_iou
    row["before_detail"] = {"val_foreground_iou": before.val_foreground_iou, "promoted": before.promoted,
                            "seconds": round(time.perf_counter() - started, 1)}

    held_out: dict[str, float] = {}

    def measure(start: str, model: keras.Model) -> None:
        held_out[start] = evaluate_model(model, test_pairs).foreground_iou

    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    rule = fit(data, workdir / f"{data.name}-rule", start="auto", on_candidate=measure, **common)
    row.update(held_out)
    kept = ModelStore(workdir / f"{data.name}-rule").load_model(rule.version_id)  # as served: one fit or an average
    row["rule"] = evaluate_model(kept, test_pairs).foreground_iou
    row["rule_detail"] = {"start": rule.start, "val_foreground_iou": rule.val_foreground_iou,
                          "promoted": rule.promoted, "start_choice": rule.start_choice,
                          "train_count": rule.train_count, "val_count": rule.val_count,
                          "seconds": round(time.perf_counter() - started, 1)}
    return row


def run_draw(config: CurveConfig, workdir: Path) -> dict[str, Any]:
    """One draw: fit the base model, then every arm at every point; IoU on the held-out project images."""
    from training.fit import evaluate, fit  # first: selects Keras's torch backend
    from training.data import scan_dataset
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
               image_size=config.image_size, batch_size=config.batch_size, seed=config.seed, verbose=0,
               workers=1, compare_max_train=0, width=config.width)
    base_seconds = time.perf_counter() - started
    base_on_own = evaluate(workdir / "base-test", workdir / "base-store", version=base.version_id)
    base_on_project = evaluate(workdir / "test", workdir / "base-store", version=base.version_id)
    test_pairs = scan_dataset(workdir / "test").pairs
    rows = []
    for count in config.points:
        # The same seed gives the same first pairs: each point's set holds the previous one's.
        data = workdir / f"project-{count}"
        write_synthetic(data, count, config.image_size, seed=config.seed + 4, kind="muted")
        row = {"annotations": count, "all_fg": base_on_project.all_foreground_iou,
               "base": base_on_project.foreground_iou, **_point(data, workdir, base.path, test_pairs, config)}
        rows.append(row)
        print(f"seed {config.seed}: " + _row_text(row), file=sys.stderr, flush=True)
    return {"seed": config.seed, "base": {"iou_on_its_kind": base_on_own.foreground_iou,
                                          "iou_on_project_kind": base_on_project.foreground_iou,
                                          "seconds": round(base_seconds, 1)},
            "rows": rows, "targets": targets(rows)}


def _draw_in_folder(config: CurveConfig, workdir: Path) -> dict[str, Any]:
    """:func:`run_draw` in its own subfolder (a process pool's unit of work)."""
    folder = workdir / f"draw-{config.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    return run_draw(config, folder)


def run(config: CurveConfig, draws: int, workdir: Path, jobs: int = 1) -> dict[str, Any]:
    """``draws`` draws from ``config.seed`` on, then the mean curve over them and the targets on it."""
    configs = [replace(config, seed=config.seed + DRAW_SPACING * i) for i in range(draws)]
    if jobs == 1:
        results = [_draw_in_folder(c, workdir) for c in configs]
    else:
        # Separate processes, not threads: each fit holds the interpreter, and Keras's seeding is global.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_draw_in_folder, configs, [workdir] * draws))
    curve = mean_curve(results)
    return {"config": asdict(config), "draws": results, "rows": curve, "targets": targets(curve),
            "per_draw": per_draw_counts(results)}


def mean_curve(draws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point's figures averaged over the draws, with their spread and the rule's choices."""
    curve = []
    for points in zip(*(d["rows"] for d in draws)):
        counts = {p["annotations"] for p in points}
        if len(counts) != 1:
            raise ValueError(f"draws disagree on the points: {sorted(counts)}")
        row: dict[str, Any] = {"annotations": counts.pop()}
        for arm in (*ARMS, "all_fg"):
            values = [p[arm] for p in points]
            row[arm] = statistics.fmean(values)
            row[f"{arm}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        kept = [p["rule_detail"]["start"] for p in points]
        row["rule_kept"] = {start: kept.count(start) for start in sorted(set(kept))}
        curve.append(row)
    return curve


def targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether the rule meets the issue's two targets on ``rows`` (one draw's, or the mean curve)."""
    return {
        "rule_at_least_the_better_start_everywhere": all(_at_least_better_start(r) for r in rows),
        "rule_beats_all_foreground_from_10": all(_above_all_foreground(r) for r in rows if r["annotations"] >= 10),
    }


def per_draw_counts(draws: list[dict[str, Any]]) -> dict[str, list[int]]:
    """For each target, ``[points where it holds, points]`` over every draw's own curve."""
    rows = [r for d in draws for r in d["rows"]]
    from_10 = [r for r in rows if r["annotations"] >= 10]
    return {
        "rule_at_least_the_better_start_everywhere": [sum(map(_at_least_better_start, rows)), len(rows)],
        "rule_beats_all_foreground_from_10": [sum(map(_above_all_foreground, from_10)), len(from_10)],
    }


def _at_least_better_start(row: dict[str, Any]) -> bool:
    return row["rule"] >= max(row["finetune"], row["scratch"]) - 1e-9


def _above_all_foreground(row: dict[str, Any]) -> bool:
    return row["rule"] > row["all_fg"]


def _row_text(row: dict[str, Any]) -> str:
    detail = row["rule_detail"]
    promoted = ("P" if row["before_detail"]["promoted"] else "-") + ("P" if detail["promoted"] else "-")
    return (f"{row['annotations']:>4} | " + " | ".join(f"{row[arm]:.3f}" for arm in ARMS)
            + f" | {row['all_fg']:.3f} | {detail['start']:<8} | {promoted} | {detail['seconds']:.0f}")


def _mean_row_text(row: dict[str, Any]) -> str:
    kept = ", ".join(f"{start} {n}" for start, n in row["rule_kept"].items())
    return (f"{row['annotations']:>4} | "
            + " | ".join(f"{row[arm]:.3f} ±{row[arm + '_sd']:.3f}" for arm in (*ARMS, "all_fg")) + f" | {kept}")


def format_report(result: dict[str, Any]) -> str:
    config, draws = result["config"], result["draws"]
    lines = [
        f"learning curve at {config['image_size']}x{config['image_size']}, model width {config['width']}, "
        f"batch {config['batch_size']}, "
        f"{config['epochs']} epochs, held-out project images: {config['test_images']}, draws: {len(draws)}",
        "foreground IoU on held-out project images",
    ]
    for draw in draws:
        base = draw["base"]
        lines += [
            f"draw seed {draw['seed']}: base model ({config['base_images']} 'shapes' images) IoU "
            f"{base['iou_on_its_kind']:.3f} on its kind, {base['iou_on_project_kind']:.3f} on the project's 'muted' kind",
            "   N | before | finetune | decoder | scratch | rule | all_fg | rule kept | promoted (before, rule) | rule s",
            *(_row_text(row) for row in draw["rows"]),
        ]
    lines += [
        f"mean over {len(draws)} draws (± standard deviation between draws)",
        "   N | " + " | ".join(f"{arm:<12}" for arm in (*ARMS, "all_fg")) + " | rule kept (draws)",
        *(_mean_row_text(row) for row in result["rows"]),
        "targets on the mean curve: "
        + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in result["targets"].items()),
        "draw by draw, points where each holds: "
        + ", ".join(f"{name} {held}/{total}" for name, (held, total) in result["per_draw"].items()),
    ]
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds to minutes): a smoke test")
    parser.add_argument("--image-size", type=int, help="image and model input size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="the first draw's seed")
    parser.add_argument("--draws", type=_positive, help="draws averaged into the curve (default 6; --quick: 2)")
    parser.add_argument("--jobs", type=_positive, default=1, help="draws run side by side, one process each")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the data and stores here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = CurveConfig.quick() if args.quick else CurveConfig()
    overrides = {k: v for k, v in {"image_size": args.image_size, "seed": args.seed}.items() if v is not None}
    config = CurveConfig(**{**asdict(config), **overrides})
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp:
        result = run(config, args.draws or (2 if args.quick else 6), args.workdir or Path(tmp), jobs=args.jobs)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
