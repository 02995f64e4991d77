"""``python -m benchmarks.click``: clicks through the whole backend, as Label Studio sends them.

The SAM bench (``python -m benchmarks.sam``) measures the engine; this one measures
what an annotator waits for: the app parsing Label Studio's context, the image loaded from
local files, SAM, and the brush RLE answer. First click on a new image against further
clicks on it, side by side in one run (random SAM weights, a synthetic JPEG).

Where a further click's time goes: the clicks are timed without instrumentation, then
replayed under ``cProfile``; each stage's share of the profiled time (the cumulative
time of the function that does it) is applied to the unprofiled median. The profiler
inflates Python-heavy stages more than tensor-heavy ones, so the shares are a guide,
the total is exact.

``--shared-prompt-state``: each further click is also sent with the prompt state in files
shared by worker processes (``PROMPT_STATE_SHARED=on``), alternating click by click with the
in-memory state on the same task, so both medians come from the same run and machine load.
The files go where the backend would put them (``/dev/shm`` when it has room; deleted at
the end), or under ``--prompt-state-dir``.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


# (stage, file the function lives in, function name); "threshold" is mask minus upsampling.
STAGES = (
    ("backend per request (config parsing)", "ml_backend/backend.py", "__init__"),
    ("context parsing", "ml_backend/labeling/context.py", "parse_context"),
    ("embedding lookup", "ml_backend/runtime.py", "task_embedding"),
    ("prompt encoder + decoder", "ml_backend/sam/decoder.py", "__call__"),
    ("upsampling", "ml_backend/sam/transforms.py", "logits_to_original"),
    ("upsampling + threshold", "ml_backend/sam/transforms.py", "logits_to_mask"),
    ("brush RLE", "ml_backend/brush.py", "encode_rle"),
    ("JSON answer", "flask/json/provider.py", "response"),
)


def stage_breakdown(profile: cProfile.Profile, total_s: float) -> dict[str, float | None]:
    """Seconds per stage, scaled from the profile's shares to the unprofiled ``total_s``."""
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    profiled_total = sum(tottime for _, _, tottime, _, _ in stats.values()) or 1.0
    seconds: dict[str, float | None] = {}
    for stage, path, name in STAGES:
        cum = [cumtime for (file, _, func), (_, _, _, cumtime, _) in stats.items()
               if func == name and file.replace("\\", "/").endswith(path)]
        seconds[stage] = total_s * max(cum) / profiled_total if cum else None
    if seconds["upsampling + threshold"] is not None and seconds["upsampling"] is not None:
        seconds["threshold"] = seconds.pop("upsampling + threshold") - seconds["upsampling"]
    return seconds


def _keypoint(x_pct: float, y_pct: float, width: int, height: int) -> dict:
    return {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x_pct, "y": y_pct, "width": 1, "keypointlabels": ["Object"]}}


def run(quick: bool, clicks: int, shared_prompt_state: bool = False, prompt_state_dir: str = "") -> dict:
    import keras
    from PIL import Image

    from ml_backend.app import create_app
    from ml_backend.prompt_state import PromptMemory
    from ml_backend.prompt_state.files import state_directory
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
        runtime = Runtime(settings, engine=engine)
        client = create_app(settings, runtime=runtime).test_client()
        in_memory = runtime.prompt_state
        shared_settings = dataclasses.replace(settings, prompt_state_shared="on")
        shared_dir = Path(prompt_state_dir) if prompt_state_dir else state_directory(shared_settings)
        shared = PromptMemory.from_settings(dataclasses.replace(shared_settings, prompt_state_dir=str(shared_dir))) \
            if shared_prompt_state else None
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
        further, further_shared = [], []
        for i in range(1, clicks + 1):
            further.append(click(i))
            if shared is not None:
                runtime.prompt_state = shared
                further_shared.append(click(i))
                runtime.prompt_state = in_memory
        median = statistics.median(further)
        profile = cProfile.Profile()
        profile.enable()
        for i in range(clicks + 1, 2 * clicks + 1):
            click(i)
        profile.disable()
        if shared is not None and not prompt_state_dir:
            shutil.rmtree(shared_dir, ignore_errors=True)  # outside the temporary folder when in /dev/shm
    stages = stage_breakdown(profile, median)
    report = {"image": f"{width}x{height}", "model": "quick" if quick else "base (vit_b shapes)",
              "first_click_s": round(first, 4), "further_click_median_s": round(median, 4),
              "first_over_further": round(first / median, 1),
              "further_click_stages_s": {k: None if v is None else round(v, 4) for k, v in stages.items()}}
    if further_shared:
        report["further_click_shared_state_median_s"] = round(statistics.median(further_shared), 4)
        report["shared_state_dir"] = str(shared_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.click", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and a 640x480 image")
    parser.add_argument("--clicks", type=int, default=5, help="further clicks to time (default 5)")
    parser.add_argument("--shared-prompt-state", action="store_true",
                        help="also time each further click with the prompt state shared by worker processes")
    parser.add_argument("--prompt-state-dir", default="",
                        help="where the shared prompt state goes (default: where the backend would put it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.clicks < 1:
        parser.error("--clicks must be at least 1")
    report = run(args.quick, args.clicks, args.shared_prompt_state, args.prompt_state_dir)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}, {report['image']} JPEG through the app: first click {report['first_click_s']:.3f} s, "
              f"further clicks {report['further_click_median_s'] * 1000:.0f} ms (median), "
              f"{report['first_over_further']}x")
        if "further_click_shared_state_median_s" in report:
            print(f"further clicks with the prompt state shared by worker processes (files in "
                  f"{report['shared_state_dir']}, alternating): "
                  f"{report['further_click_shared_state_median_s'] * 1000:.1f} ms (median) against "
                  f"{report['further_click_median_s'] * 1000:.1f} ms in memory")
        print("a further click, by stage (profile shares of the median):")
        for stage, seconds in report["further_click_stages_s"].items():
            print(f"  {stage:40s} {'n/a' if seconds is None else f'{seconds * 1000:8.1f} ms'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
