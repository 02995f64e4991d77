"""Peak memory of decoding one image: our ``decode_image`` beside Pillow's plain path.

Run ``python -m benchmarks.image_decode [--width W --height H] [--json]`` (run it under
``flock /tmp/heavy.lock``: at the default size each decode takes up to ~1.5 GB). For each colour
mode an image of W x H (default 9000 x 9900: 255 MiB of RGB, just under the default
``MAX_IMAGE_MB`` of 256) is written as a small PNG; a fresh process then decodes it, once with
``decode_image`` and once with the reference ``np.asarray(exif_transpose(Image.open(f)).convert("RGB"))``,
and reports the growth of its peak RSS over what it held before decoding, and the time. The last
row is the issue's bomb, a 12 KB 1-bit 10000 x 10000 PNG: refused from its header by ours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

MODES = ("1", "L", "P", "RGB")
LIMIT_MB = 256

_CHILD = r"""
import io, json, resource, sys, time
import numpy as np
from PIL import Image, ImageOps
from ml_backend.images.decode import decode_image
from ml_backend.errors import InvalidImageError

path, how, limit_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(path, "rb").read()
Image.init()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
outcome = "decoded"
try:
    if how == "ours":
        out = decode_image(data, max_pixels=10**9, max_bytes=limit_mb << 20, source=path)
    else:
        out = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
except InvalidImageError:
    outcome = "refused"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_growth_mib": (peak - before) / 1024}))
"""


def _write(directory: Path, mode: str, width: int, height: int) -> Path:
    image = Image.new(mode, (width, height))
    if mode == "P":
        image.putpalette([10, 20, 30, 200, 100, 50])
    path = directory / f"{mode}-{width}x{height}.png"
    image.save(path, "PNG")
    return path


def _measure(path: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), how, str(LIMIT_MB)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=9000)
    parser.add_argument("--height", type=int, default=9900)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="image-decode-bench-") as tmp:
        cases = [(mode, args.width, args.height) for mode in MODES] + [("1", 10_000, 10_000)]
        for mode, width, height in cases:
            path = _write(Path(tmp), mode, width, height)
            rows.append({
                "mode": mode, "size": f"{width}x{height}", "file_bytes": path.stat().st_size,
                "rgb_mib": width * height * 3 / 2**20,
                "ours": _measure(path, "ours"), "reference": _measure(path, "reference"),
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"decode peak-RSS growth, MAX_IMAGE_MB={LIMIT_MB}: ours vs Pillow's plain convert('RGB') path")
    print(f"{'mode':>4} {'size':>12} {'file':>9} {'RGB MiB':>8} | {'ours':>22} | {'reference':>22}")
    for row in rows:
        cells = [f"{r['outcome']:>8} {r['peak_growth_mib']:6.0f} MiB {r['seconds']:5.2f}s" for r in (row["ours"], row["reference"])]
        print(f"{row['mode']:>4} {row['size']:>12} {row['file_bytes']:>9,} {row['rgb_mib']:8.0f} | {cells[0]} | {cells[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
