"""Prompt state in files shared by the worker processes of one backend (``PROMPT_STATE_SHARED``).

One file per task key, named by the SHA-256 of the key, in ``PROMPT_STATE_DIR`` (by default a
folder of ``/dev/shm``, memory-backed, named with this installation's random token kept in
``MODEL_DIR``, so that two backends on one host never share it and no other user can guess it;
else ``MODEL_DIR/prompt-state``, see *Where* below). A file is a safetensors file (no pickle): the
object's prompts, labels, region signatures and answered region ids as JSON in its metadata, its
low-resolution logits as float32 tensors, so what a process reads back is exactly what another stored.

* **Private.** The folder is ``0700`` and this user's; an existing one that is a symbolic link or
  another user's is refused (:mod:`ml_backend.security.private_folders`; the derived ``/dev/shm``
  one then gives way to ``MODEL_DIR/prompt-state``). Files in it are opened with ``O_NOFOLLOW``.
* **Atomic.** Files are written to a temporary name and renamed into place
  (:func:`ml_backend.lru_files.write_atomically`): a reader sees a whole file or none. A
  click's read-modify-write is held under an exclusive ``flock`` on its task's own lock file
  (``locks/<sha-256>.lock``), so clicks on other tasks never wait for it. A sweep removes the lock
  files of tasks without an object that no click holds; a click that opened one just before it
  was removed notices (the path no longer names its file) and takes the new one.
* **Bounded.** A file's mtime is its last click (every click writes its object); one older
  than ``PROMPT_STATE_TTL_S`` is expired (not read, deleted by the next write), and after
  a write (at most once a second per process: a sweep stats every file, ~4 ms for 1000) the
  oldest files go until at most ``PROMPT_STATE_ENTRIES`` files of at most ``PROMPT_STATE_MB``
  in all remain.
* **Where.** ``/dev/shm`` is memory: no disk write per click. Docker gives a container 64 MB of it
  by default, so the folder goes under ``MODEL_DIR`` when ``/dev/shm`` cannot hold twice
  ``PROMPT_STATE_MB``.
* **Never fatal.** A file that cannot be read or parsed (truncated, foreign, another
  version) is logged, deleted and treated as no object; a file that cannot be written is
  logged and the click is answered anyway (the next one starts over).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend import lru_files
from ml_backend.labeling.context import KeyPoint, Rectangle
from ml_backend.prompt_state.locking import Release, hold_or_go_on, unheld
from ml_backend.prompt_state.types import ObjectState, RegionMemory, TaskKey
from ml_backend.security.private_folders import installation_token, open_no_follow, private_directory
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

SUFFIX = ".state"
LOCK_SUFFIX = ".lock"
FORMAT = 1  # bumped when the metadata changes; files of another format are treated as no object
LOCK_POLL_S = 0.005
SWEEP_INTERVAL_S = 1.0  # a process enforces the bounds on the folder at most this often (a sweep stats every file)
SHM = Path("/dev/shm")
SHM_PREFIX = "sam-trimap-prompts-"


def state_directory(settings: Settings) -> Path:
    """``PROMPT_STATE_DIR``, else a private folder of ``/dev/shm`` named with this installation's token when
    ``/dev/shm`` has room for twice ``PROMPT_STATE_MB`` (Docker gives containers 64 MB) and that name is not
    taken by a link or another user's folder, else ``MODEL_DIR/prompt-state``."""
    if settings.prompt_state_dir:
        return Path(settings.prompt_state_dir)
    if SHM.is_dir() and os.access(SHM, os.W_OK) and _free_bytes(SHM) >= 2 * (settings.prompt_state_mb << 20):
        try:
            return private_directory(_shm_directory(settings), create=False)
        except OSError as exc:
            logger.error("prompt state: not using /dev/shm: %s", exc)
    return Path(settings.model_dir) / "prompt-state"


def _shm_directory(settings: Settings, *, create: bool = True) -> Path | None:
    token = installation_token(settings.model_dir, create=create)
    return None if token is None else SHM / f"{SHM_PREFIX}{token}"


