"""SAM 3 project work yields to annotators: it runs through the encode gate one piece at a time (the image
encode, then each phrase), each piece timed as its own kind, so first clicks go first between pieces and the
gate's wait estimate counts the piece in progress. Order is checked, never timing (benchmarks/coexistence.py
measures the waits)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from ml_backend.sam.encode_gate import EncodeBusyError, EncodeGate, Priority
from ml_backend.sam3.engine import ENCODE_PIECE, PHRASE_PIECE
from test_encode_gate import FakeClock, wait_until


def test_the_wait_estimate_counts_the_sam3_piece_in_progress_as_its_own_kind() -> None:
    clock = FakeClock()
    gate = EncodeGate(slots=1, max_wait_s=2.0, clock=clock)
    with gate.slot(Priority.INTERACTIVE):
        clock.now += 0.1  # a SAM encode: 0.1 s
    with gate.slot(Priority.BACKGROUND, kind=ENCODE_PIECE):
        clock.now += 6.0  # a SAM 3 image encode: 6 s
    assert gate.mean_encode_s == pytest.approx(0.1) and gate.mean_s(ENCODE_PIECE) == pytest.approx(6.0)
    with gate.slot(Priority.BACKGROUND, kind=ENCODE_PIECE):
        clock.now += 1.0
        # The click would wait for the rest of the SAM 3 encode, not for the rest of a SAM encode (~0 s) ...
        assert gate.estimated_wait_s(Priority.INTERACTIVE) == pytest.approx(5.0)
        # ... which is over ENCODE_QUEUE_TIMEOUT_S: refused at once with Retry-After, not left to wait.
        with pytest.raises(EncodeBusyError) as refused:
            with gate.slot(Priority.INTERACTIVE):
                pass
        assert refused.value.retry_after_s == 3
        assert gate.status()["running"] == [ENCODE_PIECE]
    assert gate.status()["mean_s"] == {"encode": 0.1, ENCODE_PIECE: 4.5}  # 0.3 x 1 s + 0.7 x 6 s


@pytest.fixture(scope="module")
def sam3_engine(tmp_path_factory: pytest.TempPathFactory):
    from sam3_factory import save_tiny_checkpoint

    from ml_backend.sam3.loading import load_sam3_engine

    return load_sam3_engine(str(save_tiny_checkpoint(tmp_path_factory.mktemp("sam3") / "hf", weight_scale=3.0)),
                            device="cpu")


def test_a_first_click_goes_first_between_the_pieces_of_a_sam3_image(sam3_engine) -> None:
    """While the job's SAM 3 image encode holds the only slot, a first click queues; when the encode ends the
    click goes before the job's phrases, and the job's answer is the same as in one batch."""
    gate = EncodeGate(slots=1, max_wait_s=60)
    order: list[str] = []
    in_encode, click_queued = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def background(piece: str):
        with gate.slot(Priority.BACKGROUND, kind=piece):
            order.append(piece)
            if piece == ENCODE_PIECE:
                in_encode.set()
                assert click_queued.wait(30)
            yield

    def click() -> None:
        with gate.slot(Priority.INTERACTIVE):
            order.append("click")

    image = np.random.default_rng(4).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    found: list = []
    job = threading.Thread(target=lambda: found.extend(
        sam3_engine.segment(image, ["cat", "dog", "tree"], threshold=0.0, slot=background)))
    job.start()
    assert in_encode.wait(30)
    annotator = threading.Thread(target=click)
    annotator.start()
    wait_until(lambda: gate.status()["waiting"] == 1)
    click_queued.set()
    job.join(30)
    annotator.join(30)
    assert order == [ENCODE_PIECE, "click", PHRASE_PIECE, PHRASE_PIECE, PHRASE_PIECE]
    batched = sam3_engine.segment(image, ["cat", "dog", "tree"], threshold=0.0)
    for pieces, whole in zip(found, batched):
        np.testing.assert_allclose([c.score for c in pieces], [c.score for c in whole], atol=1e-5)


class PiecesEngine:
    """Stands in for SAM 3: runs its pieces in the slots it is given, recording what the gate shows."""

    def __init__(self, gate_status) -> None:
        self.gate_status, self.seen = gate_status, []

    def segment(self, image, phrases, *, threshold, boxes=None, box_labels=None, slot=None):
        for piece in [ENCODE_PIECE] + [PHRASE_PIECE] * len(phrases):
            with slot(piece):
                self.seen.append((piece, self.gate_status()["running"]))
        return [[] for _ in phrases]


def test_project_jobs_run_sam3_through_the_gate_piece_by_piece_and_batch_predict_does_not(
        tmp_path: Path, tiny_segmenter) -> None:
    from ml_backend.labeling import parse_label_config
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from ml_backend.settings import Settings

    config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              '<Label value="Cat"/><Label value="Dog"/></BrushLabels></View>')
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   preannotate="sam3", sam3_model="/models/sam3-tiny")
    engine = PiecesEngine(None)
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=engine)
    engine.gate_status = runtime.encode_gate.status
    image = np.zeros((20, 30, 3), np.uint8)
    with runtime.sam3_wiring.job_context().background_slot():  # as the project job runs each task
        runtime.concepts.predict(image, config, parse_label_config(config), trimap=None)
    assert engine.seen == [(ENCODE_PIECE, [ENCODE_PIECE]), (PHRASE_PIECE, [PHRASE_PIECE]),
                           (PHRASE_PIECE, [PHRASE_PIECE])]
    assert set(runtime.encode_gate.status()["mean_s"]) == {ENCODE_PIECE, PHRASE_PIECE}
    engine.seen.clear()
    runtime.concepts.predict(image, config, parse_label_config(config), trimap=None)  # a batch /predict
    assert engine.seen == [(ENCODE_PIECE, []), (PHRASE_PIECE, []), (PHRASE_PIECE, [])]
