"""Annotators' clicks while a SAM 3 project job runs, against the same clicks with no job, in one run.

Run ``python -m benchmarks.coexistence [--quick] [--json]``. Needs the test extra (transformers, to write the
random SAM 3 checkpoint). One process holds a small random SAM for clicks and a random SAM 3 for the project
job, as the backend does without Redis (one CPU encode slot). An annotator opens a new image (a first click:
SAM encodes it), clicks a few more times on it (further clicks: decoder only), pauses, and opens the next. The
clicks go through the app's ``/predict`` exactly as Label Studio sends them. Three scenarios, the same clicks:

* ``no job``: nothing else runs;
* ``job, whole image``: the job's SAM 3 image holds the slot from its encode to its last phrase, untimed (how
  the job ran before: a first click waited for the rest of the image, the gate estimating ~0 s);
* ``job, pieces``: the job as it runs now (``Sam3Wiring._background_slot``): the SAM 3 image encode and each
  phrase are separate pieces of background work in the gate, so a first click waits at most for the piece in
  progress;
* ``no job again``: the first scenario repeated, to show the drift of a shared machine over the run.

The job side does per task what the project job does (``ConceptPreannotator.predict`` in the job's slot), with
the images in memory instead of Label Studio's API. Printed: first-click and further-click latencies (median,
max) per scenario, and the gate's measured duration of each piece of SAM 3 work: the bound on a first click's
wait. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image">
<Label value="Object"/><Label value="cat"/><Label value="dog"/><Label value="yellow school bus"/>
<Label value="tree"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""
SAM3_CONFIGS = {
    # name: SAM 3 shapes (see benchmarks/sam3.py); the image size sets the cost of the image encode
    "quick": dict(image_size=336, hidden=64, vision_layers=2, queries=20),
    "default": dict(image_size=672, hidden=256, vision_layers=4, queries=100),
}
SCENARIOS = ("no job", "job, whole image", "job, pieces", "no job again")


def _data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _keypoint(x_pct: float, y_pct: float, width: int, height: int) -> dict:
    return {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x_pct, "y": y_pct, "width": 1, "keypointlabels": ["Object"]}}


def _summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3), "n": len(values)}


def run(quick: bool, images: int, further: int, pause_s: float) -> dict:
    import keras

    from benchmarks.sam import quick_architecture, synthetic_image
    from ml_backend.app import create_app
    from ml_backend.labeling import parse_label_config
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from ml_backend.sam.convert import build_segmenter
    from ml_backend.sam.encode_gate import Priority
    from ml_backend.sam3.engine import ENCODE_PIECE, PHRASE_PIECE
    from ml_backend.sam3.loading import load_sam3_engine
    from ml_backend.settings import Settings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sam3_factory import save_tiny_checkpoint

    keras.utils.set_random_seed(0)
    name = "quick" if quick else "default"
    height, width = (360, 480)
    config = parse_label_config(LABEL_CONFIG)
    with tempfile.TemporaryDirectory(prefix="coexistence-bench-") as tmp:
        root = Path(tmp)
        sam3 = load_sam3_engine(str(save_tiny_checkpoint(root / "sam3", weight_scale=3.0, **SAM3_CONFIGS[name])),
                                device="cpu")
        settings = dataclasses.replace(Settings(), model_dir=root / "models", image_cache_dir=root / "cache",
                                       preannotate="sam3", sam3_model=str(root / "sam3"), encode_concurrency=1,
                                       preencode=False)
        runtime = Runtime(settings, engine=SamEngine(build_segmenter(quick_architecture()), source="random"),
                          sam3_engine=sam3)
        runtime._warm_up(runtime.sam())
        client = create_app(settings, runtime=runtime).test_client()
        job_images = [synthetic_image(height, width, seed=1000 + i) for i in range(4)]
        sam3.segment(job_images[0], ["cat"], threshold=0.5)  # torch's first-call costs, outside the figures

        def job_task(image: np.ndarray, scenario: str) -> None:
            if scenario == "job, whole image":
                with runtime.encode_gate.slot(Priority.BACKGROUND) as slot:
                    slot.untimed()
                    sam3.segment(image, ["cat", "dog", "yellow school bus", "tree", "Object"],
                                 threshold=settings.sam3_score_threshold)
            else:
                with runtime.sam3_wiring.job_context().background_slot():
                    runtime.concepts.predict(image, LABEL_CONFIG, config, trimap=None)

        def click(image_uri: str, index: int) -> float:
            context = {"result": [_keypoint(30 + 3 * index, 40 + 2 * index, width, height)]}
            started = time.perf_counter()
            answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image_uri}}],
                                                   "label_config": LABEL_CONFIG, "params": {"context": context}})
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                raise RuntimeError(f"click failed: {answer.status_code} {answer.get_data(as_text=True)[:300]}")
            return elapsed

        report: dict = {"sam3_config": name, "sam3_image_size": SAM3_CONFIGS[name]["image_size"],
                        "image": f"{width}x{height}", "phrases": 5, "scenarios": {}}
        for warm in range(2):  # torch's first-call costs and the decoder's traces, outside the figures
            uri = _data_uri(synthetic_image(height, width, seed=500 + warm))
            [click(uri, i) for i in range(further + 1)]
        seed = 0
        for scenario in SCENARIOS:
            logging.getLogger(__name__).info("scenario: %s", scenario)
            stop = threading.Event()
            job_done = []

            def job() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    job_task(job_images[len(job_done) % len(job_images)], scenario)
                    job_done.append(time.perf_counter() - started)

            worker = threading.Thread(target=job, daemon=True) if scenario.startswith("job") else None
            if worker:
                worker.start()
                time.sleep(0.3)
            firsts, furthers = [], []
            for _ in range(images):
                seed += 1
                uri = _data_uri(synthetic_image(height, width, seed=seed))
                firsts.append(click(uri, 0))
                furthers.extend(click(uri, i) for i in range(1, further + 1))
                time.sleep(pause_s)
            stop.set()
            if worker:
                worker.join()
            report["scenarios"][scenario] = {"first_click": _summary(firsts), "further_click": _summary(furthers),
                                             "first_clicks_s": [round(v, 3) for v in firsts],
                                             "job_images_done": len(job_done),
                                             "job_s_per_image": round(statistics.median(job_done), 3)
                                             if job_done else None}
        gate = runtime.encode_gate
        report["sam3_pieces_s"] = {piece: None if gate.mean_s(piece) is None else round(gate.mean_s(piece), 3)
                                   for piece in (ENCODE_PIECE, PHRASE_PIECE)}
        report["sam_encode_s"] = round(gate.mean_encode_s, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coexistence", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller SAM 3 and fewer images")
    parser.add_argument("--images", type=int, default=None, help="first clicks per scenario (default 10, quick 4)")
    parser.add_argument("--further", type=int, default=3, help="further clicks on each image")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between images")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, oversubscribed CPU an idle multi-threaded "
                             "pool pays seconds of wake-ups per encode, which would make 'no job' the slowest)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    images = args.images or (4 if args.quick else 10)
    report = run(args.quick, images, args.further, args.pause)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"torch threads: {args.threads}; SAM 3 '{report['sam3_config']}' at {report['sam3_image_size']} px, {report['phrases']} phrases; "
          f"clicks on {report['image']} images; SAM encode {report['sam_encode_s']} s")
    print(f"{'scenario':18} {'first median':>12} {'first max':>10} {'further median':>15} {'further max':>12} "
          f"{'job s/image':>12}")
    for scenario, row in report["scenarios"].items():
        first, more = row["first_click"], row["further_click"]
        print(f"{scenario:18} {first['median_s']:>12.3f} {first['max_s']:>10.3f} {more['median_s']:>15.3f} "
              f"{more['max_s']:>12.3f} {row['job_s_per_image'] or 0:>12.3f}")
    pieces = report["sam3_pieces_s"]
    print(f"pieces of SAM 3 work (the most a first click waits for with pieces): image encode "
          f"{pieces['sam3 encode']} s, one phrase {pieces['sam3 phrase']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
