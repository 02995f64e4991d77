"""Settings from the environment, and the torch-backend guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend.settings import Settings, SettingsError


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.port == 9090 and settings.sam_model == "" and settings.sam_device == "auto"
    assert settings.model_dir == Path("models") and "background" in settings.negative_labels
    assert settings.embedding_cache_bytes == 1024 * 1024 * 1024


def test_values_are_parsed_and_normalised() -> None:
    settings = Settings.from_env({
        "PORT": "9191", "SAM_HALF": "yes", "NEGATIVE_LABELS": "Background, Not Cat ,", "ALLOWED_HOSTS": "CDN.example.com",
        "LABEL_STUDIO_URL": "http://ls:8080/", "MODEL_DIR": "/srv/models", "DOWNLOAD_TIMEOUT_S": "2.5",
        "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "SAM_DEVICE": "CUDA:1",
    })
    assert settings.port == 9191 and settings.sam_half is True
    assert settings.negative_labels == ("background", "not cat")
    assert settings.allowed_hosts == ("cdn.example.com",) and settings.label_studio_url == "http://ls:8080"
    assert settings.model_dir == Path("/srv/models") and settings.download_timeout_s == 2.5
    assert settings.sam_device == "cuda:1"


@pytest.mark.parametrize("env,words", [
    ({"PORT": "ninety"}, "PORT"),
    ({"SAM_HALF": "maybe"}, "SAM_HALF"),
    ({"EMBEDDING_CACHE_MB": "-5"}, "EMBEDDING_CACHE_MB"),
    ({"RETRAIN_IMAGE_SIZE": "100"}, "multiple of 8"),
    ({"BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH_PASS"),
])
def test_bad_values_name_the_variable(env: dict, words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)


def test_serve_refuses_bad_settings_with_exit_2() -> None:
    env = {**os.environ, "PORT": "ninety"}
    result = subprocess.run([sys.executable, "-m", "ml_backend", "serve"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "PORT" in result.stderr


@pytest.mark.parametrize("package", ["ml_backend", "training"])
def test_another_keras_backend_is_refused_clearly(package: str) -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "KERAS_BACKEND='jax'" in result.stderr and "torch" in result.stderr


def test_importing_the_package_selects_torch_before_keras() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = "import training, keras; print(keras.backend.backend())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "torch", result.stderr


def test_keras_imported_first_with_another_backend_is_refused(monkeypatch) -> None:
    """Only torch is installed here, so a keras already running on jax is stood in for."""
    import types

    from training.keras_backend import KerasBackendError, ensure_torch_backend

    fake_keras = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with pytest.raises(KerasBackendError, match="imported before this package"):
        ensure_torch_backend()