def remove_shm_directory(settings: Settings) -> None:
    """Delete the ``/dev/shm`` folder :func:`state_directory` derives (memory that would outlive the backend);
    run when gunicorn's master exits. A folder named by ``PROMPT_STATE_DIR`` is the operator's: kept."""
    if settings.prompt_state_dir:
        return
    folder = _shm_directory(settings, create=False)
    if folder is not None and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class FileStorage:
    """Objects as files in ``directory``, shared by every process that opens it (see the module's notes)."""

    def __init__(self, directory: Path, *, max_bytes: int, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.time, sweep_interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.directory = Path(directory)
        self.max_bytes, self.max_entries, self.ttl_s = max_bytes, max_entries, ttl_s
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._last_stamp = 0
        self._last_sweep = -float("inf")
        self._make_directory()

    def _make_directory(self) -> None:
        """Also after the folder vanished under a running backend (a cleaner of /dev/shm, systemd's RemoveIPC).
        Raises :class:`~ml_backend.security.private_folders.UnsafeFolderError` for a folder other users could
        read or fill."""
        private_directory(self.directory)  # other users of the host read no prompts nor plant objects
        private_directory(self.directory / "locks")

    def path_for(self, key: TaskKey) -> Path:
        return self.directory / (key_digest(key) + SUFFIX)

    def lock_path_for(self, key: TaskKey) -> Path:
        return self.directory / "locks" / (key_digest(key) + LOCK_SUFFIX)

    # --- locking -------------------------------------------------------------
    def hold(self, key: TaskKey) -> contextlib.AbstractContextManager[None]:
        """An exclusive ``flock`` on the task's own lock file (each call opens its own descriptor, so threads
        of one process exclude each other too)."""
        return hold_or_go_on(key, lambda timeout_s: self._take(self.lock_path_for(key), timeout_s))

    def _take(self, path: Path, timeout_s: float, *, quiet: bool = False) -> Release | None:
        """Hold ``path``'s lock: its release, :func:`unheld` when the lock file cannot be opened (logged), or None
        when another holder kept it ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            fd = self._open_lock(path, quiet=quiet)
            if fd is None:
                return unheld
            if not lru_files.flock_exclusive(fd, timeout_s=max(0.0, deadline - time.monotonic()), poll_s=LOCK_POLL_S):
                os.close(fd)
                return None
            if _names(path, fd):
                return lambda: _unlock(fd)
            os.close(fd)  # a sweep removed this lock file after we opened it: take the one at the path now

    def _open_lock(self, path: Path, *, quiet: bool = False) -> int | None:
        for attempt in range(2):
            try:
                return open_no_follow(path, os.O_RDWR | os.O_CREAT)
            except FileNotFoundError:
                if attempt == 0:
                    self._make_directory_quietly()
            except OSError as exc:
                if not quiet:
                    logger.warning("prompt state: cannot open %s (%s); this click goes on unheld", path, exc)
                return None
        logger.warning("prompt state: %s cannot be made; this click goes on unheld", path.parent)
        return None

    def _make_directory_quietly(self) -> None:
        try:
            self._make_directory()
        except OSError as exc:
            logger.warning("prompt state: cannot make %s (%s)", self.directory, exc)

    def _remove_idle_locks(self) -> None:
        """Delete the lock files of tasks without an object that no click holds now."""
        locks = self.directory / "locks"
        try:
            names = os.listdir(locks)
        except OSError:
            return
        for name in names:
            if not name.endswith(LOCK_SUFFIX) or (self.directory / (name[:-len(LOCK_SUFFIX)] + SUFFIX)).exists():
                continue
            release = self._take(locks / name, 0.0, quiet=True)
            if release is None or release is unheld:
                continue
            lru_files.unlink_quietly(locks / name)
            release()

    # --- reading -------------------------------------------------------------
    def load(self, key: TaskKey) -> ObjectState | None:
        path = self.path_for(key)
        try:
            with os.fdopen(open_no_follow(path, os.O_RDONLY), "rb") as file:
                last_click = os.fstat(file.fileno()).st_mtime_ns / 1e9
                payload = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("prompt state: cannot read %s (%s); starting over", path.name, exc)
            return None
        if last_click + self.ttl_s <= self._clock():
            lru_files.unlink_quietly(path)
            return None
        try:
            return decode(payload, key)
        except Exception as exc:  # noqa: BLE001 -- whatever the file holds, a click must not fail on it
            logger.warning("prompt state: %s is unreadable (%s: %s); deleting it, the object starts over",
                           path.name, type(exc).__name__, exc)
            lru_files.unlink_quietly(path)
            return None

    # --- writing -------------------------------------------------------------
    def save(self, key: TaskKey, state: ObjectState) -> None:
        path = self.path_for(key)
        payload = encode(key, state)
        try:
            try:
                lru_files.write_atomically(path, payload)
            except FileNotFoundError:
                self._make_directory()
                lru_files.write_atomically(path, payload)
            stamp = max(int(self._clock() * 1e9), self._last_stamp + 1)  # distinct stamps keep the LRU order
            self._last_stamp = stamp
            os.utime(path, ns=(stamp, stamp))
        except OSError as exc:
            logger.warning("prompt state: cannot write %s (%s); the next click on this task starts over",
                           path.name, exc)
            lru_files.unlink_quietly(path)
        if time.monotonic() - self._last_sweep >= self.sweep_interval_s:
            self._sweep()

    def delete(self, key: TaskKey) -> None:
        lru_files.unlink_quietly(self.path_for(key))

    def _live_files(self) -> list[tuple[int, int, Path]]:
        """(last click in ns, size, path) of the unexpired files; expired ones are deleted."""
        now_ns = self._clock() * 1e9
        live = []
        for entry in lru_files.list_files([self.directory], SUFFIX):
            if entry[0] + self.ttl_s * 1e9 <= now_ns:
                lru_files.unlink_quietly(entry[2])
            else:
                live.append(entry)
        return live

    def _sweep(self) -> None:
        self._last_sweep = time.monotonic()
        live = sorted(self._live_files())
        for _, _, path in live[:max(0, len(live) - self.max_entries)]:
            lru_files.unlink_quietly(path)
        lru_files.evict(live[max(0, len(live) - self.max_entries):], self.max_bytes)
        self._remove_idle_locks()

    def __len__(self) -> int:
        return len(self._live_files())

    @property
    def current_bytes(self) -> int:
        return sum(size for _, size, _ in self._live_files())


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not removed or replaced since it was opened)."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- the file format ---------------------------------------------------------------------------------------
def key_digest(key: TaskKey) -> str:
    """The file's name and its check of whose object it holds (the image URL may be a long data: URI)."""
    return hashlib.sha256(json.dumps([key.project, key.task, key.image]).encode()).hexdigest()


def encode(key: TaskKey, state: ObjectState) -> bytes:
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    regions = []
    for index, region in enumerate(state.regions):
        box, points = region.signature
        tensors[f"answered.{index}"] = np.ascontiguousarray(region.answered, np.float32)
        if region.given is not None:
            tensors[f"given.{index}"] = np.ascontiguousarray(region.given, np.float32)
        regions.append({"box": box, "points": sorted(points)})
    meta = {
        "format": FORMAT,
        "key": key_digest(key),
        "label": state.label,
        "size": list(state.size),
        "groups": [{"group": [name, list(labels)], "items": [_item_json(item) for item in items]}
                   for (name, labels), items in state.groups.items()],
        "regions": regions,
        "result_ids": sorted(state.result_ids),
    }
    return save(tensors, metadata={"state": json.dumps(meta)})


def decode(payload: bytes, key: TaskKey) -> ObjectState:
    """The object in ``payload``; raises (ValueError, KeyError, TypeError, SafetensorError) on anything else."""
    from safetensors.numpy import load

    tensors = load(payload)
    header_size = int.from_bytes(payload[:8], "little")
    meta = json.loads(json.loads(payload[8:8 + header_size])["__metadata__"]["state"])
    if meta["format"] != FORMAT:
        raise ValueError(f"format {meta['format']!r}, not {FORMAT}")
    if meta["key"] != key_digest(key):
        raise ValueError("it belongs to another task")
    groups = {}
    for entry in meta["groups"]:
        name, labels = entry["group"]
        group = (_str(name), tuple(_str(label) for label in labels))
        groups[group] = tuple(_item(item, group) for item in entry["items"])
    regions = []
    for index, region in enumerate(meta["regions"]):
        box = None if region["box"] is None else tuple(float(v) for v in region["box"])
        if box is not None and len(box) != 4:
            raise ValueError("a box of another length")
        points = frozenset((float(x), float(y), int(label)) for x, y, label in region["points"])
        answered = _logits(tensors[f"answered.{index}"])
        given = tensors.get(f"given.{index}")
        regions.append(RegionMemory(signature=(box, points), given=None if given is None else _logits(given),
                                    answered=answered))
    width, height = (int(v) for v in meta["size"])
    return ObjectState(groups=groups, label=_optional_str(meta["label"]), size=(width, height),
                       regions=tuple(regions), result_ids=frozenset(_str(i) for i in meta["result_ids"]))


def _item_json(item: KeyPoint | Rectangle) -> dict[str, Any]:
    if isinstance(item, KeyPoint):
        return {"kind": "point", "x": item.x, "y": item.y, "positive": item.positive, "label": item.label,
                "id": item.item_id, "negative_label": item.negative_label}
    return {"kind": "rectangle", "anchor": list(item.anchor), "size": list(item.size), "angle": item.angle,
            "box": list(item.box), "label": item.label, "id": item.item_id}


def _item(data: dict[str, Any], group: tuple[str, tuple[str, ...]]) -> KeyPoint | Rectangle:
    label, item_id = _optional_str(data["label"]), _optional_str(data["id"])
    if data["kind"] == "point":
        return KeyPoint(x=float(data["x"]), y=float(data["y"]), positive=_bool(data["positive"]), label=label,
                        item_id=item_id, group=group, negative_label=_bool(data["negative_label"]))
    if data["kind"] == "rectangle":
        anchor, size, box = (tuple(float(v) for v in data[name]) for name in ("anchor", "size", "box"))
        if (len(anchor), len(size), len(box)) != (2, 2, 4):
            raise ValueError("a rectangle of another shape")
        return Rectangle(anchor=anchor, size=size, angle=float(data["angle"]), box=box, label=label,
                         item_id=item_id, group=group)
    raise ValueError(f"an item of kind {data['kind']!r}")


def _logits(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.float32:
        raise ValueError(f"logits of dtype {array.dtype}")
    return array


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__} where a string belongs")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{type(value).__name__} where a boolean belongs")
    return value
