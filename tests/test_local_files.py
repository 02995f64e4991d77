"""Issue 21, item 8: a task reads a file from this disk only inside its project's local storages.

The rule (:mod:`ml_backend.security.local_files`) on real folders, the storage listing
(:mod:`ml_backend.images.storages`) against a stand-in Label Studio, and the loader and pre-encoding with both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ml_backend.errors import ImageFetchError
from ml_backend.images.storages import ProjectStorages
from ml_backend.security.local_files import LocalFileRefused, label_studio_local_path, project_file
from test_images_fetch import LEGACY, FakeServer, make_loader, png_bytes, reply


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A document root with project 1's storage ``a``, project 2's ``ab`` and a file outside the root."""
    root = tmp_path / "root"
    for folder in ("a/sub", "ab"):
        (root / folder).mkdir(parents=True)
    (root / "a" / "own.png").write_bytes(png_bytes((1, 2, 3)))
    (root / "a" / "sub" / "deep.png").write_bytes(png_bytes((4, 5, 6)))
    (root / "ab" / "secret.png").write_bytes(png_bytes((66, 66, 66)))
    (tmp_path / "outside.png").write_bytes(png_bytes((9, 9, 9)))
    (root / "a" / "link.png").symlink_to(root / "ab" / "secret.png")
    (root / "a" / "out.png").symlink_to(tmp_path / "outside.png")
    return root


def check(d: str, root: Path, storages: list[str]) -> Path:
    return project_file(label_studio_local_path(d, str(root)), document_root=str(root), storages=storages,
                        project=1, what=d)


# --- the rule ------------------------------------------------------------------------------

def test_files_inside_the_projects_storage_are_allowed(root) -> None:
    storage = [str(root / "a")]
    assert check("a/own.png", root, storage) == root / "a" / "own.png"
    assert check("a/sub/deep.png", root, storage) == root / "a" / "sub" / "deep.png"
    assert check("/a/own.png", root, storage) == root / "a" / "own.png"  # Label Studio strips leading slashes
    assert check("a/./sub/../own.png", root, storage) == root / "a" / "own.png"
    assert check("a/own.png", root, [str(root / "a") + "/"]) == root / "a" / "own.png"  # as written in Label Studio


@pytest.mark.parametrize("d, reason", [
    ("ab/secret.png", "not inside any local storage of project 1"),  # /data/a must not cover /data/ab
    ("a/../ab/secret.png", "not inside any local storage of project 1"),
    ("a/link.png", "not inside any local storage of project 1"),  # a link inside the storage, out of it
    ("a/out.png", "outside LOCAL_FILES_DOCUMENT_ROOT"),
    ("../outside.png", "outside LOCAL_FILES_DOCUMENT_ROOT"),
    ("a", "not inside any local storage"),  # the storage folder itself is no file of it
    ("a/own\x00.png", "unusable local path"),
])
def test_files_outside_the_projects_storages_are_refused(root, d, reason) -> None:
    with pytest.raises(LocalFileRefused, match=reason) as refused:
        check(d, root, [str(root / "a")])
    assert refused.value.status_code == 403 and d.split("\x00")[0] in refused.value.message


def test_a_project_without_local_storages_reads_nothing(root) -> None:
    with pytest.raises(LocalFileRefused, match="project 1 has no local storage.*add a Local Files storage"):
        check("a/own.png", root, [])
    with pytest.raises(LocalFileRefused, match="no local storage"):  # relative or empty paths are no storage
        check("a/own.png", root, ["a", ""])


def test_a_storage_reached_through_a_link_counts_by_where_it_leads(root, tmp_path) -> None:
    (root / "alias").symlink_to(root / "a")
    assert check("a/own.png", root, [str(root / "alias")]) == root / "a" / "own.png"
    assert check("alias/own.png", root, [str(root / "a")]) == root / "a" / "own.png"


# --- the storage listing -------------------------------------------------------------------

