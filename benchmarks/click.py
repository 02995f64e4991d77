"""``python -m benchmarks.click``: clicks through the whole backend, as Label Studio sends them.

What an annotator waits for is the backend's answer, not the engine: this bench sends clicks over
real HTTP to the backend under gunicorn (the flags ``python -m ml_backend serve`` uses, one worker),
in one run, for the three result forms (brush RLE, bitmask PNG, polygons), and prints four tables:

1. **Answer path, per stage** (in this process, wall and CPU time, median of ``--repeat``): what
   happens between the engine's mask and the bytes of the answer (label config, context, prompt
   state, result building, JSON), beside what the same stage cost before (label config parsed again
   by label-studio-tools, the RLE as a Python list through Flask's JSON encoder, the bitmask as an
   RGBA PNG by Pillow) on the same mask.
2. **Shaped masks through HTTP, no engine**: a server whose engine answers every click with a fixed
   mask drawn from the image it was given (``ShapedEngine``: a stub decoder, so the mask's shape and
   size are controlled: a compact blob, a thin long structure, a mask with many holes; 1024x768,
   4000x3000, 8000x6000). Its further click costs ~0 ms in the engine, so the time is the answer
   path plus HTTP, gunicorn and Flask: what the backend adds to any engine, on any device.
3. **Shaped masks behind SAM's decoder**: the same shapes and sizes, but every click first runs the
   real base-size SAM's decoder (upsampling and threshold included) on the shape image's embedding
   and then answers the shape (``shaped_sam_app``); each click alternates with the engine's cached
   click on the same embedding and point in this process. A row is the whole click of that mask in
   that form, beside the engine's.
4. **Real SAM through HTTP against the engine**: ``python -m ml_backend serve`` with a random-weight
   base-size SAM (vit_b shapes) on a 4000x3000 photo-like image, each further click alternating
   with the engine's cached click (``SamEngine.decode``, same embedding, same point, no HTTP) in
   this process: the ratio is what the backend adds on top of the engine.

Further clicks put one positive keypoint at a new place each time (Label Studio's request, with
the label config in it). ``--in-process`` (or ``--shared-prompt-state``) runs the older Flask
test-client bench instead; see :func:`run`.
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
from benchmarks.common import size_argument
from ml_backend.gunicorn_hooks import huge_page_tensors

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
    """The in-process bench (Flask's test client, brush config): first click against further clicks.

    Where a further click's time goes: the clicks are replayed under ``cProfile`` and each stage's
    share of the profiled time is applied to the unprofiled median (a guide; the HTTP bench's
    :func:`answer_stages` measures the answer path directly). ``shared_prompt_state``: each further
    click is also sent with the prompt state in files shared by worker processes
    (``PROMPT_STATE_SHARED=on``), alternating click by click with the in-memory state on the same
    task; the files go where the backend would put them, or under ``prompt_state_dir``.
    """
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



# --- the HTTP bench ------------------------------------------------------------------------------

FORMS = {"brush": "BrushLabels", "bitmask": "BitmaskLabels", "polygon": "PolygonLabels"}
SIZES = ((1024, 768), (4000, 3000), (8000, 6000))  # (width, height)
QUICK_SIZES = ((320, 240),)
TARGET_HTTP_OVER_ENGINE = 1.2  # brush, 4000x3000: a further click through HTTP against the engine's cached click
TARGET_FORM_OVER_BRUSH = 1.5  # bitmask or polygon click against a brush click, 4000x3000
TARGET_ANSWER_MS = 15.0  # the answer path (engine's mask to JSON bytes), 4000x3000, any shape


def label_config(form: str) -> str:
    """A labeling config whose mask tag is ``form``'s (brush, bitmask, polygon), with smart keypoints."""
    tag = FORMS[form]
    return (f'<View><Image name="image" value="$image"/><{tag} name="mask" toName="image"><Label value="Object"/>'
            f'</{tag}><KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/>'
            '</KeyPointLabels></View>')


def shaped_app():
    """gunicorn's app factory for the shaped-mask server: the backend as ``create_app()`` builds it, with
    a :class:`ShapedEngine` (a small random SAM encodes; every click answers the image's own shape)."""
    import dataclasses as dc

    import keras

    from benchmarks.sam import quick_architecture
    from ml_backend.app import create_app
    from ml_backend.runtime import Runtime
    from ml_backend.sam.convert import build_segmenter
    from ml_backend.settings import Settings

    keras.utils.set_random_seed(0)
    settings = dc.replace(Settings.from_env(), preencode=False)
    return create_app(settings, runtime=Runtime(settings, engine=shaped_engine(build_segmenter(quick_architecture()))))


def shaped_sam_app():
    """gunicorn's app factory for shaped masks behind the real engine: SAM loaded as ``python -m ml_backend serve``
    loads it (``SAM_MODEL``, device, embedding store), whose every click runs SAM's decoder and then answers the
    image's own shape (:func:`shaped_engine` with ``decoded``)."""
    import dataclasses as dc

    from ml_backend.app import create_app
    from ml_backend.runtime import Runtime
    from ml_backend.sam.loading import load_engine
    from ml_backend.settings import Settings

    settings = dc.replace(Settings.from_env(), preencode=False)
    sam = load_engine(settings)
    engine = shaped_engine(sam.segmenter, decoded=True, cache_bytes=settings.embedding_cache_bytes, device=sam.device,
                           source=sam.source, traced_decoder=settings.sam_trace_decoder, store=sam.store)
    return create_app(settings, runtime=Runtime(settings, engine=engine))


def shaped_engine(segmenter, *, decoded: bool = False, **engine_options):
    """A :class:`SamEngine` that answers a click on an image with the image's bright pixels (red channel >= 128)
    as the mask, so the bench controls the mask's shape. ``decoded``: the click first runs SAM's own decoder
    (prompt encoder, mask decoder, upsampling and threshold, as a real click) and only then answers the shape;
    otherwise the decoder is a stub and the click costs nothing in the engine."""
    import numpy as np

    from ml_backend.sam import SamEngine
    from ml_backend.sam.prompts import SegmentationResult

    class ShapedEngine(SamEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.masks: dict[str, np.ndarray] = {}  # image key -> the image's shape

        def cached(self, key):  # an image not seen yet is loaded, so that its shape is known
            return super().cached(key) if key in self.masks else None

        def _stored_or_encoded(self, key, image):  # encoded here or read from the shared store
            self.masks[key] = image[..., 0] >= 128
            return super()._stored_or_encoded(key, image)

        def decode(self, embedding, prompts):
            if decoded:
                result = super().decode(embedding, prompts)
                return dataclasses.replace(result, mask=self.masks[embedding.key])
            return SegmentationResult(mask=self.masks[embedding.key], score=0.9,
                                      low_res_logits=np.zeros((256, 256), np.float32))

    engine_options.setdefault("source", "shaped-stub")
    return ShapedEngine(segmenter, **engine_options)


def _stats(values: list[float]) -> float:
    return statistics.median(values) * 1000


def answer_stages(mask, form: str, repeat: int) -> dict[str, dict[str, float]]:
    """Wall and CPU ms (medians) of each answer-path stage on ``mask``, ours beside what it replaced."""
    import flask
    import numpy as np
    import orjson
    import torch
    from label_studio_tools.core.label_config import parse_config

    from ml_backend import labeling
    from ml_backend.formats.bitmask import DATA_URL_PREFIX
    from ml_backend.labeling.config import _parse
    from ml_backend.prompt_state import PromptMemory, task_key
    from ml_backend.sam.transforms import threshold_logits
    from ml_backend.settings import Settings

    height, width = mask.shape
    xml = label_config(form)
    config = labeling.parse_label_config(xml)
    context = {"result": [_keypoint(30, 40, width, height)]}
    task = {"id": 1, "data": {"image": "/data/upload/1/photo.jpg"}}
    memory = PromptMemory.from_settings(Settings())
    logits = torch.zeros((1, height, width))  # the engine's upsampled logits, for the threshold's cost
    flask_json = flask.Flask("bench").json

    def prompt_state() -> None:
        key = task_key(1, task, task["data"]["image"])
        request = labeling.read_context(context, config)
        with memory.hold(key):
            memory.remember(memory.plan(key, request, task), [np.zeros((256, 256), np.float32)], ["a"])

    def results(arrays: bool) -> dict:
        items = labeling.build_mask_results(mask, config=config, label="Object", score=0.9, arrays=arrays)
        return {"results": [labeling.build_prediction(items, 0.9, "sam-bench")], "model_version": "v"}

    answer, listed = results(True), results(False)

    def rgba_png() -> bytes:  # the bitmask encoder this replaced: an 8-bit RGBA PNG by Pillow
        import io

        from PIL import Image

        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[..., 3][mask] = 255
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
        return DATA_URL_PREFIX.encode() + buffer.getvalue()

    ours = {
        "threshold (inside the engine's click)": lambda: threshold_logits(logits)[0].numpy(),
        "label config (parsed once per text)": lambda: labeling.parse_label_config(xml),
        "context parsing": lambda: labeling.read_context(context, config),
        "prompt state (plan + remember)": prompt_state,
        f"result building ({form})": lambda: results(True),
        "JSON (orjson)": lambda: orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
    }
    before = {
        "label config (parsed once per text)": lambda: (_parse(xml, None), parse_config(xml)),
        f"result building ({form})": (lambda: rgba_png()) if form == "bitmask" else (lambda: results(False)),
        "JSON (orjson)": lambda: flask_json.dumps(listed),
    }
    rows: dict[str, dict[str, float]] = {}
    for stage, work in ours.items():
        rows[stage] = _timed(work, repeat)
        if stage in before:
            reference = _timed(before[stage], repeat)
            rows[stage].update(before_wall_ms=reference["wall_ms"], before_cpu_ms=reference["cpu_ms"])
    counted = [row for stage, row in rows.items() if not stage.startswith("threshold")]
    rows["answer path (all but the threshold)"] = {"wall_ms": sum(r["wall_ms"] for r in counted),
                                                   "cpu_ms": sum(r["cpu_ms"] for r in counted)}
    return rows


def _timed(work, repeat: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": _stats(walls), "cpu_ms": _stats(cpus)}


class _Server:
    """The backend under gunicorn on a free port: ``python -m ml_backend serve``, or the same flags with
    another app factory."""

    def __init__(self, root: Path, name: str, env: dict[str, str], app: str | None = None) -> None:
        import os
        import subprocess

        import requests

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"server-{name}.log"
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "WORKERS": "1", "THREADS": "8",
                    "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO), "PREENCODE": "false", **env}
        if app is None:
            command = [sys.executable, "-m", "ml_backend", "serve"]
        else:  # the flags of ml_backend.__main__.serve, with this app
            command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
                       "--threads", "8", "--worker-class", "gthread", "--timeout", "300", "--log-level", "warning",
                       "--config", "python:ml_backend.gunicorn_hooks", app]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=5).json()["sam"]["state"] == "ready":
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} server not ready in 900 s")

    def click(self, task: dict, form: str, index: int, size: tuple[int, int]) -> float:
        """One further click (a new positive keypoint) in ``form``'s config: seconds until the whole answer
        is read (a new connection each time, as Label Studio's requests do)."""
        import requests

        width, height = size
        x, y = click_point(index)
        # No project: bare paths under LOCAL_FILES_DOCUMENT_ROOT, no Label Studio listing a project's local storages.
        body = {"tasks": [task], "label_config": label_config(form),
                "params": {"context": {"result": [_keypoint(x, y, width, height)]}}}
        cpu, faults = self.cpu_s(), self.page_faults()
        started = time.perf_counter()
        response = requests.post(self.url + "/predict", json=body, timeout=600)
        content = response.content
        elapsed = time.perf_counter() - started
        self.last_cpu_s = self.cpu_s() - cpu
        self.last_page_faults = self.page_faults() - faults
        if response.status_code != 200 or not content:
            raise RuntimeError(f"click failed: {response.status_code} {content[:300]!r}")
        self.last_answer = content
        return elapsed

    def _workers(self) -> list[str]:
        """The gunicorn worker processes' ids (Linux ``/proc``; none elsewhere)."""
        try:
            return Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return []

    def page_faults(self) -> int:
        """Minor page faults the worker(s) have taken so far, every thread (``/proc/<pid>/stat``; 0 elsewhere)."""
        total = 0
        for pid in self._workers():
            try:  # the fields after the command's closing parenthesis; minflt is the 10th of the line
                total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def peak_rss_mb(self) -> float:
        """The largest peak resident memory of the worker(s) so far (``VmHWM``), MB; 0 where unknown."""
        peak = 0
        for pid in self._workers():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:", 1)[1].split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return peak / 1024

    def cpu_s(self) -> float:
        """CPU seconds the gunicorn worker(s) have run so far, every thread (Linux ``schedstat``: ns; 0 elsewhere).

        On a shared machine the wall time of a click includes waiting for a core; this does not."""
        total = 0
        try:
            for pid in self._workers():
                for task in Path(f"/proc/{pid}/task").iterdir():
                    total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            return 0.0
        return total / 1e9

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when gunicorn has not exited in 30 s."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def click_point(index: int) -> tuple[float, float]:
    """Further click ``index``'s keypoint, percent of the image (x, y): inside every shape's object."""
    return 30 + (index % 20), 40 + (index % 20) / 2


