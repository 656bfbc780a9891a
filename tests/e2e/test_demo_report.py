"""scripts/demo_report.py reads the right runs of a real MLflow store into the demo's table."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "scripts" / "demo_report.py"
START_TIMES_MS = itertools.count(1_700_000_000_000, 1000)
"""Runs start one second apart, in the order they are logged."""


def log_run(
    client: MlflowClient, experiment: str, name: str, metrics: dict[str, float], status: str = "FINISHED"
) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name, start_time=next(START_TIMES_MS))
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def report(tracking_uri: str, best_model: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPORT), "--tracking-uri", tracking_uri, "--best-model", best_model],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('demo-store') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    clean = {"val_clean/s2/miou": 0.25, "val_clean/s1/miou": 0.125, "val_clean/fused/miou": 0.3}
    log_run(client, "cromss-pretrain", "demo-noisy-baseline", {**clean, "val_clean/s2/miou": 0.9})
    log_run(client, "cromss-pretrain", "demo-noisy-baseline", clean)
    log_run(client, "cromss-pretrain", "demo-noisy-baseline", {"val_clean/s2/miou": 0.99}, status="FAILED")
    selection = {"train/s2/selected_precision": 0.875, "train/s2/base_rate": 0.75, "train/s2/noise_auroc": 0.8125}
    log_run(client, "cromss-pretrain", "demo-cromss-mid", {"val_clean/s2/miou": 0.5, **selection})
    best_run = log_run(
        client,
        "cromss-tune",
        "trial-3",
        {"val_clean/s2/miou": 0.625, "val_clean/s1/miou": 0.5, **selection, "train/s2/noise_auroc": 0.90625},
    )
    client.create_registered_model("cromss-late-13b")
    version = client.create_model_version("cromss-late-13b", source=f"runs:/{best_run}/model", run_id=best_run)
    client.set_registered_model_alias("cromss-late-13b", "best", version.version)
    log_run(client, "cromss-finetune", "demo-ft-random", {"test/s2/miou": 0.375})
    log_run(client, "cromss-finetune", "demo-ft-cromss", {"test/s2/miou": 0.4375})
    return tracking_uri


def test_table_takes_the_latest_finished_run_of_each_name(demo_store: str) -> None:
    result = report(demo_store, "models:/cromss-late-13b@best")
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()[2:]}
    header = result.stdout.splitlines()[0]
    assert header.index("base rate") < header.index("S2 noise AUROC")
    assert header.index("S2 selection precision") < header.index("base rate")
    assert rows["random initialisation"][-7:] == ["-", "-", "-", "37.5", "-", "-", "-"]
    assert rows["noisy-label baseline (mid fusion)"][-7:] == ["25.0", "12.5", "30.0", "-", "-", "-", "-"]
    assert rows["CromSS, middle fusion"][-7:] == ["50.0", "-", "-", "-", "87.5", "75.0", "0.812"]
    assert rows["CromSS, late fusion"][-7:] == ["-", "-", "-", "-", "-", "-", "-"]
    best = next(line for label, line in rows.items() if label.startswith("CromSS, best of the sweep"))
    assert "(models:/cromss-late-13b@best)" in " ".join(best)
    assert best[-7:] == ["62.5", "50.0", "-", "43.8", "87.5", "75.0", "0.906"]


def test_a_best_model_that_is_not_an_alias_uri_is_refused(demo_store: str) -> None:
    result = report(demo_store, "models:/cromss-late-13b/1")
    assert result.returncode != 0
    assert "not of the form models:/NAME@ALIAS" in result.stderr
