"""``cromss compare EXPERIMENT``: test scores of transfer runs side by side, as in the paper's tables (spec 11).

Every finished transfer run of the experiment (tagged ``cromss.task=finetune`` with a
test mIoU) contributes its ``test/<branch>/miou``, ``test/<branch>/miou_ref`` (the
reference's convention, spec 11: a class absent from the truth and never predicted
scores 1; NaN for runs that did not log it) and ``test/<branch>/oa``, and is labelled by
what pretrained its encoder (:func:`pretraining_label`, from its source's fusion): CromSS
middle or late fusion, the single-modality baseline, or random initialisation (spec 11).
Runs are grouped by dataset, pretraining, initialisation, branch, decoder and encoder
mode, and scores of a group averaged. The printed table has one row per dataset,
pretraining, initialisation and branch (CromSS first, then the baselines, as the paper
sets them side by side) and one column per decoder and encoder mode, each cell
``mIoU / mIoU_ref / OA`` in percent: the layout of the paper's transfer tables. The same groups, one per line, are written as
CSV: into a file, or as ``comparison.csv`` (with the table as ``comparison.txt``) of a
new run of the experiment tagged ``cromss.task=compare``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from cromss_ray.data.schema import DATASET_NAMES
from cromss_ray.tracking.finetuned import (
    BRANCH_TAG,
    DATASET_TAG,
    DECODER_TAG,
    ENCODER_MODE_TAG,
    FINETUNE_TASK,
    INIT_TAG,
    SOURCE_FUSION_TAG,
    TASK_TAG,
)
from cromss_ray.tracking.model_uris import registry_client
from cromss_ray.tracking.uris import redact_uri

COMPARE_TASK = "compare"
COMPARE_RUN_NAME = "compare"
CSV_ARTIFACT = "comparison.csv"
TABLE_ARTIFACT = "comparison.txt"
PAGE_SIZE = 500
MODE_ORDER = ("frozen", "fine-tuned")
CELLS_LEGEND = "cells: test mIoU / mIoU_ref (the reference's convention, absent classes score 1) / OA (%)"
RANDOM_INIT = "random init"
SINGLE_MODALITY = "single-modality"
PRETRAINING_ORDER = ("CromSS mid", "CromSS late", SINGLE_MODALITY, RANDOM_INIT)
"""The order of the table's rows within a dataset: CromSS, then the paper's baselines."""


def pretraining_label(init: str, fusion: str | None) -> str:
    """What pretrained a transfer run's encoder, from its ``cromss.init`` and ``cromss.source_fusion`` tags:
    'CromSS mid', 'CromSS late', 'single-modality' (the baseline), 'random init', or '?' when untold."""
    if init == "random":
        return RANDOM_INIT
    if fusion == "single":
        return SINGLE_MODALITY
    return f"CromSS {fusion}" if fusion in ("mid", "late") else "?"


@dataclass(frozen=True)
class TransferScore:
    """The test scores of one transfer run and what distinguishes it."""

    run_id: str
    dataset: str
    pretraining: str
    init: str
    branch: str
    decoder: str
    encoder_mode: str
    miou: float
    miou_ref: float
    oa: float


@dataclass(frozen=True)
class ComparisonRow:
    """The mean test scores of the runs of one dataset, pretraining, initialisation, branch, decoder and
    encoder mode."""

    dataset: str
    pretraining: str
    init: str
    branch: str
    decoder: str
    encoder_mode: str
    runs: int
    miou: float
    miou_ref: float
    oa: float


@dataclass(frozen=True)
class Comparison:
    """A comparison: its rows, the printed table, and where the CSV went (a file or an MLflow run)."""

    rows: list[ComparisonRow]
    table: str
    run_id: str | None
    path: Path | None


def _runs(client: MlflowClient, experiment_id: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TASK_TAG}` = '{FINETUNE_TASK}'",
            max_results=PAGE_SIZE,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def transfer_scores(client: MlflowClient, experiment: str) -> list[TransferScore]:
    """The scores of every transfer run in ``experiment`` that reached its test split."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment '{experiment}' in {redact_uri(client.tracking_uri)}")
    scores = []
    for run in _runs(client, found.experiment_id):
        tags, metrics = run.data.tags, run.data.metrics
        branch, init = tags.get(BRANCH_TAG, ""), tags.get(INIT_TAG, "?")
        miou, oa = metrics.get(f"test/{branch}/miou"), metrics.get(f"test/{branch}/oa")
        if miou is None or oa is None:
            continue
        scores.append(
            TransferScore(
                run_id=run.info.run_id,
                dataset=tags.get(DATASET_TAG, "custom"),
                pretraining=pretraining_label(init, tags.get(SOURCE_FUSION_TAG)),
                init=init,
                branch=branch,
                decoder=tags.get(DECODER_TAG, "?"),
                encoder_mode=tags.get(ENCODER_MODE_TAG, "?"),
                miou=miou,
                miou_ref=metrics.get(f"test/{branch}/miou_ref", math.nan),
                oa=oa,
            )
        )
    return scores


