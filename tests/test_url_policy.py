"""The URL policy (ml_backend.security.urls) against every URL attack of issue 9.

Real HTTP: a fake Label Studio and a *trap* listener, both on 127.0.0.1, each recording every
request it gets; the trap must never receive a request carrying the token (in most cases, no
request at all). Then property-based fuzzing with hypothesis: whatever the URL, only our own
error types escape, and the token is attached only to Label Studio's media paths on its origin.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_images_fetch import LEGACY, FakeServer, jwt, needs_auth, png_bytes, reply
from urllib3.util import parse_url

from ml_backend.errors import BackendError, ImageFetchError
from ml_backend.images import DownloadCache, ImageLoader
from ml_backend.label_studio_api import LabelStudioAPIError, api_get
from ml_backend.security import urls
from ml_backend.security.urls import (
    LABEL_STUDIO_MEDIA,
    PRESIGNED,
    Origin,
    Target,
    UrlPolicy,
    URLRefused,
    describe,
    is_public_address,
    parse_label_studio_url,
)
from ml_backend.settings import Settings

MiB = 1024 * 1024
TOKEN_PATH = "/api/current-user/token"


@pytest.fixture
def ls():
    server = FakeServer()
    server.routes["GET", "/data/upload/1/a.png"] = needs_auth(lambda: f"Token {LEGACY}")
    server.routes["GET", TOKEN_PATH] = lambda h: reply(h, 200, json.dumps({"token": LEGACY}).encode())
    yield server
    server.close()


@pytest.fixture
def trap():
    server = FakeServer()  # answers 404 to everything and records it
    yield server
    server.close()


def loader_for(tmp_path: Path, ls: FakeServer, **overrides) -> ImageLoader:
    values = dict(label_studio_url=ls.ls_url, label_studio_api_key=LEGACY, image_cache_dir=tmp_path / "cache",
                  download_timeout_s=5.0)
    values.update(overrides)
    return ImageLoader(Settings(**values), cache=DownloadCache(tmp_path / "cache", MiB))


def cached_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache").iterdir())


def assert_no_token_leaked(*servers: FakeServer, ls: FakeServer | None = None) -> None:
    for server in servers:
        assert [s for s in server.seen if s.auth] == [], f"the token reached {server.ls_url}"
    if ls is not None:
        assert ls.hits(TOKEN_PATH) == [], "Label Studio's token endpoint was requested"


# --- attacks named in the task URL --------------------------------------------------------------

ATTACKS = [
    # parser differences: urllib3 connects to the host before the backslash / after the '@'
    "http://127.0.0.1:{trap}\\@127.0.0.1:{ls}/data/upload/1/a.png",
    "http://127.0.0.1:{ls}\\@127.0.0.1:{trap}/data/upload/1/a.png",
    "http:\\\\127.0.0.1:{trap}/data/upload/1/a.png",
    "http://127.0.0.1:{ls}/data/upload/1/a.png\\..\\..\\api\\current-user\\token",
    # user info
    "http://127.0.0.1:{ls}@127.0.0.1:{trap}/data/upload/1/a.png",
    "http://user:secret@127.0.0.1:{ls}/data/upload/1/a.png",
    "http://127.0.0.1:{ls}%40@127.0.0.1:{trap}/data/upload/1/a.png",
    # control characters and whitespace that some parsers drop
    "http://127.0.0.1:{trap}\t@127.0.0.1:{ls}/data/upload/1/a.png",
    "http://127.0.0.1:{ls}/data/upload/1/a\n.png",
    "http://127.0.0.1:{ls}/data/upload/1/a\u200b.png",
    "http://127.0.0.1:{trap} /data/upload/1/a.png",
    # fragments and queries hiding an authority
    "http://127.0.0.1:{trap}#@127.0.0.1:{ls}/data/upload/1/a.png",
    "http://127.0.0.1:{trap}?@127.0.0.1:{ls}/data/upload/1/a.png",
    # Label Studio paths that are not media, plain, normalised and escaped
    TOKEN_PATH,
    "http://127.0.0.1:{ls}" + TOKEN_PATH,
    "/data/upload/../../api/current-user/token",
    "/data/upload/1/../../../api/current-user/token",
    "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
    "/data/upload/%2E%2E/%2E%2E/api/current-user/token",
    "/data/upload/.%2e/.%2e/api/current-user/token",
    "/data/upload/..%2f..%2fapi%2fcurrent-user%2ftoken",
    "/data/upload/%252e%252e/%252e%252e/api/current-user/token",
    "/data/local-files/../../api/current-user/token?d=x",
    "/tasks/1/resolve/../../api/current-user/token?fileuri=eA==",
    "/data/upload/",
    "/tasks/1/resolve/",
    "/api/projects/1/export?exportType=JSON",
    "/user/login/",
    # other origins: another port or scheme of Label Studio's host, or another name for it
    "http://127.0.0.1:{trap}/data/upload/1/a.png",
    "https://127.0.0.1:{ls}/data/upload/1/a.png",
    "http://localhost:{ls}/data/upload/1/a.png",
    "http://localhost.:{ls}/data/upload/1/a.png",
    "//127.0.0.1:{trap}/data/upload/1/a.png",
    "http:/127.0.0.1:{trap}/data/upload/1/a.png",
    # numeric forms of 127.0.0.1
    "http://2130706433:{ls}/data/upload/1/a.png",
    "http://017700000001:{ls}/data/upload/1/a.png",
    "http://0x7f000001:{ls}/data/upload/1/a.png",
    "http://0x7f.0.0.1:{ls}/data/upload/1/a.png",
    "http://0177.0.0.1:{ls}/data/upload/1/a.png",
    "http://127.1:{ls}/data/upload/1/a.png",
    "http://127.0.0.01:{ls}/data/upload/1/a.png",
    # IPv6 literals for loopback
    "http://[::1]:{ls}/data/upload/1/a.png",
    "http://[::ffff:127.0.0.1]:{ls}/data/upload/1/a.png",
    "http://[::ffff:7f00:1]:{ls}/data/upload/1/a.png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{ls}/data/upload/1/a.png",
    "http://[fe80::1%25lo]:{ls}/data/upload/1/a.png",
    # non-ASCII hosts (fullwidth letters map to ASCII under some IDNA modes)
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{trap}/data/upload/1/a.png",
    # other schemes
    "ftp://127.0.0.1:{trap}/a.png",
    "gopher://127.0.0.1:{trap}/_GET",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_url_attacks_are_refused_before_any_request(tmp_path, ls, trap, attack):
    loader = loader_for(tmp_path, ls)
    with pytest.raises(ImageFetchError) as info:
        loader.load(attack.format(ls=ls.port, trap=trap.port))
    assert trap.seen == [] and ls.seen == []
    assert "secret" not in str(info.value)
    assert cached_files(tmp_path) == []


def test_label_studio_media_still_gets_the_token(tmp_path, ls):
    loader = loader_for(tmp_path, ls)
    assert loader.load("/data/upload/1/a.png").shape == (4, 6, 3)
    assert loader.load(f"{ls.ls_url}/data/upload/1/a.png").shape == (4, 6, 3)
    assert loader.load(f"http://127.0.0.1:{ls.port}/data/upload/1/a.png?x=1").shape == (4, 6, 3)
    assert {s.auth for s in ls.hits("/data/upload/1/a.png")} == {f"Token {LEGACY}"}


def test_label_studio_under_a_path_prefix(tmp_path, ls):
    ls.routes["GET", "/ls/data/upload/1/a.png"] = needs_auth(lambda: f"Token {LEGACY}")
    loader = loader_for(tmp_path, ls, label_studio_url=ls.ls_url + "/ls")
    assert loader.load("/data/upload/1/a.png").shape == (4, 6, 3)
    with pytest.raises(ImageFetchError, match="media paths"):
        loader.load(f"{ls.ls_url}/data/upload/1/a.png")  # outside the prefix: not Label Studio's media
    assert [s.auth for s in ls.seen] == [f"Token {LEGACY}"]


def test_listed_host_never_gets_the_token(tmp_path, ls, trap):
    trap.routes["GET", "/data/upload/1/a.png"] = lambda h: reply(h, 200, png_bytes())
    loader = loader_for(tmp_path, ls, allowed_hosts=("localhost",))
    assert loader.load(f"http://localhost:{trap.port}/data/upload/1/a.png").shape == (4, 6, 3)
    (hit,) = trap.seen
    assert hit.auth is None


def test_environment_proxies_and_netrc_are_ignored(tmp_path, ls, trap, monkeypatch):
    other = FakeServer()
    try:
        other.routes["GET", "/x.png"] = lambda h: reply(h, 200, png_bytes())
        netrc = tmp_path / "netrc"
        netrc.write_text("machine localhost login admin password hunter2\n")
        netrc.chmod(0o600)
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, trap.ls_url)
        monkeypatch.setenv("NO_PROXY", "")
        monkeypatch.setenv("NETRC", str(netrc))
        loader = loader_for(tmp_path, ls, allowed_hosts=("localhost",))
        assert loader.load("/data/upload/1/a.png").shape == (4, 6, 3)
        assert loader.load(f"http://localhost:{other.port}/x.png").shape == (4, 6, 3)
        assert trap.seen == []  # nothing went through the "proxy"
        assert [s.auth for s in other.seen] == [None]  # no netrc credentials either
    finally:
        other.close()


# --- redirects ----------------------------------------------------------------------------------


def redirect(location: str):
    return lambda h: reply(h, 302, headers={"Location": location})


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{trap}/x.png",
        "http://localhost:{trap}/x.png",
        "http://127.0.0.1:{trap}\\@127.0.0.1:{ls}/data/upload/1/a.png",
        "http://127.0.0.1:{ls}@127.0.0.1:{trap}/data/upload/1/a.png",
        "//127.0.0.1:{trap}/x.png",
        TOKEN_PATH,
        "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
        "../../api/current-user/token",
        "http://[::ffff:127.0.0.1]:{trap}/x.png",
        "http://2130706433:{trap}/x.png",
        "file:///etc/passwd",
        "",
    ],
)
def test_redirects_from_label_studio_media_cannot_take_the_token_elsewhere(tmp_path, ls, trap, location):
    ls.routes["GET", "/data/upload/1/moved.png"] = redirect(location.format(ls=ls.port, trap=trap.port))
    with pytest.raises(ImageFetchError, match="redirect"):
        loader_for(tmp_path, ls).load("/data/upload/1/moved.png")
    assert trap.seen == []
    assert_no_token_leaked(trap, ls=ls)
    assert cached_files(tmp_path) == []


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{trap}/bucket/k.png?X-Amz-Signature=s3cr3t",
        "http://10.0.0.1/bucket/k.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{trap}/k.png",
        "http://[fd00::1]/k.png",
        "http://100.64.0.1/k.png",
        "http://0.0.0.0:{trap}/k.png",
    ],
)
def test_presigned_redirect_to_a_private_address_is_refused_without_connecting(tmp_path, ls, trap, location):
    ls.routes["GET", "/tasks/5/resolve/"] = redirect(location.format(trap=trap.port))
    with pytest.raises(ImageFetchError, match="not a public address") as info:
        loader_for(tmp_path, ls).load("/tasks/5/resolve/?fileuri=czM6Ly9iL2sucG5n")
    assert "s3cr3t" not in str(info.value)
    assert trap.seen == []
    assert [s.auth for s in ls.seen] == [f"Token {LEGACY}"]  # the resolve call itself is Label Studio's


def fake_dns(monkeypatch, names: dict[str, str]) -> None:
    """Resolve ``names`` to the given addresses; everything else as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_dns_name_resolving_to_loopback_is_refused_at_connection(tmp_path, ls, trap, monkeypatch):
    # A public-looking name that resolves (or rebinds) to 127.0.0.1: checked on the connected socket.
    fake_dns(monkeypatch, {"cdn.rebind.test": "127.0.0.1"})
    ls.routes["GET", "/tasks/5/resolve/"] = redirect(f"http://cdn.rebind.test:{trap.port}/k.png?sig=s3cr3t")
    with pytest.raises(ImageFetchError, match="cdn.rebind.test resolved to 127.0.0.1") as info:
        loader_for(tmp_path, ls).load("/tasks/5/resolve/?fileuri=czM6Ly9iL2sucG5n")
    assert "s3cr3t" not in str(info.value)
    assert trap.seen == []  # connected, checked, closed: no request line was ever sent


def test_dns_name_of_a_listed_host_may_be_private(tmp_path, ls, trap, monkeypatch):
    fake_dns(monkeypatch, {"minio.internal": "127.0.0.1"})
    trap.routes["GET", "/bucket/k.png"] = lambda h: reply(h, 200, png_bytes())
    loader = loader_for(tmp_path, ls, allowed_hosts=("minio.internal",))
    assert loader.load(f"http://minio.internal:{trap.port}/bucket/k.png").shape == (4, 6, 3)
    assert [s.auth for s in trap.seen] == [None]


def test_presigned_hops_without_a_listed_host_stay_on_their_origin(tmp_path, ls, trap, monkeypatch):
    monkeypatch.setattr(urls, "is_public_address", lambda address: True)  # pretend loopback is the internet
    cloud = FakeServer()
    try:
        ls.routes["GET", "/tasks/5/resolve/"] = redirect(f"{cloud.other_url}/k.png?sig=1")
        cloud.routes["GET", "/k.png"] = redirect(f"{cloud.other_url}/k2.png?sig=2")  # same origin: followed
        cloud.routes["GET", "/k2.png"] = redirect(f"http://localhost:{trap.port}/k3.png")  # another: refused
        with pytest.raises(ImageFetchError, match="not in ALLOWED_HOSTS"):
            loader_for(tmp_path, ls).load("/tasks/5/resolve/?fileuri=czM6Ly9iL2sucG5n")
        assert [s.path.split("?")[0] for s in cloud.seen] == ["/k.png", "/k2.png"]
        assert all(s.auth is None for s in cloud.seen) and trap.seen == []
    finally:
        cloud.close()


