"""``cromss pretrain`` and ``cromss finetune``: one training run on the Ray cluster.

``cromss pretrain --config FILE [--data URI] [--tracking-uri URI] [--set key=value ...]``
loads and validates a :class:`~cromss_ray.config.PretrainConfig` (an unknown key or a bad
value exits with code 2 and names the key), joins the cluster named by ``RAY_ADDRESS`` or
starts a local one on 127.0.0.1, and trains. Running it again with the same ``run.name``
and ``run.storage_path`` resumes from the latest checkpoint, provided the config is the
checkpoint's but for the keys that may change freely (``optim.epochs``, ...); any other
difference is refused before Ray starts, naming each key with its old and new value, unless
``--allow-config-change``, which continues with the new values and records them in the MLflow run.

``cromss finetune --config FILE [--init SOURCE] ...`` does the same for a
:class:`~cromss_ray.config.FinetuneConfig`: a single-modality network from a pretrained
encoder, registered at the end.
"""

from __future__ import annotations

import argparse

from cromss_ray.arguments import add_command, add_config_arguments, fail


ALLOW_CONFIG_CHANGE_HELP = (
    "resume the run's checkpoint although the config differs from its own (beyond the keys that may change "
    "freely, docs/reliability.md); the change is recorded in the MLflow run. Sets run.allow_config_change"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` and ``finetune`` subcommands."""
    parser = add_command(subparsers, "pretrain", _pretrain)
    add_config_arguments(parser)
    parser.add_argument("--allow-config-change", action="store_true", help=ALLOW_CONFIG_CHANGE_HELP)

    finetune = add_command(subparsers, "finetune", _finetune)
    add_config_arguments(finetune)
    finetune.add_argument("--allow-config-change", action="store_true", help=ALLOW_CONFIG_CHANGE_HELP)
    finetune.add_argument(
        "--init",
        metavar="SOURCE",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a paper checkpoint file, or 'random'; overrides model.init",
    )


def _pretrain(args: argparse.Namespace) -> int:
    """pretrain a multimodal network with CromSS on Ray Train.

    Pretrain a middle- or late-fusion S1/S2 network with CromSS on NoLDO-S12 shards across Ray
    Train workers; tracked in MLflow, the model registered under cromss-<fusion>-<bands>b.
    """
    from cromss_ray.config import PretrainConfig, load_config

    config = load_config(PretrainConfig, args.config, _overrides(args), data=args.data, tracking_uri=args.tracking_uri)

    from cromss_ray.train.cluster import init_ray
    from cromss_ray.train.loop import check_checkpoint
    from cromss_ray.train.pretrain import run_pretrain

    check_checkpoint(config)
    init_ray()
    outcome = run_pretrain(config)
    print(f"MLflow run {outcome.run_id} ({config.tracking.experiment})")
    if outcome.version is not None:
        aliases = ", ".join(f"@{alias}" for alias in config.tracking.aliases)
        print(f"registered model {config.registry_name()} version {outcome.version} {aliases}".rstrip())
    print(f"latest checkpoint {outcome.result.checkpoint.path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """fine-tune a single-modality network from a pretrained encoder on Ray Train.

    Train an smp segmentation network (any decoder) on downstream shards, its S1 or S2 encoder
    taken from a registered pretrained model, a paper checkpoint or random; frozen or fine-
    tuned. Tracked in MLflow, registered as cromss-ft-<dataset>-<decoder>.
    """
    from cromss_ray.config import ConfigError, FinetuneConfig, load_config

    overrides = [*_overrides(args), *([f"model.init={args.init}"] if args.init else [])]
    config = load_config(FinetuneConfig, args.config, overrides, data=args.data, tracking_uri=args.tracking_uri)

    from cromss_ray.tracking.model_uris import MODEL_URI_SCHEMES, ModelNotFoundError, registry_client, resolve_model_uri

    if config.model.init.startswith(MODEL_URI_SCHEMES):
        # Looked up before Ray, torch and the network load: a wrong --init fails in seconds.
        try:
            resolve_model_uri(registry_client(config.tracking.resolved_uri()), config.model.init)
        except ModelNotFoundError as exc:
            return fail("finetune", exc)
        except ValueError as exc:
            raise ConfigError(f"model.init: {exc}") from None

    from cromss_ray.train.cluster import init_ray
    from cromss_ray.train.finetune import resolve_init, run_finetune, training_config
    from cromss_ray.train.loop import check_checkpoint

    try:
        initialisation = resolve_init(config)
    except ModelNotFoundError as exc:
        return fail("finetune", exc)
    check_checkpoint(training_config(config, initialisation))
    init_ray()
    outcome = run_finetune(config, initialisation=initialisation)
    print(f"MLflow run {outcome.run_id} ({config.tracking.experiment}), initialised from {outcome.source.label}")
    keys = [f"test/{config.model.branch}/{name}" for name in ("oa", "miou", "mf1")]
    print("  ".join(f"{key} {outcome.test_metrics[key]:.4f}" for key in keys if key in outcome.test_metrics))
    if outcome.version is not None:
        print(f"registered model {outcome.registry_name} version {outcome.version}")
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, with ``run.allow_config_change=true`` for ``--allow-config-change``."""
    return [*args.overrides, *(["run.allow_config_change=true"] if args.allow_config_change else [])]