def summarise(scores: Sequence[TransferScore]) -> list[ComparisonRow]:
    """One row per dataset, pretraining, initialisation, branch, decoder and encoder mode, with mean scores,
    sorted (CromSS before the baselines, :data:`PRETRAINING_ORDER`)."""
    groups: dict[tuple[str, ...], list[TransferScore]] = defaultdict(list)
    for score in scores:
        key = (score.dataset, score.pretraining, score.init, score.branch, score.decoder, score.encoder_mode)
        groups[key].append(score)
    rows = [
        ComparisonRow(
            *key,
            runs=len(members),
            miou=_mean(member.miou for member in members),
            miou_ref=_mean(member.miou_ref for member in members),
            oa=_mean(member.oa for member in members),
        )
        for key, members in groups.items()
    ]
    return sorted(
        rows,
        key=lambda row: (
            row.dataset,
            _rank(row.pretraining, PRETRAINING_ORDER),
            row.init,
            row.branch,
            row.decoder,
            _rank(row.encoder_mode, MODE_ORDER),
        ),
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    """``value``'s place in ``order``, unlisted values after the listed ones: frozen before fine-tuned
    before fine-tuned after a warm-up, as in the paper's columns, and CromSS before the baselines."""
    return (order.index(value) if value in order else len(order), value)


def _cell(row: ComparisonRow) -> str:
    runs = f" (n={row.runs})" if row.runs > 1 else ""
    values = (row.miou, row.miou_ref, row.oa)
    scores = " / ".join(f"{100 * value:.2f}" if math.isfinite(value) else "-" for value in values)
    return f"{scores}{runs}"


def format_table(rows: Sequence[ComparisonRow]) -> str:
    """Rows: dataset, pretraining, initialisation, branch; columns: decoder and encoder mode; cells:
    :data:`CELLS_LEGEND`."""
    if not rows:
        return "no transfer runs with test scores"
    columns = sorted({(row.decoder, row.encoder_mode) for row in rows}, key=lambda c: (c[0], _rank(c[1], MODE_ORDER)))
    cells: dict[tuple[str, str, str, str], dict[tuple[str, str], str]] = defaultdict(dict)
    for row in rows:
        dataset = DATASET_NAMES.get(row.dataset, row.dataset)
        cells[(dataset, row.pretraining, row.init, row.branch.upper())][(row.decoder, row.encoder_mode)] = _cell(row)
    header = ["dataset", "pretraining", "initialisation", "input", *(f"{decoder} {mode}" for decoder, mode in columns)]
    body = [[*key, *(values.get(column, "-") for column in columns)] for key, values in cells.items()]
    widths = [max(len(line[index]) for line in (header, *body)) for index in range(len(header))]

    def render(line: Sequence[str]) -> str:
        return "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule, *(render(line) for line in body), rule, CELLS_LEGEND])


def to_csv(rows: Sequence[ComparisonRow]) -> str:
    """The rows as CSV, one group per line, scores as fractions."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([field.name for field in fields(ComparisonRow)])
    writer.writerows(astuple(row) for row in rows)
    return buffer.getvalue()


def compare_experiment(
    experiment: str, *, tracking_uri: str | None = None, out: str | Path | None = None
) -> Comparison:
    """Compare the transfer runs of ``experiment``: the CSV goes to ``out``, else into a new run of it."""
    client = registry_client(tracking_uri)
    rows = summarise(transfer_scores(client, experiment))
    table = format_table(rows)
    if out is not None:
        path = Path(out)
        path.write_text(to_csv(rows))
        return Comparison(rows, table, None, path)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=COMPARE_RUN_NAME, tags={TASK_TAG: COMPARE_TASK})
    client.log_text(run.info.run_id, to_csv(rows), CSV_ARTIFACT)
    client.log_text(run.info.run_id, table, TABLE_ARTIFACT)
    client.set_terminated(run.info.run_id)
    return Comparison(rows, table, run.info.run_id, None)
