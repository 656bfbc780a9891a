"""What a training run reports each epoch: the progress line, and the metrics (and checkpoint) to Ray Train."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ray.train


def progress_line(
    task: str,
    run_name: str,
    epoch: int,
    epochs: int,
    metrics: Mapping[str, float],
    keys: Sequence[str],
    seconds: float,
) -> str:
    """``[cromss TASK] RUN epoch E/N  key value ...  (S s)``: the ``keys`` present in ``metrics``.

    The run name tells apart the interleaved lines of runs sharing one console (sweep trials).
    """
    values = "  ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)
    return f"[cromss {task}] {run_name} epoch {epoch}/{epochs}  {values}  ({seconds:.1f} s)"


def report_epoch(
    metrics: Mapping[str, float],
    *,
    epoch: int,
    write_checkpoint: Callable[[Path], None] | None,
) -> None:
    """Report one epoch's flat metrics (with ``epoch``) to Ray Train, with a checkpoint when due.

    Every rank must call this once per epoch (it is a barrier). ``write_checkpoint`` is
    given on rank 0 of a checkpointing epoch only: it fills a fresh directory that Ray
    Train then persists as ``checkpoint_epoch_<epoch>`` under the run's storage path.
    """
    flat = {**metrics, "epoch": epoch}
    if write_checkpoint is None:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory(prefix="cromss-checkpoint-") as directory:
        write_checkpoint(Path(directory))
        ray.train.report(
            flat,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )
