"""The manual builds without a broken link or anchor, and the README's links lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a link to a missing page, heading or image fails the build."""
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    assert "X-ML-Backend-Secret" in (tmp_path / "site" / "SECURITY" / "index.html").read_text()


def test_the_readme_links_point_at_files_of_the_repository() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local, "the README links into the manual"
    assert [link for link in local if not (ROOT / link).exists()] == []