def test_listed_host_cannot_redirect_into_label_studio(tmp_path, ls, trap):
    trap.routes["GET", "/x.png"] = redirect(f"{ls.ls_url}/data/upload/1/a.png")
    with pytest.raises(ImageFetchError, match="only Label Studio may redirect into Label Studio"):
        loader_for(tmp_path, ls, allowed_hosts=("localhost",)).load(f"http://localhost:{trap.port}/x.png")
    assert ls.seen == []


# --- the backend's own calls to Label Studio ------------------------------------------------------


def test_token_exchange_is_not_redirected(tmp_path, ls, trap):
    pat = jwt(token_type="refresh", exp=time.time() + 3600)
    ls.routes["POST", "/api/token/refresh/"] = lambda h: reply(
        h, 307, headers={"Location": f"http://127.0.0.1:{trap.port}/api/token/refresh/"}
    )
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
        loader_for(tmp_path, ls, label_studio_api_key=pat).load("/data/upload/1/a.png")
    assert trap.seen == []
    assert [s.path for s in ls.seen] == ["/api/token/refresh/"]  # and no image request without a token


def test_rest_calls_go_to_label_studio_only_and_never_follow_redirects(ls, trap):
    ls.routes["GET", "/api/projects/1"] = redirect(f"http://127.0.0.1:{trap.port}/api/projects/1")
    with pytest.raises(LabelStudioAPIError, match="HTTP 302"):
        api_get(ls.ls_url, LEGACY, "/api/projects/1")
    assert trap.seen == []
    for path in ("/data/upload/1/a.png", "/api/../data/upload/1/a.png", "/api/projects/1?x=1"):
        with pytest.raises(LabelStudioAPIError, match="not a Label Studio API path"):
            api_get(ls.ls_url, LEGACY, path)
    bad_url = f"http://127.0.0.1:{trap.port}\\@127.0.0.1:{ls.port}"
    with pytest.raises(LabelStudioAPIError, match="backslash"):
        api_get(bad_url, LEGACY, "/api/projects/1")
    assert trap.seen == [] and [s.path for s in ls.seen] == ["/api/projects/1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1\\@ls",
        "http://admin:pw@ls:8080",
        "http://ls:8080/?next=x",
        "http://ls:8080/#x",
        "ftp://ls",
        "ls:8080",
        "http://ls/%2e%2e/",
    ],
)
def test_unusable_label_studio_urls_are_refused(url):
    with pytest.raises(URLRefused, match="the Label Studio URL"):
        parse_label_studio_url(url)


