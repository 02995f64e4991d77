"""``python -m ml_backend serve``: run the backend under gunicorn with the settings from the environment."""

from __future__ import annotations

import argparse
import sys

from ml_backend.logs import configure_logging
from ml_backend.settings import Settings, SettingsError


def serve(settings: Settings) -> int:
    from gunicorn.app.wsgiapp import run

    sys.argv = [
        "gunicorn",
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.workers),
        "--threads", str(settings.threads),
        "--worker-class", "gthread",
        # The first click may wait for SAM to load and encode a large image on CPU.
        "--timeout", "300",
        "--graceful-timeout", "30",
        "--log-level", settings.log_level.lower(),
        "ml_backend.app:create_app()",
    ]
    run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend", description="Label Studio ML backend")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the backend (gunicorn) on HOST:PORT")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command == "serve":
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
