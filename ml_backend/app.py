"""The WSGI application serving :class:`SegmentationBackend`, run by gunicorn.

label-studio-ml 1.0.9 defines the routes Label Studio calls, but its views answer
500 for ``/predict`` before ``/setup``, for ``/train`` and ``/is_training`` (outside
its V2 mode), spawn a process per webhook, return tracebacks for bad input, and
live on one module-global Flask app. Without forking it, we build a Flask app per
call with the library's route table (same URLs and methods) and our views.

``gunicorn 'ml_backend.app:create_app()'`` builds one app per worker process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ml_backend import labeling, metrics
from ml_backend.backend import SegmentationBackend, serve_project_jobs
from ml_backend.dashboard import register_dashboard
from ml_backend.errors import BackendError
from ml_backend.label_studio_api import api_get, iter_project_tasks, visible_project
from ml_backend.logs import configure_logging
from ml_backend.runtime import Runtime
from ml_backend.security import hosts, limits
from ml_backend.security.auth import Authenticator, check_webhook_project
from ml_backend.security.secrets import WebhookSecrets
from ml_backend.webhook_secret import WebhookSecretInstaller
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_WARMUP_LIMIT = 200
PROJECT_PREFIX = "/projects/<int:project>"  # a backend URL per project: Label Studio's calls then carry it


def _project_id(value: object) -> int | None:
    from ml_backend.retrain.policy import project_key

    if value is None or value == "":
        return None
    project = project_key(value)
    if project is None:
        raise BackendError(f"'project' must be a Label Studio project id (got {str(value)[:40]!r}).")
    return project


def _query_project() -> int | None:
    return _project_id(request.args.get("project"))


def _check_path_project(value: object) -> None:
    """Under a per-project backend URL (``/projects/<id>/``), a body naming another project is refused: the
    URL was copied into the wrong project's model settings."""
    expected = g.get("path_project")
    if expected is None or value is None or value == "":
        return
    if isinstance(value, dict):
        value = value.get("id")
    if _project_id(value) != expected:
        raise BackendError(f"This backend URL serves project {expected} (/projects/{expected}/), but the request is "
                           f"for project {str(value)[:40]!r}: give each project its own URL in its model settings.")


def _json_answer(answer: dict) -> Response:
    """``answer`` as a JSON response, by orjson: a brush RLE (a numpy array) is written straight from its
    bytes; Flask's encoder would first need a Python int per byte and then take ~30x longer on them."""
    body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return Response(body, mimetype="application/json")


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


