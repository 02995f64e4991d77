"""Per-project stores: layout, the CLI's --project, the base model and fine-tuning from it, adopting an old store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest_training import TINY_IMAGE, _fitted_store, fitted_store, tiny_data  # noqa: F401  (fixtures)

from training.__main__ import main
from training.errors import StoreError
from training.fit import fit
from training.layout import adopt, check_project, project_ids, project_store_dir
from training.store import ModelStore


def test_layout_and_canonical_project_ids(tmp_path):
    assert project_store_dir(tmp_path, 3) == tmp_path / "projects" / "3"
    assert check_project("007") == 7 and check_project(7) == 7
    for bad in ("-1", "1.5", "", "../2", True, "x"):
        with pytest.raises(ValueError):
            check_project(bad)
    (tmp_path / "projects" / "12").mkdir(parents=True)
    (tmp_path / "projects" / "notes").mkdir()
    assert project_ids(tmp_path) == [12]


def test_the_cli_works_on_a_projects_store_and_on_a_plain_one(fitted_store, tmp_path, capsys):
    plain = ModelStore(fitted_store).current_version_id()
    adopt(fitted_store, 4)  # the fitted single store becomes project 4's
    assert main(["versions", "--model-dir", str(fitted_store), "--project", "04", "--json"]) == 0
    assert [v["id"] for v in json.loads(capsys.readouterr().out)] == [plain]
    assert main(["versions", "--model-dir", str(fitted_store), "--json"]) == 0  # the root is empty now
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit):
        main(["versions", "--model-dir", str(fitted_store), "--project", "-2"])
    assert "a project id is a whole number" in capsys.readouterr().err
    out = tmp_path / "base.keras"
    assert main(["export-base", "--model-dir", str(fitted_store), "--project", "4", "--out", str(out)]) == 0
    assert out.read_bytes() == ModelStore(project_store_dir(fitted_store, 4)).current().model_path.read_bytes()
    assert f"BASE_MODEL={out}" in capsys.readouterr().out
    assert main(["export-base", "--model-dir", str(fitted_store), "--out", str(tmp_path / "x.keras")]) == 2
    assert "no current model version" in capsys.readouterr().err


def test_adopting_moves_every_version_and_refuses_to_overwrite(fitted_store, tiny_data):
    second = fit(tiny_data, fitted_store, from_version="current", epochs=1, batch_size=8, verbose=0)
    store = ModelStore(fitted_store)
    before = [(v.id, v.is_current) for v in store.list_versions()]
    assert len(before) == 2
    target = adopt(fitted_store, 9)
    assert [(v.id, v.is_current) for v in ModelStore(target).list_versions()] == before
    assert store.list_versions() == [] and store.current_version_id() is None
    with pytest.raises(StoreError, match="no single store here"):
        adopt(fitted_store, 9)
    (fitted_store / "versions").mkdir()
    with pytest.raises(StoreError, match="already has its own store"):
        adopt(fitted_store, 9)
    assert second.version_id in {v.id for v in ModelStore(target).list_versions()}


def test_a_projects_first_fine_tuning_starts_from_the_base_model(fitted_store, tiny_data, tmp_path):
    base = ModelStore(fitted_store).current()
    project = project_store_dir(tmp_path / "models", 5)
    # Learning rate 0: the weights stay where fitting started, so they show where it started.
    report = fit(tiny_data, project, from_version="current", base_model=base.path, epochs=1, batch_size=8,
                 learning_rate=0.0, verbose=0)
    assert report.parent is None and report.base_model == str(base.path)
    tuned = ModelStore(project).load_model(report.version_id).get_weights()
    for before, after in zip(ModelStore(fitted_store).load_model().get_weights(), tuned):
        np.testing.assert_array_equal(before, after)
    metrics = ModelStore(project).get(report.version_id).metrics
    assert metrics["base_model"] == str(base.path) and metrics["params"]["image_size"] == TINY_IMAGE
    # The base model is what the project was served: equal weights do not beat it.
    assert metrics["promotion"]["baseline_version"] == f"base model {base.path}"
    assert not report.promoted and ModelStore(project).current_version_id() is None
    # The base model's store is untouched.
    assert [v.id for v in ModelStore(fitted_store).list_versions()] == [base.id]
    with pytest.raises(StoreError, match="no base model here"):
        fit(tiny_data, tmp_path / "other", from_version="current", base_model=tmp_path / "missing.keras",
            epochs=1, verbose=0)
