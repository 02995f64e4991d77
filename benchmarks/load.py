"""``python -m benchmarks.load``: a team of annotators against the backend under gunicorn.

The backend starts as the README starts it (``python -m ml_backend serve``) with a
base-size SAM of random weights (vit_b shapes, saved as a local preset). In one run,
for each ``--workers`` setting:

* **single**: one annotator alone, on an image of its own: the first click (an
  encode), then ``--refinements`` further clicks with think time: the reference;
* **team**: ``--annotators`` simulated annotators start at the same moment, each on
  images of its own (``--images`` each, 4000x3000 JPEGs): first click, refinement
  clicks with think time, next image. More first clicks than encode slots arrive at
  once, so some are refused with 503 + ``Retry-After``; like a person, the annotator
  clicks again after that many seconds.

``--replicas 1,2`` runs each setting with that many backends (each ``--workers`` workers) behind a
round-robin proxy (:mod:`benchmarks.round_robin`), as a load balancer would put them: they share a
``redis-server`` started for the run (``REDIS_URL``: prompt state, URL index, encode locks), the embeddings
directory and the models directory, and nothing else; every setting of the run, one replica included, goes
through the proxy and Redis, so the ratios printed at the end (2 replicas against 1) compare replica counts
alone.

Reported per phase: p50/p95/max answer time of first clicks (from the first attempt
to the mask, retries included), cached (refinement) clicks, and busy answers (503);
errors (anything but a mask or a 503 with ``Retry-After``, or no answer within Label
Studio's 100 s); encodes performed (from the backend's log) against distinct images;
peak RSS of the gunicorn processes. Targets (``TARGET_*``) are printed beside the
figures. Label Studio opens a new connection per request, and so do the annotators
here: with several workers a further click may land on a worker that has not encoded
that image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from benchmarks.common import size_argument

REPO = Path(__file__).resolve().parents[1]
LABEL_STUDIO_TIMEOUT_S = 100.0  # how long Label Studio waits for /predict
TARGET_ERRORS = 0
TARGET_CACHED_P95_VS_SINGLE = 3.0  # p95 cached click under load / single-user p95, at most
TARGET_BUSY_ANSWER_S = 1.0  # a refused first click is answered within, at most
THREADS = 8  # gunicorn threads per worker (the README's default)
REQUEST_WORKING_MB = 128  # one click in flight: a 4000x3000 image decoded, one full-size mask upsampled
REFINEMENT_CACHE_MB = 64  # ml_backend.runtime.REFINEMENT_CACHE_BYTES
ENCODED = re.compile(r"encoded image ([0-9a-f]+) in ")
LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""


@dataclass(frozen=True)
class Workload:
    annotators: int
    images: int
    refinements: int
    think_s: float
    width: int
    height: int


@dataclass
class Recorder:
    """Answer times by phase, errors and busy answers; shared by the annotator threads."""

    times: dict[str, list[float]] = field(default_factory=lambda: {"first": [], "cached": [], "busy": []})
    errors: list[str] = field(default_factory=list)
    busy_without_retry_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.times[phase].append(seconds)

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the model and the images -------------------------------------------------------------

def build_preset(directory: Path, quick: bool) -> Path:
    """A random-weight SAM saved as a keras-hub preset (base vit_b shapes, or small with ``quick``)."""
    if (directory / "config.json").is_file():
        return directory
    import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

    import keras

    from benchmarks.sam import base_architecture, quick_architecture
    from ml_backend.sam.convert import build_segmenter

    keras.utils.set_random_seed(0)
    segmenter = build_segmenter(quick_architecture() if quick else base_architecture())
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    segmenter.save_to_preset(str(partial))
    partial.rename(directory)
    return directory


def write_images(folder: Path, paths: list[str], width: int, height: int) -> None:
    from PIL import Image

    from benchmarks.sam import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    for seed, path in enumerate(paths):
        Image.fromarray(synthetic_image(height, width, seed=seed)).save(path, quality=92)


# --- the server ---------------------------------------------------------------------------

@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [self.process.pid, *(int(p) for p in children.read_text().split())] if children.exists() else []


@contextmanager
def serve(workdir: Path, preset: Path, workers: int, env_extra: dict[str, str],
          names: tuple[str, ...] = ("",)) -> Iterator[list[Server]]:
    """``python -m ml_backend serve`` on a free loopback port per name, started together and yielded when SAM is
    ready in every one; killed afterwards. A name sets a replica apart: its log, download cache and prompt-state
    folder (what one host keeps to itself)."""
    servers = []
    try:
        for name in names:
            port = free_port()
            log = workdir / f"backend-w{workers}{name}.log"
            env = {**os.environ, "PYTHONPATH": str(REPO), "HOST": "127.0.0.1", "PORT": str(port),
                   "WORKERS": str(workers), "THREADS": str(THREADS), "LOG_LEVEL": "INFO", "SAM_MODEL": str(preset),
                   "MODEL_DIR": str(workdir / "models"), "IMAGE_CACHE_DIR": str(workdir / f"image-cache{name}"),
                   "LOCAL_FILES_DOCUMENT_ROOT": str(workdir / "files"),
                   "EMBEDDING_STORE_DIR": str(workdir / f"embeddings-w{workers}"),  # fresh: every encode counted
                   **({"PROMPT_STATE_DIR": str(workdir / f"prompt-state{name}")} if name else {}), **env_extra}
            process = subprocess.Popen([sys.executable, "-m", "ml_backend", "serve"], cwd=REPO, env=env,
                                       stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
            servers.append(Server(f"http://127.0.0.1:{port}", process, log))
        deadline = time.monotonic() + 900
        for server in servers:
            while not _all_ready(server, workers):
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"backend not ready:\n{server.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
        yield servers
    finally:
        for server in servers:
            _stop(server.process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the backend's process group (master and workers), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except ProcessLookupError:  # already gone (a worker that failed to boot takes the master along)
        process.wait()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _all_ready(server: Server, workers: int) -> bool:
    """Every worker has loaded SAM (each logs it once)."""
    return server.log.read_text(errors="replace").count("SAM ready") >= workers


@dataclass
class Replicas:
    """Backends behind a round-robin proxy: what the annotators see is one server at the proxy's URL."""

    url: str
    servers: list[Server]

    def pids(self) -> list[int]:
        return [pid for server in self.servers for pid in server.pids()]


