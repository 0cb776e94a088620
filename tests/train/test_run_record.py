"""The run record: the summary's steps, means, attempts and time carried through checkpoints."""
from __future__ import annotations

from omnibal_pl.train import run_record
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.run_record import CHECKPOINT_KEY, RunRecord

from tests.helpers import model_config


def test_a_resumed_record_carries_the_steps_means_attempts_and_time(monkeypatch):
    clock = iter([100.0, 130.0, 200.0, 210.0, 250.0, 260.0])
    monkeypatch.setattr(run_record.time, "monotonic", lambda: next(clock))
    first = RunRecord()
    first.start_attempt()  # t = 100
    for step in range(3):
        first.add_step(float(step), 10.0 + step, {"train/samples_per_s": step + 1.0})
    state = first.state_dict()  # t = 130: 30 s of training

    second = RunRecord()
    second.load_state_dict(state, step=3)
    second.start_attempt()  # t = 200
    second.add_step(3.0, 13.0, {"train/samples_per_s": 4.0, "train/mfu": 0.5})
    assert second.losses == [0.0, 1.0, 2.0, 3.0] and second.grad_norms == [10.0, 11.0, 12.0, 13.0]
    assert second.mean("train/samples_per_s") == 2.5  # over all 4 steps, not this attempt's one
    assert second.mean("train/mfu") == 0.5 and second.mean("train/tokens_per_s") != second.mean("train/tokens_per_s")
    assert (second.attempts, second.resumed_at) == (2, [3])
    assert second.training_seconds() == 40.0  # t = 210: 30 s before + 10 s

    third = RunRecord()
    third.load_state_dict(second.state_dict(), step=4)  # t = 250: 30 + 50 s
    assert (third.attempts, third.resumed_at, third.seconds_before) == (3, [3, 4], 80.0)


def test_the_module_keeps_its_record_and_skipped_steps_in_the_checkpoint():
    saving = OmniBalModule(model_config("tiny"))
    saving.record.add_step(2.5, 1.0, {"train/loss": 2.5})
    saving.nonfinite.skipped, saving.nonfinite.consecutive = 2, 1
    checkpoint = {"state_dict": saving.state_dict(), "global_step": 1}
    saving.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["losses"] == [2.5]

    resuming = OmniBalModule(model_config("tiny"))
    resuming.on_load_checkpoint(checkpoint)
    assert resuming.losses == [2.5] and resuming.record.resumed_at == [1]
    assert (resuming.nonfinite.skipped, resuming.nonfinite.consecutive) == (2, 1)

    older = OmniBalModule(model_config("tiny"))  # a checkpoint from before the record: this attempt only
    older.on_load_checkpoint({"state_dict": saving.state_dict(), "global_step": 1})
    assert older.losses == [] and older.record.attempts == 1

