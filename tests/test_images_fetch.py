"""ImageLoader against a real HTTP server on 127.0.0.1 playing Label Studio (and, as
``localhost``, a second host): auth, allow-list, redirects, limits, local files, cache."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

import ml_backend  # noqa: F401  (sets the Keras backend before anything else)
from ml_backend.errors import ImageFetchError, InvalidImageError
from ml_backend.images import DownloadCache, ImageLoader
from ml_backend.security.urls import host_allowed
from ml_backend.settings import Settings

MiB = 1024 * 1024
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def png_bytes(color=(10, 200, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jwt(**claims) -> str:
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


@dataclass
class Seen:
    method: str
    path: str
    host: str
    auth: str | None
    body: bytes


class FakeServer:
    """Routes (method, path) to handler functions; records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], object] = {}
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self._dispatch("GET")

            def do_POST(self):  # noqa: N802
                self._dispatch("POST")

            def _dispatch(self, method):
                self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append(
                    Seen(method, self.path, self.headers.get("Host", ""), self.headers.get("Authorization"), self.body)
                )
                route = server.routes.get((method, urlsplit(self.path).path))
                try:
                    if route is None:
                        reply(self, 404, b"no such page")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading, as it should for oversize bodies

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.ls_url = f"http://127.0.0.1:{self.port}"
        self.other_url = f"http://localhost:{self.port}"  # same server, another host name
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if urlsplit(s.path).path == path]

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def needs_auth(expected):
    """A route serving an image only to requests carrying ``expected()`` as Authorization."""

    def route(handler):
        if handler.headers.get("Authorization") != expected():
            reply(handler, 401, b'{"detail": "Authentication credentials were not provided."}')
        else:
            reply(handler, 200, png_bytes(), {"Content-Type": "image/png"})

    return route


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def make_loader(tmp_path: Path, server: FakeServer | None = None, *, cache_bytes: int = 0, **overrides) -> ImageLoader:
    values = dict(
        label_studio_url=server.ls_url if server else "",
        label_studio_api_key=LEGACY,
        image_cache_dir=tmp_path / "cache",
        download_timeout_s=5.0,
    )
    values.update(overrides)
    return ImageLoader(Settings(**values), cache=DownloadCache(tmp_path / "cache", cache_bytes))


# --- Label Studio authentication ---


def test_legacy_token_is_sent_to_label_studio_only(tmp_path, server):
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Token {LEGACY}")
    server.routes["GET", "/public/b.png"] = lambda h: reply(h, 200, png_bytes((1, 2, 3)))
    loader = make_loader(tmp_path, server, allowed_hosts=("localhost",))

    image = loader.load("/data/upload/1/a.png")
    assert image.shape == (4, 6, 3) and image[0, 0].tolist() == [10, 200, 30]
    assert loader.load(f"{server.ls_url}/data/upload/1/a.png").shape == (4, 6, 3)
    assert loader.load(f"{server.other_url}/public/b.png")[0, 0].tolist() == [1, 2, 3]

    assert [s.auth for s in server.hits("/data/upload/1/a.png")] == [f"Token {LEGACY}"] * 2
    (foreign,) = server.hits("/public/b.png")
    assert foreign.host.startswith("localhost") and foreign.auth is None


def test_per_call_label_studio_url_and_token_override_settings(tmp_path, server):
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: "Token from-setup")
    loader = make_loader(tmp_path, None, label_studio_api_key="")
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/a.png")
    assert loader.load("/data/upload/1/a.png", label_studio_url=server.ls_url + "/", token="from-setup").shape == (
        4,
        6,
        3,
    )


