"""The results of a sweep: one row per trial, as a printed table, a CSV file and a plot.

Rows are built from the sweep's Tune experiment state (``ExperimentAnalysis``), so the same
code serves the end of a sweep and ``cromss tune report NAME`` on a finished, running or
interrupted sweep. A row holds the trial id, its sampled values, the best value of the
sweep metric over its epochs, the number of epochs it ran and its status.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

COMPLETED = "completed"
STOPPED_EARLY = "stopped early"
ERRORED = "error"
UNFINISHED = "unfinished"

TRIAL_COLUMN = "trial"
EPOCHS_COLUMN = "epochs"
STATUS_COLUMN = "status"


@dataclass(frozen=True)
class TrialRow:
    """One trial of a sweep, as it appears in the results table."""

    trial_id: str
    sampled: dict[str, Any]
    best: float | None
    epochs: int
    status: str


def _best(values: Sequence[float], mode: str) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def trial_status(trial_status_name: str, epochs_run: int, epochs_planned: int) -> str:
    """Completed, stopped early (by the scheduler, before its last epoch), error or unfinished."""
    if trial_status_name == Trial.ERROR:
        return ERRORED
    if trial_status_name != Trial.TERMINATED:
        return UNFINISHED
    return COMPLETED if epochs_run >= epochs_planned else STOPPED_EARLY


def creation_order(trial: Trial) -> tuple[int, str]:
    """Sort key: the search algorithm's counter that leads the trial's experiment tag (``3_lr=...``).

    Tune lists trials in the order it last touched them, which a restore changes.
    """
    counter = trial.experiment_tag.partition("_")[0]
    return (int(counter) if counter.isdigit() else -1, trial.trial_id)


def collect_rows(
    analysis: ExperimentAnalysis,
    keys: Sequence[str],
    metric: str,
    mode: str,
    epochs_planned: int,
) -> list[TrialRow]:
    """One row per trial of ``analysis``, in the order the trials were created.

    ``epochs_planned`` is the base config's epoch count; a trial that samples
    ``optim.epochs`` is measured against its own value.
    """
    dataframes = analysis.trial_dataframes
    rows = []
    for trial in sorted(analysis.trials, key=creation_order):
        frame = dataframes.get(trial.trial_id)
        has_rows = frame is not None and not frame.empty
        epochs_run = int(frame["epoch"].nunique()) if has_rows and "epoch" in frame else 0
        values = frame[metric].tolist() if has_rows and metric in frame else []
        planned = int(trial.config.get("optim.epochs", epochs_planned))
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                sampled={key: trial.config.get(key) for key in keys},
                best=_best(values, mode),
                epochs=epochs_run,
                status=trial_status(trial.status, epochs_run, planned),
            )
        )
    return rows


def best_row(rows: Sequence[TrialRow], mode: str, *, statuses: Sequence[str] = (COMPLETED,)) -> TrialRow | None:
    """The row with the best metric among trials whose status is in ``statuses``."""
    candidates = [row for row in rows if row.status in statuses and row.best is not None]
    if not candidates:
        return None
    pick = max if mode == "max" else min
    return pick(candidates, key=lambda row: row.best)  # type: ignore[arg-type, return-value]


def table_columns(keys: Sequence[str], metric: str) -> list[str]:
    """Header of the table and the CSV file: trial, sampled keys, ``best <metric>``, epochs, status."""
    return [TRIAL_COLUMN, *keys, f"best {metric}", EPOCHS_COLUMN, STATUS_COLUMN]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def table_records(rows: Sequence[TrialRow], keys: Sequence[str]) -> list[list[str]]:
    """The rows as text cells in the order of ``table_columns``."""
    return [
        [row.trial_id, *(_cell(row.sampled.get(key)) for key in keys), _cell(row.best), str(row.epochs), row.status]
        for row in rows
    ]


def to_csv(columns: Sequence[str], records: Sequence[Sequence[str]]) -> str:
    """The table as CSV text (the ``results.csv`` artifact; RFC 4180 line ends)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(records)
    return buffer.getvalue()