def _engine_click(engine, embedding, index: int, size: tuple[int, int]) -> tuple[float, float]:
    """The engine's cached click at :func:`click_point` ``index`` (``SamEngine.decode``: mask on the host,
    upsampling and threshold included): wall and CPU seconds."""
    from ml_backend.sam import Prompts

    width, height = size
    x, y = click_point(index)
    started, cpu = time.perf_counter(), time.process_time()
    engine.decode(embedding, Prompts.from_lists(points=[(x * width / 100, y * height / 100)], labels=[1]))
    return time.perf_counter() - started, time.process_time() - cpu


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


def _answer_iou(answer: bytes, mask) -> float:
    """IoU of the mask read back from an HTTP answer (every region of its prediction) with ``mask``: 1.0 for
    brush and bitmask, the polygons' simplification otherwise; a wrong answer shows here, not only in time."""
    import numpy as np

    from ml_backend.formats import region_mask

    height, width = mask.shape
    restored = np.zeros_like(mask)
    for item in json.loads(answer)["results"][0]["result"]:
        restored |= region_mask(item, (width, height), max_pixels=width * height)
    return float((restored & mask).sum() / max(1, (restored | mask).sum()))


def _answer_score(answer: bytes) -> float:
    """The prediction's score in an HTTP answer: SAM's predicted IoU, or the stub decoder's fixed 0.9."""
    return float(json.loads(answer)["results"][0]["score"])


