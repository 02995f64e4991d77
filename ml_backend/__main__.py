"""``python -m ml_backend serve``: run the backend under gunicorn with the settings from the environment.

``python -m ml_backend export-dataset EXPORT.json --images DIR --out DIR``: a Label Studio JSON
export and its images to a data set in the Oxford-Pets layout for ``python -m training``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ml_backend.command_line import settings_for_command
from ml_backend.settings import Settings, SettingsError


def serve(settings: Settings) -> int:
    from gunicorn.app.wsgiapp import run

    from ml_backend.security.auth import check_exposure

    try:
        check_exposure(settings)  # before binding: an exposed, unauthenticated backend never starts
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    sys.argv = [
        "gunicorn",
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.workers),
        "--threads", str(settings.threads),
        "--worker-class", "gthread",
        # The first click may wait for SAM to load and encode a large image on CPU.
        "--timeout", "300",
        "--graceful-timeout", "30",
        "--log-level", settings.log_level.lower(),
        "--config", "python:ml_backend.gunicorn_hooks",  # workers die with their master
        "ml_backend.app:create_app()",
    ]
    run()
    return 0


def export_dataset(args: argparse.Namespace, settings: Settings) -> int:
    """Write an Oxford-Pets data set from a Label Studio JSON export file and its images."""
    from dataclasses import replace

    from ml_backend.export import IMAGES_SUBDIR, TRIMAPS_SUBDIR, ExportError, ExportOptions, export_from_file
    from ml_backend.images import ImageLoader

    out = args.out
    if not args.overwrite and any(any((out / sub).glob("*")) for sub in (IMAGES_SUBDIR, TRIMAPS_SUBDIR)
                                  if (out / sub).is_dir()):
        print(f"error: {out} already holds a data set; pass --overwrite to replace pairs of the same tasks",
              file=sys.stderr)
        return 2
    label_config = None
    if args.label_config is not None:
        try:
            label_config = args.label_config.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"error: {args.label_config}: cannot read the labeling config ({exc.strerror or exc})",
                  file=sys.stderr)
            return 2
    options = ExportOptions.from_settings(settings)
    if args.boundary_width is not None:
        options = replace(options, boundary_width=args.boundary_width)
    if args.ground_truth_only:
        options = replace(options, ground_truth_only=True)
    try:
        report = export_from_file(args.export_file, args.images, out, max_pixels=settings.max_image_pixels,
                                  options=options, loader=ImageLoader(settings), label_config=label_config)
    except ExportError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(report.describe())
    if not report.written:
        print(f"error: {args.export_file}: no task gave an image/trimap pair", file=sys.stderr)
        return 2
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend", description="Label Studio ML backend")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the backend (gunicorn) on HOST:PORT")
    export = sub.add_parser("export-dataset", help="Label Studio JSON export + images -> Oxford-Pets data set "
                                                   "(labels, boundary width etc. from the settings)")
    export.add_argument("export_file", type=Path, help="Label Studio JSON export (a list of tasks)")
    export.add_argument("--images", type=Path, required=True,
                        help="folder holding the images (by URL path, e.g. upload/3/x.jpg, or by file name)")
    export.add_argument("--out", type=Path, required=True, help="data set folder to write")
    export.add_argument("--label-config", type=Path, help="the project's labeling config (XML), to find the image field")
    export.add_argument("--boundary-width", type=_non_negative, help="boundary band width in pixels (BOUNDARY_WIDTH)")
    export.add_argument("--ground-truth-only", action="store_true", help="use only annotations marked ground truth")
    export.add_argument("--overwrite", action="store_true", help="write into a folder that already holds pairs")
    args = parser.parse_args(argv)
    settings = settings_for_command()
    if settings is None:
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "export-dataset":
        return export_dataset(args, settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