@pytest.fixture
def label_studio():
    fake = FakeServer()
    fake.listings = {}

    def storages(handler) -> None:
        project = handler.path.split("project=", 1)[1].split("&", 1)[0]
        status, body = fake.listings.get(project, (200, []))
        if handler.headers.get("Authorization") != f"Token {LEGACY}":
            status, body = 401, {"detail": "no"}
        reply(handler, status, json.dumps(body).encode(), {"Content-Type": "application/json"})

    fake.routes["GET", "/api/storages/localfiles"] = storages
    yield fake
    fake.close()


def listed(label_studio: FakeServer, project: int, storages: ProjectStorages | None = None) -> tuple[str, ...]:
    from ml_backend.images.auth import LabelStudioAuth
    from ml_backend.security.urls import UrlPolicy

    policy = UrlPolicy(label_studio.ls_url)
    with policy.session() as session:
        auth = LabelStudioAuth(policy, LEGACY, session, timeout_s=5)
        return (storages or ProjectStorages()).paths(policy, session, auth, project)


def test_storages_are_listed_per_project_and_kept_a_short_while(label_studio) -> None:
    label_studio.listings["1"] = (200, [{"id": 1, "project": 1, "path": "/data/a"},
                                        {"id": 2, "project": 2, "path": "/data/other"},  # not project 1's
                                        {"id": 3, "project": 1, "path": None}])
    kept = ProjectStorages()
    assert listed(label_studio, 1, kept) == ("/data/a",)
    assert listed(label_studio, 1, kept) == ("/data/a",)
    assert len(label_studio.hits("/api/storages/localfiles")) == 1  # kept for STORAGES_TTL_S
    assert listed(label_studio, 1, ProjectStorages(ttl_s=0)) == ("/data/a",)
    assert len(label_studio.hits("/api/storages/localfiles")) == 2


