"""Benchmark our brush RLE encoder against label-studio-sdk's ``mask2rle`` on the same masks.

Run ``python -m benchmarks.brush [--json]``. Needs the test extra (label-studio-sdk);
the target is our encoder at least 20x faster than the SDK's.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import best_of, size_argument
from ml_backend.brush import decode_rle, encode_rle

TARGET_RATIO = 20.0


def _object_mask(height: int, width: int) -> np.ndarray:
    """An ellipse plus a bar: the kind of mask SAM returns for one object."""
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - height * 0.45) / (height * 0.3)) ** 2 + ((xx - width * 0.55) / (width * 0.35)) ** 2 < 1
    mask[height // 10 : height // 10 + height // 30, width // 40 : width - width // 40] = True
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.brush", description=__doc__.splitlines()[0])
    parser.add_argument("--object-size", type=size_argument(), default=(4000, 3000), help="WIDTHxHEIGHT (default 4000x3000)")
    parser.add_argument(
        "--noise-size", type=size_argument(), default=(1000, 750),
        help="WIDTHxHEIGHT of the random-noise mask (default 1000x750: the SDK needs minutes at 4000x3000)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timing runs per measurement; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        from label_studio_sdk.converter import brush as sdk_brush
    except ImportError:
        print("benchmarks.brush: label-studio-sdk is not installed (install the test extra).", file=sys.stderr)
        return 2

    rng = np.random.default_rng(0)
    masks = {
        "object": _object_mask(*args.object_size[::-1]),
        "noise": rng.random(args.noise_size[::-1]) < 0.5,
    }
    rows = []
    for name, mask in masks.items():
        ours = encode_rle(mask)
        if ours != sdk_brush.mask2rle(mask.astype(np.uint8) * 255):
            print(f"benchmarks.brush: our encoding of the {name} mask differs from the SDK's", file=sys.stderr)
            return 1
        ours_s, _ = best_of(lambda: encode_rle(mask), args.repeat)
        sdk_s, _ = best_of(lambda: sdk_brush.mask2rle(mask.astype(np.uint8) * 255), args.repeat)
        decode_s, _ = best_of(lambda: decode_rle(ours, *mask.shape), args.repeat)
        rows.append({
            "mask": name,
            "size": f"{mask.shape[1]}x{mask.shape[0]}",
            "rle_bytes": len(ours),
            "ours_encode_ms": round(ours_s * 1000, 2),
            "sdk_mask2rle_ms": round(sdk_s * 1000, 2),
            "speedup": round(sdk_s / ours_s, 1),
            "meets_target": sdk_s / ours_s >= TARGET_RATIO,
            "ours_decode_ms": round(decode_s * 1000, 2),
        })

    if args.json:
        print(json.dumps({"target_speedup": TARGET_RATIO, "results": rows}))
    else:
        print(f"{'mask':<7} {'size':>10} {'rle bytes':>10} {'ours ms':>9} {'sdk ms':>9} {'speedup':>8}  "
              f"(target {TARGET_RATIO:.0f}x)  {'ours decode ms':>14}")
        for r in rows:
            mark = "ok" if r["meets_target"] else "BELOW"
            print(f"{r['mask']:<7} {r['size']:>10} {r['rle_bytes']:>10} {r['ours_encode_ms']:>9} "
                  f"{r['sdk_mask2rle_ms']:>9} {r['speedup']:>7}x  {mark:<13} {r['ours_decode_ms']:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
