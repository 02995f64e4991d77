"""Command line: ``python -m training {synth,fit,evaluate,predict,versions,promote,rollback,prune,export-base,adopt}``.

``--model-dir`` names a store; with ``--project N`` the commands work on project N's store inside
it (``MODEL_DIR/projects/N``, the backend's layout), without it on ``--model-dir`` itself.

Errors caused by input print one line naming the file or version and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.errors import TrainingError
from training.synthetic import KINDS

log = logging.getLogger("training")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _image_size(text: str) -> int:
    value = _positive(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (got {value})")
    return value


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _store_dir(args: argparse.Namespace) -> Path:
    from training.layout import project_store_dir

    return args.model_dir if args.project is None else project_store_dir(args.model_dir, args.project)


def _project(text: str) -> int:
    from training.layout import check_project

    try:
        return check_project(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synthetic import write_synthetic

    stems = write_synthetic(args.out_dir, args.count, args.size, args.seed, kind=args.kind)
    print(f"wrote {len(stems)} image/trimap pairs to {args.out_dir}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from training.fit import fit

    report = fit(
        args.data_dir, _store_dir(args), from_version=args.from_version, base_model=args.base_model,
        epochs=args.epochs,
        image_size=args.image_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
        patience=args.patience, promotion_margin=args.margin, seed=args.seed, flip=not args.no_flip,
        verbose=0 if args.quiet else 1,
    )
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"version {report.version_id}: validation foreground IoU {report.val_foreground_iou:.4f} "
              f"({report.train_count} training, {report.val_count} validation images, "
              f"{report.epochs_run} epochs, best {report.best_epoch}"
              f"{', stopped early' if report.early_stopped else ''}{', interrupted' if report.interrupted else ''})")
        print(f"promoted to current: {report.promotion_reason}" if report.promoted else
              f"kept, not promoted: {report.promotion_reason}")
        if report.skipped:
            print(f"{report.skipped_count} file(s) skipped:")
            for problem in report.skipped:
                print(f"  {problem}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.fit import evaluate

    report = evaluate(args.data_dir, _store_dir(args), version=args.version, subset=args.subset,
                      batch_size=args.batch_size, verbose=0 if args.json or args.quiet else 1)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"version {report.version} on {report.images} images: foreground IoU {report.foreground_iou:.4f}, "
              f"pixel accuracy {report.pixel_accuracy:.4f}")
        for name, value in report.per_class_iou.items():
            print(f"  IoU {name}: {value:.4f}")
        for problem in report.skipped:
            print(f"  skipped {problem}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from training.predict import predict_folder
    from training.store import ModelStore

    model = ModelStore(_store_dir(args)).load_model(args.version)
    result = predict_folder(model, args.images_dir, args.out, batch_size=args.batch_size)
    print(f"wrote {len(result.written)} trimaps to {Path(args.out) / 'trimaps'} and overlays to "
          f"{Path(args.out) / 'overlays'}")
    for problem in result.skipped:
        print(f"  skipped {problem}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from training.store import ModelStore

    versions = ModelStore(_store_dir(args)).list_versions()
    if args.json:
        _print_json([{"id": v.id, "current": v.is_current, "promoted": v.promoted,
                      "val_foreground_iou": v.val_foreground_iou, "parent": v.metrics.get("parent"),
                      "created_at": v.metrics.get("created_at")} for v in versions])
        return 0
    if not versions:
        print(f"no versions in {_store_dir(args)}")
    for v in versions:
        iou = v.val_foreground_iou
        print(f"{'*' if v.is_current else ' '} {v.id}  IoU {iou if iou is None else f'{iou:.4f}'}  "
              f"{'promoted' if v.promoted else 'not promoted'}  parent {v.metrics.get('parent') or '-'}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from training.store import ModelStore

    info = ModelStore(_store_dir(args)).promote(args.version)
    print(f"current version is now {info.id}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from training.store import ModelStore

    info = ModelStore(_store_dir(args)).rollback()
    print(f"rolled back: current version is now {info.id}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from training.store import ModelStore

    removed = ModelStore(_store_dir(args)).prune(args.keep)
    print(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def cmd_export_base(args: argparse.Namespace) -> int:
    from training.layout import export_base
    from training.store import ModelStore

    out = export_base(ModelStore(_store_dir(args)), args.version, args.out)
    print(f"wrote {out}; serve it to projects without their own model with BASE_MODEL={out}")
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from training.layout import adopt

    target = adopt(args.model_dir, args.project)
    print(f"moved the store in {args.model_dir} to {target}: project {args.project}'s versions and current")
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train, evaluate and manage the chapter-11 trimap segmentation model.")
    parser.add_argument("--quiet", action="store_true", help="log warnings only, no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model-dir", type=Path, required=True, help="the versioned model store")
        sub.add_argument("--project", type=_project, help="a Label Studio project's store inside it "
                         "(MODEL_DIR/projects/ID, the backend's layout)")

    sub = commands.add_parser("synth", help="write a synthetic data set in the Oxford-IIIT Pets layout")
    sub.add_argument("out_dir", type=Path)
    sub.add_argument("--count", type=_positive, required=True, help="number of image/trimap pairs")
    sub.add_argument("--size", type=_positive, default=128, help="longest image side in pixels (default 128)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--kind", choices=KINDS, default="shapes",
                     help="shapes: a saturated subject on a greyish background; muted: the reverse (default shapes)")
    sub.set_defaults(run=cmd_synth)

    sub = commands.add_parser("fit", help="fit a new version and promote it if it beats the current one")
    sub.add_argument("data_dir", type=Path, help="images/*.jpg and annotations/trimaps/*.png")
    model_dir(sub)
    sub.add_argument("--from", dest="from_version", metavar="VERSION",
                     help="fine-tune this version ('current' for the current one); default: from scratch")
    sub.add_argument("--base-model", metavar="PATH", help="with --from current on a store without a current "
                     "version: fine-tune this .keras file or version directory")
    sub.add_argument("--epochs", type=_positive, default=50)
    sub.add_argument("--image-size", type=_image_size, help="model input size, a multiple of 8 "
                     "(default: the parent's, or 200)")
    sub.add_argument("--batch-size", type=_positive, default=16)
    sub.add_argument("--learning-rate", type=float, default=1e-3)
    sub.add_argument("--patience", type=int, default=5, help="early stopping patience on validation loss")
    sub.add_argument("--margin", type=float, default=0.0, help="foreground IoU a new version must gain to be "
                     "promoted")
    sub.add_argument("--seed", type=int, default=1337)
    sub.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(run=cmd_fit)

    sub = commands.add_parser("evaluate", help="foreground IoU, per-class IoU and pixel accuracy of a version")
    sub.add_argument("data_dir", type=Path)
    model_dir(sub)
    sub.add_argument("--version", help="default: the current version")
    sub.add_argument("--subset", choices=("all", "val"), default="all",
                     help="all usable pairs, or only the version's validation images")
    sub.add_argument("--batch-size", type=_positive, default=16)
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(run=cmd_evaluate)

    sub = commands.add_parser("predict", help="write trimaps (values 1/2/3) and overlays for a folder of images")
    sub.add_argument("images_dir", type=Path)
    model_dir(sub)
    sub.add_argument("--out", type=Path, required=True)
    sub.add_argument("--version", help="default: the current version")
    sub.add_argument("--batch-size", type=_positive, default=8)
    sub.set_defaults(run=cmd_predict)

    sub = commands.add_parser("versions", help="list stored versions (* marks the current one)")
    model_dir(sub)
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(run=cmd_versions)

    sub = commands.add_parser("promote", help="make a stored version current (no metric check)")
    sub.add_argument("version")
    model_dir(sub)
    sub.set_defaults(run=cmd_promote)

    sub = commands.add_parser("rollback", help="make the previously current version current again")
    model_dir(sub)
    sub.set_defaults(run=cmd_rollback)

    sub = commands.add_parser("prune", help="delete old versions (never the current one or its parent)")
    model_dir(sub)
    sub.add_argument("--keep", type=_positive, required=True, help="newest versions to keep")
    sub.set_defaults(run=cmd_prune)

    sub = commands.add_parser("export-base", help="copy a version's model to a .keras file to serve as BASE_MODEL")
    model_dir(sub)
    sub.add_argument("--version", help="default: the current version")
    sub.add_argument("--out", type=Path, required=True, help="the .keras file to write")
    sub.set_defaults(run=cmd_export_base)

    sub = commands.add_parser("adopt", help="move a single store (MODEL_DIR/versions, current) into a project's store")
    sub.add_argument("--model-dir", type=Path, required=True, help="the folder holding the single store")
    sub.add_argument("--project", type=_project, required=True, help="the Label Studio project it becomes")
    sub.set_defaults(run=cmd_adopt)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (TrainingError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