def _shape_image(root: Path, shape: str, size: tuple[int, int]) -> Path:
    """The shape drawn white on black (PNG: lossless, so the stub's mask is exactly the shape)."""
    import numpy as np
    from PIL import Image

    from benchmarks.mask_formats import SHAPES

    width, height = size
    path = root / f"{shape}-{width}x{height}.png"
    mask = SHAPES[shape](height, width)
    Image.fromarray(np.repeat((mask * np.uint8(255))[..., None], 3, axis=2)).save(path, compress_level=1)
    return path


def run_http(*, quick: bool, clicks: int, sizes: tuple[tuple[int, int], ...], shapes: tuple[str, ...],
             forms: tuple[str, ...], repeat: int, real: bool = True, device: str = "cpu", shaped: bool = True) -> dict:
    """The four tables of the module docstring, as one report; real SAM on ``device`` (SAM_DEVICE)."""
    from benchmarks.mask_formats import SHAPES

    report: dict = {"answer_stages": {}, "shaped": [], "shaped_sam": [], "real": [], "worker_peak_rss_mb": {}}
    stage_size = (4000, 3000) if (4000, 3000) in sizes else sizes[-1]
    for shape in shapes if shaped else ():
        mask = SHAPES[shape](stage_size[1], stage_size[0])
        for form in forms:
            report["answer_stages"][f"{shape} {form} {stage_size[0]}x{stage_size[1]}"] = answer_stages(mask, form, repeat)
    with tempfile.TemporaryDirectory(prefix="click-bench-") as tmp:
        root = Path(tmp)
        env = {"LOCAL_FILES_DOCUMENT_ROOT": str(root), "MODEL_DIR": str(root / "models"),
               "IMAGE_CACHE_DIR": str(root / "cache"), "EMBEDDING_STORE_DIR": str(root / "store")}
        server = _Server(root, "shaped", env, app="benchmarks.click:shaped_app()") if shaped else None
        try:
            task_id = 0
            for size in sizes if shaped else ():
                for shape in shapes:
                    path = _shape_image(root, shape, size)
                    for form in forms:
                        task_id += 1
                        task = {"id": task_id, "data": {"image": str(path)}}
                        first = server.click(task, form, 0, size)
                        iou = _answer_iou(server.last_answer, SHAPES[shape](size[1], size[0]))
                        timed = _further_clicks(server, task, form, clicks, size)
                        report["shaped"].append({"size": f"{size[0]}x{size[1]}", "shape": shape, "form": form,
                                                 "first_click_s": first, **timed, "answer_iou": iou,
                                                 "answer_score": _answer_score(server.last_answer)})
                    path.unlink()
        finally:
            if server is not None:
                report["worker_peak_rss_mb"]["shaped"] = server.peak_rss_mb()
                server.stop()
        if real:
            engine, sam_env = _bench_engine(env, quick, device)
            if shaped:
                report["shaped_sam"] = _shaped_sam_rows(root, sam_env, engine, clicks, sizes, shapes, forms,
                                                        report["worker_peak_rss_mb"])
            report["real"] = _real_rows(root, sam_env, engine, quick, clicks, forms, report["worker_peak_rss_mb"])
    return report