def test_personal_access_token_is_exchanged_once_and_again_after_401(tmp_path, server):
    pat = jwt(token_type="refresh", exp=time.time() + 86400, jti="pat")
    state = {"access": None, "exchanges": 0}

    def refresh(handler):
        if json.loads(handler.body) != {"refresh": pat}:
            reply(handler, 401, b"{}")
            return
        state["exchanges"] += 1
        state["access"] = jwt(token_type="access", exp=time.time() + 3600, jti=f"a{state['exchanges']}")
        reply(handler, 200, json.dumps({"access": state["access"]}).encode(), {"Content-Type": "application/json"})

    server.routes["POST", "/api/token/refresh/"] = refresh
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Bearer {state['access']}")
    loader = make_loader(tmp_path, server, label_studio_api_key=pat)

    threads = [threading.Thread(target=loader.load, args=("/data/upload/1/a.png",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert state["exchanges"] == 1  # one exchange shared by concurrent requests
    assert all(s.auth == f"Bearer {state['access']}" for s in server.hits("/data/upload/1/a.png"))

    state["access"] = "revoked-by-server"  # the server forgets the access token: 401, then re-exchange
    assert loader.load("/data/upload/1/a.png").shape == (4, 6, 3)
    assert state["exchanges"] == 2
    assert server.hits("/data/upload/1/a.png")[-1].auth == f"Bearer {state['access']}"


def test_access_token_near_expiry_is_refreshed_before_use(tmp_path, server):
    pat = jwt(token_type="refresh", exp=time.time() + 86400)
    state = {"access": None, "exchanges": 0}

    def refresh(handler):
        state["exchanges"] += 1
        state["access"] = jwt(token_type="access", exp=time.time() + 5, n=state["exchanges"])  # inside the margin
        reply(handler, 200, json.dumps({"access": state["access"]}).encode())

    server.routes["POST", "/api/token/refresh/"] = refresh
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Bearer {state['access']}")
    loader = make_loader(tmp_path, server, label_studio_api_key=pat)
    loader.load("/data/upload/1/a.png")
    loader.load("/data/upload/1/a.png")
    assert state["exchanges"] == 2
    assert len(server.hits("/data/upload/1/a.png")) == 2  # no 401 round trip was needed


def test_expired_or_refused_personal_access_token_gives_clear_error(tmp_path, server):
    server.routes["POST", "/api/token/refresh/"] = lambda h: reply(h, 401, b'{"detail": "Token is invalid"}')
    loader = make_loader(tmp_path, server, label_studio_api_key=jwt(token_type="refresh", exp=time.time() + 60))
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
        loader.load("/data/upload/1/a.png")
    expired = make_loader(tmp_path, server, label_studio_api_key=jwt(token_type="refresh", exp=time.time() - 60))
    with pytest.raises(ImageFetchError, match="expired"):
        expired.load("/data/upload/1/a.png")


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, "not found in Label Studio"),
        (401, "check LABEL_STUDIO_API_KEY"),
        (403, "check LABEL_STUDIO_API_KEY"),
        (500, "HTTP 500"),
    ],
)
def test_http_errors_name_status_url_and_remedy(tmp_path, server, status, message):
    server.routes["GET", "/data/upload/1/gone.png"] = lambda h: reply(h, status, b"error")
    with pytest.raises(ImageFetchError, match=message) as info:
        make_loader(tmp_path, server).load("/data/upload/1/gone.png")
    assert "/data/upload/1/gone.png" in str(info.value)


def test_missing_api_key_is_named(tmp_path, server):
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Token {LEGACY}")
    with pytest.raises(ImageFetchError, match="none is known: set LABEL_STUDIO_API_KEY"):
        make_loader(tmp_path, server, label_studio_api_key="").load("/data/upload/1/a.png")
    assert server.hits("/data/upload/1/a.png")[0].auth is None


def test_redirect_to_login_page_means_bad_credentials(tmp_path, server):
    server.routes["GET", "/data/upload/1/a.png"] = lambda h: reply(
        h, 302, headers={"Location": "/user/login/?next=/data/upload/1/a.png"}
    )
    with pytest.raises(ImageFetchError, match="login.*LABEL_STUDIO_API_KEY"):
        make_loader(tmp_path, server).load("/data/upload/1/a.png")


# --- hosts and redirects ---


def test_hosts_outside_the_allow_list_are_refused_without_a_request(tmp_path, server):
    loader = make_loader(tmp_path, server)
    with pytest.raises(ImageFetchError, match="ALLOWED_HOSTS"):
        loader.load(f"{server.other_url}/public/b.png")
    with pytest.raises(ImageFetchError, match="unsupported"):
        loader.load("ftp://127.0.0.1/x.png")
    assert server.seen == []


def test_host_allow_list_matching():
    assert host_allowed("images.example.com", ("*.example.com",))
    assert host_allowed("a.b.example.com", ("*.example.com",))
    assert host_allowed("Example.COM", ("example.com",))
    assert not host_allowed("example.com", ("*.example.com",))
    assert not host_allowed("evilexample.com", ("*.example.com",))
    assert not host_allowed("example.com.evil.org", ("example.com",))


