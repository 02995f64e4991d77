"""What a background job (RQ) may carry and whose Label Studio a worker talks to.

A job's arguments sit in Redis while it waits and, after it ends, for as long as RQ keeps its
record: a job carrying Label Studio's token is kept :data:`FINISHED_JOB_TTL_S` after it ends, not
days. A worker sends its own ``LABEL_STUDIO_API_KEY`` only to its own ``LABEL_STUDIO_URL``; the
Label Studio URL a job names is used only when the worker has none, and then only with the token
that same job carries (so whoever can write a job into Redis cannot have a worker send the
worker's key to an address of their choosing).
"""

from __future__ import annotations

FINISHED_JOB_TTL_S = 600  # RQ's result_ttl/failure_ttl for jobs carrying the token


def job_access(own_url: str, own_token: str, job_url: str | None, job_token: str | None) -> tuple[str, str]:
    """(Label Studio URL, token) a worker uses for a job."""
    if own_url:
        return own_url, own_token or (job_token or "")
    return job_url or "", job_token or ""
