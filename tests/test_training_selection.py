"""The small-data rule (training/selection.py): the budget, the candidates, the choice, and its wiring in fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import training  # noqa: F401  (selects the torch backend before keras)
from training.data import scan_dataset, write_synthetic
from training.fit import fit
from training.model import average_of, build_model, members, model_width, rebuild_at_size
from training.pipeline import TrimapDataset
from training.predict import predict_trimaps
from training.selection import (
    DECODER, FINETUNE, MIN_STEPS, SCRATCH, STARTS, TIE, Candidate, choose, kept_name, small_data_budget,
    starts_to_try, to_keep, with_fresh_decoder,
)
from training.store import ModelStore

from conftest_training import one_torch_thread

SIZE, WIDTH = 32, 8  # a narrow model: seconds per fit


@pytest.mark.parametrize("train, batch, epochs", [(4, 16, 30), (8, 16, 1), (40, 16, 10), (3, 2, 500)])
def test_the_budget_gives_at_least_the_minimum_steps_in_batches_no_larger_than_the_set(train, batch, epochs):
    budget = small_data_budget(train, batch, epochs)
    assert budget.batch_size == min(batch, train)
    steps = epochs * -(-train * budget.repeat // budget.batch_size)
    assert steps >= MIN_STEPS
    assert budget.patience == epochs  # no early stopping on a validation split of one or two images


def test_a_repeated_epoch_goes_over_every_pair_that_many_times_with_its_own_flips(tmp_path):
    write_synthetic(tmp_path, count=3, size=24, seed=2)
    pairs = scan_dataset(tmp_path).pairs
    data = TrimapDataset(pairs, 16, 4, shuffle=True, flip=True, seed=5, repeat=4, workers=1)
    assert len(data) == 3  # 12 items in batches of 4
    images = np.concatenate([data[i][0] for i in range(len(data))])
    assert len(images) == 12
    distinct = {image.tobytes() for image in images}
    assert 3 < len(distinct) <= 6  # each pair appears, flipped and not: more than the three originals


def test_three_starts_only_for_a_small_set_with_a_parent_and_a_forced_start_alone():
    assert starts_to_try("auto", small=True, has_parent=True) == (FINETUNE, DECODER, SCRATCH)
    assert starts_to_try("auto", small=False, has_parent=True) == (FINETUNE,)
    assert starts_to_try("auto", small=True, has_parent=False) == (SCRATCH,)
    assert starts_to_try(DECODER, small=True, has_parent=True) == (DECODER,)
    assert starts_to_try(FINETUNE, small=True, has_parent=False) == (SCRATCH,)  # nothing to fine-tune


def test_the_choice_is_the_best_validation_iou_and_a_tie_goes_to_the_lower_loss():
    clear = [Candidate(FINETUNE, 0.40, 0.2, 3), Candidate(SCRATCH, 0.60, 0.9, 5), Candidate(DECODER, 0.50, 0.1, 4)]
    assert choose(clear).start == SCRATCH  # the IoU decides, not the loss
    tied = [Candidate(FINETUNE, 0.60, 0.5, 3), Candidate(SCRATCH, 0.60 + TIE / 2, 0.9, 5),
            Candidate(DECODER, 0.60 - TIE / 2, 0.3, 4)]
    assert choose(tied).start == DECODER  # all within TIE: the lowest validation loss
    same = [Candidate(s, 0.5, 0.5, 1) for s in reversed(STARTS)]
    assert choose(same).start == FINETUNE
    with pytest.raises(ValueError):
        choose([])


def test_the_two_best_are_kept_unless_one_learned_nothing_or_is_already_an_average():
    ranked = [Candidate(FINETUNE, 0.40, 0.2, 3), Candidate(SCRATCH, 0.60, 0.9, 5), Candidate(DECODER, 0.50, 0.1, 4)]
    assert [c.start for c in to_keep(ranked)] == [SCRATCH, DECODER]  # best first
    assert kept_name(to_keep(ranked)) == "scratch+decoder"
    tied = [Candidate(FINETUNE, 0.60, 0.5, 3), Candidate(SCRATCH, 0.60, 0.4, 5), Candidate(DECODER, 0.10, 0.1, 4)]
    assert [c.start for c in to_keep(tied)] == [SCRATCH, FINETUNE]  # ranked as choose ranks: a tie by the loss
    blind = [Candidate(FINETUNE, 0.0, 0.2, 3), Candidate(SCRATCH, 0.60, 0.9, 5), Candidate(DECODER, 0.0, 0.1, 4)]
    assert [c.start for c in to_keep(blind)] == [SCRATCH]  # the runner-up saw nothing: no average with it
    averaged = [Candidate(FINETUNE, 0.70, 0.2, 3, averaged=True), Candidate(SCRATCH, 0.60, 0.9, 5)]
    assert [c.start for c in to_keep(averaged)] == [FINETUNE]  # never more than two fits
    assert [c.start for c in to_keep(averaged[::-1][:1])] == [SCRATCH]  # one candidate: itself
    assert [c.start for c in to_keep([Candidate(SCRATCH, 0.8, 0.1, 1), averaged[0]])] == [SCRATCH]


def test_an_average_predicts_the_mean_of_its_members_logits_and_survives_saving_and_resizing(tmp_path):
    import keras

    keras.utils.set_random_seed(2)
    first, second = build_model(16, width=4), build_model(16, width=8)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3)).astype(np.float32)
    want = (first.predict_on_batch(images) + second.predict_on_batch(images)) / 2
    average = average_of([first, second])
    np.testing.assert_allclose(average.predict_on_batch(images), want, rtol=1e-5, atol=1e-6)
    assert members(average) == [first, second] and members(first) == [first]
    assert model_width(average) == 4  # the first member's
    average.save(tmp_path / "average.keras")
    loaded = keras.saving.load_model(tmp_path / "average.keras", compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(images), want, rtol=1e-5, atol=1e-6)
    assert [model_width(m) for m in members(loaded)] == [4, 8]
    bigger = rebuild_at_size(loaded, 32)  # every member at the new size, with its own weights
    assert bigger.input_shape == (None, 32, 32, 3) and len(members(bigger)) == 2
    large = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3)).astype(np.float32)
    parts = [rebuild_at_size(m, 32).predict_on_batch(large) for m in members(loaded)]
    np.testing.assert_allclose(bigger.predict_on_batch(large), (parts[0] + parts[1]) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        average_of([first])


def test_a_fresh_decoder_keeps_the_parents_encoder_and_nothing_of_its_decoder():
    import keras

    keras.utils.set_random_seed(1)
    parent, fresh = build_model(16, width=4), build_model(16, width=4)
    fresh_weights = [w.copy() for w in fresh.get_weights()]
    mixed = with_fresh_decoder(parent, fresh)
    encoder = 12  # six convolutions, kernel and bias each
    for got, want in zip(mixed.get_weights()[:encoder], parent.get_weights()[:encoder]):
        np.testing.assert_array_equal(got, want)
    for got, want, old in zip(mixed.get_weights()[encoder:], fresh_weights[encoder:], parent.get_weights()[encoder:]):
        np.testing.assert_array_equal(got, want)
        if got.ndim > 1:  # kernels (biases start at zero in both)
            assert not np.array_equal(got, old)


def _dead(model):
    """Every kernel zero: ReLU passes no gradient, so fine-tuning it (or its encoder) can only learn a constant."""
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    return model


@pytest.mark.slow
def test_the_rule_fits_every_start_and_keeps_the_one_that_learns_where_fine_tuning_cannot(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    base = tmp_path / "dead.keras"
    _dead(build_model(SIZE, width=WIDTH)).save(base)
    write_synthetic(tmp_path / "project", count=12, size=SIZE, seed=4)
    seen: dict[str, list[np.ndarray]] = {}
    images = [np.asarray(np.random.default_rng(3).integers(0, 255, (SIZE, SIZE, 3)), np.uint8)]

    with one_torch_thread():  # the same fit on any number of cores
        report = fit(tmp_path / "project", tmp_path / "store", from_version="current", base_model=base, epochs=10,
                     batch_size=4, verbose=0, workers=1,
                     on_candidate=lambda start, model: seen.setdefault(start, predict_trimaps(model, images)))
    choice = report.start_choice
    assert list(seen) == list(STARTS) and set(choice["candidates"]) == set(STARTS)
    figures = choice["candidates"]
    # Content: a dead parent can only learn a constant (the class shares); from scratch learns more than that,
    # which the validation split sees (by the IoU, or on a tie of IoUs by the loss), and the rule keeps it.
    assert report.start == SCRATCH
    assert figures[SCRATCH]["val_loss"] < min(figures[FINETUNE]["val_loss"], figures[DECODER]["val_loss"])
    assert figures[SCRATCH]["val_foreground_iou"] >= max(figures[FINETUNE]["val_foreground_iou"],
                                                         figures[DECODER]["val_foreground_iou"]) - TIE
    assert report.val_foreground_iou == figures[SCRATCH]["val_foreground_iou"]
    for dead in (FINETUNE, DECODER):  # a constant prediction: the same class for every pixel
        assert len(np.unique(seen[dead][0])) == 1
    # The stored version is the kept candidate itself, not a refit.
    stored = ModelStore(tmp_path / "store").load_model(report.version_id)
    np.testing.assert_array_equal(predict_trimaps(stored, images)[0], seen[SCRATCH][0])
    metrics = json.loads((report.path / "metrics.json").read_text())
    assert metrics["start"] == SCRATCH and metrics["params"]["small_data_rule"] is True
    assert not list(report.path.glob(".candidate-*"))  # the other candidates are not kept


@pytest.mark.slow
def test_the_rule_keeps_the_average_of_the_two_best_and_fine_tunes_it_as_a_whole_next_time(tmp_path):
    import keras

    keras.utils.set_random_seed(5)
    base = tmp_path / "base.keras"
    build_model(SIZE, width=16).save(base)  # wide enough that two starts learn something in the step budget
    write_synthetic(tmp_path / "project", count=20, size=SIZE, seed=4)
    images = np.random.default_rng(3).integers(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    logits: dict[str, np.ndarray] = {}

    def capture(start, model):
        logits[start] = np.asarray(model.predict_on_batch(images))

    with one_torch_thread():
        first = fit(tmp_path / "project", tmp_path / "store", from_version="current", base_model=base, epochs=10,
                    batch_size=4, verbose=0, workers=1, on_candidate=capture)
    choice = first.start_choice
    kept = first.start.split("+")
    assert len(kept) == 2 and set(kept) <= set(STARTS)
    figures = choice["candidates"]
    assert [figures[k]["val_foreground_iou"] for k in kept] == sorted(
        (f["val_foreground_iou"] for f in figures.values()), reverse=True)[:2]  # the two best, best first
    stored = ModelStore(tmp_path / "store").load_model(first.version_id)
    assert len(members(stored)) == 2
    np.testing.assert_allclose(stored.predict_on_batch(images), (logits[kept[0]] + logits[kept[1]]) / 2,
                               rtol=1e-4, atol=1e-5)  # the stored version is the average of the two fits
    metrics = json.loads((first.path / "metrics.json").read_text())
    assert metrics["start"] == first.start
    assert metrics["val_foreground_iou"] == choice["average"]["val_foreground_iou"] == first.val_foreground_iou
    assert metrics["val_loss"] == choice["average"]["val_loss"] > 0
    assert not list(first.path.glob(".candidate-*"))

    write_synthetic(tmp_path / "project", count=24, size=SIZE, seed=4)  # more annotations, then a second fit
    sizes: dict[str, int] = {}
    with one_torch_thread():
        second = fit(tmp_path / "project", tmp_path / "store", from_version=first.version_id, epochs=2,
                     batch_size=4, verbose=0, workers=1,
                     on_candidate=lambda start, model: sizes.setdefault(start, len(members(model))))
    # The averaged parent is fine-tuned whole; the fresh decoder and scratch are single fits; and an average is
    # never averaged again, so no version holds more than two fits.
    assert sizes == {FINETUNE: 2, DECODER: 1, SCRATCH: 1}
    second_stored = ModelStore(tmp_path / "store").load_model(second.version_id)
    kept = second.start.split("+")
    assert not (FINETUNE in kept and len(kept) > 1)  # the fine-tuned average is kept alone or not at all
    assert len(members(second_stored)) == (2 if kept == [FINETUNE] or len(kept) == 2 else 1)


@pytest.mark.slow
def test_the_learning_curve_benchmark_runs_every_start_side_by_side(monkeypatch, capsys):
    from benchmarks import learning_curve as bench
    from training import selection

    monkeypatch.setattr(selection, "MIN_STEPS", 4)  # a smoke test: the code paths, not the figures
    assert bench.main(["--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [d["seed"] for d in result["draws"]] == [0, bench.DRAW_SPACING]  # two draws by default in --quick
    for draw in result["draws"]:
        [row] = draw["rows"]
        assert row["annotations"] == 4
        assert all(0.0 <= row[arm] <= 1.0 for arm in (*bench.ARMS, "all_fg"))
        kept = row["rule_detail"]["start"].split("+")
        if len(kept) == 1:  # read back from its store, the kept candidate scores what it scored when fitted
            assert row["rule"] == row[kept[0]]
        assert set(row["rule_detail"]["start_choice"]["candidates"]) == set(STARTS)
    [mean] = result["rows"]
    firsts = [d["rows"][0] for d in result["draws"]]
    for arm in (*bench.ARMS, "all_fg"):
        assert mean[arm] == pytest.approx((firsts[0][arm] + firsts[1][arm]) / 2)
    assert result["draws"][0]["rows"][0]["all_fg"] != result["draws"][1]["rows"][0]["all_fg"]  # other images
    assert result["targets"] == bench.targets(result["rows"])


def _draw(seed: int, *points: tuple[int, float, float, float, float, float]) -> dict:
    """A draw's result as :func:`benchmarks.learning_curve.run_draw` gives it, from (N, finetune, decoder,
    scratch, all_fg, rule) per point; the rule's kept start is whichever candidate matches its figure."""
    rows = []
    for count, finetune, decoder, scratch, all_fg, rule in points:
        figures = {FINETUNE: finetune, DECODER: decoder, SCRATCH: scratch}
        kept = next(start for start, value in figures.items() if value == rule)
        rows.append({"annotations": count, "before": 0.0, **figures, "rule": rule, "all_fg": all_fg,
                     "rule_detail": {"start": kept}})
    return {"seed": seed, "rows": rows}


