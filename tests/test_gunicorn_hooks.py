"""gunicorn's master puts the workers' large torch tensors on transparent huge pages, unless told otherwise; a
worker's malloc keeps the small arrays of an answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend import gunicorn_hooks


@pytest.fixture
def started(monkeypatch):
    """Run ``on_starting`` as gunicorn's master does; remove the metrics folder it makes."""
    # setenv before delenv: monkeypatch then restores both after on_starting sets them (a delenv of an absent
    # variable records nothing, and the removed metrics folder leaked into every later test and subprocess)
    for name in (gunicorn_hooks.METRICS_DIR_ENV, "THP_MEM_ALLOC_ENABLE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def start() -> None:
        gunicorn_hooks.on_starting(None)
        shutil.rmtree(os.environ[gunicorn_hooks.METRICS_DIR_ENV], ignore_errors=True)

    return start


def test_workers_get_huge_page_tensors(started) -> None:
    started()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def test_the_environment_wins(monkeypatch, started) -> None:
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    started()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


_FAULTS_OF_AN_ANSWER = """
import os, resource, sys, types
from benchmarks.mask_formats import noise_mask
from ml_backend import gunicorn_hooks
from ml_backend.brush import encode_rle_array
if sys.argv[1] == "worker":
    gunicorn_hooks.post_fork(types.SimpleNamespace(pid=os.getppid()), None)
mask = noise_mask(3000, 4000)
for _ in range(3):  # the last encode's page faults
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    encode_rle_array(mask)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux page-fault counts")
def test_a_worker_keeps_the_small_arrays_of_an_answer_instead_of_faulting_them_in_again() -> None:
    """A noise-like 4000x3000 mask's brush RLE frees and makes ~24 MB of arrays under 4 MiB: in a worker (after
    ``post_fork``) the arenas keep them, so the third answer takes no page faults; glibc's own thresholds give
    thousands each time (the control: the same process without the hook)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(role: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_AN_ANSWER, role], env=env, capture_output=True,
                             text=True, timeout=300, check=True, cwd=Path(__file__).resolve().parents[1])
        return int(out.stdout.split()[-1])

    assert faults("worker") < 100
    assert faults("plain") > 1000
