"""RUN_DIR/STOP as a one-time request: the trainer removes the file it saw once the stop's checkpoint is written,
never a newer one; the sweep driver's pruned/paused decision survives that in its own record, trial.stop."""
from __future__ import annotations

from hvdtrain.loop.stop import StopRequest
from hvdtrain.rundir import write_atomic
from hvdtrain.sweep.trial import PAUSED, PRUNED, TrialDir


def test_a_served_stop_file_is_removed_but_a_newer_one_is_kept(tmp_path):
    stop = tmp_path / "STOP"
    request = StopRequest(stop_file=stop)
    assert not request.requested and not request.consume()      # nothing asked, nothing removed
    stop.touch()
    assert request.requested and request.signal_name == f"stop file {stop}"
    write_atomic(stop, "a new request, written after the stop was agreed\n")   # another file at the same path
    assert not request.consume() and stop.read_text().startswith("a new request")
    assert not (tmp_path / "STOP.served").exists()
    again = StopRequest(stop_file=stop)
    assert again.requested and again.consume() and not stop.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_keeps_its_decision_when_the_trainer_consumes_stop(tmp_path):
    trial = TrialDir(tmp_path, 1)
    trial.request_stop(PRUNED, "epoch 1: worse than the median")
    request = StopRequest(stop_file=trial.stop_file)
    assert request.requested and request.consume() and not trial.stop_file.exists()
    assert trial.stop_reason() == PRUNED                          # never relaunched
    trial.clear_pause()
    assert trial.stop_reason() == PRUNED                          # a pruned trial's record stays
    paused = TrialDir(tmp_path, 2)
    paused.request_stop(PAUSED, "the sweep was interrupted")
    assert StopRequest(stop_file=paused.stop_file).requested
    assert paused.stop_reason() == PAUSED
    paused.clear_pause()                                          # relaunched: a fresh start, no stop pending
    assert paused.stop_reason() is None and not paused.stop_file.exists()
    (paused.path / "STOP").write_text("")                         # someone else's STOP, not yet served
    assert paused.stop_reason() == PAUSED
