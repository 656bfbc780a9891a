"""The demo's results table, read from its MLflow store: noisy-label baseline vs CromSS.

Pretraining columns score held-out locations against their clean labels (the noisy
labels are what the networks were trained on); the transfer column scores the S2
network fine-tuned on the DW-like tiles on their test split. The last three columns
score the S2 branch's sample selection in the pretraining run's last epoch, on its
training batches: the share of selection weight on right noisy labels (precision), the
share of right noisy labels (base rate: the precision of selecting at random) and the
AUROC of the label trust as a detector of wrong labels. Run by scripts/demo.sh:

    python scripts/demo_report.py --tracking-uri sqlite:///outputs/demo/mlflow.db --best-model models:/NAME@best
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Run

PRETRAIN_EXPERIMENT = "cromss-pretrain"
FINETUNE_EXPERIMENT = "cromss-finetune"


@dataclass(frozen=True)
class Column:
    """A column of the table: its title, the run metric it shows, and as a percentage or a plain fraction."""

    title: str
    metric: str
    percent: bool = True


COLUMNS = (
    Column("S2 vs clean", "val_clean/s2/miou"),
    Column("S1 vs clean", "val_clean/s1/miou"),
    Column("fused vs clean", "val_clean/fused/miou"),
    Column("DW-like test (S2)", "test/s2/miou"),
    Column("S2 selection precision", "train/s2/selected_precision"),
    Column("base rate", "train/s2/base_rate"),
    Column("S2 noise AUROC", "train/s2/noise_auroc", percent=False),
)
MISSING = "-"


@dataclass(frozen=True)
class Row:
    """One initialisation: the demo's pretraining run behind it and the transfer run from it."""

    label: str
    pretrain_run: str | None
    finetune_run: str | None


ROWS = (
    Row("random initialisation", None, "demo-ft-random"),
    Row("noisy-label baseline (mid fusion)", "demo-noisy-baseline", "demo-ft-noisy-baseline"),
    Row("CromSS, middle fusion", "demo-cromss-mid", None),
    Row("CromSS, late fusion", "demo-cromss-late", None),
)
BEST_ROW_LABEL = "CromSS, best of the sweep"
BEST_FINETUNE_RUN = "demo-ft-cromss"


def latest_run(client: MlflowClient, experiment: str, run_name: str) -> Run | None:
    """The most recent finished run called ``run_name`` in ``experiment``, if any."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def best_model_run(client: MlflowClient, model_uri: str) -> Run:
    """The run that produced the model version ``models:/NAME@ALIAS`` points at."""
    match = re.fullmatch(r"models:/(?P<name>[^@/]+)@(?P<alias>[^@/]+)", model_uri)
    if match is None:
        raise SystemExit(f"--best-model {model_uri!r} is not of the form models:/NAME@ALIAS")
    version = client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_run(version.run_id)


def cell(run: Run | None, column: Column) -> str:
    """The run's last value of the column's metric: a percentage with one decimal, or a fraction with three."""
    if run is None or column.metric not in run.data.metrics:
        return MISSING
    value = run.data.metrics[column.metric]
    return f"{100 * value:.1f}" if column.percent else f"{value:.3f}"


def results_table(client: MlflowClient, best_model: str) -> str:
    """Rows of initialisations, columns of mIoU (%) in pretraining and after transfer, then the S2 selection."""
    lines: list[tuple[str, ...]] = [("initialisation", *(column.title for column in COLUMNS))]
    for row in ROWS:
        pretrained = latest_run(client, PRETRAIN_EXPERIMENT, row.pretrain_run) if row.pretrain_run else None
        finetuned = latest_run(client, FINETUNE_EXPERIMENT, row.finetune_run) if row.finetune_run else None
        lines.append((row.label, *cells(pretrained, finetuned)))
    best = best_model_run(client, best_model)
    finetuned = latest_run(client, FINETUNE_EXPERIMENT, BEST_FINETUNE_RUN)
    lines.append((f"{BEST_ROW_LABEL} ({best_model})", *cells(best, finetuned)))
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def cells(pretrained: Run | None, finetuned: Run | None) -> list[str]:
    return [cell(finetuned if column.metric.startswith("test/") else pretrained, column) for column in COLUMNS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the demo's MLflow store")
    parser.add_argument("--best-model", required=True, metavar="models:/NAME@ALIAS", help="the sweep's best model")
    args = parser.parse_args(argv)
    print(results_table(MlflowClient(tracking_uri=args.tracking_uri), args.best_model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
