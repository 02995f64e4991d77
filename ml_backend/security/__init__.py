"""Trust boundaries: each module here holds one kind of security rule, and nothing else decides it.

* :mod:`ml_backend.security.urls`: where a URL goes, and whether it may carry Label Studio's token.
* :mod:`ml_backend.security.auth`: who may call the backend (basic auth, the webhook secret, exposure).
* :mod:`ml_backend.security.limits`: what a request may hold (sizes, counts, numbers, project ids).
* :mod:`ml_backend.security.private_folders`: folders in ``/tmp`` and ``/dev/shm`` other local users can
  neither guess, read nor plant (0700, this user's, never through a symbolic link).
* :mod:`ml_backend.security.hosts`, :mod:`ml_backend.security.secrets`, :mod:`ml_backend.security.jobs`: the
  ``Host`` allow-list, the per-project webhook secrets, what a queued job may carry.

The webhook secret is installed on Label Studio's side by :mod:`ml_backend.webhook_secret` (a Label
Studio API client, so it sits above this package). SECURITY.md at the repository root states the threat model and the rules.
"""
