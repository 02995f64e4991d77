"""MkDocs hook: SECURITY.md stays at the repository root (where GitHub and people look for it) and is also a
page of the manual, so ``[SECURITY.md](SECURITY.md)`` in docs/ resolves and ``mkdocs build --strict`` checks it."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT_PAGES = ("SECURITY.md",)
# TODO(merge, issue 24): pages other branches write, linked from here already; until one is merged a stub
# stands in, so the strict build passes on this branch. Delete this tuple and its loop once all are merged.
PENDING_PAGES = ("docker.md",)


def on_files(files: Files, config) -> Files:
    root = Path(config["config_file_path"]).resolve().parent
    for name in ROOT_PAGES:
        files.append(File.generated(config, name, abs_src_path=str(root / name)))
    for name in PENDING_PAGES:
        if files.get_file_from_path(name) is None:
            files.append(File.generated(config, name, content=f"# {name}\n\nThis page arrives with its branch.\n"))
    return files