def _bench_engine(env: dict, quick: bool, device: str) -> tuple:
    """This process's SAM (the preset the servers load, on ``device``), warmed as a server warms its own; and the
    servers' environment for it (same ``SAM_MODEL``, same embedding store: a server reads the embeddings made here)."""
    import dataclasses as dc

    from benchmarks.session import ensure_preset
    from ml_backend.sam.loading import load_engine
    from ml_backend.settings import Settings

    env = {**env, "SAM_MODEL": str(ensure_preset(quick)), "SAM_DEVICE": device}
    engine = load_engine(dc.replace(Settings.from_env(env), preencode=False))
    engine.warm_up()  # as the server does after loading (the traced decoder settles over its first calls)
    return engine, env


def _further_clicks(server: "_Server", task: dict, form: str, clicks: int, size: tuple[int, int],
                    engine=None, embedding=None) -> dict:
    """Further clicks 1..``clicks`` through HTTP: medians of their wall ms, the worker's CPU ms and page faults.
    With an ``engine``, each is followed by the engine's cached click on ``embedding`` at the same point, and the
    row holds its medians and the ratios of the two."""
    http, http_cpu, faults, direct, direct_cpu = [], [], [], [], []
    for i in range(1, clicks + 1):
        http.append(server.click(task, form, i, size))
        http_cpu.append(server.last_cpu_s)
        faults.append(server.last_page_faults)
        if engine is not None:
            wall, cpu = _engine_click(engine, embedding, i, size)
            direct.append(wall)
            direct_cpu.append(cpu)
    row = {"further_click_ms": _stats(http), "further_click_cpu_ms": _stats(http_cpu),
           "further_click_page_faults": statistics.median(faults)}
    if engine is not None:
        row.update(engine_cached_click_ms=_stats(direct), engine_cached_click_cpu_ms=_stats(direct_cpu),
                   http_over_engine=_stats(http) / _stats(direct),
                   http_over_engine_cpu=_stats(http_cpu) / max(_stats(direct_cpu), 1e-9))
    return row


