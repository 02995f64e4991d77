"""Command line of the SAM engine: convert, segment (benchmarks live in ``benchmarks/``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.errors import BackendError
from ml_backend.logs import configure_logging
from ml_backend.settings import Settings, SettingsError


def _point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"point {text!r} must be X,Y or X,Y,LABEL")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"point {text!r} must hold numbers") from None
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"point {text!r}: LABEL must be 1 (positive) or 0 (negative)")
    return x, y, label


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r} must hold numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} must be X1,Y1,X2,Y2")
    return values  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.sam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert an official SAM checkpoint into a keras-hub preset directory")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out_dir", type=Path)
    segment = sub.add_parser("segment", help="segment one image from points and/or a box")
    segment.add_argument("--model", default="", help="preset name, preset directory or official checkpoint")
    segment.add_argument("--image", type=Path, required=True)
    segment.add_argument("--point", type=_point, action="append", default=[], help="X,Y[,LABEL] in image pixels")
    segment.add_argument("--box", type=_box, help="X1,Y1,X2,Y2 in image pixels")
    segment.add_argument("--out", type=Path, required=True, help="mask PNG (0/255, original size)")
    return parser


def _convert(args: argparse.Namespace) -> int:
    from ml_backend.sam.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out_dir)
    print(json.dumps({"preset": str(out)}))
    return 0


def _segment(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend.images import load_image_file
    from ml_backend.sam.loading import load_engine
    from ml_backend.sam.prompts import Prompts

    image = load_image_file(args.image, max_pixels=settings.max_image_pixels)
    prompts = Prompts.from_lists(
        points=[(x, y) for x, y, _ in args.point], labels=[label for _, _, label in args.point], box=args.box
    )
    prompts.validate(image.shape[1], image.shape[0])
    if args.model:
        settings = dataclasses.replace(settings, sam_model=args.model)
    engine = load_engine(settings)
    result = engine.segment(image, prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(args.out)
    print(json.dumps({"out": str(args.out), "score": round(result.score, 6), "width": image.shape[1],
                      "height": image.shape[0], "area": int(result.mask.sum())}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command == "convert":
            return _convert(args)
        return _segment(args, settings)
    except (BackendError, SettingsError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
