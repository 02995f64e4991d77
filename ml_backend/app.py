"""The WSGI application serving :class:`SegmentationBackend`, run by gunicorn.

label-studio-ml 1.0.9 defines the routes Label Studio calls, but its views answer
500 for ``/predict`` before ``/setup``, for ``/train`` and ``/is_training`` (outside
its V2 mode), spawn a process per webhook, return tracebacks for bad input, and
live on one module-global Flask app. Without forking it, we build a Flask app per
call with the library's route table (same URLs and methods) and our views.

``gunicorn 'ml_backend.app:create_app()'`` builds one app per worker process.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from ml_backend import labeling
from ml_backend.backend import SegmentationBackend
from ml_backend.errors import BackendError
from ml_backend.label_studio_api import api_get, iter_project_tasks
from ml_backend.logs import configure_logging
from ml_backend.runtime import Runtime
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

PUBLIC_ROUTES = {"/health", "/ready", "/"}
DEFAULT_WARMUP_LIMIT = 200


def _json_body() -> dict:
    try:
        data = request.get_json(force=True, silent=False)
    except BadRequest:
        raise BackendError("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BackendError("The request body must be a JSON object.")
    return data


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


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


class BackendViews:
    """The views that replace the library's; each holds the process's runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _backend(self, label_config: str | None, project: object = None) -> SegmentationBackend:
        return SegmentationBackend(label_config=label_config, runtime=self.runtime, project=project)

    def predict(self) -> Response:
        data = _json_body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("'tasks' must be a non-empty list of tasks.")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("'params' must be an object.")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BackendError("'params.context' must be an object.")
        backend = self._backend(data.get("label_config"), data.get("project"))
        predictions = backend.predict(tasks, context=context)
        return jsonify({"results": predictions, "model_version": backend.model_version})

    def setup(self) -> Response:
        data = _json_body()
        self.runtime.remember_label_studio(data.get("hostname"), data.get("access_token"))
        backend = self._backend(data.get("schema"), data.get("project"))
        self.runtime.project_connected(data.get("project"), data.get("schema"))  # queues pre-encoding once
        return jsonify({"model_version": backend.model_version})

    def webhook(self) -> tuple[Response, int]:
        data = _json_body()
        event = data.get("action")
        if not isinstance(event, str):
            raise BackendError("A webhook needs an 'action'.")
        answer = self.runtime.on_webhook(event, data)
        if event == "TASKS_CREATED" and self.runtime.settings.sam3_on_import:
            project = data.get("project", {}).get("id") if isinstance(data.get("project"), dict) else None
            if isinstance(project, int) and not isinstance(project, bool) and self.runtime.concepts is not None:
                self.runtime.preannotation_jobs.start(project)  # new tasks get SAM 3 predictions in the background
        return jsonify(answer), 200

    def train(self) -> tuple[Response, int]:
        data = _json_body()
        return jsonify(self.runtime.on_webhook("START_TRAINING", data)), 201

    def is_training(self) -> Response:
        return jsonify(self.runtime.training_status(request.args.get("project")))

    def health(self) -> Response:
        return jsonify({
            "status": "UP",
            "model_class": SegmentationBackend.__name__,
            "sam": self.runtime.sam_status(),
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
        data = _json_body()
        tasks, label_config = data.get("tasks"), data.get("label_config")
        project = data.get("project")
        if project is not None:
            if not isinstance(project, int) or isinstance(project, bool):
                raise BackendError("'project' must be a Label Studio project id (a number).")
            limit = data.get("limit", DEFAULT_WARMUP_LIMIT)
            if not isinstance(limit, int) or limit < 1:
                raise BackendError("'limit' must be a positive number of tasks.")
            url, token = self.runtime.access.url, self.runtime.access.token
            label_config = (api_get(url, token, f"/api/projects/{project}") or {}).get("label_config")
            tasks = list(iter_project_tasks(url, token, project, limit=limit))
        if not isinstance(tasks, list):
            raise BackendError("Give a 'project' id, or 'tasks' with their 'label_config'.")
        config = labeling.parse_label_config(label_config)
        return jsonify({"queued": self.runtime.warm(tasks, config.image_key, project)}), 202

    def preannotate(self) -> tuple[Response, int]:
        """Pre-annotate a whole project in the background: ``{"project": id}``; progress on ``/status``."""
        project = _json_body().get("project")
        if not isinstance(project, int) or isinstance(project, bool) or project < 1:
            raise BackendError("'project' must be a Label Studio project id (a positive number).")
        return jsonify(self.runtime.preannotation_jobs.start(project)), 202

    def status(self) -> Response:
        """Everything an operator wants in one place: SAM, pre-encoding, the served trimap version, training."""
        return jsonify({
            "sam": self.runtime.sam_status(),
            "preencode": self.runtime.preencode_status(),
            "trimap_model_version": self.runtime.trimaps.current_version(_query_project()),
            "training": self.runtime.training_status(request.args.get("project")),
            "preannotate": self.runtime.settings.preannotate,
            "sam3": self.runtime.sam3.status() if self.runtime.sam3 else {"state": "off"},
            "preannotation_jobs": self.runtime.preannotation_jobs.status(),
        })

    def versions(self) -> Response:
        """A project's versions (``?project=`` or a JSON body's ``project``). Label Studio 1.23's own GET
        carries no project: it then gets what serves projects without a model of their own."""
        project = _query_project()
        if project is None and request.method == "POST" and request.content_length:
            project = _project_id(_json_body().get("project"))
        return jsonify(self.runtime.trimap_versions(project))

    def metrics(self) -> Response:
        return jsonify({"sam": self.runtime.sam_status()})


def _basic_auth_guard(settings: Settings) -> Callable[[], Any]:
    def guard() -> Any:
        if not settings.basic_auth_user or request.path in PUBLIC_ROUTES:
            return None
        auth = request.authorization
        ok = (
            auth is not None
            and auth.type == "basic"
            and hmac.compare_digest(auth.username or "", settings.basic_auth_user)
            and hmac.compare_digest(auth.password or "", settings.basic_auth_pass)
        )
        if ok:
            return None
        response, status = _error("Authentication required: set the backend's basic-auth user and password "
                                  "in Label Studio's model settings.", 401)
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
        return response, status

    return guard


def _handle_errors(view: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        try:
            return view()
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
    views = BackendViews(runtime)
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
    app = Flask("ml_backend")
    for rule in api._server.url_map.iter_rules():
        if rule.endpoint in ours:
            methods = set(rule.methods or ())
            if rule.endpoint == "get_version":
                methods.add("GET")  # Label Studio 1.23 asks with GET; the library routes POST only
            app.add_url_rule(rule.rule, endpoint=rule.endpoint, view_func=ours[rule.endpoint], methods=methods)
    app.add_url_rule("/status", endpoint="status", view_func=_handle_errors(views.status), methods=["GET"])
    app.add_url_rule("/ready", endpoint="ready", view_func=_handle_errors(views.ready), methods=["GET"])
    app.add_url_rule("/warmup", endpoint="warmup", view_func=_handle_errors(views.warmup), methods=["POST"])
    app.add_url_rule("/preannotate", endpoint="preannotate", view_func=_handle_errors(views.preannotate),
                     methods=["POST"])
    app.before_request(_basic_auth_guard(settings))
    for code in (404, 405):
        app.register_error_handler(code, lambda exc: _error(exc.description, exc.code))
    runtime.start_loading_sam()
    runtime.start_background_work()
    return app
