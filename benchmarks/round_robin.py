"""A round-robin HTTP proxy in front of backend replicas, for the load benchmark and the replica tests.

Each request goes to the next replica in turn; a replica that refuses the connection (stopped, killed) is
skipped for the next one, as nginx's ``proxy_next_upstream error`` does, so a dead replica costs no request.
The upstream gets its own address as ``Host`` (nginx's default ``proxy_set_header Host $proxy_host``).
Hand-written over ``http.server``: a load balancer package would be a dependency for ~60 lines.
"""

from __future__ import annotations

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
UPSTREAM_TIMEOUT_S = 120.0  # longer than Label Studio waits for /predict (100 s)


class RoundRobinProxy:
    """``url`` forwards to ``upstreams`` (``http://host:port``) in turn; ``served`` lists, per answered request,
    the index of the replica that answered it."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = [urlsplit(url) for url in upstreams]
        self.served: list[int] = []
        self._turns = itertools.count()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                proxy.relay(self)

            do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="round-robin-proxy", daemon=True)
        self._thread.start()

    def relay(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        with self._lock:
            first = next(self._turns)
        for turn in range(len(self.upstreams)):
            index = (first + turn) % len(self.upstreams)
            upstream = self.upstreams[index]
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=UPSTREAM_TIMEOUT_S)
            try:
                connection.request(request.command, request.path, body, {**headers, "Host": upstream.netloc})
            except ConnectionRefusedError:
                connection.close()
                continue  # nothing was sent: the next replica gets it
            try:
                response = connection.getresponse()
                payload = response.read()
            except OSError:
                connection.close()
                request.send_error(502, "the replica closed the connection")
                return
            connection.close()
            with self._lock:
                self.served.append(index)
            request.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                    request.send_header(name, value)
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        request.send_error(502, "no replica accepts connections")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
