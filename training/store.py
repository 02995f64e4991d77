"""A versioned model store with an atomically switched ``current`` pointer.

Layout::

    MODEL_DIR/
        current              JSON {"version": id, "previous": [older current ids, newest last]}
        versions/<id>/       model.keras, metrics.json, split.json, curves.png, predictions.png
        .staging/<id>/       a version being written (never read by anyone else), held by an flock
                             (``training.workdirs``) so a killed writer's folder is found and removed
        .lock                serialises promotions between processes

A version is written completely under ``.staging`` and then renamed into ``versions`` (one
atomic ``rename``); ``current`` is replaced with ``os.replace`` after an fsync. A crash or kill
at any point therefore leaves ``current`` naming a complete, loadable version. :meth:`prune`
removes old versions, never the current one or its parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import StoreError
from training.workdirs import held_folder, remove_abandoned

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.json"
POINTER_FILE = "current"


@dataclass(frozen=True)
class VersionInfo:
    """One stored version. ``promoted``: whether it was ever made current by the promotion
    rule or by hand (``metrics["promotion"]``); ``is_current``: whether it is current now."""

    id: str
    path: Path
    metrics: dict[str, Any]
    promoted: bool
    is_current: bool

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def val_foreground_iou(self) -> float | None:
        return self.metrics.get("val_foreground_iou")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelStore:
    """Versions of the trimap model under ``model_dir`` (created on first write)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.pointer = self.root / POINTER_FILE

    # --- reading -------------------------------------------------------------------------
    def _read_pointer(self) -> dict[str, Any]:
        try:
            text = self.pointer.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": None, "previous": []}
        try:
            data = json.loads(text)
            return {"version": data["version"], "previous": list(data.get("previous", []))}
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.pointer}: unreadable current-version pointer ({exc})") from exc

    def current_version_id(self) -> str | None:
        """The current version's id, from one small file: cheap enough to poll for hot reload."""
        return self._read_pointer()["version"]

    def get(self, version_id: str) -> VersionInfo:
        path = self.versions_dir / version_id
        if "/" in version_id or version_id.startswith(".") or not (path / METRICS_FILE).is_file():
            raise StoreError(f"{self.root}: no version {version_id!r} (see `python -m training versions`)")
        try:
            metrics = json.loads((path / METRICS_FILE).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StoreError(f"{path / METRICS_FILE}: unreadable ({exc})") from exc
        return VersionInfo(
            id=version_id,
            path=path,
            metrics=metrics,
            promoted=bool(metrics.get("promotion", {}).get("promoted", False)),
            is_current=version_id == self.current_version_id(),
        )

    def current(self) -> VersionInfo | None:
        version_id = self.current_version_id()
        return None if version_id is None else self.get(version_id)

    def list_versions(self) -> list[VersionInfo]:
        """All complete versions, oldest first (ids sort by creation time)."""
        if not self.versions_dir.is_dir():
            return []
        ids = sorted(p.name for p in self.versions_dir.iterdir() if (p / METRICS_FILE).is_file())
        return [self.get(version_id) for version_id in ids]

    def resolve(self, version: str | None) -> str:
        """``None`` or ``"current"`` → the current id; any other value must name a stored version."""
        if version in (None, "current"):
            current = self.current_version_id()
            if current is None:
                raise StoreError(f"{self.root}: no current model version yet; fit one first")
            return current
        return self.get(version).id

    def load_model(self, version_id: str | None = None):
        """The Keras model of ``version_id`` (default: current), uncompiled, for prediction."""
        import keras  # deferred: listing versions or polling the pointer needs no Keras

        path = self.versions_dir / self.resolve(version_id) / MODEL_FILE
        try:
            return keras.saving.load_model(path, compile=False)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path}: cannot load the model ({exc})") from exc

    # --- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive inter-process lock for read-compare-switch sequences."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def new_version_id(self) -> str:
        """UTC time to the microsecond (ids sort by creation) plus random bits (unique across processes)."""
        now = time.time()
        return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now % 1 * 1e6):06d}-{secrets.token_hex(2)}"

    @contextlib.contextmanager
    def staging(self, version_id: str) -> Iterator[Path]:
        """A private folder to write a version into; removed unless :meth:`publish` took it."""
        with held_folder(self.staging_dir / version_id) as path:
            yield path

    def remove_abandoned_staging(self) -> list[str]:
        """Remove staging folders of writers that died (killed jobs); live writers' folders stay."""
        return remove_abandoned(self.staging_dir)

    def publish(self, staged: Path, metrics: dict[str, Any], *, make_current: bool) -> VersionInfo:
        """Move a fully written staging folder into ``versions`` and, if asked, make it current.

        ``metrics.json`` is written last inside the staging folder: a version without it is
        incomplete by definition and never listed.
        """
        version_id = staged.name
        for child in staged.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        write_json_atomic(staged / METRICS_FILE, metrics)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        final = self.versions_dir / version_id
        os.rename(staged, final)
        _fsync_dir(self.versions_dir)
        log.info("stored version %s at %s", version_id, final)
        if make_current:
            self._switch(version_id)
        return self.get(version_id)

    def _switch(self, version_id: str, previous: list[str] | None = None) -> None:
        pointer = self._read_pointer()
        if previous is None:
            previous = pointer["previous"] + ([pointer["version"]] if pointer["version"] else [])
        write_json_atomic(self.pointer, {"version": version_id, "previous": previous})
        log.info("current version is now %s", version_id)

    def promote(self, version_id: str) -> VersionInfo:
        """Make a stored version current by hand (no metric check), remembering the old one."""
        with self.lock():
            info = self.get(version_id)
            if info.is_current:
                return info
            if not info.promoted:
                metrics = dict(info.metrics)
                metrics["promotion"] = {**metrics.get("promotion", {}), "promoted": True, "manual": True}
                write_json_atomic(info.path / METRICS_FILE, metrics)
            self._switch(version_id)
            return self.get(version_id)

    def rollback(self) -> VersionInfo:
        """Make the version that was current before the current one current again."""
        with self.lock():
            pointer = self._read_pointer()
            previous = list(pointer["previous"])
            while previous:
                candidate = previous.pop()
                if (self.versions_dir / candidate / METRICS_FILE).is_file() and candidate != pointer["version"]:
                    self._switch(candidate, previous)
                    return self.get(candidate)
            raise StoreError(f"{self.root}: no earlier current version to roll back to")

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one or its parent; the ids removed.

        ``keep`` < 1 keeps everything. A removed version is first renamed out of ``versions`` (atomic
        for readers), then deleted.
        """
        if keep < 1:
            return []
        with self.lock():
            versions = self.list_versions()
            current = next((v for v in versions if v.is_current), None)
            protected = {current.id, current.metrics.get("parent")} if current else set()
            newest_first = [v.id for v in reversed(versions)]
            kept = set(newest_first[:keep]) | protected
            doomed = [v for v in newest_first if v not in kept]
            for version_id in doomed:
                trash = self.staging_dir / f"pruned-{version_id}"
                self.staging_dir.mkdir(parents=True, exist_ok=True)
                os.rename(self.versions_dir / version_id, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if doomed:
                _fsync_dir(self.versions_dir)
                log.info("pruned %d old version(s) from %s: %s", len(doomed), self.root, ", ".join(doomed))
            return doomed