def test_the_learning_curve_is_the_mean_over_draws_and_its_targets_are_judged_on_that_mean():
    from benchmarks import learning_curve as bench

    # Draw 0 keeps a worse start at 10 (short of the better start there); draw 1 keeps the best everywhere.
    draws = [_draw(0, (5, 0.0, 0.0, 0.30, 0.20, 0.30), (10, 0.60, 0.50, 0.40, 0.20, 0.50)),
             _draw(5, (5, 0.40, 0.50, 0.10, 0.20, 0.50), (10, 0.50, 0.90, 0.60, 0.20, 0.90))]
    curve = bench.mean_curve(draws)
    assert [r["annotations"] for r in curve] == [5, 10]
    assert curve[1]["rule"] == pytest.approx(0.70) and curve[1]["finetune"] == pytest.approx(0.55)
    assert curve[1]["scratch"] == pytest.approx(0.50) and curve[1]["rule_sd"] == pytest.approx(0.2 * 2 ** 0.5)
    assert curve[0]["rule_kept"] == {DECODER: 1, SCRATCH: 1}
    assert bench.targets(curve) == {"rule_at_least_the_better_start_everywhere": True,
                                    "rule_beats_all_foreground_from_10": True}
    assert bench.per_draw_counts(draws) == {"rule_at_least_the_better_start_everywhere": [3, 4],
                                            "rule_beats_all_foreground_from_10": [2, 2]}
    assert bench.targets(draws[0]["rows"])["rule_at_least_the_better_start_everywhere"] is False

    # A mean the rule falls below: the better start's mean at 10 is above the rule's.
    worse = [_draw(0, (10, 0.80, 0.30, 0.10, 0.20, 0.30)), _draw(5, (10, 0.80, 0.90, 0.10, 0.20, 0.90))]
    assert bench.targets(bench.mean_curve(worse))["rule_at_least_the_better_start_everywhere"] is False
    # Below all foreground from 10 on the mean, though one draw is above it.
    blind = [_draw(0, (10, 0.05, 0.0, 0.0, 0.30, 0.05)), _draw(5, (10, 0.40, 0.0, 0.0, 0.30, 0.40))]
    assert bench.targets(bench.mean_curve(blind))["rule_beats_all_foreground_from_10"] is False
    assert bench.per_draw_counts(blind)["rule_beats_all_foreground_from_10"] == [1, 2]


def test_the_learning_curve_refuses_draws_that_measured_different_points():
    from benchmarks import learning_curve as bench

    with pytest.raises(ValueError, match="disagree on the points"):
        bench.mean_curve([_draw(0, (5, 0.1, 0.1, 0.1, 0.1, 0.1)), _draw(5, (10, 0.1, 0.1, 0.1, 0.1, 0.1))])


@pytest.mark.parametrize("flag", ["--draws", "--jobs"])
def test_the_learning_curve_refuses_fewer_than_one_draw_or_job_before_fitting_anything(flag, capsys):
    from benchmarks import learning_curve as bench

    with pytest.raises(SystemExit) as refused:
        bench.main([flag, "0"])
    assert refused.value.code == 2
    assert f"argument {flag}: must be at least 1, not 0" in capsys.readouterr().err