def test_redirect_to_a_host_not_allowed_is_refused(tmp_path, server):
    server.routes["GET", "/data/upload/1/moved.png"] = lambda h: reply(
        h, 302, headers={"Location": f"{server.other_url}/x.png"}
    )
    with pytest.raises(ImageFetchError, match="redirect .* refused"):
        make_loader(tmp_path, server).load("/data/upload/1/moved.png")
    assert not [s for s in server.seen if s.host.startswith("localhost")]


def test_presign_redirect_may_go_to_cloud_host_without_credentials(tmp_path, server, monkeypatch):
    def presign(handler):
        fileuri = parse_qs(urlsplit(handler.path).query)["fileuri"][0]
        assert base64.urlsafe_b64decode(fileuri).decode() == "s3://bucket/k.png"
        reply(handler, 303, headers={"Location": f"{server.other_url}/bucket/k.png?X-Amz-Signature=s3cr3t"})

    server.routes["GET", "/tasks/5/presign/"] = presign
    server.routes["GET", "/tasks/5/resolve/"] = presign
    server.routes["GET", "/bucket/k.png"] = lambda h: reply(h, 200, png_bytes((9, 9, 9)))
    # No ALLOWED_HOSTS: the target is trusted because Label Studio chose it, but it must be a public
    # address, and "localhost" is loopback: refused at connection time, before any byte is sent.
    loader = make_loader(tmp_path, server)
    with pytest.raises(ImageFetchError, match="127.0.0.1, which is not a public address") as info:
        loader.load("s3://bucket/k.png", task_id=5)
    assert "s3cr3t" not in str(info.value)
    assert server.hits("/bucket/k.png") == []
    # Pretend loopback is public (a cloud host here would be): the chain completes, without the token.
    monkeypatch.setattr("ml_backend.security.urls.is_public_address", lambda address: True)
    assert loader.load("s3://bucket/k.png", task_id=5)[0, 0].tolist() == [9, 9, 9]
    as_sent = f"{server.ls_url}/tasks/5/resolve/?fileuri=" + base64.urlsafe_b64encode(b"s3://bucket/k.png").decode()
    assert loader.load(as_sent)[0, 0].tolist() == [9, 9, 9]  # the form Label Studio 1.23 puts in tasks
    assert all(hit.auth == f"Token {LEGACY}" for hit in server.hits("/tasks/5/presign/"))
    assert server.hits("/tasks/5/resolve/")[0].auth == f"Token {LEGACY}"
    cloud = server.hits("/bucket/k.png")
    assert len(cloud) == 2 and all(c.host.startswith("localhost") and c.auth is None for c in cloud)
    with pytest.raises(ImageFetchError, match="task id"):
        loader.load("s3://bucket/k.png")


def test_presign_redirect_to_a_listed_private_host(tmp_path, server):
    """A private object store (e.g. MinIO next to Label Studio) is reached when listed in ALLOWED_HOSTS."""
    server.routes["GET", "/tasks/5/resolve/"] = lambda h: reply(
        h, 303, headers={"Location": f"{server.other_url}/bucket/k.png?X-Amz-Signature=s3cr3t"}
    )
    server.routes["GET", "/bucket/k.png"] = lambda h: reply(h, 200, png_bytes((9, 9, 9)))
    loader = make_loader(tmp_path, server, allowed_hosts=("localhost",))
    assert loader.load("/tasks/5/resolve/?fileuri=czM6Ly9idWNrZXQvay5wbmc=")[0, 0].tolist() == [9, 9, 9]
    (cloud,) = server.hits("/bucket/k.png")
    assert cloud.auth is None


# --- limits ---


def test_oversize_download_refused_by_content_length(tmp_path, server):
    def huge(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(5 * MiB))
        handler.end_headers()
        handler.wfile.write(b"x" * 1024)  # the client must not wait for the rest

    server.routes["GET", "/data/upload/1/huge.png"] = huge
    with pytest.raises(ImageFetchError, match="larger than 1,048,576 bytes"):
        make_loader(tmp_path, server, max_download_mb=1).load("/data/upload/1/huge.png")


