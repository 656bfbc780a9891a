"""The sweep's ASHA: Ray's decisions, its rungs carried over a resume, trials left to finish
their last epoch; on values worked out by hand. The sweep's state files survive interrupted writes."""

from dataclasses import replace

import pytest
from interrupted_writes import WriteInterrupted, interrupting_filesystem
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from cromss_ray.config import TuneConfig, build_config
from cromss_ray.tune.scheduler import ResumableASHA
from cromss_ray.tune.sweep import ASHA_STATE_FILE, SWEEP_STATE_FILE, SweepLocation, build_scheduler

METRIC = "val/s2/miou"


def asha(location: SweepLocation) -> ResumableASHA:
    """One bracket, rungs at epochs 1 and 2 (grace 1, reduction factor 2, 4 epochs); maximise."""
    config = build_config(TuneConfig, {"optim": {"epochs": 4}, "tune": {"grace_period": 1, "reduction_factor": 2}})
    scheduler = build_scheduler(config, location)
    assert isinstance(scheduler, ResumableASHA)
    scheduler.set_search_properties(METRIC, "max")
    return scheduler


def trial(trial_id: str) -> Trial:
    return Trial("run_trial", config={}, trial_id=trial_id, stub=True)


def report(scheduler: ResumableASHA, which: Trial, epoch: int, miou: float) -> str:
    return scheduler.on_trial_result(None, which, {"epoch": epoch, METRIC: miou})


def test_rungs_survive_a_restored_copy(tmp_path):
    location = SweepLocation.of(str(tmp_path), "sweep")
    before = asha(location)
    first, second = trial("a"), trial("b")
    before.on_trial_add(None, first)
    assert report(before, first, 1, 0.50) == TrialScheduler.CONTINUE  # the first value of the rung
    assert report(before, first, 2, 0.60) == TrialScheduler.CONTINUE
    assert location.exists(ASHA_STATE_FILE)

    # A resumed sweep unpickles the scheduler as it was created: empty, but with the same file.
    after = asha(location)
    after.on_trial_add(None, second)
    # Rung 1 holds 0.50: the cutoff is its 50th percentile, 0.50, and 0.40 is below it.
    assert report(after, second, 1, 0.40) == TrialScheduler.STOP

    fresh = asha(SweepLocation.of(str(tmp_path), "another-sweep"))
    fresh.on_trial_add(None, second)
    assert report(fresh, second, 1, 0.40) == TrialScheduler.CONTINUE  # no history: nothing to compare


def test_a_better_trial_runs_to_its_last_epoch_after_a_resume(tmp_path):
    location = SweepLocation.of(str(tmp_path), "sweep")
    before = asha(location)
    first = trial("a")
    before.on_trial_add(None, first)
    report(before, first, 1, 0.50)
    report(before, first, 2, 0.55)
    after = asha(location)
    second = trial("b")
    after.on_trial_add(None, second)
    assert report(after, second, 1, 0.70) == TrialScheduler.CONTINUE
    assert report(after, second, 2, 0.75) == TrialScheduler.CONTINUE
    assert report(after, second, 4, 0.80) == TrialScheduler.CONTINUE  # its last epoch: it ends by itself


def test_an_interrupted_save_of_the_rungs_keeps_the_last_saved_file(tmp_path):
    location = SweepLocation.of(str(tmp_path), "sweep")
    scheduler = asha(location)
    first = trial("a")
    scheduler.on_trial_add(None, first)
    report(scheduler, first, 1, 0.50)
    saved = (tmp_path / "sweep" / ASHA_STATE_FILE).read_bytes()

    scheduler._filesystem = interrupting_filesystem()
    with pytest.raises(WriteInterrupted):
        report(scheduler, first, 2, 0.60)

    assert (tmp_path / "sweep" / ASHA_STATE_FILE).read_bytes() == saved
    assert sorted(path.name for path in (tmp_path / "sweep").iterdir()) == [ASHA_STATE_FILE]


def test_an_interrupted_write_of_the_sweep_state_keeps_the_previous_file(tmp_path):
    location = SweepLocation.of(str(tmp_path), "sweep")
    location.write(SWEEP_STATE_FILE, b'{"name": "sweep"}')

    with pytest.raises(WriteInterrupted):
        replace(location, filesystem=interrupting_filesystem()).write(SWEEP_STATE_FILE, b'{"name": "changed"}')

    assert (tmp_path / "sweep" / SWEEP_STATE_FILE).read_bytes() == b'{"name": "sweep"}'
    assert sorted(path.name for path in (tmp_path / "sweep").iterdir()) == [SWEEP_STATE_FILE]
