"""``python -m benchmarks.training``: our streaming pipeline against the book's in-memory arrays.

* Throughput: one process, one model; epochs alternate between ``model.fit`` on our
  ``TrimapDataset`` (reading JPEG/PNG from disk) and ``model.fit`` on the same images held in
  memory as float32 arrays, so both see the same machine load. The first round is warm-up.
  Target: streaming ≥ 0.9 × in-memory images/s.
* Memory: peak RSS (sampled while data is read and the model trains, after imports and model
  building) of a fresh process that trains one epoch streaming N, then 10·N images (target:
  within 10 %), and, for contrast, of one that loads N and 10·N images into memory the book's
  way (it trains only a couple of steps: its memory is the arrays).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    image_size: int
    source_size: int  # longest side of the synthetic images on disk (they get resized)
    batch_size: int
    throughput_images: int
    rounds: int  # alternating epochs per mode, the first one being warm-up
    memory_images: int  # N; the second memory run uses 10·N

    @classmethod
    def preset(cls, quick: bool) -> BenchConfig:
        if quick:
            return cls(image_size=64, source_size=96, batch_size=8, throughput_images=48, rounds=3, memory_images=16)
        return cls(image_size=200, source_size=320, batch_size=16, throughput_images=96, rounds=3, memory_images=50)


class RssSampler:
    """Peak resident memory while a block runs, sampled every 10 ms from /proc (Linux).

    ``ru_maxrss`` alone is useless here: the process's all-time peak is set while importing
    torch and Keras, before any data is touched, so every run reported the same figure.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        with open("/proc/self/statm", encoding="ascii") as handle:
            self.peak_bytes = max(self.peak_bytes, int(handle.read().split()[1]) * self._page)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def _load_in_memory(pairs, size: int):
    """The book's approach: every image as float32, every trimap as uint8, all in memory."""
    import numpy as np

    from training.data import load_pair

    images = np.zeros((len(pairs), size, size, 3), dtype="float32")
    trimaps = np.zeros((len(pairs), size, size), dtype="uint8")
    for i, pair in enumerate(pairs):
        images[i], trimaps[i] = load_pair(pair, size)
    return images, trimaps


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    return EpochTimer()


def _throughput(data_dir: Path, config: BenchConfig) -> dict[str, Any]:
    from training.data import scan_dataset
    from training.model import build_model, compile_model
    from training.pipeline import TrimapDataset

    pairs = scan_dataset(data_dir).pairs
    model = compile_model(build_model(config.image_size))
    streaming = TrimapDataset(pairs, config.image_size, config.batch_size, shuffle=True)
    load_started = time.perf_counter()
    images, trimaps = _load_in_memory(pairs, config.image_size)
    load_seconds = time.perf_counter() - load_started
    seconds: dict[str, list[float]] = {"streaming": [], "in_memory": []}
    for round_index in range(config.rounds):
        for mode in ("streaming", "in_memory"):
            timer = _epoch_timer()
            if mode == "streaming":
                model.fit(streaming, epochs=1, verbose=0, callbacks=[timer])
            else:
                model.fit(images, trimaps, batch_size=config.batch_size, shuffle=True, epochs=1, verbose=0,
                          callbacks=[timer])
            if round_index > 0:
                seconds[mode].append(timer.seconds)
    rates = {mode: len(pairs) * len(times) / sum(times) for mode, times in seconds.items()}
    return {
        "images": len(pairs),
        "streaming_images_per_s": round(rates["streaming"], 2),
        "in_memory_images_per_s": round(rates["in_memory"], 2),
        "ratio": round(rates["streaming"] / rates["in_memory"], 3),
        "in_memory_load_s": round(load_seconds, 2),
        "epoch_seconds": {mode: [round(s, 2) for s in times] for mode, times in seconds.items()},
    }


