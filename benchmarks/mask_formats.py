"""The three mask result forms on the same masks: encode/read-back time, JSON size, and polygon accuracy.

Run ``python -m benchmarks.mask_formats [--size 4000x3000] [--shape blob] [--json]``. The brush RLE
encoder is the reference measured side by side (same mask, same run). Polygon rows give the vertex
count and the IoU of the read-back mask with the original for each simplification tolerance, and
what filling the holes instead of bridging them would cost.

:data:`SHAPES` are the object masks the click bench and the format tests share: a compact blob, a
thin long structure, a mask with many holes and a random SAM's noise-like mask, drawn at any size.
"""

from __future__ import annotations

import argparse
import json
import sys

import cv2
import numpy as np

from benchmarks.common import best_of, size_argument
from ml_backend.formats import BITMASK, BRUSH, POLYGON, PolygonOptions, mask_values, region_mask

TOLERANCES = (0.0, 0.5, 1.0, 2.0, 4.0)


def blob_mask(height: int, width: int) -> np.ndarray:
    """A compact object: one tilted ellipse over a third of the image (few runs per row, one outline)."""
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 2), (int(width * 0.3), int(height * 0.3)), 15, 0, 360, 1, -1)
    return mask.astype(bool)


def thin_mask(height: int, width: int) -> np.ndarray:
    """A thin long structure (a cable, a branch): a three-wave curve 1/800 of the width thick (3 px at least)."""
    mask = np.zeros((height, width), np.uint8)
    xs = np.linspace(0.02 * width, 0.98 * width, 400)
    ys = height * 0.5 + height * 0.35 * np.sin(xs / width * 6 * np.pi)
    cv2.polylines(mask, [np.stack([xs, ys], 1).round().astype(np.int32)], False, 1, max(3, width // 800))
    return mask.astype(bool)


def holes_mask(height: int, width: int) -> np.ndarray:
    """A mask with many holes (a fence, a grid): a rectangle with 20x15 round holes of 1/200 the width radius."""
    mask = np.zeros((height, width), np.uint8)
    cv2.rectangle(mask, (int(width * 0.1), int(height * 0.1)), (int(width * 0.9), int(height * 0.9)), 1, -1)
    radius = max(2, width // 200)
    for y in np.linspace(height * 0.15, height * 0.85, 15):
        for x in np.linspace(width * 0.15, width * 0.85, 20):
            cv2.circle(mask, (int(x), int(y)), radius, 0, -1)
    return mask.astype(bool)


def noise_mask(height: int, width: int) -> np.ndarray:
    """What a random-weight SAM answers: 256x256 random logits over the padded square, upsampled bilinearly and
    thresholded at 0 (hundreds of components and holes, many of them specks)."""
    logits = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    side = max(height, width)
    return cv2.resize(logits, (side, side), interpolation=cv2.INTER_LINEAR)[:height, :width] > 0


SHAPES = {"blob": blob_mask, "thin": thin_mask, "holes": holes_mask, "noise": noise_mask}


def object_mask(height: int, width: int) -> np.ndarray:
    """An ellipse with a hole, plus a bar: one object of the kind SAM returns, with two components."""
    mask = np.zeros((height, width), np.uint8)
    centre, axes = (int(width * 0.55), int(height * 0.5)), (int(width * 0.3), int(height * 0.3))
    cv2.ellipse(mask, centre, axes, 20, 0, 360, 1, -1)
    cv2.ellipse(mask, centre, (axes[0] // 4, axes[1] // 3), 0, 0, 360, 0, -1)
    mask[height // 12: height // 12 + height // 30, width // 40: width - width // 40] = 1
    return mask.astype(bool)


def _read(values: list[dict], result_type: str, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), bool)
    for value in values:
        item = {"type": result_type, "original_width": width, "original_height": height, "value": value}
        mask |= region_mask(item, size, max_pixels=width * height)
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def measure(height: int, width: int, repeat: int, shape: str = "object") -> dict:
    mask = SHAPES.get(shape, object_mask)(height, width)
    size = (width, height)
    forms = {}
    for result_type in (BRUSH, BITMASK, POLYGON):
        encode_s, values = best_of(lambda: mask_values(mask, result_type, PolygonOptions()), repeat)
        read_s, restored = best_of(lambda: _read(values, result_type, size), repeat)
        forms[result_type] = {"encode_ms": encode_s * 1e3, "read_ms": read_s * 1e3,
                              "json_kb": len(json.dumps(values)) / 1024, "iou": _iou(restored, mask)}
    polygons = []
    for tolerance in TOLERANCES:
        options = PolygonOptions(min_area=PolygonOptions().min_area, tolerance=tolerance)
        values = mask_values(mask, POLYGON, options)
        polygons.append({"tolerance": tolerance, "vertices": sum(len(v["points"]) for v in values),
                         "iou": _iou(_read(values, POLYGON, size), mask)})
    external, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = cv2.drawContours(np.zeros(mask.shape, np.uint8), external, -1, 1, -1).astype(bool)
    return {"size": f"{width}x{height}", "shape": shape, "foreground_pixels": int(mask.sum()), "forms": forms,
            "polygon_tolerances": polygons, "holes_filled_iou": _iou(filled, mask)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mask_formats", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=size_argument(), action="append", help="WIDTHxHEIGHT (repeatable)")
    parser.add_argument("--shape", choices=["object", *SHAPES], action="append",
                        help="the mask: object (an ellipse with a hole plus a bar, the default) or a click-bench "
                             "shape (repeatable)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = [measure(h, w, max(1, args.repeat), shape) for w, h in (args.size or [(1024, 768), (4000, 3000)])
               for shape in (args.shape or ["object"])]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(f"{result['size']} {result['shape']} ({result['foreground_pixels']} object pixels)")
        print(f"  {'form':<14}{'encode ms':>10}{'read ms':>10}{'JSON KiB':>10}{'IoU':>9}")
        for name, row in result["forms"].items():
            print(f"  {name:<14}{row['encode_ms']:>10.1f}{row['read_ms']:>10.1f}{row['json_kb']:>10.1f}"
                  f"{row['iou']:>9.4f}")
        print("  polygon tolerance (px): " + ", ".join(
            f"{p['tolerance']:g} -> {p['vertices']} vertices IoU {p['iou']:.4f}" for p in result["polygon_tolerances"]))
        print(f"  holes filled instead of bridged: IoU {result['holes_filled_iou']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
