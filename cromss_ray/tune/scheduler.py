"""ASHA whose rung records survive a resumed sweep (an interrupted sweep resumes where it stopped).

Ray Tune restores an interrupted experiment's trials and search algorithm, but not its
scheduler: the restored ASHA starts with empty rungs, so the trials that run after a
resume would be compared only with each other, and a trial that the full history would
stop could run to the end. :class:`ResumableASHA` is Ray's ``AsyncHyperBandScheduler``
that saves itself (its public ``save``) to the sweep folder whenever a trial reports or
ends (through a temporary file renamed into place), and reloads that file (``restore``)
the first time a restored copy is used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler

from cromss_ray.data.storage import write_atomically


class ResumableASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` (same arguments) kept in ``state_path`` on ``filesystem``.

    The file is a pickle, like Tune's own experiment state: restore only sweep folders you trust.
    """

    def __init__(self, *, state_path: str, filesystem: pafs.FileSystem, **asha: Any) -> None:
        super().__init__(**asha)
        self._state_path = state_path
        self._filesystem = filesystem
        self._recalled = False

    def _recall(self) -> None:
        """Load the saved rungs once, before the first decision of this copy.

        The file's location stays the current one: a sweep folder may have been moved.
        """
        if self._recalled:
            return
        self._recalled = True
        state_path, filesystem = self._state_path, self._filesystem
        if filesystem.get_file_info(state_path).type != pafs.FileType.File:
            return
        with tempfile.TemporaryDirectory(prefix="cromss-asha-") as folder:
            local = Path(folder, "asha.pkl")
            with filesystem.open_input_stream(state_path) as stream:
                local.write_bytes(stream.read())
            self.restore(str(local))
        self._state_path, self._filesystem = state_path, filesystem

    def _persist(self) -> None:
        """Save the rungs through a temporary file renamed into place (an interrupted save keeps the last)."""
        with tempfile.TemporaryDirectory(prefix="cromss-asha-") as folder:
            local = Path(folder, "asha.pkl")
            self.save(str(local))
            write_atomically(self._filesystem, self._state_path, local.read_bytes())

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._recall()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self._recall()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._recall()
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._recall()
        super().on_trial_remove(tune_controller, trial)
        self._persist()