def _warm_server(server: "_Server", image: Path, form: str, size: tuple[int, int]) -> None:
    """Four untimed further clicks on a task of its own: otherwise whichever row is timed first pays the fresh
    worker's first allocations (measured: the first form 2.1x the engine, the same form 1.1x second)."""
    warm_up = {"id": 999, "data": {"image": str(image)}}
    for i in range(4):
        server.click(warm_up, form, i, size)


def _shaped_sam_rows(root: Path, env: dict, engine, clicks: int, sizes: tuple[tuple[int, int], ...],
                     shapes: tuple[str, ...], forms: tuple[str, ...], peak_rss_mb: dict) -> list:
    """Shaped masks behind SAM's decoder (``shaped_sam_app``): every click runs the real decoder on the shape
    image's embedding and answers the shape; each alternates with this process's cached click on the same
    embedding and point, so a row is the whole click of that mask and form beside the engine's."""
    from benchmarks.mask_formats import SHAPES
    from ml_backend.images import load_image_file

    server = _Server(root, "shaped-sam", env, app="benchmarks.click:shaped_sam_app()")
    rows, task_id = [], 2000
    try:
        for size in sizes:
            for shape in shapes:
                path = _shape_image(root, shape, size)
                embedding = engine.embed(load_image_file(path, max_pixels=size[0] * size[1]))  # into the store
                _engine_click(engine, embedding, 0, size)  # the engine's first click at this size, untimed
                if not rows:
                    _warm_server(server, path, forms[0], size)
                for form in forms:
                    task_id += 1
                    task = {"id": task_id, "data": {"image": str(path)}}
                    first = server.click(task, form, 0, size)
                    answer = {"answer_iou": _answer_iou(server.last_answer, SHAPES[shape](size[1], size[0])),
                              "answer_score": _answer_score(server.last_answer)}
                    rows.append({"size": f"{size[0]}x{size[1]}", "shape": shape, "form": form, "first_click_s": first,
                                 **answer, **_further_clicks(server, task, form, clicks, size, engine, embedding)})
                path.unlink()
    finally:
        peak_rss_mb["shaped_sam"] = server.peak_rss_mb()
        server.stop()
    return rows


