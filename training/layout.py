"""Where each project's model store lives, the base model, and moving an older single store.

Layout::

    MODEL_DIR/
        projects/<project id>/   one :class:`~training.store.ModelStore` per Label Studio project
        versions/, current       a single store of an older release (or of ``python -m training fit
                                 --model-dir MODEL_DIR`` without ``--project``): adopted as a
                                 project's store by :func:`adopt`, or served as the base model

A base model is a ``.keras`` file or a version directory (``…/versions/<id>/``); projects without
a promoted version of their own are served by it and their first fine-tuning starts from it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from training.errors import StoreError
from training.store import MODEL_FILE, POINTER_FILE, ModelStore

PROJECTS_DIR = "projects"


def check_project(value: object) -> int:
    """A project id as an int (``"01"`` is project 1); raises ``ValueError`` for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a project id: {value!r}")
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"a project id is a whole number >= 0 (got {value!r})")
    return int(text)


def project_store_dir(model_dir: str | Path, project: int) -> Path:
    return Path(model_dir) / PROJECTS_DIR / str(check_project(project))


def project_ids(model_dir: str | Path) -> list[int]:
    root = Path(model_dir) / PROJECTS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def legacy_current_version(model_dir: str | Path) -> Path | None:
    """The current version directory of a single store at ``model_dir`` itself, if there is one."""
    root = Path(model_dir)
    if not (root / POINTER_FILE).is_file():
        return None
    info = ModelStore(root).current()
    return info.path if info is not None else None


def base_model_file(base_model: str | Path) -> Path:
    """The ``.keras`` file of a base model given as a file or a version directory."""
    path = Path(base_model)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise StoreError(f"{path}: no base model here (give a version directory holding {MODEL_FILE}, "
                         f"or a .keras file)")
    return file


def base_model_name(base_model: str | Path) -> str:
    """A short name for model versions shown in Label Studio: the version id or the file's stem."""
    path = Path(base_model)
    return path.name if path.is_dir() else path.stem


def export_base(store: ModelStore, version: str | None, out: str | Path) -> Path:
    """Copy a version's model (default: current) to ``out`` (a ``.keras`` file), atomically."""
    info = store.get(store.resolve(version))
    out = Path(out)
    if out.suffix != ".keras":
        raise StoreError(f"{out}: a base model file must end in .keras")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(info.model_path, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return out


def adopt(model_dir: str | Path, project: int) -> Path:
    """Move the single store at ``model_dir`` (its versions and current pointer) into ``project``'s store.

    Nothing is copied or lost: ``versions/`` and ``current`` are renamed (atomic on one file system).
    Refused when the project already has versions of its own.
    """
    root = Path(model_dir)
    target = project_store_dir(root, project)
    if not (root / "versions").is_dir():
        raise StoreError(f"{root}: no single store here to adopt (no versions/ folder)")
    if (target / "versions").exists() or (target / POINTER_FILE).exists():
        raise StoreError(f"{target}: project {project} already has its own store; nothing was moved")
    target.mkdir(parents=True, exist_ok=True)
    with ModelStore(root).lock(), ModelStore(target).lock():
        os.rename(root / "versions", target / "versions")
        if (root / POINTER_FILE).exists():
            os.rename(root / POINTER_FILE, target / POINTER_FILE)
    return target