# --- messages -----------------------------------------------------------------------------------


def test_presigned_query_strings_and_passwords_never_reach_messages(tmp_path, ls, monkeypatch):
    monkeypatch.setattr(urls, "is_public_address", lambda address: True)
    cloud = FakeServer()
    try:
        ls.routes["GET", "/tasks/5/resolve/"] = redirect(f"{cloud.other_url}/k.png?X-Amz-Signature=s3cr3t")
        cloud.routes["GET", "/k.png"] = lambda h: reply(h, 404)
        with pytest.raises(ImageFetchError, match="HTTP 404") as info:
            loader_for(tmp_path, ls).load("/tasks/5/resolve/?fileuri=czM6Ly9iL2sucG5n")
        assert "fileuri=czM6Ly9iL2sucG5n" in str(info.value) and "s3cr3t" not in str(info.value)
    finally:
        cloud.close()
    assert describe("https://b.s3.amazonaws.com/k.png?X-Amz-Credential=AKIA&X-Amz-Signature=s3cr3t") == (
        "https://b.s3.amazonaws.com/k.png?..."
    )
    assert describe("http://ls/data/local-files/?d=dir/a.png&sig=s3cr3t") == "http://ls/data/local-files/?d=dir/a.png&..."
    assert describe("http://admin:hunter2@ls/x") == "http://***@ls/x"
    assert describe("http://ls/x\r\nSet-Cookie: a") == "http://ls/x\\r\\nSet-Cookie: a"


