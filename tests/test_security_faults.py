"""Issue 21, item 7: shared temporary folders. Training exports and the prompt state are written under
host-wide folders (``/tmp``, ``/dev/shm``). Another user of the host who could guess the name would pre-create
the folder (to read the private images and prompts, or plant images that train the next model) or plant a
symbolic link. Each attack below is performed and must fail: the names hold a random token of the
installation, the folders are 0700 and this user's, a planted folder or link is refused, and files in them
are never opened through a link. The prompt state's attack runs against the backend under gunicorn."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults_serving import Backends, SlowLabelStudio, assert_a_mask, click, wait_ready

from ml_backend.prompt_state import TaskKey
from ml_backend.prompt_state import files as prompt_files
from ml_backend.prompt_state.files import FileStorage, state_directory
from ml_backend.retrain import jobs
from ml_backend.security import private_folders
from ml_backend.security.private_folders import UnsafeFolderError, installation_token, private_directory
from ml_backend.settings import Settings

LIMITS = {"max_bytes": 64 << 20, "max_entries": 100, "ttl_s": 900.0}
NOBODY = 65534


def another_users(path: Path, monkeypatch) -> None:
    """Make ``path`` look made by another user: really (as root), else by taking this process for another."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    else:
        monkeypatch.setattr(private_folders, "this_user", lambda: os.geteuid() + 1)


def is_private(path: Path) -> bool:
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o700


# --- the building block ---------------------------------------------------------------------------------

def test_a_private_folder_is_0700_and_a_planted_link_or_foreign_folder_is_refused(tmp_path: Path, monkeypatch):
    made = private_directory(tmp_path / "mine")
    assert is_private(made)
    os.chmod(made, 0o777)
    assert is_private(private_directory(made))  # made private again

    target = tmp_path / "attacker"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafeFolderError, match="symbolic link"):
        private_directory(tmp_path / "link")
    assert list(target.iterdir()) == [] and stat.S_IMODE(target.stat().st_mode) != 0o700  # never followed

    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UnsafeFolderError, match="not a folder"):
        private_directory(tmp_path / "file")

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    another_users(foreign, monkeypatch)
    with pytest.raises(UnsafeFolderError, match="belongs to user id"):
        private_directory(foreign)


def test_the_installation_token_is_random_private_and_stable(tmp_path: Path) -> None:
    first = installation_token(tmp_path / "a")
    assert first == installation_token(tmp_path / "a") != installation_token(tmp_path / "b")
    assert len(first) == 32 and int(first, 16) >= 0
    token_file = tmp_path / "a" / private_folders.TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert installation_token(tmp_path / "c", create=False) is None


# --- training exports -----------------------------------------------------------------------------------

def export_folder_of_a_job(tmp_path: Path, monkeypatch) -> Path:
    """Run a training job up to its export and return the folder the export was given."""
    from ml_backend import export
    from ml_backend.retrain.jobs import execute_training
    from ml_backend.retrain.spec import JobSpec

    seen: list[Path] = []

    def export_stub(data_dir, **kwargs):
        seen.append(Path(data_dir))
        (Path(data_dir) / "images").mkdir()
        raise RuntimeError("stopped after the export started")

    monkeypatch.setattr(export, "export_from_label_studio", export_stub)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    spec = JobSpec(job_id="j1", project=3, reason="test", model_dir=str(tmp_path / "models" / "projects" / "3"),
                   label_studio_url="http://ls", token="t", epochs=1, image_size=64, batch_size=2,
                   promotion_margin=0.0, boundary_width=2, ground_truth_only=False, foreground_labels=("cat",),
                   background_labels=(), boundary_labels=())
    with pytest.raises(RuntimeError, match="stopped after"):
        execute_training(spec)
    [folder] = seen
    return folder


def test_training_exports_go_to_a_private_unguessable_folder_not_the_planted_one(tmp_path: Path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o1777)
    monkeypatch.setattr(jobs.tempfile, "gettempdir", lambda: str(temp))
    planted = temp / jobs.WORK_ROOT_NAME  # the name every installation used to write to
    (planted / "project-3-j1" / "images").mkdir(parents=True)
    (planted / "project-3-j1" / "images" / "task-1.jpg").write_bytes(b"poison")
    os.chmod(planted, 0o777)

    folder = export_folder_of_a_job(tmp_path, monkeypatch)
    root = folder.parent
    assert root.parent == temp and root != planted
    assert root.name == f"{jobs.WORK_ROOT_NAME}-{installation_token(tmp_path / 'models')}"  # 128 random bits
    assert is_private(root)
    assert not folder.exists()  # removed after the job
    assert [p.name for p in (planted / "project-3-j1" / "images").iterdir()] == ["task-1.jpg"]  # untouched


