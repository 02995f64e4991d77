"""``python -m benchmarks.click``: clicks through the whole backend, as Label Studio sends them.

The SAM bench (``python -m benchmarks.sam``) measures the engine; this one measures
what an annotator waits for: the app parsing Label Studio's context, the image loaded from
local files, SAM, and the brush RLE answer. First click on a new image against further
clicks on it, side by side in one run (random SAM weights, a synthetic JPEG).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


def _keypoint(x_pct: float, y_pct: float, width: int, height: int) -> dict:
    return {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x_pct, "y": y_pct, "width": 1, "keypointlabels": ["Object"]}}


def run(quick: bool, clicks: int) -> dict:
    import keras
    from PIL import Image

    from ml_backend.app import create_app
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from benchmarks.sam import base_architecture, quick_architecture, synthetic_image
    from ml_backend.sam.convert import build_segmenter
    from ml_backend.settings import Settings

    keras.utils.set_random_seed(0)
    arch = quick_architecture() if quick else base_architecture()
    height, width = (480, 640) if quick else (3000, 4000)
    with tempfile.TemporaryDirectory(prefix="click-bench-") as tmp:
        root = Path(tmp)
        settings = dataclasses.replace(Settings(), model_dir=root / "models", image_cache_dir=root / "cache",
                                       local_files_document_root=str(root))
        engine = SamEngine(build_segmenter(arch), source="random")
        client = create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()
        Image.fromarray(synthetic_image(height, width)).save(root / "photo.jpg", quality=92)
        task = {"id": 1, "data": {"image": str(root / "photo.jpg")}}

        def click(index: int) -> float:
            context = {"result": [_keypoint(30 + index, 40 + index / 2, width, height)]}
            started = time.perf_counter()
            response = client.post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG,
                                                     "params": {"context": context}})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"click failed: {response.status_code} {response.get_data(as_text=True)}")
            return elapsed

        first = click(0)
        further = [click(i) for i in range(1, clicks + 1)]
    median = statistics.median(further)
    return {"image": f"{width}x{height}", "model": "quick" if quick else "base (vit_b shapes)",
            "first_click_s": round(first, 4), "further_click_median_s": round(median, 4),
            "first_over_further": round(first / median, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.click", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and a 640x480 image")
    parser.add_argument("--clicks", type=int, default=5, help="further clicks to time (default 5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.clicks < 1:
        parser.error("--clicks must be at least 1")
    report = run(args.quick, args.clicks)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}, {report['image']} JPEG through the app: first click {report['first_click_s']:.3f} s, "
              f"further clicks {report['further_click_median_s'] * 1000:.0f} ms (median), "
              f"{report['first_over_further']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