def _real_rows(root: Path, env: dict, engine, quick: bool, clicks: int, forms: tuple[str, ...],
               peak_rss_mb: dict) -> list:
    """Real SAM through ``python -m ml_backend serve``, each click alternating with the engine's cached click."""
    from PIL import Image

    from benchmarks.sam import synthetic_image
    from ml_backend.images import load_image_file

    width, height = (640, 480) if quick else (4000, 3000)
    Image.fromarray(synthetic_image(height, width)).save(root / "photo.jpg", quality=92)
    image = load_image_file(root / "photo.jpg", max_pixels=10**8)
    embedding = engine.embed(image)  # into the shared store: the server reads it instead of encoding again
    for i in range(3):
        _engine_click(engine, embedding, i, (width, height))
    server = _Server(root, "sam", env)
    rows = []
    try:
        _warm_server(server, root / "photo.jpg", forms[0], (width, height))
        for n, form in enumerate(forms, start=1):
            task = {"id": 1000 + n, "data": {"image": str(root / "photo.jpg")}}
            first = server.click(task, form, 0, (width, height))
            rows.append({"size": f"{width}x{height}", "form": form, "model": "quick" if quick else "base (vit_b shapes)",
                         "first_click_s": first,
                         **_further_clicks(server, task, form, clicks, (width, height), engine, embedding)})
    finally:
        peak_rss_mb["real"] = server.peak_rss_mb()
        server.stop()
    return rows