# --- addresses ----------------------------------------------------------------------------------

NON_PUBLIC = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    "2001:db8::/32",
]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("1.1.1.1", True),
        ("127.0.0.1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.1.2.3", False), ("::127.0.0.1", False),
        ("2002:7f00:1::", False), ("2002:a00:1::", False), ("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo whose client is 127.0.0.1
        ("fe80::1%lo", False), ("224.0.0.1", False), ("255.255.255.255", False), ("not an address", False),
    ],
)
def test_public_addresses(address, public):
    assert is_public_address(address) is public


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(NON_PUBLIC).flatmap(lambda net: st.ip_addresses(network=net)))
def test_fuzz_no_private_address_counts_as_public(ip):
    assert not is_public_address(str(ip))
    if ip.version == 4:
        assert not is_public_address(f"::ffff:{ip}")
        assert not is_public_address(str(ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80))))  # 6to4


# --- fuzzing the classification -----------------------------------------------------------------

LS_URL = "http://ls.example:8080"
ALLOWED = ("images.example.com", "*.cdn.example")
POLICY = UrlPolicy(LS_URL, ALLOWED)
LS_ORIGIN = Origin("http", "ls.example", 8080)
MEDIA_ON_THE_WIRE = re.compile(
    r"/data/upload/[^/].*|/data/local-files/?|/storage-data/uploaded/?|/(tasks|projects)/[0-9]+/(resolve|presign)/?",
    re.DOTALL,
)