def _memory_worker(mode: str, data_dir: Path, config: BenchConfig) -> dict[str, Any]:
    """Runs in a fresh process: train on every pair of ``data_dir`` and report peak RSS."""
    from training.data import scan_dataset
    from training.model import build_model, compile_model
    from training.pipeline import TrimapDataset

    model = compile_model(build_model(config.image_size))
    started = time.perf_counter()
    with RssSampler() as sampler:
        pairs = scan_dataset(data_dir).pairs
        if mode == "streaming":
            data = TrimapDataset(pairs, config.image_size, config.batch_size, shuffle=True)
            model.fit(data, epochs=1, verbose=0)
        else:
            images, trimaps = _load_in_memory(pairs, config.image_size)
            model.fit(images, trimaps, batch_size=config.batch_size, epochs=1, steps_per_epoch=2, verbose=0)
    return {"mode": mode, "images": len(pairs), "peak_rss_mb": round(sampler.peak_mb, 1),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - started, 2)}


def _run_worker(mode: str, data_dir: Path, config: BenchConfig) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.training", "--worker", mode, str(data_dir), json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Run the whole benchmark; returns the figures (also the ``--json`` output)."""
    from training.synthetic import write_synthetic

    config = BenchConfig.preset(quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="training-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        n = config.memory_images
        write_synthetic(root / "throughput", config.throughput_images, config.source_size, seed=1)
        write_synthetic(root / "n", n, config.source_size, seed=2)
        write_synthetic(root / "10n", 10 * n, config.source_size, seed=3)
        log.info("throughput: %d images, %d alternating rounds", config.throughput_images, config.rounds)
        throughput = _throughput(root / "throughput", config)
        memory: dict[str, Any] = {}
        for mode in ("streaming", "in_memory"):
            for label in ("n", "10n"):
                log.info("memory: %s on %s images", mode, label)
                memory[f"{mode}_{label}"] = _run_worker(mode, root / label, config)
    stream_ratio = memory["streaming_10n"]["peak_rss_mb"] / memory["streaming_n"]["peak_rss_mb"]
    book_ratio = memory["in_memory_10n"]["peak_rss_mb"] / memory["in_memory_n"]["peak_rss_mb"]
    import torch

    return {
        "config": asdict(config),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "throughput": throughput,
        "throughput_target_met": throughput["ratio"] >= 0.9,
        "memory": memory,
        "memory_ratio_streaming_10n_over_n": round(stream_ratio, 3),
        "memory_ratio_in_memory_10n_over_n": round(book_ratio, 3),
        "memory_target_met": stream_ratio <= 1.10,
        "total_s": round(time.perf_counter() - started, 1),
    }


def format_report(result: dict[str, Any]) -> str:
    t, m = result["throughput"], result["memory"]
    return "\n".join([
        f"device: {result['device']}, image size {result['config']['image_size']}, "
        f"batch {result['config']['batch_size']}",
        f"throughput on {t['images']} images: streaming {t['streaming_images_per_s']} img/s, "
        f"in-memory {t['in_memory_images_per_s']} img/s, ratio {t['ratio']} (target >= 0.9: "
        f"{'met' if result['throughput_target_met'] else 'NOT met'})",
        f"peak RSS streaming: {m['streaming_n']['peak_rss_mb']} MB at {m['streaming_n']['images']} images, "
        f"{m['streaming_10n']['peak_rss_mb']} MB at {m['streaming_10n']['images']}, ratio "
        f"{result['memory_ratio_streaming_10n_over_n']} (target <= 1.10: "
        f"{'met' if result['memory_target_met'] else 'NOT met'})",
        f"peak RSS in-memory (book): {m['in_memory_n']['peak_rss_mb']} MB at {m['in_memory_n']['images']} "
        f"images, {m['in_memory_10n']['peak_rss_mb']} MB at {m['in_memory_10n']['images']}, ratio "
        f"{result['memory_ratio_in_memory_10n_over_n']}",
        f"total {result['total_s']} s",
    ])


def main(argv: list[str] | None = None) -> int:
    """The benchmark (``--quick``, ``--json``), or one memory worker (``--worker MODE DATA CONFIG``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images and counts (about 2 minutes on a CPU)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=("streaming", "in_memory"), help=argparse.SUPPRESS)
    parser.add_argument("worker_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import training  # noqa: F401  (selects the torch backend before keras)

    if args.worker:
        data_dir, config = args.worker_args
        print(json.dumps(_memory_worker(args.worker, Path(data_dir), BenchConfig(**json.loads(config)))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_bench(quick=args.quick)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