def from_csv(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and records of a ``results.csv`` written by :func:`to_csv`."""
    reader = list(csv.reader(io.StringIO(text, newline="")))
    if not reader:
        raise ValueError("results.csv is empty")
    return reader[0], reader[1:]


def format_table(columns: Sequence[str], records: Sequence[Sequence[str]], *, marked: str | None = None) -> str:
    """A fixed-width text table; the record whose first cell is ``marked`` gets a ``*``."""
    widths = [max([len(column), *(len(record[index]) for record in records)]) for index, column in enumerate(columns)]

    def line(cells: Sequence[str], lead: str) -> str:
        return lead + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    lines = [line(columns, "  "), line(["-" * w for w in widths], "  ")]
    lines.extend(line(record, "* " if record[0] == marked else "  ") for record in records)
    return "\n".join(lines)


def _axis_values(values: Sequence[Any], log_scale: bool) -> tuple[list[float], list[float], list[str]]:
    """Positions in [0, 1] for one axis, with tick positions and labels.

    Numbers are scaled linearly (or in log10 for log-uniform keys) between their extremes;
    anything else (strings, booleans, lists) is a category placed evenly in sorted order.
    """
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        raw = [math.log10(v) if log_scale else float(v) for v in values]
        low, high = min(raw), max(raw)
        span = (high - low) or 1.0
        ticks = [0.0, 1.0] if high > low else [0.0]
        labels = [_cell(min(values)), _cell(max(values))] if high > low else [_cell(values[0])]
        return [(r - low) / span for r in raw], ticks, labels
    categories = sorted({str(v) for v in values})
    step = 1.0 / max(len(categories) - 1, 1)
    position = {category: i * step for i, category in enumerate(categories)}
    return [position[str(v)] for v in values], [position[c] for c in categories], categories


def plot_parallel_coordinates(
    rows: Sequence[TrialRow],
    keys: Sequence[str],
    metric: str,
    path: Path,
    *,
    log_keys: Sequence[str] = (),
) -> Path:
    """A parallel-coordinates PNG: one axis per sampled key plus the metric, one line per trial.

    Lines are coloured by the trial's best metric; trials that reported no metric are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize

    plotted = [row for row in rows if row.best is not None]
    axes_names = [*keys, f"best {metric}"]
    figure, axis = plt.subplots(figsize=(max(6.0, 2.2 * len(axes_names)), 4.5))
    if not plotted:
        axis.text(0.5, 0.5, f"no trial has reported {metric} yet", ha="center", va="center")
        axis.set_axis_off()
    else:
        columns = [[row.sampled.get(key) for row in plotted] for key in keys]
        columns.append([row.best for row in plotted])
        positions = []
        for index, (name, values) in enumerate(zip(axes_names, columns, strict=True)):
            scaled, ticks, labels = _axis_values(values, name in log_keys)
            positions.append(scaled)
            axis.axvline(index, color="0.3", linewidth=1)
            for tick, label in zip(ticks, labels, strict=True):
                axis.text(index + 0.03, tick, label, fontsize=8, va="center")
        low, high = min(row.best for row in plotted), max(row.best for row in plotted)
        norm = Normalize(low, high if high > low else low + 1)
        colormap = matplotlib.colormaps["viridis"]
        for trial_index, row in enumerate(plotted):
            axis.plot(
                range(len(axes_names)),
                [column[trial_index] for column in positions],
                color=colormap(norm(row.best)),
                linewidth=1.8,
                linestyle="-" if row.status == COMPLETED else "--",
                marker="o",
                markersize=3,
            )
        names = [f"{name}\n(log)" if name in log_keys else name for name in axes_names]
        axis.set_xticks(range(len(axes_names)), names, fontsize=8)
        axis.set_yticks([])
        axis.set_xlim(-0.2, len(axes_names) - 0.6)
        axis.set_ylim(-0.08, 1.08)
        for side in ("left", "right", "top"):
            axis.spines[side].set_visible(False)
        figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=axis, label=f"best {metric}")
        axis.set_title("Sweep trials (dashed: did not complete)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def sampled_log_keys(domains: Mapping[str, Any]) -> list[str]:
    """The searched keys drawn log-uniformly, which the plot shows on a log axis."""
    return [key for key, domain in domains.items() if getattr(domain, "loguniform", None) is not None]