@pytest.mark.parametrize("plant", ["link", "foreign folder"])
def test_a_training_export_refuses_a_planted_work_folder(tmp_path: Path, monkeypatch, plant: str) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(jobs.tempfile, "gettempdir", lambda: str(temp))
    name = temp / f"{jobs.WORK_ROOT_NAME}-{installation_token(tmp_path / 'models')}"  # as if the name leaked
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    if plant == "link":
        name.symlink_to(target)
    else:
        name.mkdir(mode=0o777)
        another_users(name, monkeypatch)
    with pytest.raises(UnsafeFolderError):
        export_folder_of_a_job(tmp_path, monkeypatch)
    assert list(target.iterdir()) == [] and (plant == "link" or list(name.iterdir()) == [])


# --- the prompt state -------------------------------------------------------------------------------------

def test_a_lock_file_planted_as_a_link_is_never_followed(tmp_path: Path, caplog) -> None:
    storage = FileStorage(tmp_path / "state", **LIMITS)
    key = TaskKey("1", "1", "/data/upload/1/a.png")
    victim = tmp_path / "victim"
    storage.lock_path_for(key).symlink_to(victim)
    with storage.hold(key):  # the click goes on (unheld, with a warning) ...
        pass
    assert not victim.exists()  # ... and never created nor opened what the link points to
    assert "cannot open" in caplog.text
    state = storage.path_for(key)
    state.symlink_to(victim)
    victim.write_bytes(b"not a state")
    assert storage.load(key) is None and victim.read_bytes() == b"not a state"


@pytest.fixture
def label_studio() -> Iterator[SlowLabelStudio]:
    server = SlowLabelStudio()
    yield server
    server.close()


@pytest.fixture
def backends(tmp_path: Path, tiny_sam_preset: Path, label_studio: SlowLabelStudio) -> Iterator[Backends]:
    started = Backends(tmp_path, tiny_sam_preset, label_studio)
    yield started
    started.close()


def test_planted_prompt_state_folders_are_not_used_by_the_backend_under_gunicorn(
        backends: Backends, tmp_path: Path, monkeypatch) -> None:
    model_dir = tmp_path / "models"
    settings = dataclasses.replace(Settings(), model_dir=model_dir, workers=2, prompt_state_mb=1)  # fits any shm
    old_name = prompt_files.SHM / ("sam-trimap-prompts-" + hashlib.sha256(
        os.path.realpath(model_dir).encode()).hexdigest()[:16])  # the name the backend used to derive
    new_name = prompt_files.SHM / f"{prompt_files.SHM_PREFIX}{installation_token(model_dir)}"
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    try:
        old_name.mkdir(mode=0o777)  # pre-created by another user, writable by all
        if os.geteuid() == 0:
            os.chown(old_name, NOBODY, NOBODY)
        new_name.symlink_to(target)  # and, had the token leaked, a link at the new name
        server = backends.start(WORKERS="2", PROMPT_STATE_MB="1")
        wait_ready(server)
        assert_a_mask(click(server))
        assert_a_mask(click(server))  # the second click reads the state the first one wrote
        used = model_dir / "prompt-state"
        assert is_private(used) and is_private(used / "locks")
        assert len(list(used.glob("*" + prompt_files.SUFFIX))) == 1
        assert list(target.iterdir()) == [] and list(old_name.iterdir()) == []
        assert "not using /dev/shm" in server.log.read_text()
        assert state_directory(settings) == used
    finally:
        for path in (old_name, new_name):
            if path.is_symlink():
                path.unlink()
            elif path.is_dir():
                path.rmdir()


def test_the_derived_shm_folder_is_private_and_named_by_the_token(tmp_path: Path, monkeypatch) -> None:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    monkeypatch.setattr(prompt_files, "SHM", shm)
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", workers=2)
    directory = state_directory(settings)
    assert directory == shm / f"{prompt_files.SHM_PREFIX}{installation_token(tmp_path / 'models')}"
    FileStorage(directory, **LIMITS)
    assert is_private(directory) and is_private(directory / "locks")


def test_a_backend_start_makes_no_folder_in_tmp(tmp_path: Path, monkeypatch) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(jobs.tempfile, "gettempdir", lambda: str(temp))
    assert jobs.remove_abandoned_work(tmp_path / "models") == []  # what a backend or RQ worker does at start
    assert list(temp.iterdir()) == [] and not (tmp_path / "models" / private_folders.TOKEN_FILE).exists()