class BackendViews:
    """The views that replace the library's; each holds the process's runtime."""

    def __init__(self, runtime: Runtime, installer: WebhookSecretInstaller | None = None) -> None:
        self.runtime = runtime
        self.limits = limits.RequestLimits.from_settings(runtime.settings)
        self.installer = installer
        self.sampler: metrics.Sampler | None = None

    def _json(self, check: Callable[[dict], object] | None = None) -> dict:
        return limits.parse_json_body(request.content_type, request.get_data(cache=True), self.limits, check)

    def _backend(self, label_config: str | None, project: object = None) -> SegmentationBackend:
        return SegmentationBackend(label_config=label_config, runtime=self.runtime, project=project)

    def predict(self) -> Response:
        data = self._json(lambda body: limits.predict_request(body, self.limits))
        _check_path_project(data.get("project"))
        tasks, context = limits.predict_request(data, self.limits)
        g.request_kind = "click" if context and context.get("result") else "batch"
        backend = self._backend(data.get("label_config"), data.get("project") or g.get("path_project"))
        g.request_project = backend.project
        try:
            predictions = backend.predict(tasks, context=context, project=data.get("project"))
        finally:
            g.request_kind = backend.request_kind
        return _json_answer({"results": predictions, "model_version": backend.model_version})

    def setup(self) -> Response:
        """Validate the labeling config first; only then, and only for an authenticated caller, take
        Label Studio's address and token from the body (never over ``LABEL_STUDIO_URL``)."""
        data = self._json()
        _check_path_project(data.get("project"))
        hostname, token = data.get("hostname"), data.get("access_token")
        project_value = data.get("project") or g.get("path_project")
        backend = self._backend(data.get("schema"), project_value)
        if g.get("authenticated"):
            self.runtime.remember_label_studio(limits.setup_hostname(hostname), limits.setup_token(token))
            project = limits.project_id(project_value)
            if self.installer is not None and project is not None and self.runtime.access.url:
                self.installer.ensure(project, request.host)
        elif hostname or token:
            logger.info("/setup from an unauthenticated caller: its hostname/access_token are not used "
                        "(set LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY, or BASIC_AUTH_USER/BASIC_AUTH_PASS)")
        self.runtime.preencoding.project_connected(project_value, data.get("schema"))  # queues pre-encoding once
        self.runtime.sam3_wiring.preannotate_on_connect(project_value)  # SAM 3 predictions for tasks lacking them
        return jsonify({"model_version": backend.model_version})

    def webhook(self) -> tuple[Response, int]:
        data = self._json()
        check_webhook_project(g.get("webhook_project"), data)  # a project's secret opens that project only
        event = data.get("action")
        if not isinstance(event, str):
            raise BackendError("A webhook needs an 'action'.")
        _check_path_project(data.get("project"))
        answer = self.runtime.on_webhook(event, data)
        if event == "TASKS_CREATED" and self.runtime.settings.sam3_on_import:
            key = limits.project_id(data.get("project")) if isinstance(data.get("project"), dict) else None
            if key not in (None, "0") and self.runtime.concepts is not None:
                try:  # new tasks get SAM 3 predictions in the background
                    self.runtime.preannotation_jobs.start(int(key))
                except BackendError as exc:  # Redis down: the webhook still answers; /preannotate can start it later
                    logger.warning("SAM 3 pre-annotation of project %s not started: %s", key, exc.message)
        return jsonify(answer), 200

    def train(self) -> tuple[Response, int]:
        data = self._json()
        return jsonify(self.runtime.on_webhook("START_TRAINING", data)), 201

    def is_training(self) -> Response:
        return jsonify(self.runtime.training_status(request.args.get("project")))

    def health(self) -> Response:
        """Open to anyone (Label Studio's connection check): states only, no paths, sources or errors."""
        return jsonify({
            "status": "UP",
            "model_class": SegmentationBackend.__name__,
            "sam": {"state": self.runtime.sam_status()["state"]},
            "trimap_model_version": self.runtime.trimaps.current_version(),
        })

    def ready(self) -> tuple[Response, int]:
        """Readiness (container healthchecks, load balancers): 503 while SAM is loading or failed.

        ``/health`` stays 200 while the process is up: Label Studio calls it when connecting.
        """
        state = self.runtime.sam_status()["state"]  # loading, failed, ready: details are on /status
        return jsonify({"ready": state == "ready", "sam": state}), 200 if state == "ready" else 503

    def warmup(self) -> tuple[Response, int]:
        """Embed a project's images before annotators start: ``{"project": id, "limit": n}`` or
        ``{"tasks": [...], "label_config": "..."}``; answers at once, the work runs in the background
        (progress in ``/status`` under ``preencode``)."""
        data = self._json()
        tasks, label_config = data.get("tasks"), data.get("label_config")
        project: int | None = None
        if data.get("project") is not None:
            key = limits.project_id(data["project"])
            if key is None:
                raise BackendError("'project' must be a Label Studio project id (a number).")
            project = int(key)
            limit = limits.warmup_limit(data.get("limit"), self.limits, DEFAULT_WARMUP_LIMIT)
            url, token = self.runtime.access.url, self.runtime.access.token
            label_config = (api_get(url, token, f"/api/projects/{project}") or {}).get("label_config")
            tasks = list(iter_project_tasks(url, token, project, limit=limit))
        tasks = limits.warmup_tasks(tasks, self.limits)
        config = labeling.parse_label_config(label_config)
        return jsonify({"queued": self.runtime.preencoding.warm(tasks, config.image_key, project)}), 202

    def preannotate(self) -> tuple[Response, int]:
        """Pre-annotate a whole project in the background: ``{"project": id}``; progress on ``/status``."""
        key = limits.project_id(self._json().get("project"))
        if key is None or key == "0":
            raise BackendError("'project' must be a Label Studio project id (a positive number).")
        visible_project(self.runtime.access.url, self.runtime.access.token, int(key))  # 404 unless it exists for us
        return jsonify(self.runtime.preannotation_jobs.start(int(key))), 202

    def status(self) -> Response:
        """Everything an operator wants in one place: SAM, pre-encoding, the served trimap version, training
        (``{"error": ...}`` while its shared state is unreachable), SAM 3 and its project jobs."""
        return jsonify({
            "sam": self.runtime.sam_status(),
            "preencode": self.runtime.preencoding.status(),
            "trimap_model_version": self.runtime.trimaps.current_version(_query_project()),
            "training": _section(lambda: self.runtime.training_status(request.args.get("project"))),
            "preannotate": self.runtime.settings.preannotate,
            "sam3": self.runtime.sam3.status() if self.runtime.sam3 else {"state": "off"},
            "preannotation_jobs": self.runtime.preannotation_jobs.status(),
        })

    def versions(self) -> Response:
        """A project's versions: from a per-project URL (``/projects/<id>/versions``), ``?project=`` or a JSON
        body's ``project``. Label Studio 1.23's own GET carries no project, so only a per-project backend URL
        makes its version list the project's; without one it gets what serves projects without a model."""
        project = g.get("path_project")
        if project is None:
            project = _query_project()
        if project is None and request.method == "POST" and request.content_length:
            project = _project_id(self._json().get("project"))
        return jsonify(self.runtime.trimap_versions(project))

    def metrics(self) -> Response:
        """Prometheus text (every worker's values); the SAM state that this route used to answer is on ``/status``."""
        if self.sampler is not None:
            self.sampler.sample()  # this worker's gauges as of now
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)


def _section(read: Callable[[], dict]) -> dict:
    """One part of ``/status``: a part that cannot be read (its Redis down) says why; the others still show."""
    try:
        return read()
    except BackendError as exc:
        return {"error": exc.message}


