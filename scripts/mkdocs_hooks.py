"""MkDocs hook: SECURITY.md stays at the repository root (where GitHub and people look for it) and is also a
page of the manual, so ``[SECURITY.md](SECURITY.md)`` in docs/ resolves and ``mkdocs build --strict`` checks it."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT_PAGES = ("SECURITY.md",)


def on_files(files: Files, config) -> Files:
    root = Path(config["config_file_path"]).resolve().parent
    for name in ROOT_PAGES:
        files.append(File.generated(config, name, abs_src_path=str(root / name)))
    return files