schemes = st.sampled_from(["http", "https", "HTTP", "hTTps", "ftp", "file", "javascript", "data", "s3", ""])
separators = st.sampled_from(["://", ":/", ":", ":\\\\", "://\\", ":///", "//", "://\t"])
userinfos = st.sampled_from(["", "", "", "user@", "user:pw@", "ls.example:8080@", "ls.example:8080\\@", "@", "%40@"])
hosts = st.one_of(
    st.sampled_from([
        "ls.example", "LS.EXAMPLE", "ls.example.", "ls.example\\", "127.0.0.1", "2130706433", "0x7f.1", "0177.1",
        "[::1]", "[::ffff:127.0.0.1]", "[fe80::1%25eth0]", "evil.test", "images.example.com", "a.cdn.example",
        "cdn.example", "localhost", "xn--nxasmq6b", "\uff4c\uff53.example", "ls.example%2f", "", "10.0.0.1",
    ]),
    st.text(max_size=10),
)
ports = st.sampled_from(["", ":8080", ":8080", ":80", ":08080", ":0", ":65536", ":", ":8080\\", ":8080@evil.test", ":x"])
segments = st.one_of(
    st.sampled_from([
        "data", "upload", "local-files", "api", "current-user", "token", "tasks", "1", "resolve", "presign",
        "projects", "storage-data", "uploaded", "..", ".", "%2e%2e", "%2E%2e", ".%2e", "%252e%252e", "..%2f",
        "%2f", "%5c", "\\", "", "x.png", "%00", "\t", "\u00e9", "?", "#", ";", "@", "%", "%zz", "\u200b",
    ]),
    st.text(max_size=6),
)
queries = st.sampled_from([
    "", "", "?d=a.png", "?fileuri=czM6Ly9h", "?filepath=upload/1/a.png", "?d=", "?x=1&d=b", "#frag", "?d=../../x",
    "?fileuri=", "#@evil.test", "?@evil.test",
])
absolute_urls = st.builds(
    lambda scheme, sep, user, host, port, segs, query: f"{scheme}{sep}{user}{host}{port}/{'/'.join(segs)}{query}",
    schemes, separators, userinfos, hosts, ports, st.lists(segments, max_size=6), queries,
)
relative_urls = st.builds(lambda segs, query: "/" + "/".join(segs) + query, st.lists(segments, max_size=6), queries)
any_url = st.one_of(absolute_urls, relative_urls, st.text(max_size=40))


class _Captured(Exception):
    """Raised by the capturing session instead of sending."""

    def __init__(self, prepared: requests.PreparedRequest) -> None:
        super().__init__("captured")
        self.prepared = prepared


def _capturing_session() -> requests.Session:
    session = POLICY.session()

    def send(prepared, **kwargs):
        raise _Captured(prepared)

    session.send = send  # type: ignore[method-assign]
    return session


SESSION = _capturing_session()


def sent(target: Target) -> requests.PreparedRequest | None:
    """The request the policy would send for ``target`` (None when it refuses at the last check)."""
    try:
        POLICY.send(SESSION, "GET", target, authorization=lambda: {"Authorization": f"Token {LEGACY}"}, timeout=1)
    except _Captured as captured:
        return captured.prepared
    except ImageFetchError:
        return None
    raise AssertionError("nothing was sent")


def assert_token_only_to_label_studio_media(target: Target) -> None:
    prepared = sent(target)
    if prepared is None or "Authorization" not in prepared.headers:
        assert not target.label_studio or prepared is None
        return
    wire = parse_url(prepared.url)
    assert Origin.of(wire) == LS_ORIGIN
    other = urlsplit(prepared.url)  # the stdlib parser must agree on where the token goes
    assert (other.scheme, other.hostname, other.port) == ("http", "ls.example", 8080)
    assert other.username is None and "\\" not in prepared.url
    path = unquote(other.path)
    assert not {".", ".."} & set(path.split("/")), prepared.url
    assert "/api/" not in path and MEDIA_ON_THE_WIRE.fullmatch(path), prepared.url
    assert target.route == LABEL_STUDIO_MEDIA


# Sized with the other fuzz tests below to ~15 s of CPU in all (4,400 inputs) on a 2-core machine.
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(any_url)
def test_fuzz_image_urls_only_our_errors_and_token_only_to_media(url):
    try:
        target = POLICY.image_target(url)
    except BackendError:
        return
    assert_token_only_to_label_studio_media(target)


