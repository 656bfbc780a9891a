"""``cromss tune``: a Ray Tune sweep of pretraining runs, and ``cromss tune report NAME``.

``cromss tune --config FILE [--data URI] [--tracking-uri URI] [--set key=value ...]`` loads
a :class:`~cromss_ray.config.TuneConfig`, runs (or, when ``<run.storage_path>/<run.name>``
holds it, resumes) the sweep, prints the results table and exits 0; an interrupted sweep
exits 130 after saying how to resume. ``cromss tune report NAME`` prints the table of a
sweep again (also of a running one) from its folder, or from its MLflow parent run.
"""

from __future__ import annotations

import argparse
import sys

from cromss_ray.arguments import add_command, add_config_arguments

INTERRUPTED_EXIT = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "tune", _tune)
    add_config_arguments(
        parser,
        config_help="YAML sweep configuration (a TuneConfig)",
        config_required=False,
        example="tune.num_samples=8",
    )
    parser.set_defaults(tune_parser=parser)
    actions = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    report = actions.add_parser(
        "report",
        help="print the results table of a sweep again",
        description=(
            "Print the results table of sweep NAME (its run.name): from its folder under --storage-path "
            "when there (also while it runs), else from its MLflow parent run."
        ),
    )
    report.add_argument("name", metavar="NAME", help="the sweep's run.name")
    report.add_argument(
        "--storage-path", default="runs", metavar="DIR", help="the sweeps' run.storage_path (default: runs)"
    )
    report.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store (default: as for runs)")
    report.add_argument(
        "--experiment", default="cromss-tune", help="the sweeps' MLflow experiment (default: cromss-tune)"
    )
    report.set_defaults(handler=_report)


def _tune(args: argparse.Namespace) -> int:
    """sweep CromSS pretraining settings with Ray Tune (ASHA, random/grid/Optuna).

    Run a Ray Tune sweep of pretraining runs over the config's tune.search_space: one Ray Train
    run per trial, one MLflow child run per trial under the sweep's parent run, the best model
    registered with alias @best. Running the same command again resumes an interrupted sweep.
    """
    if args.config is None:
        args.tune_parser.error("--config is required to run a sweep (or use: cromss tune report NAME)")

    from cromss_ray.config import TuneConfig, load_config

    config = load_config(TuneConfig, args.config, args.overrides, data=args.data, tracking_uri=args.tracking_uri)

    from cromss_ray.tune.sweep import SweepStateError, run_sweep

    try:
        outcome = run_sweep(config)
    except SweepStateError as exc:
        print(f"cromss tune: {exc}", file=sys.stderr)
        return 1
    print(outcome.table)
    print(f"sweep folder {outcome.path}; MLflow parent run {outcome.parent_run_id} ({config.tune.experiment})")
    if outcome.interrupted:
        print(f"sweep '{outcome.name}' was interrupted; run the same command again to resume it", file=sys.stderr)
        return INTERRUPTED_EXIT
    if outcome.best is None:
        print(f"no trial completed with a value of {outcome.metric}", file=sys.stderr)
        return 1
    print(f"best trial {outcome.best.trial_id}: {outcome.metric} {outcome.best.best:.4g}; model {outcome.best_model}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from cromss_ray.tune.sweep import SweepStateError, sweep_report

    try:
        report = sweep_report(
            args.name, storage_path=args.storage_path, tracking_uri=args.tracking_uri, experiment=args.experiment
        )
    except (LookupError, SweepStateError) as exc:
        print(f"cromss tune report: {exc.args[0]}", file=sys.stderr)
        return 1
    print(report)
    return 0