def format_http(report: dict) -> str:
    lines = [f"Answer path per stage (in process; median wall / CPU ms; 'before' = what the stage replaced; "
             f"target: the sum <= {TARGET_ANSWER_MS:g} ms at 4000x3000):"]
    for name, stages in report["answer_stages"].items():
        lines.append(f"  {name}")
        for stage, row in stages.items():
            before = (f"   before {row['before_wall_ms']:8.2f} / {row['before_cpu_ms']:8.2f}"
                      if "before_wall_ms" in row else "")
            lines.append(f"    {stage:40s} {row['wall_ms']:8.2f} / {row['cpu_ms']:8.2f}{before}")
    lines.append("Shaped masks (stub decoder, ~0 ms engine) through HTTP, gunicorn: further click median, wall ms / "
                 "the worker's CPU ms (x brush of the same shape and size, wall)")
    brush = {(r["size"], r["shape"]): r["further_click_ms"] for r in report["shaped"] if r["form"] == "brush"}
    for row in report["shaped"]:
        ratio = (f"  x{row['further_click_ms'] / brush[(row['size'], row['shape'])]:.2f}"
                 if (row["size"], row["shape"]) in brush and row["form"] != "brush" else "")
        lines.append(f"  {row['size']:>10s} {row['shape']:6s} {row['form']:8s} {row['further_click_ms']:9.1f} / "
                     f"{row['further_click_cpu_ms']:7.1f}{ratio:8s}  read-back IoU {row['answer_iou']:.4f}, "
                     f"{row['further_click_page_faults']:.0f} page faults")
    if report["shaped_sam"]:
        lines.append(f"Shaped masks behind SAM's decoder through HTTP, against the engine's cached click (same "
                     f"embedding and point): further click median, wall ms / the worker's CPU ms; x engine (wall, CPU); "
                     f"x brush of the same shape and size (wall, CPU; target <= {TARGET_FORM_OVER_BRUSH}x at 4000x3000)")
        brush = {(r["size"], r["shape"]): r for r in report["shaped_sam"] if r["form"] == "brush"}
        for row in report["shaped_sam"]:
            base = brush.get((row["size"], row["shape"]))
            ratio = (f"  x{row['further_click_ms'] / base['further_click_ms']:.2f} / "
                     f"x{row['further_click_cpu_ms'] / max(base['further_click_cpu_ms'], 1e-9):.2f} brush"
                     if base and row["form"] != "brush" else "")
            lines.append(f"  {row['size']:>10s} {row['shape']:6s} {row['form']:8s} {row['further_click_ms']:8.1f} / "
                         f"{row['further_click_cpu_ms']:7.1f}, engine {row['engine_cached_click_ms']:7.1f} / "
                         f"{row['engine_cached_click_cpu_ms']:7.1f}: x{row['http_over_engine']:.2f} / "
                         f"x{row['http_over_engine_cpu']:.2f}{ratio}  read-back IoU {row['answer_iou']:.4f}, "
                         f"{row['further_click_page_faults']:.0f} page faults")
    if report["real"]:
        lines.append(f"Real SAM through HTTP against the engine's cached click (same embedding and point; wall ms, CPU "
                     f"ms), target for brush <= {TARGET_HTTP_OVER_ENGINE}x and for the other forms <= "
                     f"{TARGET_FORM_OVER_BRUSH}x brush:")
        brush_ms = next((r["further_click_ms"] for r in report["real"] if r["form"] == "brush"), None)
        for row in report["real"]:
            form_ratio = f", x{row['further_click_ms'] / brush_ms:.2f} brush" if brush_ms and row["form"] != "brush" else ""
            lines.append(f"  {row['model']} {row['size']} {row['form']:8s}: HTTP {row['further_click_ms']:7.1f} "
                         f"(CPU {row['further_click_cpu_ms']:6.1f}), engine {row['engine_cached_click_ms']:7.1f} "
                         f"(CPU {row['engine_cached_click_cpu_ms']:6.1f}): x{row['http_over_engine']:.2f} wall, "
                         f"x{row['http_over_engine_cpu']:.2f} CPU{form_ratio} (first click {row['first_click_s']:.2f} s, "
                         f"{row['further_click_page_faults']:.0f} page faults)")
    if report["worker_peak_rss_mb"]:
        lines.append("Worker's peak resident memory (VmHWM): " + ", ".join(
            f"{name} {mb:.0f} MB" for name, mb in report["worker_peak_rss_mb"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # The engine's click here allocates as the servers' workers do; before torch's first allocation, and in main
    # rather than at import, so that a process importing this module (the test session) keeps its environment.
    huge_page_tensors()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.click", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small model and small images (HTTP: 320x240 shapes, a 640x480 photo; "
                             "in-process: 640x480)")
    parser.add_argument("--clicks", type=int, default=5, help="further clicks to time per row (default 5)")
    parser.add_argument("--size", type=size_argument(16), action="append",
                        help="WIDTHxHEIGHT of the shaped masks (repeatable; default 1024x768, 4000x3000, 8000x6000)")
    parser.add_argument("--shape", choices=("blob", "thin", "holes", "noise"), action="append",
                        help="(repeatable; default blob, thin, holes; noise: a random SAM's noise-like mask)")
    parser.add_argument("--form", choices=tuple(FORMS), action="append", help="(repeatable; default all)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per answer-path stage (default 7)")
    parser.add_argument("--no-real", action="store_true",
                        help="skip the tables that run real SAM (shapes behind its decoder, real SAM)")
    parser.add_argument("--device", default="cpu", help="SAM_DEVICE of the real-SAM rows (default cpu)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads in the bench and the servers (OMP_NUM_THREADS; default: torch's own). "
                             "On an oversubscribed machine 2 threads spin-wait for each other: compare with 1")
    parser.add_argument("--real-only", action="store_true", help="only the real-SAM photo rows (no stages, no shapes)")
    parser.add_argument("--in-process", action="store_true", help="the older Flask test-client bench (brush only)")
    parser.add_argument("--shared-prompt-state", action="store_true",
                        help="in-process: also time each further click with the prompt state shared by worker processes")
    parser.add_argument("--prompt-state-dir", default="",
                        help="where the shared prompt state goes (default: where the backend would put it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.clicks < 1:
        parser.error("--clicks must be at least 1")
    if args.torch_threads > 0:
        import os

        import torch

        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the servers inherit it
    if not (args.in_process or args.shared_prompt_state):
        report = run_http(quick=args.quick, clicks=args.clicks,
                          sizes=tuple(args.size or (QUICK_SIZES if args.quick else SIZES)),
                          shapes=tuple(args.shape or ("blob", "thin", "holes")), forms=tuple(args.form or FORMS),
                          repeat=args.repeat, real=not args.no_real, device=args.device, shaped=not args.real_only)
        print(json.dumps(report) if args.json else format_http(report))
        return 0
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
