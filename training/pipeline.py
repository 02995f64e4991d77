"""Streaming input pipeline: decode and resize from disk in worker threads while the model trains.

Memory holds only the queued batches (``max_queue_size`` of them), never the whole data set,
unlike the book, which loads all 7,390 images as float32. Threads rather than processes:
Pillow releases the GIL while decoding and resizing, and a shared object lets every worker
record the files it had to skip.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import keras
import numpy as np

from training.data import Pair, PairLoadError, Problem, load_pair
from training.errors import DatasetError

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class SkipLog:
    """Thread-safe record of files skipped while loading, each warned about once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, Problem] = {}

    def add(self, stem: str, problem: Problem) -> None:
        with self._lock:
            if stem in self._problems:
                return
            self._problems[stem] = problem
        log.warning("skipped %s", problem)

    def __contains__(self, stem: str) -> bool:
        return stem in self._problems

    @property
    def problems(self) -> list[Problem]:
        with self._lock:
            return list(self._problems.values())


class TrimapDataset(keras.utils.PyDataset):
    """Batches of (uint8-valued float32 images, class-id trimaps) read from disk.

    A pair that fails to decode is skipped (recorded in ``skipped``) and replaced by the next
    usable pair, so batches keep their size. Shuffling and flips are seeded per epoch.
    ``repeat`` > 1 makes an epoch go over the pairs that many times (each time with its own
    flips): a handful of pairs then still gives enough steps per epoch.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        image_size: int,
        batch_size: int,
        *,
        shuffle: bool = False,
        flip: bool = False,
        seed: int = 1337,
        skipped: SkipLog | None = None,
        workers: int | None = None,
        max_queue_size: int = 8,
        repeat: int = 1,
    ) -> None:
        super().__init__(workers=workers or default_workers(), use_multiprocessing=False, max_queue_size=max_queue_size)
        if not pairs:
            raise DatasetError("no image/trimap pair to load")
        if repeat < 1:
            raise ValueError(f"repeat must be at least 1 (got {repeat})")
        self.pairs = list(pairs)
        self.repeat = repeat
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.flip = flip
        self.seed = seed
        self.skipped = skipped if skipped is not None else SkipLog()
        self.epoch = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.tile(np.arange(len(self.pairs)), self.repeat)
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.concatenate([rng.permutation(len(self.pairs)) for _ in range(self.repeat)])

    def __len__(self) -> int:
        return -(-len(self._order) // self.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._epoch_order()

    def _load(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair at ``position`` in this epoch's order, or the next usable one."""
        for step in range(len(self._order)):
            pair = self.pairs[self._order[(position + step) % len(self._order)]]
            if pair.stem in self.skipped:
                continue
            try:
                return load_pair(pair, self.image_size)
            except PairLoadError as exc:
                self.skipped.add(pair.stem, exc.problem)
        raise DatasetError(f"every one of the {len(self.pairs)} pairs failed to load; see the warnings above")

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self._order))
        images = np.empty((stop - start, self.image_size, self.image_size, 3), dtype=np.float32)
        trimaps = np.empty((stop - start, self.image_size, self.image_size), dtype=np.uint8)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.flip else None
        for row, position in enumerate(range(start, stop)):
            image, trimap = self._load(position)
            if rng is not None and rng.random() < 0.5:
                image, trimap = image[:, ::-1], trimap[:, ::-1]
            images[row] = image
            trimaps[row] = trimap
        return images, trimaps