def _auth_guard(authenticator: Authenticator) -> Callable[[], Any]:
    def guard() -> Any:
        basic = authenticator.basic(request.headers)
        g.webhook_project = None if basic else authenticator.secret_project(request.path, request.headers)
        g.authenticated = basic or g.webhook_project is not None
        if authenticator.may_pass(request.path, g.authenticated):
            return None
        response, status = _error("Authentication required: set the backend's basic-auth user and password "
                                  "in Label Studio's model settings.", 401)
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
        return response, status

    return guard


def _started() -> None:
    g.started = time.perf_counter()


def _observed(response: Response) -> Response:
    """Count and time every answered request by route (``/projects/<id>`` stripped), kind and status."""
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    route = rule.removeprefix(PROJECT_PREFIX) or "/"
    metrics.observe_request(route, g.get("request_kind", "other"), response.status_code,
                            time.perf_counter() - g.get("started", time.perf_counter()), g.get("request_project"))
    return response


def _per_project(view: Callable[[], Any]) -> Callable[..., Any]:
    """The same view under ``/projects/<id>/``: the project comes from the URL (Label Studio's calls then carry it)."""
    def wrapped(project: int) -> Any:
        g.path_project = project
        return view()

    wrapped.__name__ = f"project_{view.__name__}"
    return wrapped


def _handle_errors(view: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(**kwargs: Any) -> Any:
        try:
            return view(**kwargs)
        except BackendError as exc:
            logger.info("%s %s -> %d: %s", request.method, request.path, exc.status_code, exc.message)
            response, status = _error(exc.message, exc.status_code)
            if (retry_after := getattr(exc, "retry_after_s", None)) is not None:  # busy: EncodeBusyError
                response.headers["Retry-After"] = str(retry_after)
            return response, status
        except HTTPException:
            raise
        except Exception as exc:  # never let one request take the worker down or leak a traceback
            logger.exception("%s %s failed", request.method, request.path)
            return _error(f"Internal error ({exc.__class__.__name__}); the backend's log has the details.", 500)

    wrapped.__name__ = view.__name__
    return wrapped


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> Flask:
    """Build the app for this process (gunicorn calls this in each worker)."""
    from label_studio_ml import api

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    runtime = runtime or Runtime(settings)
    serve_project_jobs(runtime)
    secrets = WebhookSecrets(settings.model_dir) if settings.basic_auth else None
    installer = None
    if secrets is not None:
        installer = WebhookSecretInstaller(secrets, lambda: (runtime.access.url, runtime.access.token))
    views = BackendViews(runtime, installer)
    endpoints = {
        "_predict": views.predict,
        "_setup": views.setup,
        "webhook": views.webhook,
        "_train": views.train,
        "_is_training": views.is_training,
        "health": views.health,
        "get_version": views.versions,
        "metrics": views.metrics,
    }
    ours = {endpoint: _handle_errors(view) for endpoint, view in endpoints.items()}
    per_project = {endpoint: _per_project(view) for endpoint, view in ours.items()}
    app = Flask("ml_backend")
    app.config["MAX_CONTENT_LENGTH"] = views.limits.max_body_bytes
    for rule in api._server.url_map.iter_rules():
        if rule.endpoint in ours:
            methods = set(rule.methods or ())
            if rule.endpoint == "get_version":
                methods.add("GET")  # Label Studio 1.23 asks with GET; the library routes POST only
            app.add_url_rule(rule.rule, endpoint=rule.endpoint, view_func=ours[rule.endpoint], methods=methods)
            app.add_url_rule(PROJECT_PREFIX + rule.rule, endpoint=f"project_{rule.endpoint}",
                             view_func=per_project[rule.endpoint], methods=methods)
    app.add_url_rule("/status", endpoint="status", view_func=_handle_errors(views.status), methods=["GET"])
    app.add_url_rule("/ready", endpoint="ready", view_func=_handle_errors(views.ready), methods=["GET"])
    app.add_url_rule("/warmup", endpoint="warmup", view_func=_handle_errors(views.warmup), methods=["POST"])
    app.add_url_rule("/preannotate", endpoint="preannotate", view_func=_handle_errors(views.preannotate),
                     methods=["POST"])
    app.before_request(hosts.before_request(hosts.HostPolicy(settings)))  # DNS rebinding: before anything else
    app.before_request(_started)
    app.before_request(_auth_guard(Authenticator(settings, secrets)))
    app.before_request(limits.before_request(views.limits))  # per-route body size, before reading it
    app.after_request(_observed)
    register_dashboard(app, runtime, _handle_errors)
    views.sampler = metrics.Sampler(runtime.encode_gate.status, runtime.preencoder.status,
                                    runtime.preannotation_jobs.status)
    if metrics.multiproc_dir() is not None:  # several workers: each samples its gauges for the others' scrapes
        views.sampler.start()
    for code in (400, 404, 405):
        app.register_error_handler(code, lambda exc: _error(exc.description, exc.code))
    app.register_error_handler(RequestEntityTooLarge,
                               lambda exc: _error(limits.body_too_large_message(views.limits), 413))
    runtime.start_loading_sam()
    runtime.sam3_wiring.start_background_work()
    return app