def test_oversize_download_refused_while_streaming_without_length(tmp_path, server):
    sent = []

    def stream(handler):
        handler.send_response(200)
        handler.end_headers()  # HTTP/1.0, no Content-Length: body ends when the connection closes
        for _ in range(64):  # up to 4 MiB, bounded
            if server.stopping.is_set():
                return
            handler.wfile.write(b"x" * 65536)
            sent.append(65536)

    server.routes["GET", "/data/upload/1/stream.png"] = stream
    with pytest.raises(ImageFetchError, match="larger than"):
        make_loader(tmp_path, server, max_download_mb=1).load("/data/upload/1/stream.png")


def test_slow_server_times_out(tmp_path, server):
    def slow(handler):
        for _ in range(100):  # at most 5 s, far beyond the 0.3 s limit
            if server.stopping.wait(0.05):
                return
        reply(handler, 200, png_bytes())

    server.routes["GET", "/data/upload/1/slow.png"] = slow
    with pytest.raises(ImageFetchError, match="DOWNLOAD_TIMEOUT_S"):
        make_loader(tmp_path, server, download_timeout_s=0.3).load("/data/upload/1/slow.png")


def test_downloaded_non_image_is_an_invalid_image_naming_the_url(tmp_path, server):
    server.routes["GET", "/data/upload/1/page.png"] = lambda h: reply(h, 200, b"<html>hello</html>")
    with pytest.raises(InvalidImageError, match="/data/upload/1/page.png: not an image"):
        make_loader(tmp_path, server).load("/data/upload/1/page.png")


def test_downloaded_bomb_is_refused(tmp_path, server):
    big = io.BytesIO()
    Image.new("1", (3000, 3000)).save(big, "PNG")  # 9 Mpx, a few hundred bytes on the wire
    server.routes["GET", "/data/upload/1/bomb.png"] = lambda h: reply(h, 200, big.getvalue())
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        make_loader(tmp_path, server, max_image_pixels=1_000_000).load("/data/upload/1/bomb.png")


# --- data URIs and local files ---


def test_data_uri(tmp_path):
    loader = make_loader(tmp_path, cache_bytes=MiB)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((7, 8, 9))).decode()
    assert loader.load(uri)[0, 0].tolist() == [7, 8, 9]
    assert not any((tmp_path / "cache").iterdir())  # data URIs are not cached
    with pytest.raises(ImageFetchError, match="base64"):
        loader.load("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageFetchError, match="MAX_DOWNLOAD_MB"):
        make_loader(tmp_path, max_download_mb=0).load(uri)
    with pytest.raises(InvalidImageError, match="data:image/png;base64,...: not an image"):
        loader.load("data:image/png;base64," + base64.b64encode(b"hello").decode())


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "in.png").write_bytes(png_bytes((5, 5, 5)))
    (tmp_path / "secret.png").write_bytes(png_bytes((66, 66, 66)))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root


def test_local_files_url_is_read_from_disk_inside_the_root(tmp_path, server, files):
    loader = make_loader(tmp_path, server, cache_bytes=MiB, local_files_document_root=str(files))
    assert loader.load("/data/local-files/?d=dir/in.png")[0, 0].tolist() == [5, 5, 5]
    assert loader.load(f"{server.ls_url}/data/local-files/?d=dir%2Fin.png")[0, 0].tolist() == [5, 5, 5]
    assert loader.load((files / "dir" / "in.png").as_uri())[0, 0].tolist() == [5, 5, 5]
    assert loader.load(str(files / "dir" / "in.png"))[0, 0].tolist() == [5, 5, 5]
    assert server.seen == []  # no HTTP at all
    assert not any((tmp_path / "cache").iterdir())  # local files are not cached


