"""Imported at start-up by the backend replicas of tests/test_replicas.py only (their PYTHONPATH names this
folder): with ``SLOW_ENCODE_S`` set, every image encode (not the warm-up) takes that much longer, so the test
can click on one replica while the other is still encoding the same image."""

import os
import time

DELAY_S = float(os.environ.get("SLOW_ENCODE_S") or 0)

if DELAY_S:
    from ml_backend.sam import engine

    _run_encoder = engine.SamEngine._run_encoder

    def _slow_run_encoder(self, key, image):
        if key != "warm-up":
            time.sleep(DELAY_S)
        return _run_encoder(self, key, image)

    engine.SamEngine._run_encoder = _slow_run_encoder
