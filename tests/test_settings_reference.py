"""The configuration reference (docs/configuration.md) is generated from ml_backend/settings.py and kept in step."""

from __future__ import annotations

from dataclasses import fields

from ml_backend import settings_reference
from ml_backend.settings import MEANINGS, Settings


def test_every_setting_has_a_meaning() -> None:
    assert settings_reference.missing_meanings() == [], \
        "add a one-line meaning to MEANINGS in ml_backend/settings.py for each new setting"
    assert set(MEANINGS) <= {f.name for f in fields(Settings)}, "MEANINGS names a setting that no longer exists"


def test_the_committed_reference_matches_settings_py() -> None:
    committed = settings_reference.PAGE.read_text(encoding="utf-8")
    assert committed == settings_reference.render(), (
        f"docs/configuration.md is out of date with ml_backend/settings.py: run "
        f"`{settings_reference.COMMAND}` and commit the page")


def test_the_reference_holds_each_name_default_and_meaning() -> None:
    page = settings_reference.render()
    assert "| `HOST` | `127.0.0.1` | where gunicorn listens;" in page
    assert "| `NEGATIVE_LABELS` | `background,negative,neg,exclude,not object` |" in page
    assert "| `SAM_HALF` | `false` | half precision on GPU |" in page
    assert "| `IMAGE_CACHE_DIR` | `~/.cache/sam-trimap-backend/images` |" in page
    assert "\n## SAM 3 concept pre-annotation\n" in page
    for f in fields(Settings):
        assert f"| `{f.name.upper()}` |" in page