@pytest.mark.parametrize(
    "url",
    [
        "/data/local-files/?d=../secret.png",
        "/data/local-files/?d=link.png",
        "file:///{tmp}/secret.png",
        "{root}/../secret.png",
        "{root}/link.png",
    ],
)
def test_local_paths_cannot_escape_the_root(tmp_path, server, files, url):
    loader = make_loader(tmp_path, server, local_files_document_root=str(files))
    with pytest.raises(ImageFetchError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        loader.load(url.format(tmp=str(tmp_path).lstrip("/"), root=files))
    assert server.seen == []


def test_local_paths_need_a_document_root(tmp_path, files):
    with pytest.raises(ImageFetchError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        make_loader(tmp_path).load((files / "dir" / "in.png").as_uri())


def test_local_files_url_missing_on_disk_is_fetched_from_label_studio(tmp_path, server, files):
    server.routes["GET", "/data/local-files/"] = needs_auth(lambda: f"Token {LEGACY}")
    loader = make_loader(tmp_path, server, local_files_document_root=str(files))
    assert loader.load("/data/local-files/?d=dir/elsewhere.png").shape == (4, 6, 3)
    (hit,) = server.hits("/data/local-files/")
    assert parse_qs(urlsplit(hit.path).query)["d"] == ["dir/elsewhere.png"]


# --- cache ---


def test_downloads_are_cached_on_disk_across_loaders(tmp_path, server):
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Token {LEGACY}")
    first = make_loader(tmp_path, server, cache_bytes=MiB)
    a = first.load("/data/upload/1/a.png")
    b = first.load("/data/upload/1/a.png")
    c = make_loader(tmp_path, server, cache_bytes=MiB).load("/data/upload/1/a.png")  # e.g. another worker process
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert len(server.hits("/data/upload/1/a.png")) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_failed_downloads_are_not_cached(tmp_path, server):
    server.routes["GET", "/data/upload/1/gone.png"] = lambda h: reply(h, 404)
    loader = make_loader(tmp_path, server, cache_bytes=MiB)
    for _ in range(2):
        with pytest.raises(ImageFetchError):
            loader.load("/data/upload/1/gone.png")
    assert len(server.hits("/data/upload/1/gone.png")) == 2


def test_cache_evicts_least_recently_used_beyond_budget(tmp_path):
    cache = DownloadCache(tmp_path / "c", 450)
    cache.put("a", b"a" * 100)  # each file: a header of ~90 bytes, then the bytes
    cache.put("b", b"b" * 100)
    assert cache.get("a").data == b"a" * 100  # a is now more recent than b
    cache.put("c", b"c" * 100)  # over 450: the least recently used (b) goes
    assert cache.get("b") is None
    assert cache.get("a").data == b"a" * 100 and cache.get("c").data == b"c" * 100
    cache.put("huge", b"h" * 1000)  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("huge") is None and cache.get("a") is not None
    assert sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 450


def test_cache_survives_concurrent_writers(tmp_path):
    cache = DownloadCache(tmp_path / "c", 10_000)
    payloads = {f"k{i}": bytes([i]) * 900 for i in range(20)}

    def write(key):
        for _ in range(5):
            cache.put(key, payloads[key])

    threads = [threading.Thread(target=write, args=(key,)) for key in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stored = {key: cache.get(key) for key in payloads}
    assert all(value is None or value.data == payloads[key] for key, value in stored.items())  # never half a file
    assert sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 10_000
    assert any(value is not None for value in stored.values())


def _write_entries(directory: str, worker: int) -> None:
    cache = DownloadCache(Path(directory), 5_000)
    for i in range(40):
        cache.put(f"w{worker}-{i % 12}", bytes([worker]) * (300 + i))


def test_cache_is_shared_safely_by_processes(tmp_path):
    import multiprocessing

    from ml_backend.images.cache import _parse

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_entries, args=(str(tmp_path / "c"), n)) for n in range(1, 4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    files = list((tmp_path / "c").iterdir())
    assert files and not [f for f in files if f.name.startswith(".tmp-")]
    assert sum(f.stat().st_size for f in files) <= 5_000
    for f in files:  # every file is whole: one worker's byte, at one of the lengths it wrote
        data = _parse(f.read_bytes()).data
        assert len(set(data)) == 1 and 300 <= len(data) < 340


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "   ",
        "http://[::1/x.png",
        "http://127.0.0.1:99999/x.png",
        "javascript:alert(1)",
        "relative/x.png",
        "//evil.example/x.png",
        "file:///etc/passwd\x00",
        "/data/local-files/?d=%00",
        "gs://bucket/key.png",
    ],
)
def test_malformed_urls_get_a_clear_error_never_a_crash(tmp_path, server, files, url):
    loader = make_loader(tmp_path, server, local_files_document_root=str(files))
    with pytest.raises(ImageFetchError):
        loader.load(url)
    assert server.seen == []


def test_relative_local_files_url_is_read_from_disk_without_a_label_studio_url(tmp_path, files):
    loader = make_loader(tmp_path, None, local_files_document_root=str(files))
    assert loader.load("/data/local-files/?d=dir/in.png")[0, 0].tolist() == [5, 5, 5]
    assert loader.local_file("/data/local-files/?d=dir/in.png") == files / "dir" / "in.png"
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):  # not on this disk: only Label Studio has it
        loader.load("/data/local-files/?d=dir/elsewhere.png")