def test_a_paged_listing_is_followed(label_studio) -> None:
    def paged(handler) -> None:
        page = 2 if "page=2" in handler.path else 1
        body = {"results": [{"project": 1, "path": f"/data/p{page}"}], "next": "more" if page == 1 else None}
        reply(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    label_studio.routes["GET", "/api/storages/localfiles"] = paged
    assert listed(label_studio, 1) == ("/data/p1", "/data/p2")


def test_the_cache_is_bounded(label_studio) -> None:
    kept = ProjectStorages(max_projects=3)
    for project in range(10):
        listed(label_studio, project, kept)
    assert len(kept._kept) == 3


@pytest.mark.parametrize("status, body, reason", [
    (500, {"detail": "boom"}, "HTTP 500"),
    (404, {"detail": "Not found."}, "no project 1 that the backend's token can see"),
    (200, {"detail": "odd"}, "not a list of storages"),
])
def test_a_failing_label_studio_refuses_and_is_asked_again(label_studio, status, body, reason) -> None:
    label_studio.listings["1"] = (status, body)
    kept = ProjectStorages()
    with pytest.raises(LocalFileRefused, match=f"cannot check the local storages of project 1.*{reason}"):
        listed(label_studio, 1, kept)
    label_studio.listings["1"] = (200, [{"project": 1, "path": "/data/a"}])
    assert listed(label_studio, 1, kept) == ("/data/a",)  # failures are not kept


# --- the loader ----------------------------------------------------------------------------

def test_the_loader_reads_only_the_projects_files_and_never_asks_over_http_instead(tmp_path, root,
                                                                                     label_studio) -> None:
    label_studio.listings["1"] = (200, [{"project": 1, "path": str(root / "a")}])
    label_studio.listings["2"] = (200, [{"project": 2, "path": str(root / "ab")}])
    label_studio.routes["GET", "/data/local-files/"] = lambda handler: reply(handler, 200, png_bytes((66, 66, 66)))
    loader = make_loader(tmp_path, label_studio, local_files_document_root=str(root))
    assert loader.load("/data/local-files/?d=a/own.png", project=1)[0, 0].tolist() == [1, 2, 3]
    assert loader.load("/data/local-files/?d=ab/secret.png", project=2)[0, 0].tolist() == [66, 66, 66]
    for url in ("/data/local-files/?d=ab/secret.png", f"{label_studio.ls_url}/data/local-files/?d=ab%2Fsecret.png",
                "/data/local-files/?d=a/link.png", (root / "ab" / "secret.png").as_uri(), str(root / "ab" / "secret.png")):
        with pytest.raises(LocalFileRefused, match="not inside any local storage of project 1"):
            loader.load(url, project=1)
        with pytest.raises(LocalFileRefused):
            loader.local_file(url, project=1)  # what the URL index checks before it offers an embedding
    # Allowed but not on this disk: asked from Label Studio, which applies its own rule.
    assert loader.load("/data/local-files/?d=a/elsewhere.png", project=1).shape == (4, 6, 3)
    assert [hit.path for hit in label_studio.hits("/data/local-files/")] == ["/data/local-files/?d=a/elsewhere.png"]
    # Outside any task (no project): LOCAL_FILES_DOCUMENT_ROOT alone limits, as before.
    assert loader.load("/data/local-files/?d=ab/secret.png")[0, 0].tolist() == [66, 66, 66]


def test_the_loader_refuses_when_label_studio_cannot_say(tmp_path, root, label_studio) -> None:
    label_studio.listings["1"] = (500, {"detail": "boom"})
    loader = make_loader(tmp_path, label_studio, local_files_document_root=str(root))
    with pytest.raises(LocalFileRefused, match="HTTP 500"):
        loader.load("/data/local-files/?d=a/own.png", project=1)
    unknown = make_loader(tmp_path, None, local_files_document_root=str(root))  # no Label Studio URL at all
    with pytest.raises(LocalFileRefused, match="cannot check the local storages of project 1.*LABEL_STUDIO_URL"):
        unknown.load("/data/local-files/?d=a/own.png", project=1)
    assert label_studio.hits("/data/local-files/") == []


def test_preencoding_skips_another_projects_file(tmp_path, root, label_studio, tiny_segmenter) -> None:
    """The background path carries the project too: project 1's queued task naming project 2's file is not
    encoded (nor is its image read)."""
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from ml_backend.settings import Settings

    label_studio.listings["1"] = (200, [{"project": 1, "path": str(root / "a")}])
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   local_files_document_root=str(root), label_studio_url=label_studio.ls_url,
                                   label_studio_api_key=LEGACY, preencode=True)
    engine = SamEngine(tiny_segmenter, source="tiny")
    runtime = Runtime(settings, engine=engine)
    tasks = [{"id": 1, "project": 1, "data": {"img": "/data/local-files/?d=ab/secret.png"}},
             {"id": 2, "project": 1, "data": {"img": "/data/local-files/?d=a/own.png"}}]
    assert runtime.preencoding.warm(tasks, "img", 1) == 2
    assert runtime.preencoding.scheduler.wait_idle(60)
    status = runtime.preencoding.scheduler.status()["1"]
    assert engine.images_encoded == 1 and status.get("failed") == 1, status  # only project 1's own file
    assert "local storage of project 1" in status.get("last_error", ""), status
    with pytest.raises(ImageFetchError, match="local storage of project 1"):
        runtime.task_embedding("/data/local-files/?d=ab/secret.png", 1, 1)



def test_the_retraining_export_reads_local_files_as_the_project(tmp_path, root) -> None:
    """The export behind retraining carries the project: a Label Studio that lists no storage for it (this stand-in
    knows no storage route) gets none of the project's tasks read from disk, each skipped with the reason."""
    from fake_label_studio import TOKEN, fake_label_studio

    from ml_backend.export import export_from_label_studio
    from ml_backend.images import ImageLoader
    from ml_backend.settings import Settings

    loader = ImageLoader(dataclasses.replace(Settings(), image_cache_dir=tmp_path / "cache",
                                             local_files_document_root=str(root)))
    with fake_label_studio(n_tasks=2) as ls:
        for task in ls.tasks:
            task["data"]["image"] = "/data/local-files/?d=a/own.png"
        report = export_from_label_studio(tmp_path / "out", url=ls.url, token=TOKEN, project=1, loader=loader)
    assert report.written == [] and len(report.skipped) == 2, report.describe()
    assert all("cannot check the local storages of project 1" in reason for reason in report.skipped.values())
