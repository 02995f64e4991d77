"""``/dashboard``: one server-rendered page for operators (no script, no build step, nothing from a CDN).

Per project: the version serving it, every stored version with its validation IoU beside the baselines and
why it was or was not promoted, the IoU history as inline SVG, each version's training curves and
validation overlays (PNG files under ``MODEL_DIR``, sent by :func:`artifact` through
:mod:`ml_backend.security.artifacts`), retraining state, pre-encoding and SAM 3 job progress, and the
recent click latencies. Every route here sits behind the app's authentication like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, render_template, send_file

from ml_backend.dashboard.data import overview
from ml_backend.dashboard.plots import iou_history_svg
from ml_backend.security.artifacts import version_artifact

ARTIFACT_ROUTE = "/dashboard/projects/<int:project>/versions/<version>/<name>"


def register_dashboard(app: Flask, runtime, handle_errors: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Add the page and its image route to ``app`` (``handle_errors`` turns errors into JSON 4xx answers)."""
    blueprint = Blueprint("dashboard", __name__, template_folder="templates")

    def page() -> Response:
        view = overview(runtime)
        plots = {p.project: iou_history_svg(p.versions) for p in view["projects"]}
        html = render_template("dashboard.html", view=view, plots=plots)
        return Response(html, content_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP})

    def artifact(project: int, version: str, name: str) -> Response:
        from training.layout import project_store_dir

        path = version_artifact(project_store_dir(runtime.settings.model_dir, project), version, name)
        response = send_file(path, mimetype="image/png", max_age=0)
        response.headers["Cache-Control"] = "private, no-cache"
        return response

    blueprint.add_url_rule("/dashboard", endpoint="page", view_func=handle_errors(page), methods=["GET"])
    blueprint.add_url_rule(ARTIFACT_ROUTE, endpoint="artifact", view_func=handle_errors(artifact), methods=["GET"])
    app.register_blueprint(blueprint)


# Nothing but this origin's images and the page's own styles: no script runs, nothing is fetched elsewhere.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'"