CURRENT = [
    Target(f"{LS_URL}/data/upload/1/a.png", LS_ORIGIN, LABEL_STUDIO_MEDIA),
    Target(f"{LS_URL}/tasks/1/resolve/?fileuri=eA==", LS_ORIGIN, LABEL_STUDIO_MEDIA, presign_endpoint=True),
    Target("https://bucket.s3.example/k.png?sig=1", Origin("https", "bucket.s3.example", 443), PRESIGNED),
    Target("https://images.example.com/a.png", Origin("https", "images.example.com", 443), urls.LISTED_HOST),
]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CURRENT), any_url)
def test_fuzz_redirects_never_carry_the_token_off_label_studio(current, location):
    try:
        following = POLICY.redirect_target(current, location)
    except BackendError:
        return
    assert_token_only_to_label_studio_media(following)
    if following.label_studio:
        assert current.label_studio


@settings(max_examples=600, deadline=None)
@given(any_url)
def test_fuzz_describe_never_raises_nor_shows_secrets(url):
    url = url.split("#", 1)[0]
    secret_url = f"{url}{'&' if '?' in url else '?'}X-Amz-Signature=S3CR3T"
    text = describe(secret_url)
    assert "S3CR3T" not in text or re.search(r"[?&](d|fileuri|filepath)=[^&]*S3CR3T", secret_url)
    assert describe(f"https://user:PASSW0RD@{url}").count("PASSW0RD") == 0
    assert text.isprintable()


@settings(max_examples=300, deadline=None)
@given(any_url)
def test_fuzz_label_studio_urls_only_our_errors(url):
    try:
        UrlPolicy(url, ALLOWED)
    except BackendError:
        pass


def test_api_request_posts_json_to_label_studio_with_the_token(ls):
    from ml_backend.label_studio_api import api_request

    def echo(handler):
        if handler.headers.get("Authorization") != f"Token {LEGACY}":
            reply(handler, 401)
        else:
            reply(handler, 201, json.dumps({"got": json.loads(handler.body)}).encode())

    ls.routes["POST", "/api/webhooks/"] = echo
    assert api_request(ls.ls_url, LEGACY, "POST", "/api/webhooks/", json={"url": "x"}) == {"got": {"url": "x"}}


def _chain_text(exc: BaseException) -> str:
    """Every message a logged traceback of ``exc`` would print (its causes and contexts too)."""
    texts = []
    while exc is not None:
        texts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n".join(texts)


def test_failed_downloads_keep_presigned_queries_out_of_tracebacks_too(tmp_path, ls, monkeypatch):
    monkeypatch.setattr(urls, "is_public_address", lambda address: True)
    closed = FakeServer()
    closed.close()  # nothing listens on this port any more: connection refused
    ls.routes["GET", "/tasks/5/resolve/"] = redirect(f"{closed.other_url}/k.png?X-Amz-Signature=s3cr3t")
    with pytest.raises(ImageFetchError, match="connection refused") as info:
        loader_for(tmp_path, ls).load("/tasks/5/resolve/?fileuri=czM6Ly9iL2sucG5n")
    assert "k.png" in _chain_text(info.value) and "s3cr3t" not in _chain_text(info.value)
    with pytest.raises(URLRefused) as info:
        urls.parse_http_url("http://ls:99999/x?sig=s3cr3t")
    assert "ls:99999" in _chain_text(info.value) and "s3cr3t" not in _chain_text(info.value)


def test_no_log_line_formats_a_raw_url() -> None:
    """Every logger call that formats a URL goes through ``describe`` (issue 21 item 8): presigned signatures
    and whole ``data:`` URIs never reach a log. Checked on the source, so a new raw one fails here."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ml_backend"
    raw = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("logger", "log", "logging")):
                continue
            for arg in node.args[1:]:
                source = ast.unparse(arg)
                names = {n.id.lower() for n in ast.walk(arg) if isinstance(n, ast.Name)} | \
                        {n.attr.lower() for n in ast.walk(arg) if isinstance(n, ast.Attribute)}
                names = {name for name in names if not name.startswith("max_")}  # bounds, not URLs
                if any(w in name for name in names for w in ("url", "uri", "ident")) and "describe(" not in source \
                        and not source.startswith("len("):
                    raw.append(f"{path.relative_to(root.parent)}:{node.lineno}: {source}")
    assert raw == []