# --- an image replaced at the same URL (issue 21, item 10) ---


class ReplaceableImage:
    """A route serving ``self.png``, which a test replaces, with the validators ``kinds`` names ("etag",
    "last-modified"), honouring ``If-None-Match``/``If-Modified-Since`` with a bodiless 304; records the
    conditions of each request."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.png, self.version, self.kinds = png_bytes((10, 200, 30)), 1, kinds
        self.conditions: list[dict[str, str]] = []
        self.not_modified = 0

    def replace(self, color) -> None:
        self.png, self.version = png_bytes(color), self.version + 1

    def __call__(self, handler) -> None:
        etag = f'"v{self.version}"'
        modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(1_700_000_000 + self.version))
        asked = {name: handler.headers[name] for name in ("If-None-Match", "If-Modified-Since")
                 if name in handler.headers}
        self.conditions.append(asked)
        headers = {"Content-Type": "image/png"}
        if "etag" in self.kinds:
            headers["ETag"] = etag
        if "last-modified" in self.kinds:
            headers["Last-Modified"] = modified
        if asked.get("If-None-Match") == etag or (
                "If-None-Match" not in asked and asked.get("If-Modified-Since") == modified):
            self.not_modified += 1
            reply(handler, 304, b"", headers, length=False)
        else:
            reply(handler, 200, self.png, headers)


@pytest.mark.parametrize("kinds", [("etag",), ("last-modified",), ("etag", "last-modified"), ()])
def test_an_image_replaced_at_its_url_is_read_anew_after_url_key_ttl(tmp_path, server, kinds):
    route = server.routes["GET", "/data/upload/1/r.png"] = ReplaceableImage(kinds)
    within_ttl = make_loader(tmp_path, server, cache_bytes=MiB, url_key_ttl_s=3600.0)
    assert within_ttl.load("/data/upload/1/r.png")[0, 0].tolist() == [10, 200, 30]
    route.replace((200, 10, 30))
    assert within_ttl.load("/data/upload/1/r.png")[0, 0].tolist() == [10, 200, 30]  # cached: no request
    assert len(route.conditions) == 1

    expired = make_loader(tmp_path, server, cache_bytes=MiB, url_key_ttl_s=0.0)  # every read is past the TTL
    assert expired.load("/data/upload/1/r.png")[0, 0].tolist() == [200, 10, 30]  # the new picture
    assert expired.load("/data/upload/1/r.png")[0, 0].tolist() == [200, 10, 30]
    asked = route.conditions[1:]
    if kinds:  # asked only "if changed", with what the server gave; unchanged: 304 and the cached bytes
        expected = {**({"If-None-Match": '"v1"'} if "etag" in kinds else {}),
                    **({"If-Modified-Since": "Tue, 14 Nov 2023 22:13:21 GMT"} if "last-modified" in kinds else {})}
        assert asked[0] == expected and asked[1] != {} and route.not_modified == 1
    else:  # no validator: downloaded again
        assert asked == [{}, {}] and route.not_modified == 0
    assert within_ttl.load("/data/upload/1/r.png")[0, 0].tolist() == [200, 10, 30]  # the cache holds the new one


def test_a_replaced_http_image_gets_a_new_embedding(tmp_path, server, tiny_segmenter):
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine

    route = server.routes["GET", "/data/upload/1/r.png"] = ReplaceableImage(("etag",))
    route.png = png_bytes((10, 200, 30), size=(64, 48))
    settings = Settings(label_studio_url=server.ls_url, label_studio_api_key=LEGACY, image_cache_dir=tmp_path / "cache",
                        model_dir=tmp_path / "models", url_key_ttl_s=0.0)
    engine = SamEngine(tiny_segmenter, source="tiny")
    runtime = Runtime(settings, engine=engine)
    first = runtime.task_embedding("/data/upload/1/r.png")
    assert runtime.task_embedding("/data/upload/1/r.png").key == first.key and route.not_modified == 1
    assert engine.images_encoded == 1  # unchanged (304): the cached bytes, the known embedding
    route.replace((200, 10, 30))
    route.png = png_bytes((200, 10, 30), size=(64, 48))
    second = runtime.task_embedding("/data/upload/1/r.png")
    assert second.key != first.key and engine.images_encoded == 2
