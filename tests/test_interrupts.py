"""Issue 20 item 1: prepare and train interrupted at random moments (SIGINT, some trains SIGTERM) end in
one line, never hang, never trace, leave no temporary folder and the earlier output intact.

CI runs a few trials on a small corpus; INTERRUPT_DRILL=full runs the full drill (30 prepares, 10
trainings, as `python tests/interrupt_drill.py`, which also keeps the machine busy)."""
import os
import random

from interrupt_drill import prepare_trials, train_trials

FULL = os.environ.get("INTERRUPT_DRILL") == "full"


def test_prepare_and_train_interrupted_at_random_moments(tmp_path):
    rng = random.Random(20)
    prepared, _ = prepare_trials(str(tmp_path), 30 if FULL else 5, rng, max_bytes=1_000_000 if FULL else 100_000)
    trained = train_trials(str(tmp_path), str(tmp_path / "prepared"), 10 if FULL else 2, rng,
                           longest=14.0 if FULL else 10.0)
    failed = [trial for trial in prepared + trained if trial[0] not in ("clean", "finished")]
    assert not failed, failed
    assert sum(outcome == "clean" for outcome, *_ in prepared) >= len(prepared) // 3, prepared  # many interrupted