@contextmanager
def redis_for_run(workdir: Path) -> Iterator[str]:
    """A ``redis-server`` on a free loopback port for one run (no persistence); its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--replicas needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def serve_replicas(workdir: Path, preset: Path, workers: int, replicas: int, env_extra: dict[str, str],
                   redis_url: str) -> Iterator[Replicas]:
    """``replicas`` backends sharing ``redis_url``, the embeddings and the models directory, behind the proxy."""
    from benchmarks.round_robin import RoundRobinProxy

    shared = {**env_extra, "REDIS_URL": redis_url,
              "EMBEDDING_STORE_DIR": str(workdir / f"embeddings-r{replicas}w{workers}")}  # fresh, and shared
    with serve(workdir, preset, workers, shared, tuple(f"-r{replicas}.{n}" for n in range(replicas))) as servers:
        proxy = RoundRobinProxy([server.url for server in servers])
        try:
            yield Replicas(proxy.url, servers)
        finally:
            proxy.close()


class RssSampler:
    """Peak resident memory of the gunicorn master and workers (of every replica), sampled from /proc."""

    def __init__(self, server: Server | Replicas, interval_s: float = 0.25) -> None:
        self.server = server
        self.interval_s = interval_s
        self.peak_total_mb = 0.0
        self.peak_worker_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float]:
        servers = self.server.servers if isinstance(self.server, Replicas) else [self.server]
        sizes = [[_rss_mb(pid) for pid in server.pids()] for server in servers]
        workers = [size for each in sizes for size in each[1:]] or [0.0]
        return sum(size for each in sizes for size in each), max(workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, worker = self.sample()
            self.peak_total_mb = max(self.peak_total_mb, total)
            self.peak_worker_mb = max(self.peak_worker_mb, worker)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --- the annotators -----------------------------------------------------------------------

def _keypoint(x_pct: float, y_pct: float, work: Workload) -> dict:
    return {"original_width": work.width, "original_height": work.height, "image_rotation": 0,
            "from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x_pct, "y": y_pct, "width": 1, "keypointlabels": ["Object"]}}


def click(server: Server, task: dict, points: list[dict], record: Recorder, phase: str) -> None:
    """One click as Label Studio sends it (all the region's points so far); retried after a 503 as a
    person would. Records the time from the first attempt to the mask."""
    # No project: the images are bare paths under LOCAL_FILES_DOCUMENT_ROOT and no Label Studio lists a project's
    # local storages here (a task of a project reads only inside those).
    body = {"tasks": [task], "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": points}}}
    started = time.perf_counter()
    while True:
        attempt = time.perf_counter()
        try:
            response = requests.post(server.url + "/predict", json=body, timeout=LABEL_STUDIO_TIMEOUT_S)
        except requests.RequestException as exc:
            record.error(f"{phase} click: {exc.__class__.__name__} after {time.perf_counter() - attempt:.1f} s")
            return
        answered = time.perf_counter() - attempt
        if response.status_code == 503:
            record.add("busy", answered)
            retry_after = response.headers.get("Retry-After", "")
            if not retry_after.isdigit():
                with record.lock:
                    record.busy_without_retry_after += 1
                retry_after = "5"
            time.sleep(int(retry_after))
            continue
        results = response.json().get("results") if response.status_code == 200 else None
        if not results or not results[0].get("result") or "rle" not in results[0]["result"][0]["value"]:
            record.error(f"{phase} click: {response.status_code} {response.text[:200]}")
            return
        record.add(phase, time.perf_counter() - started)
        return


def annotate(server: Server, images: list[str], work: Workload, record: Recorder, rng: random.Random) -> None:
    """One annotator's session; ``images`` are paths under the backend's LOCAL_FILES_DOCUMENT_ROOT."""
    for name in images:
        task = {"id": abs(hash(name)) % 10**6, "data": {"image": name}}
        points = [_keypoint(rng.uniform(20, 80), rng.uniform(20, 80), work)]
        click(server, task, points, record, "first")
        for _ in range(work.refinements):
            time.sleep(work.think_s * rng.uniform(0.5, 1.5))
            points.append(_keypoint(rng.uniform(20, 80), rng.uniform(20, 80), work))
            click(server, task, points, record, "cached")


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"n": len(values), "p50_s": round(statistics.median(ordered), 3), "p95_s": round(p95, 3),
            "max_s": round(ordered[-1], 3)}


def run_config(workdir: Path, preset: Path, workers: int, work: Workload, env_extra: dict[str, str],
               replicas: int | None = None, redis_url: str = "") -> dict:
    """One setting: ``workers`` per backend; ``replicas`` backends behind the proxy (None: one, no proxy)."""
    tag = f"w{workers}" if replicas is None else f"r{replicas}w{workers}"
    folder = workdir / "files" / "images"
    single_image = str(folder / f"{tag}-single.jpg")
    team_images = [[str(folder / f"{tag}-a{a}-{i}.jpg") for i in range(work.images)]
                   for a in range(work.annotators)]
    write_images(folder, [single_image, *(n for names in team_images for n in names)], work.width, work.height)
    with contextlib.ExitStack() as stack:
        if replicas is None:
            [server] = stack.enter_context(serve(workdir, preset, workers, env_extra))
        else:
            server = stack.enter_context(serve_replicas(workdir, preset, workers, replicas, env_extra, redis_url))
        rss = stack.enter_context(RssSampler(server))
        rss_ready_mb = rss.sample()[1]
        single = Recorder()
        annotate(server, [single_image], work, single, random.Random(0))
        rss_single_mb = rss.peak_worker_mb  # ready + one encode's working set, measured
        team = Recorder()
        threads = [threading.Thread(target=annotate, args=(server, names, work, team, random.Random(a + 1)))
                   for a, names in enumerate(team_images)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        team_s = time.perf_counter() - started
    logs = server.servers if isinstance(server, Replicas) else [server]
    encoded = [key for each in logs for key in ENCODED.findall(each.log.read_text(errors="replace"))]
    single_p95 = summary(single.times["cached"]).get("p95_s")
    team_p95 = summary(team.times["cached"]).get("p95_s")
    cache_mb = int(env_extra.get("EMBEDDING_CACHE_MB", "1024"))
    # What a worker may hold: what one annotator's image needed (the model, one encode's working set: ~2.7 GB
    # for vit_b in float32 on a CPU), the two caches full, and one click in flight on every thread.
    rss_bound_mb = rss_single_mb + cache_mb + REFINEMENT_CACHE_MB + THREADS * REQUEST_WORKING_MB
    busy = summary(team.times["busy"])
    return {
        "workers": workers,
        "replicas": replicas,
        "single": {phase: summary(single.times[phase]) for phase in ("first", "cached")},
        "team": {phase: summary(team.times[phase]) for phase in ("first", "cached", "busy")},
        "team_wall_s": round(team_s, 1),
        "errors": len(single.errors) + len(team.errors),
        "error_examples": (single.errors + team.errors)[:5],
        "busy_without_retry_after": team.busy_without_retry_after,
        "encodes": len(encoded),
        "distinct_images": 1 + work.annotators * work.images,
        "distinct_images_encoded": len(set(encoded)),
        "rss_ready_worker_mb": round(rss_ready_mb),
        "rss_single_user_worker_mb": round(rss_single_mb),
        "rss_peak_worker_mb": round(rss.peak_worker_mb),
        "rss_peak_total_mb": round(rss.peak_total_mb),
        "rss_bound_worker_mb": round(rss_bound_mb),
        "cached_p95_ratio": round(team_p95 / single_p95, 2) if team_p95 and single_p95 else None,
        "checks": {
            "errors == 0": len(single.errors) + len(team.errors) == TARGET_ERRORS,
            f"cached p95 <= {TARGET_CACHED_P95_VS_SINGLE}x single": bool(
                team_p95 and single_p95 and team_p95 <= TARGET_CACHED_P95_VS_SINGLE * single_p95),
            f"busy answered < {TARGET_BUSY_ANSWER_S} s with Retry-After": (
                busy["n"] == 0 or busy["max_s"] < TARGET_BUSY_ANSWER_S) and team.busy_without_retry_after == 0,
            "encodes == distinct images": len(encoded) == 1 + work.annotators * work.images,
            "peak worker RSS within the cache bound": rss.peak_worker_mb <= rss_bound_mb,
        },
    }


def run(quick: bool, workers: list[int], work: Workload, env_extra: dict[str, str], preset_dir: Path | None,
        log_dir: Path | None = None, replicas: list[int] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        preset = build_preset(preset_dir or workdir / "preset", quick)
        redis_url = stack.enter_context(redis_for_run(workdir)) if replicas else ""
        configs = []
        for count in replicas or [None]:
            for n in workers:
                try:
                    configs.append(run_config(workdir, preset, n, work, env_extra, count, redis_url))
                finally:
                    if log_dir is not None:
                        log_dir.mkdir(parents=True, exist_ok=True)
                        for log in workdir.glob("backend-*.log"):
                            shutil.copy(log, log_dir / log.name)
    return {"model": "quick (small random SAM)" if quick else "base (vit_b shapes, random weights)",
            "image": f"{work.width}x{work.height} JPEG", "annotators": work.annotators,
            "images_per_annotator": work.images, "refinements": work.refinements, "think_s": work.think_s,
            "cpus": os.cpu_count(), "settings": env_extra, "configs": configs,
            "replica_ratios": replica_ratios(configs)}


def replica_ratios(configs: list[dict]) -> dict:
    """Each setting with several replicas against the same setting with one, from the same run: the team's
    first and cached clicks (p50, p95; below 1 is faster) and the team phase's wall time."""
    def figure(config: dict, phase: str, stat: str) -> float | None:
        return config["team"][phase].get(stat)

    ratios = {}
    for config in configs:
        base = next((c for c in configs if c["replicas"] == 1 and c["workers"] == config["workers"]), None)
        if base is None or not config["replicas"] or config["replicas"] == 1:
            continue
        ratio = {f"{phase} {stat}": round(mine / theirs, 2)
                 for phase in ("first", "cached") for stat in ("p50_s", "p95_s")
                 if (mine := figure(config, phase, stat)) and (theirs := figure(base, phase, stat))}
        ratio["team wall"] = round(config["team_wall_s"] / base["team_wall_s"], 2) if base["team_wall_s"] else None
        ratios[f"{config['replicas']} replicas / 1, WORKERS={config['workers']}"] = ratio
    return ratios


def _fmt(stats: dict) -> str:
    if not stats.get("n"):
        return "-"
    return f"{stats['p50_s']:.2f} / {stats['p95_s']:.2f} / {stats['max_s']:.2f} (n={stats['n']})"


def print_report(report: dict) -> None:
    print(f"{report['model']}, {report['image']}, {report['annotators']} annotators x "
          f"{report['images_per_annotator']} images, 1 + {report['refinements']} clicks each, think "
          f"{report['think_s']} s, {report['cpus']} CPUs, settings {report['settings'] or 'defaults'}")
    for config in report["configs"]:
        replicas = f"{config['replicas']} replica(s) behind the proxy, " if config["replicas"] else ""
        print(f"\n{replicas}WORKERS={config['workers']}  (p50 / p95 / max seconds)")
        print(f"  single user: first click   {_fmt(config['single']['first'])}")
        print(f"  single user: cached click  {_fmt(config['single']['cached'])}")
        print(f"  team: first click          {_fmt(config['team']['first'])}  (retries after 503 included)")
        print(f"  team: cached click         {_fmt(config['team']['cached'])}  "
              f"(p95 {config['cached_p95_ratio']}x single; target <= {TARGET_CACHED_P95_VS_SINGLE}x)")
        print(f"  team: busy answers (503)   {_fmt(config['team']['busy'])}  (target < {TARGET_BUSY_ANSWER_S} s)")
        print(f"  errors {config['errors']} (target 0) {config['error_examples'] or ''}")
        print(f"  encodes {config['encodes']} for {config['distinct_images']} distinct images "
              f"({config['distinct_images_encoded']} of them encoded); team phase {config['team_wall_s']} s")
        print(f"  RSS per worker: ready {config['rss_ready_worker_mb']} MB, after one user's image "
              f"{config['rss_single_user_worker_mb']} MB, peak {config['rss_peak_worker_mb']} MB "
              f"(bound {config['rss_bound_worker_mb']} MB); all processes peak {config['rss_peak_total_mb']} MB")
        for name, ok in config["checks"].items():
            print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    for name, ratio in report["replica_ratios"].items():
        print(f"\n{name} (same run):  " + ", ".join(f"{k} {v}x" for k, v in ratio.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: small model, 640x480 images, 3 annotators x 2 images x 3 refinements")
    parser.add_argument("--workers", default="1,2", help="gunicorn WORKERS settings to run, comma-separated (1,2)")
    parser.add_argument("--replicas", help="backend replicas behind a round-robin proxy and a shared Redis, "
                                           "comma-separated (e.g. 1,2); each with every --workers setting")
    parser.add_argument("--annotators", type=int, help="simulated annotators (8)")
    parser.add_argument("--images", type=int, help="images per annotator (2)")
    parser.add_argument("--refinements", type=int, help="further clicks per image (10)")
    parser.add_argument("--think", type=float, help="mean think time between clicks in seconds (2)")
    parser.add_argument("--image", type=size_argument(16), help="WIDTHxHEIGHT of the images (4000x3000; --quick: 640x480)")
    parser.add_argument("--embedding-cache-mb", type=int, default=64,
                        help="EMBEDDING_CACHE_MB for the run (64: small enough that the cache evicts)")
    parser.add_argument("--encode-queue-timeout", type=float,
                        help="ENCODE_QUEUE_TIMEOUT_S for the run (default: the backend's, 45)")
    parser.add_argument("--preset-dir", type=Path, help="keep the random SAM preset here and reuse it")
    parser.add_argument("--log-dir", type=Path, help="keep the backend's log of each run here (backend-w<N>.log)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        workers = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers {args.workers!r}: give numbers such as 1,2")
    try:
        replicas = [int(n) for n in args.replicas.split(",")] if args.replicas else None
    except ValueError:
        parser.error(f"--replicas {args.replicas!r}: give numbers such as 1,2")
    if replicas is not None and min(replicas) < 1:
        parser.error("--replicas: at least 1")
    defaults = (3, 2, 3, 0.05, 640, 480) if args.quick else (8, 2, 10, 2.0, 4000, 3000)
    given = (args.annotators, args.images, args.refinements, args.think, *(args.image or (None, None)))
    work = Workload(*(default if value is None else value for value, default in zip(given, defaults)))
    if min(work.annotators, work.images, *workers) < 1 or work.refinements < 1 or work.think_s < 0:
        parser.error("annotators, images, refinements and workers must be at least 1; think time not negative")
    env_extra = {"EMBEDDING_CACHE_MB": str(args.embedding_cache_mb)}
    if args.encode_queue_timeout is not None:
        env_extra["ENCODE_QUEUE_TIMEOUT_S"] = str(args.encode_queue_timeout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the backend on the way out
    report = run(args.quick, workers, work, env_extra, args.preset_dir, args.log_dir, replicas)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
