"""The versioned store: listing, promotion, rollback, and atomicity under crashes and kills."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import training  # noqa: F401  (selects the torch backend before keras)
import keras
from training.errors import StoreError
from training.store import MODEL_FILE, ModelStore


def _tiny_model(fill: float) -> keras.Model:
    """A one-layer stand-in: the store does not care what it stores, and this saves in milliseconds."""
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.set_weights([np.full(w.shape, fill, dtype="float32") for w in model.get_weights()])
    return model


def _add(store: ModelStore, fill: float, *, current: bool) -> str:
    version_id = store.new_version_id()
    with store.staging(version_id) as staged:
        _tiny_model(fill).save(staged / MODEL_FILE)
        store.publish(staged, {"val_foreground_iou": fill, "promotion": {"promoted": current}}, make_current=current)
    return version_id


def _fill(model: keras.Model) -> float:
    return float(model.get_weights()[0].ravel()[0])


def test_empty_store(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.current_version_id() is None and store.current() is None and store.list_versions() == []
    with pytest.raises(StoreError, match="no current model version"):
        store.load_model()
    with pytest.raises(StoreError, match="no earlier current version"):
        store.rollback()


def test_list_promote_and_rollback(tmp_path):
    store = ModelStore(tmp_path / "models")
    first = _add(store, 0.1, current=True)
    second = _add(store, 0.2, current=True)
    rejected = _add(store, 0.05, current=False)
    assert [v.id for v in store.list_versions()] == [first, second, rejected]
    assert [(v.promoted, v.is_current) for v in store.list_versions()] == [(True, False), (True, True), (False, False)]
    assert store.current().id == second and _fill(store.load_model()) == pytest.approx(0.2)
    assert _fill(store.load_model(rejected)) == pytest.approx(0.05)

    assert store.rollback().id == first
    assert store.current_version_id() == first and _fill(store.load_model()) == pytest.approx(0.1)
    with pytest.raises(StoreError, match="no earlier current version"):
        store.rollback()

    promoted = store.promote(rejected)
    assert promoted.is_current and promoted.promoted and promoted.metrics["promotion"]["manual"] is True
    assert store.rollback().id == first
    with pytest.raises(StoreError, match="no version 'nope'"):
        store.promote("nope")


def test_a_failed_save_leaves_the_current_version_unchanged(tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "models")
    first = _add(store, 0.1, current=True)

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        _add(store, 0.9, current=True)
    monkeypatch.undo()
    assert store.current_version_id() == first
    assert [v.id for v in store.list_versions()] == [first]
    assert _fill(store.load_model()) == pytest.approx(0.1)
    assert list((store.root / ".staging").iterdir()) == []  # the half-written version is cleaned up


KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import training
    from training.store import ModelStore, MODEL_FILE

    store, point, source = ModelStore(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    real_replace = os.replace
    if point == "before_rename":
        os.rename = die
    if point == "pointer_switch":
        os.replace = lambda src, dst: die() if Path(dst).name == "current" else real_replace(src, dst)
    version_id = store.new_version_id()
    with store.staging(version_id) as staged:
        if point == "model_write":
            (staged / MODEL_FILE).write_bytes(source.read_bytes()[:500])
            die()
        shutil.copy(source, staged / MODEL_FILE)
        store.publish(staged, {"val_foreground_iou": 0.9, "promotion": {"promoted": True}}, make_current=True)
    print("survived")
""")


@pytest.mark.parametrize("point", ["model_write", "before_rename", "pointer_switch"])
def test_a_killed_save_leaves_the_current_version_loadable_and_unchanged(tmp_path, point):
    store = ModelStore(tmp_path / "models")
    first = _add(store, 0.1, current=True)
    source = tmp_path / "new.keras"
    _tiny_model(0.9).save(source)
    done = subprocess.run([sys.executable, "-c", KILLER, str(store.root), point, str(source)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == -9, done.stderr  # SIGKILL: no cleanup code ran
    assert store.current_version_id() == first
    assert _fill(store.load_model()) == pytest.approx(0.1)
    listed = [v.id for v in store.list_versions()]
    # Killed before the rename: no new version; at the pointer switch: a complete, non-current one.
    assert listed == [first] if point != "pointer_switch" else (len(listed) == 2 and listed[0] == first)


def test_prune_keeps_the_newest_the_current_and_its_parent(tmp_path):
    store = ModelStore(tmp_path / "models")
    ids = []
    for fill in range(6):
        version_id = store.new_version_id()
        with store.staging(version_id) as staged:
            (staged / MODEL_FILE).write_bytes(b"stand-in")
            store.publish(staged, {"val_foreground_iou": fill / 10, "parent": ids[0] if fill == 2 else None},
                          make_current=fill == 2)
        ids.append(version_id)
    assert store.prune(0) == [] and len(store.list_versions()) == 6  # 0: keep everything
    removed = store.prune(2)
    assert sorted(removed) == [ids[1], ids[3]]
    assert [v.id for v in store.list_versions()] == [ids[0], ids[2], ids[4], ids[5]]
    assert store.current_version_id() == ids[2] and store.current().model_path.read_bytes() == b"stand-in"
    assert not (store.root / ".staging").exists() or list((store.root / ".staging").iterdir()) == []
    assert store.prune(2) == []


def test_a_killed_writers_staging_folder_is_removed_a_live_ones_is_not(tmp_path):
    store = ModelStore(tmp_path / "models")
    hold = textwrap.dedent("""
        import sys, time
        from training.store import ModelStore
        with ModelStore(sys.argv[1]).staging(sys.argv[2]) as staged:
            (staged / "model.keras").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(600)
    """)
    writers = {name: subprocess.Popen([sys.executable, "-c", hold, str(store.root), name], stdout=subprocess.PIPE,
                                      text=True) for name in ("killed", "alive")}
    try:
        for writer in writers.values():
            assert writer.stdout.readline().strip() == "writing"
        writers["killed"].kill()
        writers["killed"].wait()
        assert store.remove_abandoned_staging() == ["killed"]
        assert (store.staging_dir / "alive" / "model.keras").read_bytes() == b"half"
        assert not (store.staging_dir / "killed").exists()
    finally:
        for writer in writers.values():
            writer.kill()
            writer.wait()
    assert store.remove_abandoned_staging() == ["alive"]
